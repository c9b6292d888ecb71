"""--train_text_encoder: a LoRA on the CLIP text encoders, encoded every step, saved for load_lora_weights and kohya."""

import os

import pytest
import torch
from conftest import predict, resumed_weights, stock_pipeline, train_argv, unet_inputs
from safetensors.torch import load_file

import train_dreambooth
from common import adapters, models

CAPTION = "a photo of ohwx toy"
# The kohya file's text-encoder names per family (diffusers reads SD 1.x / SDXL / FLUX.1 back; SD3 has no reader)
KOHYA_TEXT = {"sd1": ["lora_te_"], "sdxl": ["lora_te1_", "lora_te2_"], "sd3": ["lora_te1_", "lora_te2_"],
              "flux": ["lora_te1_"]}


def pipeline_texts(pipe, info):
    """encode_prompt's output through a pipeline's own text encoders."""
    parts = info.text_parts
    return info.encode_prompt([getattr(pipe, t) for t, _ in parts], [getattr(pipe, e) for _, e in parts], [CAPTION])


def denoiser_inputs(unet, family, texts):
    """unet_inputs with the text side replaced by `texts` (encode_prompt's output)."""
    inputs = unet_inputs(unet, family)
    inputs["encoder_hidden_states"] = texts["prompt_embeds"]
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"]["text_embeds"] = texts["pooled_prompt_embeds"]
    if "pooled_projections" in inputs:
        inputs["pooled_projections"] = texts["pooled_prompt_embeds"]
    if family == "flux":
        inputs["txt_ids"] = torch.zeros(texts["prompt_embeds"].shape[1], 3)
    return inputs


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_trained_text_encoders_reload_in_a_fresh_pipeline_and_reproduce_our_outputs(tiny_model, subject_dir, tmp_path,
                                                                                    family):
    """The saved LoRA holds both encoders' layers (text_encoder. / text_encoder_2.): a fresh pipeline with stock
    load_lora_weights encodes the caption exactly as our trained encoders do, and its denoiser then predicts what
    ours does. The kohya file's lora_te* keys give the same through diffusers' own converter."""
    model = tiny_model(family)
    layers = ["--lora_layers", "attn.to_out.0"] if family == "flux" else []  # (converter: real widths for qkv)
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--train_text_encoder",
                                              "--learning_rate", "1e-2", "--lora_format", "comfyui", *layers))
    unet = result["unet"].eval()
    info = models.resolve_model(train_dreambooth.parse_args(train_argv(model, subject_dir, tmp_path / "out")))
    trained = adapters.trained_text_encoders(unet)
    assert sorted(trained) == sorted(info.trainable_text_encoders)  # CLIPs, never T5
    base_pipe = stock_pipeline(model)
    base = pipeline_texts(base_pipe, info)
    ours = info.encode_prompt([getattr(base_pipe, t) for t, _ in info.text_parts],
                              [trained.get(e) or getattr(base_pipe, e) for _, e in info.text_parts], [CAPTION])
    moved = {key: (ours[key] - base[key]).abs().max().item() for key in ours}
    assert moved["pooled_prompt_embeds" if family == "flux" else "prompt_embeds"] > 1e-3, moved  # FLUX: CLIP's pooled
    with torch.no_grad():
        expected = unet(**denoiser_inputs(unet, family, ours), return_dict=False)[0]
    kohya = load_file(str(tmp_path / "out" / adapters.KOHYA_WEIGHTS_NAME))
    assert sorted({key[:key.index("text_model")] for key in kohya if key.startswith("lora_te")}) == KOHYA_TEXT[family]
    for name in [adapters.LORA_WEIGHTS_NAME] + ([adapters.KOHYA_WEIGHTS_NAME] if family != "sd3" else []):
        pipe = stock_pipeline(model)
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=name)
        got = pipeline_texts(pipe, info)
        assert all(torch.allclose(got[key], ours[key], atol=1e-6) for key in ours), name
        denoiser = models.denoiser_of(pipe)
        assert torch.allclose(predict(denoiser, denoiser_inputs(denoiser, family, got)), expected, atol=1e-5), name


