"""Scheduled sampling (rollouts): the model's own k-step rollout replaces the forward process's x_t."""

import argparse
import json
import os

import pytest
import torch
from conftest import first_batches_are_prior_then_mixed, model_info, resolution_for, train_argv, unet_inputs, write_json

from common import adapters, models, objectives
import make_demo
import train_dreambooth

SAMPLER_CLASSES = {"unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
                   "dpm": "DPMSolverMultistepScheduler"}
MODELS = [("sd1", "epsilon"), ("sd2", "v_prediction")]


def unet_with_fresh_lora(model):
    """The student as training builds it: a LoRA whose B matrices start at zero (no effect yet)."""
    info = model_info(model)
    unet = models.load_component(info, "unet")
    adapters.add_lora(unet, adapters.LoraSettings(rank=4), info.lora_targets(unet, "attention"))
    return unet.eval()


def training_scheduler(model):
    return objective_of(model).scheduler


def objective_of(model):
    return objectives.for_model(model_info(model), argparse.Namespace())


def start(unet, family, seed=0):
    """A clean latent, its noise and the conditioning for one sample."""
    inputs = unet_inputs(unet, family, seed=seed)
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(seed + 100))
    return inputs["sample"], noise, inputs["encoder_hidden_states"], inputs.get("added_cond_kwargs")


def our_rollout(model, family, sampler, t, k):
    student = unet_with_fresh_lora(model)
    clean, noise, embeds, cond = start(student, family)
    conditioning = {"encoder_hidden_states": embeds, **({"added_cond_kwargs": cond} if cond else {})}
    info = model_info(model)

    def predict(x, timestep):
        return info.predict(student, x, timestep, conditioning)

    return objective_of(model).rollout(predict, clean, noise, torch.tensor(t), k, sampler)


@pytest.mark.parametrize("sampler", list(SAMPLER_CLASSES))
@pytest.mark.parametrize("family,prediction", MODELS + [("sdxl", "epsilon")])
def test_rollout_equals_a_standalone_sampling_loop_of_the_same_scheduler(tiny_model, family, prediction, sampler):
    import diffusers

    model = tiny_model(family, prediction)
    t, k = 480, 6
    rolled = our_rollout(model, family, sampler, t, k)

    # The plain base model (no adapter at all) in the loop every diffusers pipeline runs, entered mid-schedule.
    base = models.load_component(model_info(model), "unet").eval()
    clean, noise, embeds, cond = start(base, family)
    scheduler = getattr(diffusers, SAMPLER_CLASSES[sampler]).from_pretrained(model, subfolder="scheduler",
                                                                            timestep_spacing="trailing")
    scheduler.set_timesteps(1000)
    first = list(scheduler.timesteps.tolist()).index(t + k)
    latents = scheduler.add_noise(clean, noise, scheduler.timesteps[first:first + 1])
    with torch.no_grad():
        for timestep in scheduler.timesteps[first:first + k]:
            prediction_ = base(scheduler.scale_model_input(latents, timestep), timestep, embeds,
                               added_cond_kwargs=cond).sample
            latents = scheduler.step(prediction_, timestep, latents).prev_sample
    if sampler == "euler":  # Euler samples x0 + sigma * noise; the UNet is trained on x_t = that / sqrt(sigma^2 + 1)
        alpha_bar = scheduler.alphas_cumprod[t]
        latents = latents * alpha_bar.sqrt()
    assert torch.allclose(rolled, latents, atol=1e-5), (rolled - latents).abs().max()
    assert not torch.allclose(rolled, training_scheduler(model).add_noise(clean, noise, torch.tensor([t])), atol=1e-3)


def ddim_by_hand(unet, x, t_from, t_to, embeds, alphas_cumprod, prediction_type):
    """One deterministic DDIM step written out: predict x0 and eps, re-noise x0 to t_to with that eps."""
    a, a_next = alphas_cumprod[t_from], alphas_cumprod[t_to]
    with torch.no_grad():
        out = unet(x, torch.tensor([t_from]), embeds).sample
    if prediction_type == "epsilon":
        x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
    else:
        x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


@pytest.mark.parametrize("family,prediction", MODELS)
@pytest.mark.parametrize("sampler,k", [("ddim", 4), ("euler", 4), ("unipc", 1), ("dpm", 1)])
def test_first_order_rollouts_are_the_ddim_update_written_out(tiny_model, family, prediction, sampler, k):
    # Euler on a diffusion model is DDIM in another parameterisation; UniPC and DPM-Solver start first-order.
    model = tiny_model(family, prediction)
    t = 300
    rolled = our_rollout(model, family, sampler, t, k)
    base = models.load_component(model_info(model), "unet").eval()
    clean, noise, embeds, _ = start(base, family)
    alphas_cumprod = training_scheduler(model).alphas_cumprod
    x = alphas_cumprod[t + k].sqrt() * clean + (1 - alphas_cumprod[t + k]).sqrt() * noise
    for step in range(t + k, t, -1):
        x = ddim_by_hand(base, x, step, step - 1, embeds, alphas_cumprod, prediction)
    assert torch.allclose(rolled, x, atol=1e-5), (rolled - x).abs().max()


