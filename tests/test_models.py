"""Model loading and family detection; text encoding and time ids identical to what the diffusers pipelines compute."""

import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

from common import families, models
from conftest import stock_pipeline


def model_args(path, tmp_path, **extra):
    values = dict(pretrained_model_name_or_path=path, output_dir=str(tmp_path / "out"), cache_dir=None, variant=None,
                  revision=None, local_files_only=True, single_file_config=None)
    values.update(extra)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("family,prediction_type", [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction"),
                                                    ("sdxl", "epsilon"), ("sd3", "flow"), ("flux", "flow"),
                                                    ("flux-schnell", "flow"), ("chroma", "flow"),
                                                    ("flux2-klein", "flow"), ("if", "epsilon"), ("if-ii", "epsilon")])
def test_family_and_prediction_type_come_from_the_configs(tiny_model, tmp_path, family, prediction_type):
    info = models.resolve_model(model_args(tiny_model(family, prediction_type), tmp_path))
    assert (info.family, info.prediction_type) == ({"flux-schnell": "flux"}.get(family, family), prediction_type)
    assert info.vae_scale_factor == (1 if family.startswith("if") else 8)  # IF works on pixels
    # FLUX: no sample_size, 1024 px; the tiny IF's UNet draws 16 px (the real stage I: 64), its stage II 32 (256)
    assert info.native_resolution == {"flux": 1024, "flux-schnell": 1024, "chroma": 1024, "flux2-klein": 1024,
                                      "if": 16, "if-ii": 32}.get(family, 64)
    # FLUX.1-dev embeds its guidance and reads 512 T5 tokens, schnell neither; SD3 77 (diffusers' SD3 example);
    # Chroma 512 (its pipeline's), no guidance input
    assert (getattr(info, "guidance_embeds", False), info.t5_max_length) == {
        "flux": (True, 512), "flux-schnell": (False, 256), "sd3": (False, 77), "chroma": (False, 512)}.get(family,
                                                                                                      (False, 0))


def test_real_model_configs_are_detected_by_their_dimensions():
    # The defining config values of the real models (no weights needed to detect them).
    sd15 = {"cross_attention_dim": 768, "in_channels": 4}
    sd21 = {"cross_attention_dim": 1024, "in_channels": 4, "use_linear_projection": True}
    sdxl = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "in_channels": 4}
    index = {"text_encoder": ["transformers", "CLIPTextModel"]}
    assert families.detect(index, sd15, "m").family == "sd1"
    assert families.detect(index, sd21, "m").family == "sd2"
    assert families.detect(index, sdxl, "m").family == "sdxl"
    assert families.detect({"text_encoder": [None, None], "requires_aesthetics_score": True},
                           {**sdxl, "cross_attention_dim": 1280}, "m").family == "sdxl-refiner"
    with pytest.raises(SystemExit, match="inpainting"):
        families.detect(index, {**sd15, "in_channels": 9}, "m")
    # DeepFloyd IF: no VAE in the folder; T5 projected by encoder_hid_dim; noise + variance out (IF-I-XL's values)
    if_index = {"text_encoder": ["transformers", "T5EncoderModel"], "unet": ["diffusers", "UNet2DConditionModel"]}
    stage_1 = {"in_channels": 3, "out_channels": 6, "encoder_hid_dim": 4096, "cross_attention_dim": 4096,
               "addition_embed_type": "text", "sample_size": 64}
    assert families.detect(if_index, stage_1, "m").family == "if"
    # stage II, the x4 upscaler: the enlarged low-resolution picture in beside the noisy one, its noise level embedded
    stage_2 = {**stage_1, "in_channels": 6, "class_embed_type": "timestep"}
    assert families.detect(if_index, stage_2, "m").family == "if-ii"
    with pytest.raises(SystemExit, match="neither DeepFloyd IF stage I"):
        families.detect(if_index, {**stage_1, "in_channels": 6}, "m")
    # The transformers by their class: lodestones/Chroma1-HD's, and one this tool does not train
    transformer_index = {"transformer": ["diffusers", "ChromaTransformer2DModel"]}
    assert families.detect(transformer_index, {"_class_name": "ChromaTransformer2DModel", "in_channels": 64,
                                               "approximator_layers": 5}, "m").family == "chroma"
    klein = {"transformer": ["diffusers", "Flux2Transformer2DModel"], "text_encoder": ["transformers",
                                                                                         "Qwen3ForCausalLM"]}
    flux2 = {"_class_name": "Flux2Transformer2DModel", "in_channels": 128}
    assert families.detect(klein, flux2, "m").family == "flux2-klein"
    with pytest.raises(SystemExit, match="FLUX.2 dev, which this tool does not train yet"):
        families.detect({**klein, "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"]}, flux2, "m")
    with pytest.raises(SystemExit, match="SanaTransformer2DModel transformer is not a model this tool trains"):
        families.detect(transformer_index, {"_class_name": "SanaTransformer2DModel"}, "m")


