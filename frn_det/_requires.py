"""The one message for "this part of frn_det needs detectron2"."""

DETECTRON2_MISSING = (
    "{what} needs detectron2, which is not installed in this environment (the FRN layers and op in "
    "frn_det.layers work without it). detectron2 has no package on PyPI under that name: run "
    "`make test` in the frn-det checkout (installs it into .venv by the verified recipe in README.md), "
    "or install upstream detectron2 from its git repository "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git')."
)


def detectron2_missing(what: str) -> ImportError:
    return ImportError(DETECTRON2_MISSING.format(what=what))


def require_detectron2(what: str) -> None:
    """Raise the ImportError above, naming ``what``, when detectron2 does not import."""
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise detectron2_missing(what) from e