def test_text_encoder_lr_is_its_own_group_and_a_resumed_run_ends_bit_identical(tiny_model, subject_dir, tmp_path):
    model = tiny_model("sdxl")
    argv = train_argv(model, subject_dir, tmp_path / "whole", "--train_text_encoder", "--text_encoder_lr", "5e-4",
                      "--max_train_steps", "3", "--checkpointing_steps", "2", "--lora_init", "default")
    train_dreambooth.main(argv)
    whole, resumed = resumed_weights(argv, tmp_path / "whole", tmp_path / "resumed", "checkpoint-2")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    for prefix in ("text_encoder.", "text_encoder_2.", "unet."):  # every part learned (B starts at zero)
        assert any(v.abs().max() > 0 for k, v in whole.items() if k.startswith(prefix) and ("lora_B" in k or "up" in k))
    # lr 0 for the encoders: their LoRA stays where it started while the UNet's moves
    still = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "still", "--train_text_encoder",
                                             "--text_encoder_lr", "0", "--max_train_steps", "2"))
    ups = {k: v for k, v in adapters.trainable_parameters(still["unet"]).items() if "lora_B" in k}
    assert all(not v.any() for k, v in ups.items() if k.startswith("text_encoders."))
    assert any(v.any() for k, v in ups.items() if not k.startswith("text_encoders."))


def test_base_passes_read_the_base_encoders_and_training_reads_the_trained_ones(tiny_model, subject_dir, tmp_path,
                                                                                 monkeypatch):
    """The base model's predictions (DOP's class rows here; the base-model prior target likewise) are computed with
    the adapter off on both sides: the base text encoders' embeddings, equal to the pipeline's encode_prompt. The
    trained pass reads the caption through the encoders as they are at that step."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_model("sd1")
    info = models.resolve_model(train_dreambooth.parse_args(train_argv(model, subject_dir, tmp_path / "out")))
    base_pipe = stock_pipeline(model)
    base = {c: info.encode_prompt([base_pipe.tokenizer], [base_pipe.text_encoder], [c])["prompt_embeds"][0]
            for c in (CAPTION, "a photo of toy")}
    seen, original = [], type(info).predict

    def recording(info_, model_, noisy, timesteps, cond):
        layers = [m for m in model_.modules() if isinstance(m, BaseTunerLayer)]
        seen.append((any(layer.disable_adapters for layer in layers), cond["encoder_hidden_states"].detach().clone()))
        return original(info_, model_, noisy, timesteps, cond)

    monkeypatch.setattr(type(info), "predict", recording)
    train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--train_text_encoder", "--learning_rate",
                                     "1e-2", "--dop_class", "toy", "--dop_trigger", "ohwx toy",
                                     "--max_train_steps", "3"))
    base_passes = [states for disabled, states in seen if disabled]
    trained_passes = [states for disabled, states in seen if not disabled]
    assert len(base_passes) == len(trained_passes) == 3
    for states in base_passes:  # the class caption, read by the base encoder
        assert all(torch.allclose(row, base["a photo of toy"], atol=1e-6) for row in states)
    # The trained pass: the instance captions, then DOP's class rows, through encoders that learn step by step
    first, last = trained_passes[0], trained_passes[-1]
    assert torch.allclose(first[0], base[CAPTION], atol=1e-6)  # step 0: the LoRA starts as the identity
    assert not torch.allclose(last[0], base[CAPTION], atol=1e-3)
    assert not torch.allclose(last[-1], base["a photo of toy"], atol=1e-3)


def test_validation_draws_with_the_trained_encoders(tiny_model, subject_dir, tmp_path, monkeypatch):
    from common import render

    drawn_with, original = [], render.render

    def recording(pipe, *args, **kwargs):
        drawn_with.append(pipe.text_encoder)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(render, "render", recording)
    result = train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--train_text_encoder",
                                              "--validation_prompt", "a ohwx toy", "--validation_steps", "2",
                                              "--num_validation_images", "1", "--validation_num_inference_steps", "2",
                                              "--offload_frozen"))
    trained = adapters.trained_text_encoders(result["unet"])["text_encoder"]
    assert len(drawn_with) == 2 and all(encoder is trained for encoder in drawn_with)
    assert all(p.requires_grad for p in adapters.trainable_parameters(trained).values())


@pytest.mark.parametrize("family,flags,message", [
    ("sd1", ["--model_type", "full"], "a full fine-tune saves whole models"),
    ("sd1", ["--lora_type", "lycoris", "--lycoris_config", "x.json"], "a LyCORIS network covers the UNet alone"),
    ("sdxl-refiner", [], "the caption barely steers the picture"),
])
def test_text_encoder_training_is_refused_where_it_cannot_work(tiny_model, subject_dir, tmp_path, family, flags,
                                                               message):
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(tiny_model(family), subject_dir, tmp_path / "out", "--train_text_encoder",
                                         *flags))
    with pytest.raises(SystemExit, match="add --train_text_encoder"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--text_encoder_lr", "1e-5"))
    assert not os.path.exists(tmp_path / "out" / "cache")