def test_sdxl_refiner_is_told_apart_from_the_base(tiny_model, tmp_path):
    info = models.resolve_model(model_args(tiny_model("sdxl-refiner"), tmp_path))
    assert info.family == "sdxl-refiner" and info.text_parts == [("tokenizer_2", "text_encoder_2")]
    assert models.resolve_model(model_args(tiny_model("sdxl"), tmp_path)).family == "sdxl"


def test_a_folder_that_is_not_a_diffusers_model_is_a_clear_error(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="not a diffusers model folder \\(no model_index.json\\)"):
        models.resolve_model(model_args(str(tmp_path / "notamodel"), tmp_path))
    with pytest.raises(SystemExit, match="no such folder or file"):
        models.resolve_model(model_args(str(tmp_path / "missing"), tmp_path))


def test_an_uncached_hub_id_offline_says_what_went_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="could not get model 'nobody/no-such-model' from the hub \\(offline"):
        models.resolve_model(model_args("nobody/no-such-model", tmp_path))


def test_variant_weights_are_loaded_and_change_the_cache_identity(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model("sd1"), local_files_only=True)
    folder = str(tmp_path / "variant")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    info = models.resolve_model(model_args(folder, tmp_path, variant="fp16"))
    unet = models.load_component(info, "unet")
    assert torch.allclose(unet.conv_in.weight, pipe.unet.conv_in.weight.float())
    plain = models.resolve_model(model_args(tiny_model("sd1"), tmp_path))
    assert models.component_identity(info, "vae") != models.component_identity(plain, "vae")


def test_single_file_family_is_read_from_tensor_names(tmp_path):
    cases = {
        "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "sd2": "cond_stage_model.model.token_embedding.weight",
        "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
        "sdxl-refiner": "conditioner.embedders.0.model.token_embedding.weight",
    }
    for family, key in cases.items():
        path = str(tmp_path / f"{family}.safetensors")
        save_file({key: torch.zeros(1), "model.diffusion_model.out.2.bias": torch.zeros(1)}, path)
        assert families.detect_single_file(path).family == family
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)},
              str(tmp_path / "sd3.safetensors"))
    assert families.detect_single_file(str(tmp_path / "sd3.safetensors")).family == "sd3"
    for prefix in ("", "model.diffusion_model."):  # Black Forest Labs' file; ComfyUI's, with the prefix
        save_file({prefix + "double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(tmp_path / "flux.safetensors"))
        assert families.detect_single_file(str(tmp_path / "flux.safetensors")).family == "flux"
    # Chroma's original file has FLUX's double blocks and its distilled guidance network; it is not converted yet
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
               "distilled_guidance_layer.in_proj.weight": torch.zeros(1)}, str(tmp_path / "chroma.safetensors"))
    assert families.detect_single_file(str(tmp_path / "chroma.safetensors")).family == "chroma"
    with pytest.raises(SystemExit, match="Pass the diffusers folder or hub id instead"):
        models.resolve_model(model_args(str(tmp_path / "chroma.safetensors"), tmp_path))
    # FLUX.2's has double blocks too, modulated by shared stream modulations: recognised, refused for now
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
               "double_stream_modulation_img.lin.weight": torch.zeros(1)}, str(tmp_path / "flux2.safetensors"))
    assert families.detect_single_file(str(tmp_path / "flux2.safetensors")).family == "flux2-klein"
    with pytest.raises(SystemExit, match="a FLUX.2 checkpoint in Black Forest Labs' layout"):
        models.resolve_model(model_args(str(tmp_path / "flux2.safetensors"), tmp_path))
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SystemExit, match="not a Stable Diffusion checkpoint"):
        families.detect_single_file(str(tmp_path / "other.safetensors"))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(SystemExit, match="pickle that can run code"):
        models.resolve_model(model_args(str(path), tmp_path))


