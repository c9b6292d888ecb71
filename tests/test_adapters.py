"""LyCORIS adapters, the kohya/ComfyUI layout and quantised base models."""

import json
import os

import pytest
import torch
from conftest import (FLOW, model_info, predict, stock_pipeline, unet_inputs, first_batches_are_prior_then_mixed,
                      train_argv, write_json)
from safetensors import safe_open

from common import adapters, files, models, quantise
import train_dreambooth

ALGOS = {
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 2},
    "locon": {"algo": "locon", "linear_dim": 4, "linear_alpha": 2, "conv_dim": 2, "conv_alpha": 1},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2},
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
}
PRESET = {"target_module": ["Attention", "FeedForward", "ResnetBlock2D"], "module_algo_map": {}}


# SD3 / FLUX: the transformer blocks (LyCORIS adapts the linear layers inside the modules it is pointed at)
TRANSFORMER_PRESET = {"target_module": ["JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                                        "ChromaTransformerBlock", "ChromaSingleTransformerBlock",
                                        "Flux2TransformerBlock", "Flux2SingleTransformerBlock"],
                      "module_algo_map": {}}


def fresh_pipeline(family, model):
    return stock_pipeline(model)


@pytest.mark.parametrize("family,algo", [(family, algo) for family in ("sd1", "sdxl") for algo in ALGOS]
                         + [("flux", "lokr"), ("sd3", "lora"), ("chroma", "lokr"), ("flux2-klein", "lokr"),
                            ("if", "locon"), ("if-ii", "locon")])
def test_lycoris_adapter_reloads_and_reproduces_the_trained_prediction(tiny_model, subject_dir, tmp_path, family,
                                                                        algo):
    model = tiny_model(family)
    preset = TRANSFORMER_PRESET if family.startswith(FLOW) else PRESET
    config = write_json(tmp_path / "lycoris.json", {**ALGOS[algo], "apply_preset": preset})
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_type", "lycoris",
                                              "--lycoris_config", config, "--learning_rate", "5e-3"))
    inputs = unet_inputs(result["unet"], family)
    trained = predict(result["unet"], inputs)
    base = predict(models.denoiser_of(fresh_pipeline(family, model)), inputs)
    assert (trained - base).abs().max() > 1e-4  # it learned something

    saved = str(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME)
    with safe_open(saved, "pt") as handle:
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == algo
        assert all(key.startswith("lycoris_") for key in handle.keys())
    assert json.load(open(tmp_path / "out" / "lycoris_config.json"))["algo"] == algo
    pipe = adapters.load_adapter(fresh_pipeline(family, model), str(tmp_path / "out"))  # LyCORIS's own loader
    assert torch.allclose(predict(models.denoiser_of(pipe), inputs), trained, atol=1e-5)

    kohya = tmp_path / "out" / adapters.KOHYA_WEIGHTS_NAME
    assert kohya.exists() == (algo in ("lora", "locon") and family in ("sd1", "sdxl"))  # (no tool runs IF kohya's way)
    if kohya.exists():  # lora and locon also load in stock diffusers (and ComfyUI) from the kohya layout
        pipe = fresh_pipeline(family, model)
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=adapters.KOHYA_WEIGHTS_NAME)
        assert torch.allclose(predict(pipe.unet, inputs), trained, atol=1e-5)


def test_lycoris_presets_do_not_leak_into_the_next_run(tiny_model, subject_dir, tmp_path):
    from lycoris import LycorisNetwork

    before = {name: getattr(LycorisNetwork, name) for name in adapters.LYCORIS_PRESET_ATTRIBUTES}
    config = write_json(tmp_path / "attention.json", {**ALGOS["lora"], "apply_preset": {"target_module": ["Attention"]}})
    first = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "a", "--lora_type", "lycoris",
                                             "--lycoris_config", config, "--max_train_steps", "1"))
    assert {name: getattr(LycorisNetwork, name) for name in before} == before
    wider = write_json(tmp_path / "wider.json", {**ALGOS["lora"], "apply_preset": PRESET})
    second = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "b", "--lora_type", "lycoris",
                                              "--lycoris_config", wider, "--max_train_steps", "1"))
    assert len(second["unet"].lycoris.loras) > len(first["unet"].lycoris.loras)


