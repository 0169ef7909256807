import numpy as np
import pytest

from benchmarks.toycanvas.render import make_dataset, render, sample_image, sample_scene
from benchmarks.toycanvas.world import (
    CAPTION_TEMPLATE,
    OBJECTS,
    STYLES,
    UNSAFE_OBJECT,
    caption,
    concept_kind,
    paraphrases,
)


def test_world_is_at_least_ten_by_ten_with_an_unsafe_object():
    assert len(OBJECTS) >= 10 and len(STYLES) >= 10
    assert UNSAFE_OBJECT in OBJECTS


def test_captions_follow_unlearncanvas_template_and_paraphrases_differ():
    assert CAPTION_TEMPLATE == "A {object} image in {style} style."
    assert caption("star", "Stripes") == "A star image in Stripes style."
    training = {caption(o, s) for o in OBJECTS for s in STYLES}
    for o in OBJECTS[:3]:
        assert not training & set(paraphrases(o, "Dots"))


def test_concept_kind():
    assert concept_kind("star") == "object" and concept_kind("stripes") == "style"
    with pytest.raises(KeyError):
        concept_kind("nudity")


def test_rendering_is_seeded():
    a, _ = sample_image("star", "Dots", seed=3)
    b, _ = sample_image("star", "Dots", seed=3)
    c, _ = sample_image("star", "Dots", seed=4)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_every_pair_renders_at_32px():
    images, objects, styles = make_dataset(len(OBJECTS) * len(STYLES), seed=0)
    assert images.shape == (100, 32, 32, 3)
    assert sorted(set(zip(objects.tolist(), styles.tolist()))) == [(o, s) for o in range(10) for s in range(10)]


def _texture_energy(image) -> float:
    pixels = np.asarray(image).astype(float)
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


def test_styles_differ_in_more_than_colour():
    """Colour is drawn independently of style, and textured styles carry far more local contrast than a flat fill
    of the same scene in the same colour: erasing a style cannot be done by erasing a colour."""
    from benchmarks.toycanvas.world import COLORS

    rng = np.random.default_rng(0)
    for style in ("Stripes", "Outline"):
        assert {sample_scene(rng, style=style).color for _ in range(300)} == set(COLORS)
    scene = sample_scene(np.random.default_rng(0), "square", "Flat", color="blue")
    flat = _texture_energy(render(scene))
    for style in ("Stripes", "Hatch", "Dots", "Checker", "Speckle", "Rings", "Mosaic"):
        assert _texture_energy(render(scene.__class__(**{**scene.__dict__, "style": style}))) > 1.5 * flat, style


def test_count_places_several_objects():
    scene = sample_scene(np.random.default_rng(1), "heart", "Flat", count=3)
    assert scene.count == 3
