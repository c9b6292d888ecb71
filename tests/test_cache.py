"""cache_latents.py: safetensors caches that are fingerprinted, atomic, resumable, and skip all model work when
up to date."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, write_json
from safetensors import safe_open

import cache_latents
from common import caches, files, images, models


def cache_argv(model, data_config, tmp_path, *extra):
    return ["--pretrained_model_name_or_path", model, "--data_backend_config", data_config,
            "--output_dir", str(tmp_path / "out"), "--seed", "1", *extra]


def data_config(tmp_path, subject_dir, **overrides):
    return write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy", "resolution": 128,
         "cache_dir_vae": str(tmp_path / "vae"), **overrides},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "text")},
    ])


def cache_files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def dead_pid():
    """The pid of a process that has exited and been reaped: a temporary file named after it is a leftover."""
    process = subprocess.Popen(["true"])
    process.wait()
    assert not files.process_alive(process.pid)
    return process.pid


def refuse_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded although the cache is up to date")

    monkeypatch.setattr(models, "load_component", fail)


def test_cache_entry_holds_latent_distribution_and_its_provenance(tiny_model, subject_dir, tmp_path):
    plans = cache_latents.main(cache_argv(tiny_model("sd1"), data_config(tmp_path, subject_dir), tmp_path))
    entry = next(e for e in plans["subject"] if e.transform["original_size"] == [128, 256])
    width, height = entry.transform["target_size"]
    assert entry.cache_path.endswith(f"{entry.relpath}-{width}x{height}.safetensors")
    with safe_open(entry.cache_path, "pt") as handle:
        mean, std = handle.get_tensor("mean"), handle.get_tensor("std")
    metadata = caches.cache_metadata(entry.cache_path)
    assert mean.shape == std.shape == (4, height // 8, width // 8) and (std > 0).all()
    assert metadata["format_version"] == caches.CACHE_FORMAT_VERSION
    assert metadata["transform"] == entry.transform and metadata["transform"]["original_size"] == [128, 256]
    assert metadata["source"] == files.file_fingerprint(entry.path) and metadata["vae"]
    # The latent is what the VAE gives for the transformed image.
    info = models.resolve_model(cache_latents.parse_args(cache_argv(tiny_model("sd1"), str(tmp_path / "data.json"),
                                                                   tmp_path)))
    vae = models.load_component(info, "vae")
    pixels = images.image_to_tensor(images.apply_transform(images.load_image(entry.path), entry.transform))
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mean[0]
    assert torch.allclose(mean, expected, atol=1e-5)


def test_second_run_does_no_model_work(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    argv = cache_argv(tiny_model("sd1"), data_config(tmp_path, subject_dir), tmp_path)
    cache_latents.main(argv)
    before = {path: os.stat(path).st_mtime_ns for path in cache_files(tmp_path / "vae") + cache_files(tmp_path / "text")}
    capsys.readouterr()
    refuse_model_loading(monkeypatch)
    cache_latents.main(argv)
    out = capsys.readouterr().out
    assert "all 8 latents are up to date; nothing to encode" in out
    assert "all 1 caption embeddings are up to date; nothing to encode" in out
    assert before == {path: os.stat(path).st_mtime_ns for path in before}


def test_touching_an_image_invalidates_exactly_its_entry(tiny_model, subject_dir, tmp_path):
    argv = cache_argv(tiny_model("sd1"), data_config(tmp_path, subject_dir), tmp_path)
    plans = cache_latents.main(argv)
    before = {e.cache_path: os.stat(e.cache_path).st_mtime_ns for e in plans["subject"]}
    touched = plans["subject"][3]
    stat = os.stat(touched.path)
    os.utime(touched.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    time.sleep(0.01)
    cache_latents.main(argv)
    changed = [path for path, mtime in before.items() if os.stat(path).st_mtime_ns != mtime]
    assert changed == [touched.cache_path]


def test_changed_image_content_crop_or_vae_makes_entries_stale(tiny_model, subject_dir, tmp_path, capsys):
    model = tiny_model("sd1")
    cache_latents.main(cache_argv(model, data_config(tmp_path, subject_dir), tmp_path))
    # Same size and mtime, different content: the content hash catches it.
    path = os.path.join(subject_dir, "subject_00.png")
    stat = os.stat(path)
    from PIL import Image

    Image.new("RGB", Image.open(path).size, "black").save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    cache_latents.main(cache_argv(model, data_config(tmp_path, subject_dir), tmp_path))
    assert "encoding 1 of 8 images" in capsys.readouterr().out
    # Square corner crops change the four non-square images' transforms; the square ones keep theirs.
    cache_latents.main(cache_argv(model, data_config(tmp_path, subject_dir, crop=True, crop_style="corner"), tmp_path))
    assert "encoding 4 of 8 images" in capsys.readouterr().out
    # The tiny SDXL model has byte-identical VAE weights but other text encoders...
    other = tiny_model("sdxl")
    cache_latents.main(cache_argv(other, data_config(tmp_path, subject_dir, crop=True, crop_style="corner"), tmp_path))
    out = capsys.readouterr().out
    assert "nothing to encode" in out.split("text cache")[0]  # ...the same VAE weights: latents are shared
    assert "text cache: encoding 1 of 1" in out  # but the text encoders differ: new embeddings, in the same folder


def test_a_half_written_cache_file_is_never_trusted(tiny_model, subject_dir, tmp_path):
    argv = cache_argv(tiny_model("sd1"), data_config(tmp_path, subject_dir), tmp_path)
    plans = cache_latents.main(argv)
    victim = plans["subject"][0].cache_path
    good = open(victim, "rb").read()
    with open(victim, "wb") as handle:  # what a non-atomic writer would leave after a kill
        handle.write(good[: len(good) // 2])
    folder, name = os.path.split(victim)
    stray = os.path.join(folder, f".tmp{dead_pid()}")  # the temporaries of a write whose process was killed:
    os.makedirs(stray)
    for leftover in (name, ".tmpAb12Cd"):  # ours, and the one safetensors writes through before renaming it to ours
        with open(os.path.join(stray, leftover), "wb") as handle:
            handle.write(good[:100])
    live = os.path.join(folder, f".tmp{os.getppid()}")  # a write still in progress in another running process
    os.makedirs(live)
    with open(os.path.join(live, name), "wb") as handle:
        handle.write(good[:100])
    cache_latents.main(argv)
    assert open(victim, "rb").read() == good
    assert not os.path.exists(stray) and os.path.exists(os.path.join(live, name))  # the live one is left alone


def test_a_cache_run_killed_midway_resumes_to_the_same_files(tiny_model, tmp_path):
    import make_demo

    subject = make_demo.make_subject_images(str(tmp_path / "many"), sizes=((192, 192),) * 40)
    model = tiny_model("sd1")
    clean = tmp_path / "clean"
    clean.mkdir()
    cache_latents.main(cache_argv(model, data_config(clean, subject), clean))

    killed = tmp_path / "killed"
    killed.mkdir()
    argv = cache_argv(model, data_config(killed, subject), killed)
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "cache_latents.py"), *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(cache_files(killed / "vae")) < 5 and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path in cache_files(killed / "vae"):  # whatever the kill left is either complete or a temporary
        assert path.endswith(".safetensors") and files.load_tensors(path) or ".tmp" in path
    cache_latents.main(argv)
    names = [os.path.relpath(p, killed / "vae") for p in cache_files(killed / "vae")]
    assert names == [os.path.relpath(p, clean / "vae") for p in cache_files(clean / "vae")]
    for name in names:  # byte-identical: same latents (same batch companions), same provenance record
        assert open(clean / "vae" / name, "rb").read() == open(killed / "vae" / name, "rb").read(), name


def test_text_cache_encodes_only_new_captions(tiny_model, tmp_path, capsys):
    args = cache_latents.parse_args(["--pretrained_model_name_or_path", tiny_model("sd1"), "--output_dir",
                                     str(tmp_path)])
    info = models.resolve_model(args)
    paths = caches.build_text_cache(["a photo of ohwx toy", "a toy"], info, str(tmp_path / "text"))
    capsys.readouterr()
    more = caches.build_text_cache(["a photo of ohwx toy", "a toy", "a red toy"], info, str(tmp_path / "text"))
    assert "encoding 1 of 3 captions" in capsys.readouterr().out
    assert {k: more[k] for k in paths} == paths
    tokenizers, encoders = models.load_text_encoders(info)
    expected = info.encode_prompt(tokenizers, encoders, ["a red toy"])["prompt_embeds"][0]
    assert torch.allclose(files.load_tensors(more["a red toy"])["prompt_embeds"], expected)


def test_training_builds_missing_caches_with_the_same_functions(tiny_model, subject_dir, tmp_path):
    import train_dreambooth

    model = tiny_model("sd1")
    config = data_config(tmp_path, subject_dir)
    train_dreambooth.main(["--pretrained_model_name_or_path", model, "--data_backend_config", config, "--output_dir",
                           str(tmp_path / "out"), "--seed", "1", "--max_train_steps", "1", "--lora_rank", "2"])
    trained = {p: open(p, "rb").read() for p in cache_files(tmp_path / "vae")}
    for path in trained:
        os.remove(path)
    cache_latents.main(cache_argv(model, config, tmp_path))
    assert {p: open(p, "rb").read() for p in cache_files(tmp_path / "vae")} == trained


@pytest.mark.parametrize("style", ["random"])
def test_random_crops_are_reproducible_across_cache_rebuilds(tiny_model, subject_dir, tmp_path, style):
    model = tiny_model("sd1")
    config = data_config(tmp_path, subject_dir, crop=True, crop_style=style, resolution=96)
    first = {e.path: e.transform["crop_box"] for e in cache_latents.main(cache_argv(model, config, tmp_path))["subject"]}
    second = {e.path: e.transform["crop_box"] for e in cache_latents.main(cache_argv(model, config, tmp_path))["subject"]}
    assert first == second
    assert len({tuple(box[:2]) for box in first.values()}) > 1  # the crops really are at different places
