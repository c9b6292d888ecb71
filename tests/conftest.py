"""Fixtures: tiny randomly initialised diffusers models (built in well under a second) and small image sets.

The model configs live in examples/make_demo.py (the demo builds the same tiny models); each family is built
once per test session into a temporary folder and loaded from there like any local model."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded during the tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import pytest  # noqa: E402

import make_demo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, prediction_type="epsilon") -> path of a saved tiny pipeline (cached per session)."""
    built = {}

    def get(family="sd1", prediction_type="epsilon"):
        key = (family, prediction_type)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"model-{family}-{prediction_type}")
            built[key] = make_demo.build_tiny_model(str(folder), family, prediction_type)
        return built[key]

    return get


@pytest.fixture
def subject_dir(tmp_path):
    """Eight synthetic subject images: four square, two portrait, two landscape."""
    return make_demo.make_subject_images(str(tmp_path / "subject"))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle)
    return str(path)


def train_argv(model, data_dir, output_dir, *extra, prompt="a photo of ohwx toy", resolution=64):
    """Command-line flags for a short, fast training run on a tiny model."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data_dir, "--instance_prompt", prompt,
            "--output_dir", str(output_dir), "--resolution", str(resolution), "--seed", "7", "--train_batch_size", "2",
            "--max_train_steps", "4", "--learning_rate", "1e-3", "--lora_rank", "4", *map(str, extra)]
