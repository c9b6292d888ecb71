"""Commands that carry over: diffusers' example flags (--rank, --output_kohya_format, --with_prior_preservation
and its class images, --pretrained_vae_model_name_or_path), --output_name, and a --help that says every default."""

import argparse
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import train_argv
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import make_regularisation
import train_dreambooth
from common import adapters, caches, data, flags, models


def test_help_gives_every_training_flag_a_meaning_and_its_default():
    parser = train_dreambooth.build_parser()
    formatter = parser._get_formatter()
    shown = {action.option_strings[0]: formatter._get_help_string(action) for action in parser._actions
             if action.option_strings and action.default is not argparse.SUPPRESS}
    assert len(shown) > 100
    assert [flag for flag, text in shown.items() if len(text.split("(default")[0].split()) < 2] == []
    assert [flag for flag, text in shown.items() if "default" not in text.lower()] == []
    text = parser.format_help()  # argparse %-formats the help: a stray % would raise here
    assert "--learning_rate LEARNING_RATE\n" in text and "(default: 0.0001)" in text
    assert "(default: off)" in text and "(default: none)" in text


@pytest.mark.parametrize("script", ["cache_latents", "evaluate", "make_masks", "make_regularisation", "rare_tokens"])
def test_every_other_script_s_help_gives_each_flag_a_meaning_and_its_default(script, monkeypatch):
    import importlib

    class Built(Exception):
        pass

    def stop(parser, *args, **kwargs):  # the script's parser, as it is about to read the command line
        raise Built(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(Built) as built:
        importlib.import_module(script).parse_args([])
    parser = built.value.args[0]
    assert parser.formatter_class is flags.HelpFormatter
    assert [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help] == []
    parser.format_help()  # no stray % in any help


def test_a_diffusers_command_trains_with_prior_preservation_and_its_own_class_images(tiny_model, subject_dir,
                                                                                    tmp_path):
    """diffusers' names: --rank, --output_kohya_format, and --with_prior_preservation, whose missing class images
    the base model makes exactly as make_regularisation.py does; a second run makes none."""
    model, classes, out = tiny_model("sd1"), tmp_path / "class", tmp_path / "out"
    argv = train_argv(model, subject_dir, out, "--max_train_steps", "2", "--report_to", "none")
    del argv[argv.index("--lora_rank"):argv.index("--lora_rank") + 2]
    argv += ["--rank", "2", "--output_kohya_format", "--with_prior_preservation", "--class_data_dir", str(classes),
        "--class_prompt", "a photo of toy", "--num_class_images", "2"]
    train_dreambooth.main(argv)
    made = sorted(glob.glob(str(classes / "*.png")))
    assert len(made) == 2
    make_regularisation.main(["--pretrained_model_name_or_path", model, "--class_prompt", "a photo of toy",
                              "--num_images", "2", "--output_dir", str(tmp_path / "by_hand")])
    for path in made:
        assert np.array_equal(np.asarray(Image.open(path)),
                              np.asarray(Image.open(tmp_path / "by_hand" / os.path.basename(path))))
    saved = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    assert {tuple(v.shape)[0] for k, v in saved.items() if k.endswith("lora.down.weight")} == {2}  # --rank 2
    assert (out / adapters.KOHYA_WEIGHTS_NAME).is_file()  # --output_kohya_format
    args = train_dreambooth.parse_args(argv)
    datasets = data.load_datasets(args)
    assert [(d.id, d.is_regularisation_data, d.instance_prompt) for d in datasets] == [
        ("instance", False, "a photo of ohwx toy"), ("class", True, "a photo of toy")]
    stamps = {path: os.stat(path).st_mtime_ns for path in made}
    data.make_class_images(args, print)  # what the next run does first: the folder is full, nothing is made
    assert {path: os.stat(path).st_mtime_ns for path in made} == stamps


def test_class_images_of_its_own_too_few_are_refused_with_the_fix(tiny_model, subject_dir, tmp_path):
    classes = tmp_path / "class"
    classes.mkdir()
    shutil.copy(glob.glob(os.path.join(subject_dir, "*"))[0], classes / "mine.png")
    argv = train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--with_prior_preservation",
                      "--class_data_dir", classes, "--class_prompt", "a toy", "--num_class_images", "5")
    try:
        train_dreambooth.main(argv)
    except SystemExit as err:
        assert "1 images, fewer than --num_class_images 5" in str(err) and "give an empty folder" in str(err)
    else:
        raise AssertionError("a short folder of the user's own images was not refused")
    assert os.listdir(classes) == ["mine.png"]


