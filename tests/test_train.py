"""train_dreambooth.py end to end on tiny models: the saved LoRA reloads in diffusers and reproduces our prediction,
a killed-and-resumed run ends where an uninterrupted one does, full fine-tunes save a loadable pipeline."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import model_info, predict, resumed_weights, stock_pipeline, unet_inputs, ROOT, train_argv, write_json
from safetensors.torch import load_file

from common import adapters, checkpoints, data, files, images, models, objectives
import train_dreambooth


@pytest.mark.parametrize("target", list(adapters.LORA_PRESETS))
@pytest.mark.parametrize("family", ["sd1", "sdxl", "if"])
def test_saved_lora_reloads_in_diffusers_and_reproduces_our_prediction(tiny_model, subject_dir, tmp_path, family,
                                                                       target):
    """Every --lora_target: with conv and time-embedding LoRAs ("all"), a file mixing key formats once lost its
    attention LoRAs in load_lora_weights (it judges the format by the first key)."""
    model = tiny_model(family)
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_target", target))
    ours = result["unet"].eval()
    inputs = unet_inputs(ours, family)

    pipe = stock_pipeline(model)
    base = predict(pipe.unet, inputs)
    pipe.load_lora_weights(str(tmp_path / "out"))
    reloaded = predict(pipe.unet, inputs)
    assert torch.allclose(reloaded, predict(ours, inputs), atol=1e-5)
    assert (reloaded - base).abs().max() > 1e-4  # the LoRA learned something, so the match above means something
    pipe.unload_lora_weights()
    assert torch.allclose(predict(pipe.unet, inputs), base, atol=1e-6)


def test_lora_metadata_records_the_run(tiny_model, subject_dir, tmp_path):
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--lora_alpha", "2"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME), "pt") as handle:
        meta = handle.metadata()
    assert meta["family"] == "sd1" and meta["lora_rank"] == "4" and meta["step"] == "4"
    assert json.loads(meta["instance_prompts"]) == ["a photo of ohwx toy"]
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 2  # alpha survives reloading


def test_lora_alpha_scales_the_adapter_after_reloading(tiny_model, subject_dir, tmp_path):
    """alpha != rank: diffusers must reload the same scale (alpha / rank) we trained with."""
    model = tiny_model("sd1")
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_alpha", "1"))
    inputs = unet_inputs(result["unet"], "sd1")
    pipe = stock_pipeline(model)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert torch.allclose(predict(pipe.unet, inputs), predict(result["unet"].eval(), inputs), atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "flux", "if", "if-ii"])
def test_full_finetune_writes_a_pipeline_that_reproduces_our_unet(tiny_model, subject_dir, tmp_path, family):
    model = tiny_model(family)
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--model_type", "full",
                                              "--max_train_steps", "2"))
    inputs = unet_inputs(result["unet"], family)
    saved = models.denoiser_of(stock_pipeline(str(tmp_path / "out")))
    base = models.denoiser_of(stock_pipeline(model))
    assert torch.allclose(predict(saved, inputs), predict(result["unet"].eval(), inputs), atol=1e-6)
    assert (predict(saved, inputs) - predict(base, inputs)).abs().max() > 1e-4
    assert not os.path.exists(tmp_path / "out" / ".pipeline.tmp")


def two_dataset_config(tmp_path, subject_dir):
    """Two datasets (mixed by weight), one with repeats and a list of prompts, plus a text cache entry."""
    import make_demo

    other = make_demo.make_subject_images(str(tmp_path / "other"), sizes=((192, 192), (256, 128), (128, 256)))
    return write_json(tmp_path / "data.json", [
        {"id": "subject", "type": "local", "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy",
         "resolution": 64, "repeats": 1},
        {"id": "other", "type": "local", "instance_data_dir": other, "resolution": 128, "crop": True,
         "crop_style": "random", "instance_prompt": ["a photo of a toy", "a toy"]},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "textcache")},
    ])


def resumable_argv(model, data_config, output_dir, steps):
    return ["--pretrained_model_name_or_path", model, "--data_backend_config", data_config, "--output_dir",
            str(output_dir), "--seed", "3", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_train_steps", str(steps), "--checkpointing_steps", "3", "--learning_rate", "1e-3",
            "--lora_rank", "4", "--lora_dropout", "0.1", "--snr_gamma", "5", "--noise_offset", "0.05",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--cache_dir", str(output_dir.parent / "cache")]


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_does(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    data = two_dataset_config(tmp_path, subject_dir)
    steps = 12
    whole = train_dreambooth.main(resumable_argv(model, data, tmp_path / "whole", steps))

    # Kill a second run (SIGKILL, no chance to clean up) as soon as its first checkpoint is complete.
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dreambooth.py"),
                                *resumable_argv(model, data, out, steps)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while not os.path.isfile(out / "checkpoint-3" / checkpoints.STATE_FILE) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if os.path.exists(out / adapters.LORA_WEIGHTS_NAME):  # it outran the kill: keep only what a kill leaves
        os.remove(out / adapters.LORA_WEIGHTS_NAME)
    assert checkpoints.list_checkpoints(str(out))

    resumed = train_dreambooth.main(resumable_argv(model, data, out, steps) + ["--resume_from_checkpoint", "latest"])
    final_whole = load_file(str(tmp_path / "whole" / adapters.LORA_WEIGHTS_NAME))
    final_resumed = load_file(str(out / adapters.LORA_WEIGHTS_NAME))
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.allclose(final_whole[key], final_resumed[key], atol=1e-6, rtol=0), key
    assert whole["seed"] == resumed["seed"] == 3
    # The logs agree on every step both runs logged.
    losses = {}
    for run in ("whole", "killed"):
        with open(tmp_path / run / "logs" / "train_log.jsonl") as handle:
            for line in handle:
                record = json.loads(line)
                losses.setdefault(record["step"], set()).add(round(record["loss"], 6))
    assert all(len(values) == 1 for values in losses.values())


def test_resume_latest_skips_an_incomplete_checkpoint(tiny_model, subject_dir, tmp_path, capsys):
    model = tiny_model("sd1")
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(model, subject_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "2"))
    os.makedirs(out / "checkpoint-99")  # e.g. a half-copied folder: no training_state.json
    assert checkpoints.list_checkpoints(str(out)) == [str(out / "checkpoint-2")]
    train_dreambooth.main(train_argv(model, subject_dir, out, "--max_train_steps", "3", "--resume_from_checkpoint",
                                     "latest"))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    with open(out / "logs" / "train_log.jsonl") as handle:
        steps = [json.loads(line)["step"] for line in handle]
    assert steps == [1, 2, 3]  # the log kept up to checkpoint-2; the resumed run redid step 3 only, once


def test_checkpoints_rotate_to_the_total_limit(tiny_model, subject_dir, tmp_path):
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "6",
                                     "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-4", "checkpoint-5"]
    state = json.load(open(out / "checkpoint-5" / checkpoints.STATE_FILE))
    assert state["step"] == 5 and state["batches_drawn"] == 5
    # Checkpoint state loads without unpickling arbitrary objects.
    torch.load(out / "checkpoint-5" / "optimizer.pt", weights_only=True)


def test_validation_images_are_written_and_do_not_change_training(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sd1")
    plain = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "plain", "--lora_dropout", "0.2"))
    shown = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "shown", "--lora_dropout", "0.2",
                                             "--validation_prompt", "a photo of ohwx toy", "a toy on the beach",
                                             "--validation_steps", "2", "--num_validation_images", "2",
                                             "--validation_num_inference_steps", "2"))
    for step in (2, 4):
        folder = tmp_path / "shown" / "validation" / f"step-{step}"
        names = sorted(os.listdir(folder))
        assert names == ["grid.png", "prompt00-seed0.png", "prompt00-seed1.png", "prompt01-seed0.png",
                         "prompt01-seed1.png", "prompts.txt"]
        from PIL import Image

        grid = np.asarray(Image.open(folder / "grid.png").convert("RGB"))
        assert grid.shape == (2 * 64, images.ROW_LABEL_WIDTH + 2 * 64, 3)  # a row per prompt, a column per seed
        last = np.asarray(Image.open(folder / "prompt01-seed1.png").convert("RGB"))
        assert (grid[64:, images.ROW_LABEL_WIDTH + 64:] == last).all()
        for row in (0, 1):  # each row labelled with its prompt, in the strip at its left
            assert (grid[row * 64:(row + 1) * 64, :images.ROW_LABEL_WIDTH] < 100).any()
    for name, param in adapters.trainable_parameters(plain["unet"]).items():
        assert torch.equal(param, adapters.trainable_parameters(shown["unet"])[name]), name


@pytest.mark.parametrize("extra", [[], ["--train_text_encoder"]])
def test_gradient_checkpointing_gives_the_same_weights(tiny_model, subject_dir, tmp_path, extra):
    model = tiny_model("sd1")
    plain = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "a", "--max_train_steps", "2", *extra))
    checkpointed = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "b", "--max_train_steps", "2",
                                                    "--gradient_checkpointing", *extra))
    a = adapters.trainable_parameters(plain["unet"])
    b = adapters.trainable_parameters(checkpointed["unet"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(k.startswith("text_encoders.") and "lora_B" in k and a[k].any() for k in a) == bool(extra)


def test_bf16_mixed_precision_keeps_trainable_weights_in_fp32(tiny_model, subject_dir, tmp_path):
    result = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--mixed_precision",
                                              "bf16", "--max_train_steps", "2"))
    unet = result["unet"]
    trainable = adapters.trainable_parameters(unet)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    lines = open(tmp_path / "out" / "logs" / "train_log.jsonl").read().splitlines()
    assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in lines)


@pytest.mark.parametrize("optimizer,lr", [("adamw8bit", "1e-3"), ("prodigy", "1.0"), ("adafactor", "1e-3")])
def test_each_optimizer_trains_and_resumes_exactly(tiny_model, subject_dir, tmp_path, optimizer, lr, capsys):
    """Each optimiser moves the LoRA its own way (not AdamW's), and its state (8-bit moments, Prodigy's step-size
    estimate, Adafactor's factored moments) is checkpointed: a resumed run ends bit-identical to an uninterrupted one."""
    model = tiny_model("sd1")
    argv = train_argv(model, subject_dir, tmp_path / "whole", "--optimizer", optimizer, "--learning_rate", lr,
                      "--max_train_steps", "3", "--checkpointing_steps", "2", "--lora_init", "default")
    train_dreambooth.main(argv)
    whole, resumed = resumed_weights(argv, tmp_path / "whole", tmp_path / "resumed", "checkpoint-2")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora.up" in k)  # B starts at zero: it moved
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "adamw", "--max_train_steps", "3",
                                     "--lora_init", "default", "--learning_rate", "1e-3"))
    adamw = load_file(str(tmp_path / "adamw" / adapters.LORA_WEIGHTS_NAME))
    assert any(not torch.equal(adamw[k], whole[k]) for k in whole)
    if optimizer == "prodigy":  # a small lr is the usual mistake with Prodigy: it is said
        train_dreambooth.check_args(train_dreambooth.parse_args(train_argv(model, subject_dir, tmp_path / "x",
                                                                           "--optimizer", "prodigy")))
        assert "Prodigy finds its own step size" in capsys.readouterr().out
    if optimizer == "adamw8bit":  # diffusers' examples' flag means the same
        args = train_dreambooth.parse_args(train_argv(model, subject_dir, tmp_path / "x", "--use_8bit_adam"))
        train_dreambooth.check_args(args)
        assert args.optimizer == "adamw8bit"


