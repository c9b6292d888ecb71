"""The toy world's procedural data (toy/make_toy_data.py): deterministic pictures whose captions are true."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy"))

import make_toy_data  # noqa: E402


def colour_at(image, x, y):
    return np.asarray(image)[int(y * make_toy_data.SIZE), int(x * make_toy_data.SIZE)].astype(int)


def close_to(pixel, name, tolerance=12):
    return np.abs(pixel - np.array(make_toy_data.COLOURS[name])).max() <= tolerance


def test_pictures_are_deterministic_and_their_captions_true():
    seen_shapes = set()
    for index in range(60):
        image, text, attributes = make_toy_data.toy_sample(index, seed=3)
        again, text_again, _ = make_toy_data.toy_sample(index, seed=3)
        assert image.tobytes() == again.tobytes() and text == text_again
        assert image.size == (64, 64)
        # The centre of the shape has the shape's colour, a far corner the background's.
        x, y = make_toy_data.PLACES[attributes["place"]]
        assert close_to(colour_at(image, x, y), attributes["colour"]), (text, colour_at(image, x, y))
        corner = (0.02, 0.02) if x > 0.4 or y > 0.4 else (0.97, 0.97)
        assert close_to(colour_at(image, *corner), attributes["background"]), text
        assert attributes["colour"] != attributes["background"]
        assert set(text.split()) <= set(make_toy_data.TOY_WORDS)
        seen_shapes.add(attributes["shape"])
    assert seen_shapes == set(make_toy_data.SHAPES)
    assert make_toy_data.toy_sample(0, seed=4)[0].tobytes() != make_toy_data.toy_sample(0, seed=3)[0].tobytes()


def test_a_pictures_mask_is_its_shape():
    """toy_sample(..., with_mask=True): the same picture, and a mask white where the shape's colour is."""
    for index in range(20):
        image, text, attributes, mask = make_toy_data.toy_sample(index, seed=3, with_mask=True)
        assert image.tobytes() == make_toy_data.toy_sample(index, seed=3)[0].tobytes()
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        painted = np.abs(pixels - make_toy_data.COLOURS[attributes["colour"]]).max(1) <= 12
        covered = np.asarray(mask).reshape(-1) > 127
        assert (painted == covered).mean() > 0.95, text  # (anti-aliased edges differ)


def test_a_subject_is_two_coloured_and_its_mask_covers_it():
    samples = make_toy_data.subject_samples(0, 6)
    shape, colour, stripes = make_toy_data.SUBJECTS[0]
    for image, mask, attributes in samples:
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        inside = np.asarray(mask).reshape(-1) > 250
        shown = {name for name in (colour, stripes)
                 if (np.abs(pixels[inside] - make_toy_data.COLOURS[name]).max(1) <= 12).mean() > 0.2}
        assert shown == {colour, stripes}, attributes  # both colours, in bands
        assert attributes["background"] not in (colour, stripes)
        outside = np.asarray(mask).reshape(-1) == 0  # (the resized edge rings a little)
        assert (np.abs(pixels[outside] - make_toy_data.COLOURS[attributes["background"]]).max(1) <= 12).mean() > 0.97
    assert len({attributes["background"] for _, _, attributes in samples}) > 1


def test_the_command_writes_pictures_captions_and_a_preview(tmp_path):
    make_toy_data.main(["--output_dir", str(tmp_path / "world"), "--count", "5"])
    assert sorted(os.listdir(tmp_path / "world"))[:2] == ["000000.png", "000000.txt"]
    assert open(tmp_path / "world" / "000000.txt").read().strip() == make_toy_data.toy_sample(0)[1]
    assert os.path.isfile(tmp_path / "world_preview.png")
    make_toy_data.main(["--output_dir", str(tmp_path / "subject"), "--subject", "1", "--count", "3"])
    assert len(os.listdir(tmp_path / "subject_masks")) == 3
    with pytest.raises(SystemExit):
        make_toy_data.main(["--output_dir", str(tmp_path / "x"), "--count", "0"])