def test_lycoris_prior_target_is_the_base_model_and_resume_is_exact(tiny_model, subject_dir, tmp_path):
    import make_demo

    model = tiny_model("sd1")
    config = write_json(tmp_path / "lokr.json", {**ALGOS["lokr"], "apply_preset": PRESET})
    reg = make_demo.make_subject_images(str(tmp_path / "class"), sizes=((64, 64),) * 4)
    data = write_json(tmp_path / "data.json", [
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a toy", "resolution": 64,
         "is_regularisation_data": True},
        {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "ohwx toy", "resolution": 64}])
    seed = next(s for s in range(100) if first_batches_are_prior_then_mixed(data, s, 4))
    argv = ["--pretrained_model_name_or_path", model, "--data_backend_config", data, "--seed", str(seed),
            "--train_batch_size", "1", "--lora_type", "lycoris", "--lycoris_config", config, "--learning_rate", "1e-3",
            "--max_train_steps", "4", "--checkpointing_steps", "2"]
    whole = train_dreambooth.main(argv + ["--output_dir", str(tmp_path / "whole")])
    records = [json.loads(line) for line in open(tmp_path / "whole" / "logs" / "train_log.jsonl")]
    assert records[0]["loss/prior"] == 0.0  # a fresh LoKr changes nothing yet
    assert any(r.get("loss/prior", 0) > 0 for r in records[1:])
    assert whole["unet"].lycoris.multiplier == 1.0  # restored after every prior pass
    # Switched off, the trained network gives exactly the base model; on, something else.
    inputs = unet_inputs(whole["unet"], "sd1")
    base = predict(fresh_pipeline("sd1", model).unet, inputs)
    with adapters.adapter_disabled(whole["unet"]):
        assert torch.allclose(predict(whole["unet"], inputs), base, atol=1e-6)
    assert (predict(whole["unet"], inputs) - base).abs().max() > 1e-5
    # Resume from the step-2 checkpoint: the same final weights as the uninterrupted run.
    os.rename(tmp_path / "whole" / "checkpoint-2", tmp_path / "checkpoint-2")
    os.makedirs(tmp_path / "resumed")
    os.rename(tmp_path / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train_dreambooth.main(argv + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                                            "latest"])
    a, b = (adapters.trainable_parameters(r["unet"]) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lycoris_multiplier_survives_reloading_and_mixed_algorithms_get_no_kohya_file(tiny_model, subject_dir,
                                                                                        tmp_path, capsys):
    model = tiny_model("sd1")
    config = write_json(tmp_path / "half.json", {**ALGOS["lora"], "multiplier": 0.5, "apply_preset": PRESET})
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "half", "--lora_type", "lycoris",
                                              "--lycoris_config", config, "--learning_rate", "5e-3"))
    inputs = unet_inputs(result["unet"], "sd1")
    trained = predict(result["unet"], inputs)
    pipe = adapters.load_adapter(fresh_pipeline("sd1", model), str(tmp_path / "half"))
    assert torch.allclose(predict(pipe.unet, inputs), trained, atol=1e-5)
    pipe = fresh_pipeline("sd1", model)  # kohya has no multiplier: it is folded into alpha
    pipe.load_lora_weights(str(tmp_path / "half"), weight_name=adapters.KOHYA_WEIGHTS_NAME)
    assert torch.allclose(predict(pipe.unet, inputs), trained, atol=1e-5)

    mixed = write_json(tmp_path / "mixed.json", {**ALGOS["lora"], "apply_preset": {
        "target_module": ["Attention", "FeedForward"], "module_algo_map": {"FeedForward": {"algo": "lokr"}}}})
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "mixed", "--lora_type", "lycoris",
                                     "--lycoris_config", mixed, "--max_train_steps", "1"))
    assert "have no kohya form" in capsys.readouterr().out
    assert not (tmp_path / "mixed" / adapters.KOHYA_WEIGHTS_NAME).exists()


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_lycoris_trains_on_a_quantised_base_and_loads_unquantised(tiny_model, subject_dir, tmp_path, precision):
    model = tiny_model("sd1")
    config = write_json(tmp_path / "lokr.json", {**ALGOS["lokr"], "apply_preset": PRESET})
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_type", "lycoris",
                                              "--lycoris_config", config, "--base_model_precision", precision,
                                              "--learning_rate", "5e-3"))
    pipe = adapters.load_adapter(fresh_pipeline("sd1", model), str(tmp_path / "out"))
    trained = dict(result["unet"].lycoris.named_parameters())  # the learned weights (alpha buffers aside: a
    loaded = dict(pipe.unet.lycoris.named_parameters())        # full-matrix LoKr ignores them)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k].float()) for k in trained)
    assert max(v.abs().max().item() for k, v in trained.items() if "lokr_w" in k) > 0