def test_caption_dropout_trains_a_drawn_share_of_samples_on_the_empty_caption(tiny_model, subject_dir, tmp_path,
                                                                             monkeypatch):
    """With --caption_dropout_probability p each sample's embeddings are, with probability p, the empty caption's
    (equal to what the pipeline's encoder gives for ""); which samples is drawn from the batch's own stream, so the
    same seed drops the same samples (and a resume or another process count would too); p = 0 drops none."""
    model = tiny_model("sdxl")
    info = model_info(model)
    empty = info.encode_prompt(*models.load_text_encoders(info), [""])
    seen = []
    conditioning = type(info).conditioning

    def recording(info, embeds, *args, **kwargs):
        seen.append([all(torch.allclose(e[k], empty[k][0], atol=1e-6) for k in empty) for e in embeds])
        return conditioning(info, embeds, *args, **kwargs)

    monkeypatch.setattr(type(info), "conditioning", recording)
    dropped = {}
    for name, p in (("first", 0.5), ("again", 0.5), ("never", 0.0)):
        seen.clear()
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / name, "--caption_dropout_probability", p,
                                         "--max_train_steps", "8", "--train_batch_size", "2"))
        dropped[name] = [drop for batch in seen for drop in batch]
    assert len(dropped["first"]) == 16 and 2 <= sum(dropped["first"]) <= 14  # a share, drawn per sample
    assert dropped["again"] == dropped["first"] and not any(dropped["never"])
    with pytest.raises(SystemExit, match="--caption_dropout_probability 1.5: a probability"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "bad", "--caption_dropout_probability", 1.5))


