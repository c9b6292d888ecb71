"""What lands beside the weights: args.json, the model card, the metadata other tools read, readable files."""

import json
import os
import stat

import pytest
import torch
import yaml
from conftest import train_argv
from safetensors import safe_open
from safetensors.torch import load_file

import train_dreambooth
from common import adapters


def metadata(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_args_json_repeats_the_run_bit_for_bit(tiny_model, subject_dir, tmp_path):
    """args.json holds every flag as settled (the seed it drew included, no --config key); fed back with --config
    it trains the same weights."""
    argv = [a for a in train_argv(tiny_model("sd1"), subject_dir, tmp_path / "first", "--max_train_steps", "2",
                                  "--lora_alpha", "2") if a not in ("--seed", "7")]  # unseeded: the seed is drawn
    train_dreambooth.main(argv)
    saved = json.load(open(tmp_path / "first" / "args.json"))
    assert saved["lora_alpha"] == 2 and isinstance(saved["seed"], int) and "config" not in saved
    assert saved["mixed_precision"] == "no"  # settled, not left empty
    train_dreambooth.main(["--config", str(tmp_path / "first" / "args.json"), "--output_dir", str(tmp_path / "again")])
    first = load_file(str(tmp_path / "first" / adapters.LORA_WEIGHTS_NAME))
    again = load_file(str(tmp_path / "again" / adapters.LORA_WEIGHTS_NAME))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_model_card_and_metadata_describe_the_run_for_the_hub_and_kohya_tools(tiny_model, subject_dir, tmp_path,
                                                                                  family):
    model = tiny_model(family)
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--checkpointing_steps", "2", "--validation_prompt",
                                     "a ohwx toy", "--validation_steps", "3", "--num_validation_images", "1",
                                     "--validation_num_inference_steps", "2", "--lora_alpha", "8",
                                     *(["--lora_format", "comfyui"] if family == "sdxl" else [])))
    card = open(out / "README.md", encoding="utf-8").read()
    front = yaml.safe_load(card.split("---")[1])
    base = os.path.basename(model)  # a local base model is named, never given by its absolute path
    assert front["base_model"] == base and front["instance_prompt"] == "a photo of ohwx toy"
    assert {"dreambooth", "lora", "text-to-image"} <= set(front["tags"])
    assert model not in card and f"# a photo of ohwx toy: a DreamBooth LoRA of {base}" in card
    # the last validation round's grid (step 4, the end: not step 3) is embedded, and the file it names exists
    assert "![validation images at step 4](validation/step-4/grid.png)" in card and \
        (out / "validation" / "step-4" / "grid.png").is_file()
    assert f'pipe.load_lora_weights("path/to/this/folder", weight_name="{adapters.LORA_WEIGHTS_NAME}")' in card
    assert (adapters.KOHYA_WEIGHTS_NAME in card) == (family == "sdxl")
    assert (out / "checkpoint-2" / "README.md").is_file()  # each checkpoint carries its own card
    meta = metadata(out / adapters.LORA_WEIGHTS_NAME)
    assert meta["base_model"] == meta["ss_sd_model_name"] == base
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and meta["ss_steps"] == "4"
    assert meta["ss_base_model_version"] == {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family]
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"a photo of ohwx toy": 1}}
    assert meta["modelspec.architecture"] == {"sdxl": "stable-diffusion-xl-v1-base/lora",
                                              "flux": "flux-1-dev/lora"}[family]
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.trigger_phrase"] == "a photo of ohwx toy"
    assert meta["modelspec.title"] == f"a photo of ohwx toy: a DreamBooth LoRA of {base}"
    for name in ("README.md", "args.json", adapters.LORA_WEIGHTS_NAME, "checkpoint-2/trainable.safetensors",
                 "validation/step-4/grid.png"):  # readable by other users (0644 under the usual umask)
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~0o022, name


def test_mixed_precision_follows_accelerate_launch_and_traps_are_warned(tiny_model, subject_dir, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config
    args = train_dreambooth.parse_args(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out"))
    train_dreambooth.check_args(args)
    assert args.mixed_precision == "bf16"
    args = train_dreambooth.parse_args(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out",
                                                  "--mixed_precision", "no"))
    train_dreambooth.check_args(args)
    assert args.mixed_precision == "no"  # the flag wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    # One epoch of a few photos is a handful of steps; captions from file names when the prompt is left out
    argv = train_argv(tiny_model("sd1"), subject_dir, tmp_path / "short")
    argv = argv[:argv.index("--max_train_steps")] + argv[argv.index("--max_train_steps") + 2:]
    argv = argv[:argv.index("--instance_prompt")] + argv[argv.index("--instance_prompt") + 2:]
    train_dreambooth.main(argv)
    out = capsys.readouterr().out
    assert "is too few to learn a subject" in out and "set --max_train_steps" in out
    assert "captions come from the file names" in out


def test_tensorboard_gets_the_run_s_scalars_config_and_validation_grid(tiny_model, subject_dir, tmp_path):
    """--report_to tensorboard (the default): the event file holds every logged step's loss (equal to the JSONL
    log's), the run's flags, and the validation grid as an image of the grid's size."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common import checkpoints, images

    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "3",
                                     "--validation_prompt", "a ohwx toy", "--validation_steps", "2",
                                     "--num_validation_images", "1", "--validation_num_inference_steps", "2"))
    folder = out / "logs" / checkpoints.TRACKER_PROJECT
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    logged = {r["step"]: r["loss"] for r in checkpoints.read_log(str(out / "logs" / checkpoints.LOG_FILE))
              if "loss" in r}
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars.keys() == logged.keys() == {1, 2, 3}
    assert all(abs(scalars[s] - logged[s]) < 1e-6 for s in logged)  # TensorBoard stores float32
    pictures = events.Images("validation")
    assert [p.step for p in pictures] == [2, 3]
    width, height = images.load_image(str(out / "validation" / "step-3" / "grid.png")).size
    assert (pictures[-1].width, pictures[-1].height) == (width, height)
    hparams = [open(os.path.join(root, name)).read() for root, _, names in os.walk(folder) for name in names
               if name == "hparams.yml"]
    assert len(hparams) == 1 and yaml.safe_load(hparams[0])["max_train_steps"] == 3


def test_report_to_none_writes_no_tracker_and_wandb_missing_is_named(tiny_model, subject_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "1",
                                     "--report_to", "none"))
    assert sorted(os.listdir(out / "logs")) == ["train_log.jsonl"]
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        importlib.machinery.PathFinder.find_spec(name))
    with pytest.raises(SystemExit, match="pip install wandb"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "w", "--report_to", "wandb"))
    assert not (tmp_path / "w").exists()


def test_wandb_offline_gets_the_validation_grids(tiny_model, subject_dir, tmp_path, monkeypatch):
    """--report_to wandb with WANDB_MODE=offline (wandb is optional: skipped where it is not installed): the run is
    written locally, each validation grid as an image of the grid's size at its step."""
    pytest.importorskip("wandb")
    from common import images

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "3", "--report_to",
                                     "wandb", "--validation_prompt", "a ohwx toy", "--validation_steps", "2",
                                     "--num_validation_images", "1", "--validation_num_inference_steps", "2"))
    media = sorted((tmp_path / "wandb").glob("wandb/offline-run-*/files/media/images/validation_*.png"))
    assert sorted(int(p.name.split("_")[1]) for p in media) == [2, 3]
    for path in media:
        step = path.name.split("_")[1]
        assert images.load_image(str(path)).size == images.load_image(
            str(out / "validation" / f"step-{step}" / "grid.png")).size
