"""The configs frn-det ships (configs/: bases, synthetic/, coco/, lazy/), found the way detectron2's
model zoo finds its own: inside the installed package, so a non-editable install needs no checkout.
In a source tree frn_det/configs is a link to the checkout's configs/. The CPU study's grids
(configs/cpu_grid*) are not shipped: they belong to the checkout's experiments/."""
import os

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(config_path):
    """The path of a shipped config, e.g. ``get_config_file("synthetic/retinanet_R18_FPN_FRN.yaml")``.

    Raises FileNotFoundError naming the config and where it was looked for.
    """
    path = os.path.join(CONFIG_ROOT, config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_path!r} is not a config shipped with frn-det (looked in {CONFIG_ROOT})")
    return path


def get_config(config_path, opts=()):
    """The yacs config of a shipped config file (frn_det.engine.load_cfg: MODEL.FRN.* added and checked)."""
    from .engine.config import load_cfg

    return load_cfg(get_config_file(config_path), opts)