@pytest.mark.parametrize("family,prediction", MODELS)
def test_recomputed_target_implies_exactly_the_true_clean_latent(tiny_model, family, prediction):
    model = tiny_model(family, prediction)
    t = 250
    rolled = our_rollout(model, family, "unipc", t, 8)
    clean = start(models.load_component(model_info(model), "unet"), family)[0]
    scheduler = training_scheduler(model)
    timesteps = torch.tensor([t])
    noise = objective_of(model).implied_noise(clean, rolled, timesteps)
    a = scheduler.alphas_cumprod[t]
    if prediction == "epsilon":
        implied = (rolled - (1 - a).sqrt() * noise) / a.sqrt()
    else:
        v = scheduler.get_velocity(clean, noise, timesteps)
        implied = a.sqrt() * rolled - (1 - a).sqrt() * v
    assert torch.allclose(implied, clean, atol=1e-5)


def capture_training_steps(monkeypatch):
    """Record what the trained forward pass sees (x_t, t) and the loss target: the hook skips no-grad passes
    (rollouts and base-model targets), so it sees exactly the student's training inputs."""
    seen = {"inputs": [], "targets": []}
    load_component, masked_mse = models.load_component, train_dreambooth.masked_mse

    def load(info, name, *args, **kwargs):
        component = load_component(info, name, *args, **kwargs)
        if name == "unet":
            def hook(module, inputs):
                if torch.is_grad_enabled():
                    seen["inputs"].append((inputs[0].detach().clone(), inputs[1].clone()))
            component.register_forward_pre_hook(hook)
        return component

    def mse(pred, target, *args):
        seen["targets"].append(target.detach().clone())
        return masked_mse(pred, target, *args)

    monkeypatch.setattr(models, "load_component", load)
    monkeypatch.setattr(train_dreambooth, "masked_mse", mse)
    return seen


def log_records(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "logs", "train_log.jsonl"))]


@pytest.mark.parametrize("family,prediction", MODELS)
def test_training_rolls_out_and_the_target_still_implies_the_clean_latent(tiny_model, subject_dir, tmp_path,
                                                                          monkeypatch, family, prediction):
    model = tiny_model(family, prediction)
    variants = {"off": [], "p0": ["--scheduled_sampling_probability", "0"], "recomputed": [],
                "original": ["--scheduled_sampling_target", "original"]}
    runs = {}
    for name, extra in variants.items():
        offset = [] if name == "off" else ["--scheduled_sampling_max_step_offset", "5"]
        with monkeypatch.context() as patch:
            seen = capture_training_steps(patch)
            train_dreambooth.main(train_argv(model, subject_dir, tmp_path / name, "--max_train_steps", "1",
                                             "--cache_dir", tmp_path / "cache", *offset, *extra))
        [(x, t)], [target] = seen["inputs"], seen["targets"]
        runs[name] = x, t, target
    x_off, t, target_off = runs["off"]
    assert t.max() < 999  # (with t = 999 there is no room above to roll out from)
    # Probability 0 leaves the batch exactly as without rollouts.
    assert all(torch.equal(a, b) for a, b in zip(runs["p0"], runs["off"]))
    assert log_records(tmp_path / "p0")[0]["rollout_forwards"] == 0
    # Probability 1: every sample's x_t is the rollout's; each cost up to 5 forward passes.
    x, _, target = runs["recomputed"]
    assert (x - x_off).flatten(1).abs().amax(1).min() > 1e-3
    assert 2 <= log_records(tmp_path / "recomputed")[0]["rollout_forwards"] <= 10
    a = training_scheduler(model).alphas_cumprod[t].view(-1, 1, 1, 1)

    def implied_clean(noisy, target):
        if prediction == "epsilon":
            return (noisy - (1 - a).sqrt() * target) / a.sqrt()
        return a.sqrt() * noisy - (1 - a).sqrt() * target

    assert torch.allclose(implied_clean(x, target), implied_clean(x_off, target_off), atol=1e-5)
    # --scheduled_sampling_target original: the same rolled-out input, the clean trajectory's target.
    x_original, _, target_original = runs["original"]
    assert torch.equal(x_original, x) and torch.equal(target_original, target_off)


def test_the_probability_ramps_up_from_zero_to_the_stated_value(tiny_model, subject_dir, tmp_path):
    args = argparse.Namespace(scheduled_sampling_probability=0.8, scheduled_sampling_ramp_steps=100)
    assert [train_dreambooth.rollout_probability(args, s) for s in (0, 25, 50, 100, 1000)] == \
        pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    args.scheduled_sampling_ramp_steps = 0
    assert train_dreambooth.rollout_probability(args, 0) == 0.8
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--max_train_steps", "6",
                                     "--scheduled_sampling_max_step_offset", "3", "--scheduled_sampling_probability",
                                     "0.5", "--scheduled_sampling_ramp_steps", "4"))
    records = log_records(tmp_path / "out")
    assert [r["rollout_probability"] for r in records] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert records[0]["rollout_forwards"] == 0