def test_a_vae_given_on_its_own_encodes_the_cache_and_draws(tiny_model, subject_dir, tmp_path):
    """--pretrained_vae_model_name_or_path (SDXL's fp16-fix VAE is the common case): the latents are that VAE's,
    the cache knows it is another VAE, and the pipeline draws with it."""
    model = tiny_model("sdxl")
    other = tmp_path / "other_vae"
    shutil.copytree(os.path.join(model, "vae"), other)
    weights = glob.glob(str(other / "*.safetensors"))[0]
    state = load_file(weights)
    save_file({k: v * 1.5 if k.endswith("conv_in.weight") else v for k, v in state.items()}, weights)
    runs = {}
    for name, extra in (("own", []), ("other", ["--pretrained_vae_model_name_or_path", str(other)])):
        out = tmp_path / name
        argv = train_argv(model, subject_dir, out, "--max_train_steps", "1", "--report_to", "none", *extra)
        train_dreambooth.main(argv)
        args = train_dreambooth.parse_args(argv)
        info = models.resolve_model(args)
        cached = sorted(glob.glob(str(out / "cache" / "vae" / "**" / "*.safetensors"), recursive=True))[0]
        with safe_open(cached, "pt") as handle:
            runs[name] = handle.get_tensor(handle.keys()[0]), caches.cache_metadata(cached)["vae"]
        vae = models.load_component(info, "vae")
        assert torch.equal(vae.encoder.conv_in.weight, (state["encoder.conv_in.weight"] * (1.5 if extra else 1)))
    assert not torch.equal(runs["own"][0], runs["other"][0]) and runs["own"][1] != runs["other"][1]


def test_output_name_names_every_adapter_file_and_the_tools_find_it(tiny_model, subject_dir, tmp_path):
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--output_name", "ohwx_toy", "--use_ema",
                                     "--lora_format", "comfyui", "--checkpointing_steps", "2", "--report_to", "none"))
    names = {"ohwx_toy.safetensors", "ohwx_toy_ema.safetensors", "ohwx_toy_comfyui.safetensors",
             "ohwx_toy_ema_comfyui.safetensors"}
    for folder in (out, out / "checkpoint-2"):
        assert names <= set(os.listdir(folder)) and not glob.glob(str(folder / "pytorch_lora_weights*"))
        assert all(os.stat(folder / n).st_mode & 0o044 == 0o044 for n in names)  # others may read them
    assert 'weight_name="ohwx_toy.safetensors"' in open(out / "README.md", encoding="utf-8").read()
    targets = evaluate.find_targets(str(out), None, "raw")
    assert [(t[0], os.path.basename(t[3] or "")) for t in targets] == [
        ("base", ""), ("checkpoint-2", "ohwx_toy.safetensors"), ("final", "ohwx_toy.safetensors")]
    info = models.resolve_model(train_dreambooth.parse_args(train_argv(tiny_model("sd1"), subject_dir, out)))
    pipe = adapters.load_adapter(models.load_pipeline(info), str(out))  # the folder: args.json names the file
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_output_name_must_be_a_plain_file_name(tiny_model, subject_dir, tmp_path):
    for bad in ("sub/name", "name.safetensors", " "):
        try:
            train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--output_name", bad))
        except SystemExit as err:
            assert "--output_name" in str(err)
        else:
            raise AssertionError(bad)
    assert flags.option_names(train_dreambooth.build_parser()) >= {"rank", "output_kohya_format", "output_name"}