def test_fp16_on_cpu_is_refused_before_model_work(tiny_model, subject_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--mixed_precision", "fp16"))
    assert not os.path.exists(tmp_path / "out")


def test_log_has_one_line_per_step_with_the_scheduled_lr(tiny_model, subject_dir, tmp_path):
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--lr_scheduler",
                                     "constant_with_warmup", "--lr_warmup_steps", "2"))
    records = [json.loads(line) for line in open(tmp_path / "out" / "logs" / "train_log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # get_last_lr after step k: warm-up reaches the full rate at step 2 and stays there.
    assert [round(r["lr"], 8) for r in records] == [5e-4, 1e-3, 1e-3, 1e-3]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(tiny_model, prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_model("sd1"), subfolder="scheduler")
    timesteps = torch.tensor([0, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = objectives.NoisePrediction(scheduler, prediction_type, 1000, snr_gamma=5.0).loss_weights(timesteps)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(weights, expected)
    assert weights[0] < 1 and weights[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_finite_at_a_zero_terminal_snr(tiny_model, prediction_type):
    """With rescale_betas_zero_snr the last timestep has SNR 0: min(SNR, γ) / SNR is 0 / 0 there (a NaN that stopped
    about one sample in a thousand). Its limit is the weight: 1 for ε (SNR below γ), 0 for v."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_model("sd1"), subfolder="scheduler", rescale_betas_zero_snr=True)
    timesteps = torch.arange(1000)
    assert scheduler.alphas_cumprod[999] == 0  # the schedule really ends at pure noise
    weights = objectives.NoisePrediction(scheduler, prediction_type, 1000, snr_gamma=5.0).loss_weights(timesteps)
    assert torch.isfinite(weights).all()
    assert weights[999].item() == (1.0 if prediction_type == "epsilon" else 0.0)
    assert weights[998].item() == pytest.approx(1.0 if prediction_type == "epsilon" else 0.0, abs=1e-3)


def test_first_step_loss_equals_the_v_prediction_objective_computed_by_hand(tiny_model, subject_dir, tmp_path):
    """SD 2.x v-prediction: the logged loss of step 1 is MSE(unet(x_t), v) with v from diffusers' get_velocity,
    on the latent drawn from the cached distribution and scaled by the VAE's scaling factor."""
    from diffusers import DDPMScheduler

    model = tiny_model("sd2", "v_prediction")
    out = tmp_path / "out"
    argv = train_argv(model, subject_dir, out, "--max_train_steps", "1", "--train_batch_size", "1", "--learning_rate", "0")
    train_dreambooth.main(argv)
    logged = json.loads(open(out / "logs" / "train_log.jsonl").readline())["loss"]

    args = train_dreambooth.parse_args(argv)
    info = models.resolve_model(args)
    datasets = data.load_datasets(args)
    for dataset in datasets:
        dataset.resolution = dataset.resolution or info.native_resolution
    plans = data.plan_datasets(datasets, 7)
    [(entry, caption)] = train_dreambooth.BatchSampler(datasets, plans, 1, 7).next()
    generator = train_dreambooth.batch_generator(7, 0)
    cached = files.load_tensors(entry.cache_path)
    latents = (cached["mean"] + cached["std"] * torch.randn(cached["mean"].shape, generator=generator))[None]
    latents = latents * info.vae_config["scaling_factor"]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (1,), generator=generator)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizers, encoders = models.load_text_encoders(info)
    embeds = info.encode_prompt(tokenizers, encoders, [caption])["prompt_embeds"]
    unet = models.load_component(info, "unet")
    with torch.no_grad():
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, embeds).sample
    expected = torch.nn.functional.mse_loss(pred, scheduler.get_velocity(latents, noise, timesteps)).item()
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["sd1", "if"])
def test_several_validation_sizes_are_each_drawn_named_and_labelled_in_one_grid(tiny_model, subject_dir, tmp_path,
                                                                                family):
    """--validation_resolution 32,48,32x48,48x32 (the reference's form): every prompt and seed at each size, each
    file named by its size and the same picture a one-size run draws at that size; the grid holds them side by side
    under a label per size. A size the pipeline cannot draw is refused before any work."""
    from PIL import Image

    model = tiny_model(family)

    def run(out, sizes):
        return train_argv(model, subject_dir, out, "--max_train_steps", "1", "--validation_prompt",
                          "a photo of ohwx toy", "--validation_steps", "1", "--num_validation_images", "1",
                          "--validation_num_inference_steps", "2", "--validation_resolution", sizes)

    train_dreambooth.main(run(tmp_path / "several", "32,48,32x48,48x32"))
    folder = tmp_path / "several" / "validation" / "step-1"
    for width, height in ((32, 32), (48, 48), (32, 48), (48, 32)):
        assert Image.open(folder / f"prompt00-seed0-{width}x{height}.png").size == (width, height)
    train_dreambooth.main(run(tmp_path / "one", "32x48"))
    alone = Image.open(tmp_path / "one" / "validation" / "step-1" / "prompt00-seed0.png")
    assert np.array_equal(np.asarray(alone), np.asarray(Image.open(folder / "prompt00-seed0-32x48.png")))
    grid = Image.open(folder / "grid.png")
    assert grid.size == (images.ROW_LABEL_WIDTH + 4 * 48, images.COLUMN_LABEL_HEIGHT + 48)  # cells fit the largest
    header = np.asarray(grid.convert("L"))[:images.COLUMN_LABEL_HEIGHT, images.ROW_LABEL_WIDTH:]
    assert all((header[:, i * 48:(i + 1) * 48] < 128).any() for i in range(4))  # a label over each size
    with pytest.raises(SystemExit, match="--validation_resolution: 36x36: .* multiples of 8 px"):
        train_dreambooth.main(run(tmp_path / "bad", "36"))
    assert not os.path.exists(tmp_path / "bad" / "cache")