def test_the_reference_config_block_runs_as_written(tiny_model, subject_dir, tmp_path):
    config = write_json(tmp_path / "config.json", {
        "scheduled_sampling_max_step_offset": 10, "scheduled_sampling_probability": 1.0,
        "scheduled_sampling_ramp_steps": 1000, "scheduled_sampling_sampler": "unipc",
        "pretrained_model_name_or_path": tiny_model("sd1"), "instance_data_dir": subject_dir,
        "instance_prompt": "a photo of ohwx toy", "output_dir": str(tmp_path / "out"), "resolution": 64,
        "max_train_steps": 3, "seed": 1})
    train_dreambooth.main(["--config", config])
    records = log_records(tmp_path / "out")
    assert [r["rollout_probability"] for r in records] == pytest.approx([0, 0.001, 0.002])


def test_the_prior_target_is_the_base_model_on_the_students_rolled_out_input(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("sd1")
    subject = make_demo.make_subject_images(str(tmp_path / "subject"), sizes=((64, 64),) * 2)
    reg = make_demo.make_subject_images(str(tmp_path / "class"), sizes=((64, 64),) * 2)
    data = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject, "instance_prompt": "ohwx toy", "resolution": 64},
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a toy", "resolution": 64,
         "is_regularisation_data": True}])
    seed = next(s for s in range(100) if first_batches_are_prior_then_mixed(data, s, 4))
    argv = ["--pretrained_model_name_or_path", model, "--data_backend_config", data, "--seed", str(seed),
            "--train_batch_size", "1", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"),
            "--scheduled_sampling_max_step_offset", "4"]
    seen = capture_training_steps(monkeypatch)
    train_dreambooth.main(argv)
    [(x, t)], [target] = seen["inputs"], seen["targets"]
    assert log_records(tmp_path / "out")[0]["rollout_forwards"] > 0  # the regularisation sample was rolled out
    info = model_info(model)
    embeds = info.encode_prompt(*models.load_text_encoders(info), ["a toy"])["prompt_embeds"]
    with torch.no_grad():
        base = models.load_component(info, "unet").eval()(x, t, embeds).sample
    assert torch.allclose(target, base, atol=1e-6)  # one rollout (the student's), the base model judged on it


@pytest.mark.parametrize("family", ["sd1", "if-ii"])
def test_rollouts_work_with_lycoris_masks_prior_ema_and_full_finetunes(tiny_model, tmp_path, family):
    from PIL import Image

    model = tiny_model(family)
    subject = make_demo.make_subject_images(str(tmp_path / "subject"), sizes=((64, 64),) * 3)
    os.makedirs(tmp_path / "masks")
    for name in os.listdir(subject):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        mask.save(tmp_path / "masks" / name)
    reg = make_demo.make_subject_images(str(tmp_path / "class"), sizes=((64, 64),) * 2)
    resolution = resolution_for(model)
    data = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject, "instance_prompt": "ohwx toy", "resolution": resolution,
         "conditioning_data": "masks"},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(tmp_path / "masks")},
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a toy", "resolution": resolution,
         "is_regularisation_data": True}])
    lycoris = write_json(tmp_path / "lokr.json", {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4})
    common_argv = ["--pretrained_model_name_or_path", model, "--data_backend_config", data, "--seed", "2",
                   "--max_train_steps", "4", "--scheduled_sampling_max_step_offset", "3", "--use_ema",
                   "--ema_decay", "0.5", "--cache_dir", str(tmp_path / "cache")]
    for name, extra in {"lycoris": ["--lora_type", "lycoris", "--lycoris_config", lycoris],
                        "full": ["--model_type", "full", "--learning_rate", "1e-4"]}.items():
        train_dreambooth.main(common_argv + ["--output_dir", str(tmp_path / name), *extra])
        records = log_records(tmp_path / name)
        assert sum(r["rollout_forwards"] for r in records) > 0
        assert any("loss/prior" in r for r in records) and all(r["loss/instance"] > 0 for r in records
                                                                 if "loss/instance" in r)
    assert os.path.isfile(tmp_path / "lycoris" / "pytorch_lora_weights_ema.safetensors")
    assert os.path.isfile(tmp_path / "full" / "ema" / "model_index.json")


def test_bad_rollout_settings_are_refused_before_model_work(tiny_model, subject_dir, tmp_path):
    for flags in (["--scheduled_sampling_max_step_offset", "-1"], ["--scheduled_sampling_probability", "1.5"]):
        with pytest.raises(SystemExit, match="scheduled sampling"):
            train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", *flags))
    assert not os.path.exists(tmp_path / "out")
