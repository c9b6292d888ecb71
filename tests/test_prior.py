"""Regularisation data and prior preservation: make_regularisation.py and the prior loss in training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (ROOT, first_batches_are_prior_then_mixed, model_info, prior_argv, prior_data, resolution_for,
                      train_argv, write_json)

from common import adapters, data, files, models
import make_demo
import make_regularisation
import train_dreambooth


# ---------------------------------------------------------------------------------------------------------------------
# make_regularisation.py


def reg_argv(model, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--class_prompt", "a photo of a toy", "--output_dir",
            str(output_dir), "--num_inference_steps", "2", "--resolution", "64", "--batch_size", "2", *map(str, extra)]


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if not name.startswith(".")}


def test_images_are_named_by_index_and_seed_with_their_captions(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a toy\n\na toy on a table\na small toy\n")
    made = make_regularisation.main(reg_argv(tiny_model("sd1"), tmp_path / "reg", "--num_images", "5", "--seed", "10",
                                             "--class_prompts_file", prompts))
    assert [os.path.basename(p) for p in made] == [f"{i:06d}-seed{10 + i}.png" for i in range(5)]
    captions = [open(p[:-4] + ".txt").read().strip() for p in made]
    assert captions == ["a photo of a toy", "a toy on a table", "a small toy", "a photo of a toy", "a toy on a table"]
    from PIL import Image

    assert all(Image.open(p).size == (64, 64) for p in made)
    manifest = json.load(open(tmp_path / "reg" / make_regularisation.MANIFEST))
    assert manifest["prompts"] == ["a photo of a toy", "a toy on a table", "a small toy"] and manifest["seed"] == 10
    assert Image.open(str(tmp_path / "reg") + "_preview.png").size == (3 * 160, 2 * 174)
    # The folder is a ready regularisation dataset: textfile captions for every image.
    args = train_dreambooth.parse_args(["--data_backend_config", write_json(tmp_path / "d.json", [
        {"id": "reg", "instance_data_dir": str(tmp_path / "reg"), "caption_strategy": "textfile",
         "is_regularisation_data": True}]), "--resolution", "64"])
    [entries] = data.plan_datasets(data.load_datasets(args), 0).values()
    assert len(entries) == 5 and entries[1].captions == ["a toy on a table"]


def test_a_killed_run_resumes_to_the_images_of_an_uninterrupted_run(tiny_model, tmp_path):
    model = tiny_model("sd1")
    make_regularisation.main(reg_argv(model, tmp_path / "whole", "--num_images", "6"))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "make_regularisation.py"),
                                *reg_argv(model, tmp_path / "killed", "--num_images", "6")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while process.poll() is None and len([n for n in os.listdir(tmp_path / "killed") if n.endswith(".png")]
                                         if os.path.isdir(tmp_path / "killed") else []) < 2:
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = folder_bytes(tmp_path / "killed")
    if process.returncode == -signal.SIGKILL:
        assert len([n for n in before if n.endswith(".png") and ".tmp" not in n]) < 6  # it really was cut short
    # A write the kill interrupted is left in a temporary folder carrying the dead process's pid, never under a
    # final name; the re-run clears it (a temporary of a process still running would be left alone).
    assert not files.process_alive(process.pid)
    leftover = tmp_path / "killed" / f".tmp{process.pid}" / "000005-seed5.png"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"half an image")
    make_regularisation.main(reg_argv(model, tmp_path / "killed", "--num_images", "6"))
    after = folder_bytes(tmp_path / "killed")
    assert after == folder_bytes(tmp_path / "whole") and len(after) == 12
    assert all(after[name] == data for name, data in before.items() if name.endswith(".png"))  # never rewritten
    assert not leftover.exists()


def test_a_larger_num_images_only_adds_the_shortfall(tiny_model, tmp_path, capsys):
    model = tiny_model("sd1")
    make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "2"))
    first = os.stat(tmp_path / "reg" / "000000-seed0.png").st_mtime_ns
    make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "4"))
    assert "2 of 4 images exist; making 2" in capsys.readouterr().out
    assert os.stat(tmp_path / "reg" / "000000-seed0.png").st_mtime_ns == first
    make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "3", "--batch_size", "1"))
    out = capsys.readouterr().out
    assert "already holds 1 images beyond --num_images 3" in out and "'batch_size': 2" in out
    with pytest.raises(SystemExit, match="--seed 0 or more"):
        make_regularisation.main(reg_argv(model, tmp_path / "other", "--num_images", "1", "--seed", "-1"))


def test_a_failed_first_run_does_not_lock_the_folder_to_its_settings(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("sd1")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(make_regularisation, "load_generator_pipeline", out_of_memory)
    with pytest.raises(RuntimeError):
        make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "2", "--resolution", "128"))
    monkeypatch.undo()
    made = make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "2"))  # other settings: fine
    assert len(made) == 2 and json.load(open(tmp_path / "reg" / make_regularisation.MANIFEST))["width"] == 64


def test_a_folder_of_other_images_or_settings_is_refused(tiny_model, tmp_path):
    model = tiny_model("sd1")
    (tmp_path / "photos").mkdir()
    make_demo.draw_subject(64, 64, 0).save(tmp_path / "photos" / "me.png")
    with pytest.raises(SystemExit, match="did not make .* \\(e.g. me.png\\); mixing them would mix datasets"):
        make_regularisation.main(reg_argv(model, tmp_path / "photos", "--num_images", "2"))
    make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "2"))
    with pytest.raises(SystemExit, match="other settings \\(prompts: \\['a photo of a toy'\\] there, \\['a photo of a man'\\]"):
        argv = reg_argv(model, tmp_path / "reg", "--num_images", "4")
        argv[argv.index("--class_prompt") + 1] = "a photo of a man"
        make_regularisation.main(argv)
    with pytest.raises(SystemExit, match="did not make with --seed 5"):
        make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "4", "--seed", "5"))
    os.remove(tmp_path / "reg" / make_regularisation.MANIFEST)
    with pytest.raises(SystemExit, match="holds images but no .regularisation.json"):
        make_regularisation.main(reg_argv(model, tmp_path / "reg", "--num_images", "4"))


def lora_file(model, folder):
    """A LoRA with random (non-zero) weights, saved as training saves one."""
    info = model_info(model)
    denoiser = info.denoiser  # "unet", or an SD3 / FLUX "transformer"
    unet = models.load_component(info, denoiser)
    config = adapters.add_lora(unet, adapters.LoraSettings(rank=4, init="default"), info.lora_targets(unet, "attention"))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    path = os.path.join(folder, adapters.LORA_WEIGHTS_NAME)
    adapters.save_lora(unet, path, adapters.peft_metadata({denoiser: config}), denoiser)
    return path


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3", "if"])
def test_lora_is_applied_when_generating(tiny_model, tmp_path, family):
    model = tiny_model(family)
    plain = make_regularisation.main(reg_argv(model, tmp_path / "plain", "--num_images", "1"))
    lora = lora_file(model, str(tmp_path))
    adapted = make_regularisation.main(reg_argv(model, tmp_path / "adapted", "--num_images", "1", "--lora", lora))
    assert open(plain[0], "rb").read() != open(adapted[0], "rb").read()
    assert json.load(open(tmp_path / "adapted" / make_regularisation.MANIFEST))["lora"]["digest"]


# ---------------------------------------------------------------------------------------------------------------------
# The prior loss


def unet_with_lora(model):
    info = model_info(model)
    unet = models.load_component(info, "unet")
    adapters.add_lora(unet, adapters.LoraSettings(rank=4), info.lora_targets(unet, "attention"))
    return unet


def predict_random_input(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([400]),
                    torch.randn(1, 77, 32, generator=generator)).sample


def test_fresh_adapter_prior_target_equals_the_students_prediction(tiny_model):
    unet = unet_with_lora(tiny_model("sd1"))
    student = predict_random_input(unet)
    with adapters.adapter_disabled(unet):
        base = predict_random_input(unet)
    assert torch.equal(student, base)  # B starts at zero: the prior loss is exactly 0 at step 0


LYCORIS_CASES = [("locon", False), ("locon", True), ("loha", False), ("loha", True), ("lokr", False),
                 ("lokr", True), ("full", False), ("ia3", False), ("glora", False), ("diag-oft", False)]


@pytest.mark.parametrize("algo,dora_wd", LYCORIS_CASES, ids=[f"{a}{'-dora' if d else ''}" for a, d in LYCORIS_CASES])
def test_the_prior_target_is_the_base_model_for_every_lycoris_algorithm(tiny_model, algo, dora_wd):
    """With its weights moved off their start, the adapter changes the prediction; switched off, the model predicts
    exactly what the base model does, with weight decomposition too (there a multiplier of 0 left W + dW in place:
    0.64 off for locon), and on again afterwards."""
    info = model_info(tiny_model("sd1"))
    unet = models.load_component(info, "unet")
    base = predict_random_input(unet)
    config = {"algo": algo, "linear_dim": 4, "linear_alpha": 1, "dora_wd": dora_wd,
              "apply_preset": {"target_module": ["Attention", "FeedForward"]}}
    network = adapters.add_lycoris(unet, config, "test")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    adapted = predict_random_input(unet)
    assert (adapted - base).abs().max() > 1e-3
    with adapters.adapter_disabled(unet):
        assert torch.equal(predict_random_input(unet), base)
    assert torch.equal(predict_random_input(unet), adapted)


def test_the_adapter_is_switched_back_on_even_when_the_prior_pass_raises(tiny_model):
    unet = unet_with_lora(tiny_model("sd1"))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.fill_(0.1)
    adapted = predict_random_input(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters.adapter_disabled(unet):
            assert not torch.allclose(predict_random_input(unet), adapted)  # really off inside
            raise RuntimeError("boom")
    assert torch.equal(predict_random_input(unet), adapted)


def log_records(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "logs", "train_log.jsonl"))]


@pytest.mark.parametrize("family", ["sd1", "flux"])  # min-SNR; a flow weighting scheme (every family: test_families)
def test_prior_loss_is_zero_at_step_zero_and_positive_once_the_adapter_learned(tiny_model, subject_dir, tmp_path,
                                                                               family):
    data = prior_data(tmp_path, subject_dir, resolution=resolution_for(tiny_model(family)))
    seed = next(s for s in range(100) if first_batches_are_prior_then_mixed(data, s, 8))
    weighting = ["--weighting_scheme", "cosmap"] if family == "flux" else ["--snr_gamma", "5"]
    result = train_dreambooth.main(prior_argv(tiny_model(family), data, tmp_path / "out", seed, "--max_train_steps",
                                              "8", *weighting))
    records = log_records(tmp_path / "out")
    assert records[0]["loss/prior"] == 0.0 and "loss/instance" not in records[0]
    first_instance = next(i for i, r in enumerate(records) if "loss/instance" in r)
    later = [r["loss/prior"] for r in records[first_instance:] if "loss/prior" in r]
    assert later and all(value > 0 for value in later)  # the adapter has learned: it differs from the base
    # No prior pass leaks: every LoRA layer is on after training.
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in result["unet"].modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(layer.disable_adapters for layer in layers)


def class_prediction_drift(model, unet):
    """How far the trained UNet's predictions for the class prompt lie from the base model's."""
    info = model_info(model)
    embeds = info.encode_prompt(*models.load_text_encoders(info), ["a photo of a toy"])["prompt_embeds"]
    base = models.load_component(info, "unet").eval()
    generator = torch.Generator().manual_seed(1)
    drift = 0.0
    for t in (100, 400, 700):
        x = torch.randn(2, 4, 8, 8, generator=generator)
        with torch.no_grad():
            drift += (unet.eval()(x, torch.tensor([t, t]), embeds.expand(2, -1, -1)).sample
                      - base(x, torch.tensor([t, t]), embeds.expand(2, -1, -1)).sample).pow(2).mean().item()
    return drift


def test_base_model_prior_keeps_class_predictions_closer_to_the_base_model(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    data = prior_data(tmp_path, subject_dir, class_images=8, repeats=0)
    drift = {}
    for weight in (1.0, 0.0):  # the same batches, the same seed; only the prior loss differs
        result = train_dreambooth.main(prior_argv(model, data, tmp_path / f"w{weight}", 3, "--max_train_steps", "16",
                                                  "--prior_loss_weight", weight))
        drift[weight] = class_prediction_drift(model, result["unet"])
    assert drift[1.0] < 0.7 * drift[0.0], drift


def test_dataset_target_is_the_class_image_and_the_only_choice_for_full(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    data = prior_data(tmp_path, subject_dir)
    seed = next(s for s in range(100) if first_batches_are_prior_then_mixed(data, s, 8))
    train_dreambooth.main(prior_argv(model, data, tmp_path / "dataset", seed, "--max_train_steps", "1",
                                     "--prior_loss_target", "dataset"))
    assert log_records(tmp_path / "dataset")[0]["loss/prior"] > 0  # the ordinary target: not zero at step 0
    with pytest.raises(SystemExit, match="a full fine-tune has none: use --prior_loss_target dataset"):
        train_dreambooth.main(prior_argv(model, data, tmp_path / "full", seed, "--model_type", "full",
                                         "--prior_loss_target", "base_model"))
    args = train_dreambooth.parse_args(prior_argv(model, data, tmp_path / "x", 0, "--model_type", "full"))
    train_dreambooth.check_args(args)
    assert args.prior_loss_target == "dataset"


def test_prior_weight_scales_the_regularisation_loss_in_the_total(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    data = prior_data(tmp_path, subject_dir)
    seed = next(s for s in range(100) if first_batches_are_prior_then_mixed(data, s, 8))
    train_dreambooth.main(prior_argv(model, data, tmp_path / "out", seed, "--max_train_steps", "1",
                                     "--prior_loss_target", "dataset", "--prior_loss_weight", "0.25"))
    [record] = log_records(tmp_path / "out")
    assert record["loss"] == pytest.approx(0.25 * record["loss/prior"])


def test_the_epoch_mix_is_printed_and_too_few_instance_samples_warned(tiny_model, subject_dir, tmp_path, capsys):
    data = prior_data(tmp_path, subject_dir, class_images=20, repeats=0)
    train_dreambooth.main(prior_argv(tiny_model("sd1"), data, tmp_path / "out", 0, "--max_train_steps", "1"))
    out = capsys.readouterr().out
    assert "an epoch holds 8 instance and 20 regularisation samples; 29% of batches are instance batches" in out
    assert "warning: only 29% of batches show the subject" in out and "raise the subject's repeats" in out
    train_dreambooth.main(prior_argv(tiny_model("sd1"), data, tmp_path / "uniform", 0, "--max_train_steps", "1",
                                     "--data_sampling", "uniform"))
    out = capsys.readouterr().out
    assert "50% of batches are instance batches" in out and "warning" not in out  # uniform: by probability alone


def test_dop_keeps_the_class_caption_at_the_base_models_prediction(tiny_model, subject_dir, tmp_path, capsys):
    """Differential output preservation without any regularisation image: the instance caption with "ohwx toy"
    replaced by "a toy" rides along, its target the base model's prediction. At step 0 that term is exactly 0 (a
    fresh adapter is the base model), then positive; the step's loss is the instance loss plus --dop_weight times it;
    and the class prompt drifts far less from the base model than without DOP."""
    model = tiny_model("sd1")
    drift = {}
    for dop in (True, False):
        extra = ["--dop_class", "a toy", "--dop_trigger", "ohwx toy", "--dop_weight", "0.5"] if dop else []
        result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / f"dop-{dop}", "--max_train_steps",
                                                  "16", "--learning_rate", "5e-3", "--train_batch_size", "1", *extra))
        drift[dop] = class_prediction_drift(model, result["unet"])
    records = log_records(tmp_path / "dop-True")
    # Step 0: zero up to float rounding (the student sees the row batched with the instance row, the base alone).
    assert records[0]["loss/dop"] < 1e-10 and all(r["loss/dop"] > 1e-6 for r in records[1:])
    assert all(r["loss"] == pytest.approx(r["loss/instance"] + 0.5 * r["loss/dop"]) for r in records)
    assert "loss/dop" not in log_records(tmp_path / "dop-False")[0]
    assert "1 of 1 instance caption(s) name 'ohwx toy'; with it replaced ('a photo of a toy')" in capsys.readouterr().out
    assert drift[True] < 0.5 * drift[False], drift
    with pytest.raises(SystemExit, match="'sks dog' is in none of the instance captions"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "none", "--dop_class", "a dog",
                                         "--dop_trigger", "sks dog"))
    with pytest.raises(SystemExit, match="needs --dop_class and --dop_trigger together"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "half", "--dop_class", "a dog"))


@pytest.mark.parametrize("family", ["sdxl", "if-ii"])  # time ids; the low-resolution input per row
def test_dop_runs_on_the_other_families(tiny_model, subject_dir, tmp_path, family):
    """The class-caption rows ride in the same forward pass on SDXL (time ids) and IF stage II (each row keeps its
    sample's low-resolution input): zero at step 0 up to rounding, then the adapter's departure on the class caption.
    Every family's step 0: tests/test_families.py."""
    train_dreambooth.main(train_argv(tiny_model(family), subject_dir, tmp_path / "out", "--max_train_steps", "3",
                                     "--learning_rate", "5e-3", "--dop_class", "a toy", "--dop_trigger", "ohwx toy"))
    records = log_records(tmp_path / "out")
    assert records[0]["loss/dop"] < 1e-10 and records[-1]["loss/dop"] > 1e-8
