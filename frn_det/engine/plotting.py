"""One matplotlib set-up for every figure frn-det writes (demo, error analysis, the comparison's
plots): the file backend, a grid of axes, layout, save and close."""
import contextlib

NORM_COLORS = {"BN": "tab:blue", "SyncBN": "tab:purple", "GN": "tab:orange", "FRN": "tab:green",
               "FRN centered": "tab:red"}


def norm_color(label):
    """One colour per norm in every plot, so BN, GN and FRN read the same across figures; ``label`` is
    a norm or a group's "norm variant" (a variant with a colour of its own keeps it: the centred FRN)."""
    return NORM_COLORS.get(label, NORM_COLORS.get(label.split()[0], "tab:gray"))


@contextlib.contextmanager
def figure(path, nrows=1, ncols=1, panel_size=(6, 3.5), extra_width=0.0, dpi=120, sharey=False, tight_bbox=False):
    """Yields (fig, axes: an nrows x ncols array) and writes the figure to ``path`` when the block
    ends (``tight_bbox``: cropped to what is drawn, legends beside the panels included); the figure
    is closed either way (a failed plot leaks no memory into a long process)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharey=sharey,
                             figsize=(panel_size[0] * ncols + extra_width, panel_size[1] * nrows))
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight_bbox else {}))
    finally:
        plt.close(fig)
