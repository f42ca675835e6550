"""The one place where frn_det patches detectron2: the norm name "FRN" in detectron2's closed
``get_norm``, so that stock builders and model-zoo configs accept it (MODEL.RESNETS.NORM,
MODEL.FPN.NORM, MODEL.RETINANET.NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM).
Applied by ``import frn_det``; :func:`uninstall` restores detectron2 exactly.

``get_norm`` is a literal dict inside a function that every consumer binds by name at import, so
:func:`install` rebinds it wherever a loaded module bound the stock function (detectron2's consumers,
and user modules that imported it before frn_det; modules imported later bind the patched name from
``detectron2.layers``). ``build_model`` / ``build_backbone`` are rebound the same way, to read
MODEL.FRN from the cfg being built (once per build) and to apply the paper's placement to the
result (:func:`frn_det.modeling.apply_frn_placement`), and MODEL.RESNETS.ZERO_INIT_RESIDUAL for
every norm (:func:`frn_det.modeling.zero_init_residual_norms`).

``get_norm("FRN", C)`` returns a ``FilterResponseNorm2d`` without TLU with the eps and implementation
of the current :func:`frn_options`. Models from ``build_model`` / ``build_backbone`` that contain FRN
also log one line saying what a BatchNorm checkpoint did to their FRN layers, besides detectron2's
missing / unused key lists.
"""
import contextlib
import contextvars
import dataclasses
import functools
import logging
import sys
from typing import NamedTuple

import detectron2.modeling  # noqa: F401  (loads every stock consumer of get_norm before patching)
from detectron2.layers import batch_norm
from detectron2.modeling.backbone import build as backbone_build
from detectron2.modeling.meta_arch import build as meta_arch_build

from ..layers import FilterResponseNorm2d
from .config import FRNOptions
from .placement import apply_frn_placement
from .residual_init import zero_init_residual_norms

__all__ = ["NORM_NAME", "frn_options", "current_options", "get_norm", "install", "uninstall", "is_installed"]

NORM_NAME = "FRN"
# The names of detectron2's get_norm dict (tests check each is still accepted by the stock function).
STOCK_NORM_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


class _Scope(NamedTuple):
    options: FRNOptions
    building: bool  # inside build_model / build_backbone, which place once when the outermost returns


_SCOPE = contextvars.ContextVar("frn_det_scope", default=_Scope(FRNOptions(), False))


def current_options() -> FRNOptions:
    """The options ``get_norm("FRN")`` builds with now."""
    return _SCOPE.get().options


@contextlib.contextmanager
def frn_options(cfg=None, **overrides):
    """Build FRN layers with ``cfg.MODEL.FRN`` (plus ``overrides``: eps, learned_eps, activation, impl).

    ``build_model(cfg)`` and ``build_backbone(cfg)`` enter this context themselves; use it when
    building parts (a head, a ResNet) by hand, then call ``apply_frn_placement(part, options)``
    with the options it yields. A cfg without MODEL.FRN keeps the current options.
    """
    scope = _SCOPE.get()
    options = (FRNOptions.from_cfg(cfg) if cfg is not None else None) or scope.options
    options = dataclasses.replace(options, **overrides)
    token = _SCOPE.set(scope._replace(options=options))
    try:
        yield options
    finally:
        _SCOPE.reset(token)


class UnknownNormError(KeyError):
    def __str__(self):  # KeyError would print the message quoted
        return str(self.args[0])


_STOCK_GET_NORM = batch_norm.get_norm


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` plus the name "FRN" (FRN without TLU; eps, impl and variant from the options)."""
    if isinstance(norm, str) and norm == NORM_NAME:
        options = current_options()
        groups = options.num_groups or None
        if groups is not None and out_channels % groups:
            raise ValueError(f"MODEL.FRN.NUM_GROUPS {groups} does not divide an FRN layer's {out_channels} channels")
        return FilterResponseNorm2d(out_channels, eps=options.eps, tlu=False, impl=options.impl, num_groups=groups,
                                    centered=options.centered)
    try:
        return _STOCK_GET_NORM(norm, out_channels)
    except KeyError:
        if not isinstance(norm, str):
            raise
        names = ", ".join(STOCK_NORM_NAMES + (NORM_NAME,))
        raise UnknownNormError(f"Unknown norm {norm!r}; valid names: {names} (or '' for none)") from None


def _report_bn_checkpoint(model, incompatible_keys):
    """Load-state-dict post-hook: say in one line what loading BatchNorm entries into FRN layers did."""
    frns = [n for n, m in model.named_modules() if isinstance(m, FilterResponseNorm2d)]
    from_bn = [n for n in frns if f"{n}.running_mean" in incompatible_keys.unexpected_keys]
    if from_bn:
        logging.getLogger(__name__).warning(
            f"{len(from_bn)} of {len(frns)} FRN layers were loaded from BatchNorm entries (e.g. {from_bn[0]}): "
            "BN weight/bias became FRN gamma/beta, running statistics were ignored, TLU tau and eps_l keep "
            "their initial values.")


def _cfg_scoped(builder):
    """A stock builder ``builder(cfg, ...)`` that builds inside ``frn_options(cfg)`` and places FRN.

    Nested builds (build_model calls build_backbone) reuse the outer scope: the options are entered
    and the placement applied once, by the outermost builder, to the whole result.
    """

    @functools.wraps(builder)
    def build(cfg, *args, **kwargs):
        if _SCOPE.get().building:
            return builder(cfg, *args, **kwargs)
        with frn_options(cfg) as options:
            token = _SCOPE.set(_SCOPE.get()._replace(building=True))
            try:
                module = builder(cfg, *args, **kwargs)
            finally:
                _SCOPE.reset(token)
        if any(isinstance(m, FilterResponseNorm2d) for m in module.modules()):
            apply_frn_placement(module, options)
            module.register_load_state_dict_post_hook(_report_bn_checkpoint)
        resnets = getattr(getattr(cfg, "MODEL", None), "RESNETS", None)
        if resnets is not None and resnets.get("ZERO_INIT_RESIDUAL", False):
            zero_init_residual_norms(module)
        return module

    return build


_STOCK_BUILD_MODEL = meta_arch_build.build_model
_STOCK_BUILD_BACKBONE = backbone_build.build_backbone
# (stock function, replacement): rebound under the same name in every loaded module.
_FUNCTIONS = (
    (_STOCK_GET_NORM, get_norm),
    (_STOCK_BUILD_MODEL, _cfg_scoped(_STOCK_BUILD_MODEL)),
    (_STOCK_BUILD_BACKBONE, _cfg_scoped(_STOCK_BUILD_BACKBONE)),
)


def _rebind(old, new):
    # Every loaded module, not only detectron2's: scripts and plugins commonly import build_model or
    # get_norm from detectron2 before importing frn_det (isort puts detectron2 first).
    for name, module in list(sys.modules.items()):
        if name != __name__ and getattr(module, "__dict__", {}).get(old.__name__) is old:
            setattr(module, old.__name__, new)


def is_installed() -> bool:
    return batch_norm.get_norm is get_norm


def install():
    """Patch detectron2 so the norm name "FRN" works (idempotent)."""
    if not is_installed():
        for stock, ours in _FUNCTIONS:
            _rebind(stock, ours)


def uninstall():
    """Restore detectron2's own functions (idempotent). Built models are unaffected."""
    if is_installed():
        for stock, ours in _FUNCTIONS:
            _rebind(ours, stock)
