"""The shipped toy scorer (toy/scorer.safetensors) reads the toy world's pictures right."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy"))

import make_toy_data  # noqa: E402
import toy_scorer  # noqa: E402


def test_the_shipped_scorer_classifies_fresh_procedural_pictures():
    scorer = toy_scorer.load_scorer()
    scores = toy_scorer.accuracy(scorer, count=300, seed=777)  # a seed neither training nor the script used
    assert set(scores) == {"shape", "colour", "background", "size", "place"}
    assert all(value >= 0.95 for value in scores.values()), scores


def test_its_features_tell_a_subject_from_the_world():
    scorer = toy_scorer.load_scorer()
    subject = [image for image, _, _ in make_toy_data.subject_samples(0, 6)]
    world = [make_toy_data.toy_sample(i, 5)[0] for i in range(6)]
    with torch.no_grad():
        a, b = (torch.nn.functional.normalize(scorer.features(toy_scorer.to_pixels(x)), dim=-1)
                for x in (subject, world))
    assert a.shape == (6, 128)
    within = (a @ a.T)[~torch.eye(6, dtype=bool)].mean()
    across = (a @ b.T).mean()
    assert within > across  # pictures of one subject are closer to each other than to other pictures


def test_a_missing_scorer_file_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="python toy/toy_scorer.py --output"):
        toy_scorer.load_scorer(str(tmp_path / "none.safetensors"))
