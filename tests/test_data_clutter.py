"""The cluttered synthetic task: the same objects (classes, sizes, places, colours, annotations) as
the plain task, on a background with unlabelled distractors and high-frequency texture; and its
registration as frn_synthetic_clutter_{train,val}."""
import dataclasses

import numpy as np
import pytest
from detectron2.data import MetadataCatalog

import frn_det  # noqa: F401  (registers the synthetic datasets)
from frn_det.data import ensure_synthetic, register_synthetic, synthetic
from frn_det.data.synthetic import CLUTTERED_SPEC, SyntheticSpec, render_image

PLAIN = SyntheticSpec()
INDICES = range(12)


def _box(g, k):
    """k x k mean (k odd) of a 2-D array, same size (edges replicated)."""
    c = np.pad(np.pad(g, k // 2, mode="edge"), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def _fine_structure(img, keep):
    """Mean |3x3 mean - 9x9 mean| of the grey image where ``keep``: detail at the scale of a few
    pixels (strokes, gratings, edges), not per-pixel noise, which the 3x3 mean mostly removes."""
    g = img.astype(np.float64).mean(axis=2)
    return np.abs(_box(g, 3) - _box(g, 9))[keep].mean()


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_objects_and_pixels_on_them_only_the_background_differs(split):
    ratios = []
    for index in INDICES:
        plain_img, plain_objs = render_image(PLAIN, split, index)
        clut_img, clut_objs = render_image(CLUTTERED_SPEC, split, index)
        assert [c for c, _, _ in clut_objs] == [c for c, _, _ in plain_objs]
        painted = np.zeros(plain_img.shape[:2], bool)
        for (_, pv, pm), (_, cv, cm) in zip(plain_objs, clut_objs):
            assert np.array_equal(pv, cv) and np.array_equal(pm, cm)
            painted |= pm
        assert np.array_equal(plain_img[painted], clut_img[painted])  # colours and textures unchanged
        background = ~painted
        assert np.abs(plain_img[background].astype(int) - clut_img[background]).mean() > 5
        ratios.append(_fine_structure(clut_img, background) / _fine_structure(plain_img, background))
    # the scene, not only the objects, now puts fine structure into every plane (1.4-3.4x measured)
    assert min(ratios) > 1.25 and np.mean(ratios) > 1.5, ratios


def test_cluttered_images_are_deterministic_and_differ_between_images():
    a, _ = render_image(CLUTTERED_SPEC, "train", 5)
    b, _ = render_image(CLUTTERED_SPEC, "train", 5)
    c, _ = render_image(CLUTTERED_SPEC, "train", 6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_each_option_alone_changes_the_background():
    plain, _ = render_image(PLAIN, "val", 0)
    for spec in (dataclasses.replace(PLAIN, clutter=5), dataclasses.replace(PLAIN, texture=24.0)):
        img, _ = render_image(spec, "val", 0)
        assert not np.array_equal(img, plain)


@pytest.mark.parametrize("bad", [{"clutter": -1}, {"texture": -1.0}, {"texture": 300.0}])
def test_bad_clutter_settings_are_named(bad):
    with pytest.raises(ValueError, match="clutter >= 0 and 0 <= texture <= 255"):
        SyntheticSpec(**bad)


def test_cluttered_task_is_registered_beside_the_plain_one_and_generated_with_its_spec(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda spec, root, progress=True: calls.append((spec, root)))
    root = str(tmp_path / "frn_synthetic")
    try:
        register_synthetic(root)
        assert MetadataCatalog.get("frn_synthetic_clutter_val").synthetic_root == root + "_clutter"
        assert MetadataCatalog.get("frn_synthetic_clutter_train").thing_classes == list(synthetic.CLASSES)
        ensure_synthetic(["frn_synthetic_clutter_train", "frn_synthetic_clutter_val", "frn_synthetic_val"])
    finally:
        register_synthetic()
    assert sorted(calls, key=lambda c: c[1]) == [(PLAIN, root), (CLUTTERED_SPEC, root + "_clutter")]