def test_quantised_text_encoders_work_with_bf16_validation(tiny_model, subject_dir, tmp_path):
    train_dreambooth.main(train_argv(tiny_model("sdxl"), subject_dir, tmp_path / "out", "--max_train_steps", "1",
                                     "--mixed_precision", "bf16", "--text_encoder_1_precision", "int8-quanto",
                                     "--text_encoder_2_precision", "int8-quanto", "--validation_prompt", "a toy",
                                     "--validation_steps", "1", "--validation_num_inference_steps", "2",
                                     "--offload_frozen"))
    assert (tmp_path / "out" / "validation" / "step-1" / "grid.png").exists()
    with pytest.raises(SystemExit, match="--model_type full trains every UNet weight"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "full", "--model_type", "full",
                                         "--text_encoder_1_precision", "int8-quanto"))


def test_comfyui_format_of_a_peft_lora_loads_in_diffusers(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sdxl")
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_format", "comfyui",
                                              "--lora_alpha", "2", "--lora_target", "all"))
    with safe_open(str(tmp_path / "out" / adapters.KOHYA_WEIGHTS_NAME), "pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    inputs = unet_inputs(result["unet"], "sdxl")
    pipe = fresh_pipeline("sdxl", model)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=adapters.KOHYA_WEIGHTS_NAME)
    assert torch.allclose(predict(pipe.unet, inputs), predict(result["unet"], inputs), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Quantised base models

QUANTISED = ["int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb"]


@pytest.mark.parametrize("precision", QUANTISED)
def test_lora_on_a_quantised_unet_learns_a_fixed_batch(tiny_model, precision):
    """On one fixed batch, the LoRA's loss goes down step after step: the quantised layers pass gradients through."""
    info = model_info(tiny_model("sd1"))
    unet = quantise.quantize_model(models.load_component(info, "unet"), precision)
    assert not any(p.requires_grad for p in unet.parameters())
    adapters.add_lora(unet, adapters.LoraSettings(rank=4, init="default"), info.lora_targets(unet, "attention_ff"))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = unet_inputs(unet, "sd1")
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(unet.train()(**inputs).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("family,precision", [("sd1", precision) for precision in QUANTISED]
                         + [("flux", "int8-quanto"), ("sd3", "nf4-bnb"), ("chroma", "int8-quanto")])
def test_adapter_trained_on_a_quantised_base_loads_unquantised_and_resumes_exactly(tiny_model, subject_dir, tmp_path,
                                                                                  family, precision):
    model = tiny_model(family)
    argv = train_argv(model, subject_dir, tmp_path / "whole", "--base_model_precision", precision,
                      "--checkpointing_steps", "2")
    whole = train_dreambooth.main(argv)
    trained = adapters.trainable_parameters(whole["unet"])
    # The adapter is saved under the ordinary layer names: a normal pipeline loads every tensor of it.
    pipe = fresh_pipeline(family, model)
    pipe.load_lora_weights(str(tmp_path / "whole"))
    loaded = {name.replace(".default_0.", ".default."): p for name, p in models.denoiser_of(pipe).named_parameters()
              if "lora_" in name}
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k].float()) for k in trained)
    # Resume from the step-2 checkpoint of the same run.
    os.makedirs(tmp_path / "resumed")
    os.rename(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train_dreambooth.main(argv[:argv.index("--output_dir")] + ["--output_dir", str(tmp_path / "resumed")]
                                    + argv[argv.index("--output_dir") + 2:] + ["--resume_from_checkpoint", "latest"])
    again = adapters.trainable_parameters(resumed["unet"])
    assert all(torch.allclose(again[k], trained[k], atol=1e-6) for k in trained)


def test_impossible_precisions_fail_before_model_work(tiny_model, subject_dir, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="fp8-torchao needs a CUDA GPU of compute capability 8.9"):
            train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "a", "--base_model_precision",
                                             "fp8-torchao"))
    with pytest.raises(SystemExit, match="--model_type full trains every UNet weight"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "b", "--base_model_precision",
                                         "int8-quanto", "--model_type", "full"))
    with pytest.raises(SystemExit, match="--lora_type lycoris needs --lycoris_config"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "c", "--lora_type", "lycoris"))
    assert not any(os.path.exists(tmp_path / name) for name in "abc")