def load_pipeline(family, path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(
        path, local_files_only=True)


@pytest.mark.parametrize("family, t5_length", [(family, None) for family in ("sd1", "sd2", "sdxl", "sd3", "sd3-no-t5",
                                                                             "flux", "flux-schnell", "chroma",
                                                                             "flux2-klein", "if", "if-ii")]
                         + [("sd3-no-t5", 100)])  # without T5, the pipeline pads with max_sequence_length zeros
def test_encode_prompt_equals_the_pipeline(tiny_model, tmp_path, family, t5_length):
    path = tiny_model(family)
    info = models.resolve_model(model_args(path, tmp_path, t5_max_sequence_length=t5_length))
    tokenizers, encoders = models.load_text_encoders(info)
    prompts = ["a photo of ohwx dog", "a very long prompt " * 30]  # the second one is truncated at 77 tokens
    if family.startswith("if"):  # IF's pipelines lower-case and strip the caption first
        prompts.append("  A Photo of OHWX Dog ")
    ours = info.encode_prompt(tokenizers, encoders, prompts)
    if family.startswith("if"):  # T5 with its padding masked, 77 tokens; the caption read as the pipeline reads it
        pipe = stock_pipeline(path)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                           clean_caption=False)
        assert torch.equal(ours["prompt_embeds"], embeds) and embeds.shape[1] == 77
        assert torch.equal(embeds[2], embeds[0]) and "pooled_prompt_embeds" not in ours
        return
    if family == "flux2-klein":  # Qwen3 through its chat template, layers 9, 18 and 27 side by side, 512 tokens
        pipe = stock_pipeline(path)
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(prompts, device="cpu")
        assert torch.equal(ours["prompt_embeds"], embeds) and embeds.shape[1:] == (512, 3 * 16)
        assert text_ids[0, :3].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]  # the layer axis counts
        return
    if family == "chroma":  # T5 read with its mask; the transformer's mask: every real token and the first pad
        pipe = stock_pipeline(path)
        with torch.no_grad():
            embeds, _, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                     max_sequence_length=info.t5_max_length)
        assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["attention_mask"], mask)
        real = pipe.tokenizer(prompts[:1]).attention_mask[0]
        assert embeds.shape[1] == 512 and mask[0].sum() == len(real) + 1 and "pooled_prompt_embeds" not in ours
        return
    if info.denoiser == "transformer":  # SD3 / FLUX: the stock pipeline, T5 at the length we train with
        pipe = stock_pipeline(path)
        with torch.no_grad():  # as the pipeline's __call__ runs it (T5's attention kernel differs under grad)
            if info.family == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                          max_sequence_length=info.t5_max_length)
            else:
                embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=info.t5_max_length)
        assert torch.equal(ours["pooled_prompt_embeds"], pooled) and torch.equal(ours["prompt_embeds"], embeds)
        # SD3: 77 CLIP tokens then the T5 tokens (zeros without T5); FLUX: T5 only
        assert embeds.shape[1] == {"sd3": 77 + info.t5_max_length, "flux": info.t5_max_length}[info.family]
        assert (family == "sd3-no-t5") == bool((embeds[:, 77:] == 0).all())
        return
    pipe = load_pipeline(family, path)
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        assert torch.equal(ours["pooled_prompt_embeds"], pooled)
        assert ours["prompt_embeds"].shape[-1] == 32 + 48  # both encoders' penultimate states, concatenated
    else:
        embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        assert "pooled_prompt_embeds" not in ours
    assert torch.equal(ours["prompt_embeds"], embeds)


def test_sdxl_time_ids_equal_the_pipeline(tiny_model, tmp_path):
    pipe = load_pipeline("sdxl", tiny_model("sdxl"))
    info = models.resolve_model(model_args(tiny_model("sdxl"), tmp_path))
    transform = {"original_size": [640, 480], "crop_box": [32, 16, 544, 528], "target_size": [512, 512],
                 "resized_size": [683, 512], "downsampled_size": [640, 480]}
    expected = pipe._get_add_time_ids((480, 640), (16, 32), (512, 512), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(info.time_ids(transform)[None], expected)


def test_a_hub_id_loads_from_the_local_hub_cache_offline(tiny_model, tmp_path, monkeypatch):
    """The real hub path (diffusers' downloader), served from a hub cache laid out as huggingface_hub writes it."""
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model("sd1"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = models.resolve_model(model_args("someone/tiny-sd", tmp_path))
    assert (info.family, info.ref) == ("sd1", "someone/tiny-sd")
    assert os.path.realpath(info.folder) == os.path.realpath(repo / "snapshots" / commit)
    unet = models.load_component(info, "unet")
    assert unet.config.cross_attention_dim == 32


def test_a_step_distilled_flux2_klein_is_told_apart_and_warned_about(tiny_model, tmp_path):
    """The pipeline's is_distilled (model_index.json) marks a step-distilled klein: its pipeline draws without
    classifier-free guidance, and training on it is warned about, naming the base models to train on instead."""
    import json
    import shutil

    folder = str(tmp_path / "distilled")
    shutil.copytree(tiny_model("flux2-klein"), folder)
    index = json.load(open(os.path.join(folder, "model_index.json")))
    json.dump({**index, "is_distilled": True}, open(os.path.join(folder, "model_index.json"), "w"))
    base, distilled = (models.resolve_model(model_args(path, tmp_path)) for path in (tiny_model("flux2-klein"), folder))
    assert (base.distilled, base.notes(4.0)) == (False, [])
    assert distilled.distilled and "FLUX.2-klein-base-4B" in distilled.notes(4.0)[0]
    assert models.load_pipeline(distilled).config.is_distilled  # so validation draws as the model is meant to
    assert not models.load_pipeline(base).config.is_distilled
    # the model card's example names the prompt: the pipeline's first argument is an image to edit
    assert base.card_loading('image = pipe("a photo").images[0]', "lora")[1] == 'image = pipe(prompt="a photo").images[0]'