@pytest.mark.parametrize("family,encoder", [("sd1", 1), ("flux", 2), ("sd3", 3)])  # FLUX's and SD3's T5
def test_a_quantised_text_encoder_makes_its_own_text_cache(tiny_model, subject_dir, tmp_path, family, encoder):
    import cache_latents

    argv = ["--pretrained_model_name_or_path", tiny_model(family), "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of ohwx toy", "--output_dir", str(tmp_path / "out"), "--resolution", "64"]
    cache_latents.main(argv)
    cache_latents.main(argv + [f"--text_encoder_{encoder}_precision", "int8-quanto"])
    names = sorted(os.listdir(tmp_path / "out" / "cache" / "text"))
    assert len(names) == 2  # one embedding per (caption, encoder identity): the int8 encoder's is its own
    plain, quantised = (files.load_tensors(str(tmp_path / "out" / "cache" / "text" / f))["prompt_embeds"] for f in names)
    assert 0 < (plain - quantised).abs().max() < 0.5


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_validation_renders_each_lora_strength_and_strength_zero_is_the_base_model(tiny_model, subject_dir, tmp_path,
                                                                                   adapter):
    """--validation_lora_scales 0 0.5 1: each prompt and seed at each strength, side by side in the grid. Strength 0
    draws exactly the base model's picture, 1 exactly the trained adapter's, 0.5 neither; the adapter is left as
    trained."""
    import numpy as np
    from PIL import Image

    from common import images, render

    model = tiny_model("sd1")
    extra = ["--lora_type", "lycoris", "--lycoris_config", write_json(tmp_path / "lokr.json", {
        **ALGOS["lokr"], "apply_preset": PRESET})] if adapter == "lokr" else []
    argv = train_argv(model, subject_dir, tmp_path / "out", "--max_train_steps", "2", "--learning_rate", "5e-2",
                      "--validation_prompt", "a photo of ohwx toy", "--validation_steps", "2",
                      "--num_validation_images", "1", "--validation_num_inference_steps", "2",
                      "--validation_resolution", "64", "--validation_lora_scales", "0", "0.5", "1", *extra)
    result = train_dreambooth.main(argv)
    folder = tmp_path / "out" / "validation" / "step-2"
    drawn = {scale: np.asarray(Image.open(folder / f"prompt00-seed0_scale{scale}.png")) for scale in ("0", "0.5", "1")}
    args, info = train_dreambooth.parse_args(argv), model_info(model)
    options = render.drawing_options(info, 2, train_dreambooth.validation_guidance(args, info), None, 64)
    base = stock_pipeline(model)
    trained = models.build_pipeline(info, result["unet"].eval(), base.vae, [base.tokenizer], [base.text_encoder])
    for pipe, scale in ((base, "0"), (trained, "1")):
        [[picture]] = render.render(pipe, ["a photo of ohwx toy"], render.Round(1, args.validation_seed, options))
        assert np.array_equal(np.asarray(picture), drawn[scale]), scale
    assert not np.array_equal(drawn["0.5"], drawn["0"]) and not np.array_equal(drawn["0.5"], drawn["1"])
    grid = Image.open(folder / "grid.png")
    assert grid.size[0] == images.ROW_LABEL_WIDTH + 3 * 64  # three strengths side by side, labelled


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_dora_trains_reloads_in_stock_diffusers_and_switches_off_to_the_base_model(tiny_model, subject_dir, tmp_path,
                                                                                   family):
    """--use_dora (peft's DoRA): the saved file holds each module's magnitude beside its LoRA matrices, and stock
    load_lora_weights in a fresh pipeline reproduces the trained model's prediction; switched off (the base-model
    prior target), the model predicts exactly what the base model does, magnitudes and all."""
    model = tiny_model(family)
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--use_dora", "--max_train_steps",
                                              "3", "--learning_rate", "5e-2", "--lora_alpha", "8"))
    trained = result["unet"]
    denoiser = "unet" if family == "sd1" else "transformer"
    inputs = unet_inputs(trained, family)
    base = predict(getattr(fresh_pipeline(family, model), denoiser), inputs)
    ours = predict(trained, inputs)
    assert (ours - base).abs().max() > 1e-3  # it learned something
    with safe_open(str(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME), "pt") as handle:
        magnitudes = [k for k in handle.keys() if k.endswith(".lora_magnitude_vector")]
        assert magnitudes and all(k.startswith(f"{denoiser}.") for k in magnitudes)
        assert json.loads(handle.metadata()["lora_adapter_metadata"])[f"{denoiser}.use_dora"] is True
    pipe = fresh_pipeline(family, model)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert torch.allclose(predict(getattr(pipe, denoiser), inputs), ours, atol=1e-5)
    with adapters.adapter_disabled(trained):
        assert torch.equal(predict(trained, inputs), base)
    with pytest.raises(SystemExit, match="the kohya \\(ComfyUI\\) layout has no DoRA form"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "x", "--use_dora", "--lora_format", "comfyui"))
