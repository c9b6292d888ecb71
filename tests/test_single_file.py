"""Single-file checkpoints: an original-format (LDM / A1111) .safetensors loads through models.resolve_model ->
convert_single_file -> diffusers' from_single_file offline, with --single_file_config naming a diffusers folder of
the same architecture, and comes out as a diffusers folder whose weights equal the model it was written from.

The checkpoints are written from the tiny random models by tests/ldm_checkpoint.py (the inverse of diffusers'
converters), so nothing binary is committed and nothing is downloaded."""

import argparse
import json
import os
import shutil

import pytest
import torch
from ldm_checkpoint import (SD1_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
                            flux_to_original, load_components, save_ldm_checkpoint, save_sd3_checkpoint)
from safetensors import safe_open
from safetensors.torch import save_file

from common import families, models

PROMPTS = ["a photo of ohwx dog", "a red robot on the beach"]


def model_args(path, tmp_path, **extra):
    values = dict(pretrained_model_name_or_path=path, output_dir=str(tmp_path / "out"),
                  cache_dir=str(tmp_path / "cache"), variant=None, revision=None, local_files_only=True,
                  single_file_config=None)
    values.update(extra)
    return argparse.Namespace(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one CPU thread runs them fastest, and much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def public_config(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "transformers_version"}


def assert_same_weights(original_folder, converted_folder, family):
    """Every weight component: same configs, same tensor names, every tensor bit-identical."""
    original, converted = load_components(original_folder, family), load_components(converted_folder, family)
    for name, model in original.items():
        other = converted[name]
        a_config = model.config.to_dict() if hasattr(model.config, "to_dict") else model.config
        b_config = other.config.to_dict() if hasattr(other.config, "to_dict") else other.config
        assert public_config(a_config) == public_config(b_config), name
        a, b = model.state_dict(), other.state_dict()
        assert sorted(a) == sorted(b), name
        different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_outputs(original, converted):
    """What training computes from the model: prompt embeddings, a UNet prediction and a VAE latent."""
    ours = [info.encode_prompt(*models.load_text_encoders(info), PROMPTS) for info in (original, converted)]
    assert sorted(ours[0]) == sorted(ours[1])
    for key in ours[0]:
        assert torch.equal(ours[0][key], ours[1][key]), key

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    kwargs = {}
    if original.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": ours[0]["pooled_prompt_embeds"],
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    outputs = []
    for info in (original, converted):
        unet, vae = models.load_component(info, "unet").eval(), models.load_component(info, "vae").eval()
        with torch.no_grad():
            noise_pred = unet(latents, torch.tensor([10, 500]), ours[0]["prompt_embeds"], **kwargs).sample
            latent = vae.encode(image).latent_dist.mean
        outputs.append((noise_pred, latent))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def check_single_file_round_trip(folder, family, tmp_path, monkeypatch):
    checkpoint = save_ldm_checkpoint(folder, str(tmp_path / f"tiny-{family}.safetensors"), family)
    assert families.detect_single_file(checkpoint).family == family
    args = model_args(checkpoint, tmp_path, single_file_config=folder)

    info = models.resolve_model(args)
    assert (info.family, info.prediction_type, info.ref) == (family, "epsilon", checkpoint)
    cache = os.path.realpath(args.cache_dir)
    assert os.path.commonpath([os.path.realpath(info.folder), cache]) == cache
    assert os.path.isfile(os.path.join(info.folder, "model_index.json"))
    assert not [n for n in os.listdir(os.path.dirname(info.folder)) if ".tmp" in n]  # nothing half-written left

    original = models.resolve_model(model_args(folder, tmp_path))
    assert (info.model_config, info.vae_config) == (original.model_config, original.vae_config)
    with open(os.path.join(info.folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as handle:
        scheduler = json.load(handle)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as handle:
        assert public_config(scheduler) == public_config(json.load(handle))
    assert_same_weights(folder, info.folder, family)
    assert_same_outputs(original, info)

    # A second run finds the converted folder and never calls from_single_file again.
    from diffusers.loaders.single_file import FromSingleFileMixin

    def refuse(*_, **__):
        raise AssertionError("the checkpoint was converted a second time")

    monkeypatch.setattr(FromSingleFileMixin, "from_single_file", classmethod(refuse))
    index = os.path.join(info.folder, "model_index.json")
    written = os.stat(index).st_mtime_ns
    again = models.resolve_model(args)
    assert again.folder == info.folder and again.family == family
    assert os.stat(index).st_mtime_ns == written


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_checkpoint_converts_offline_to_the_same_model(tiny_model, tmp_path, monkeypatch, family):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    check_single_file_round_trip(tiny_model(family), family, tmp_path, monkeypatch)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_checkpoint_is_the_inverse_of_the_diffusers_converters(tiny_model, tmp_path, family):
    """The writer alone, against diffusers' converter functions (no pipeline, nothing of common/)."""
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)

    folder = tiny_model(family)
    path = save_ldm_checkpoint(folder, str(tmp_path / "tiny.safetensors"), family)
    with safe_open(path, framework="pt") as handle:
        checkpoint = {key: handle.get_tensor(key) for key in handle.keys()}
    models = load_components(folder, family)
    prefixes = [UNET_PREFIX, VAE_PREFIX] + ([SD1_CLIP_PREFIX] if family == "sd1" else
                                            [SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX])
    assert all(key.startswith(tuple(prefixes)) for key in checkpoint)
    marker = CHECKPOINT_KEY_NAMES["clip" if family == "sd1" else "open_clip_sdxl"]
    assert marker in checkpoint

    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config)),
        # transformers >= 5.6 CLIPTextModel has no text_model. level; the original files (and converter) do
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }
    if family == "sdxl":
        converted["text_encoder_2"] = convert_open_clip_checkpoint(models["text_encoder_2"], checkpoint,
                                                                   prefix=SDXL_OPEN_CLIP_PREFIX)
    for name, model in models.items():
        expected = model.state_dict()
        assert sorted(converted[name]) == sorted(expected), name
        assert all(torch.equal(converted[name][k], expected[k]) for k in expected), name


@pytest.mark.parametrize("family", ["sd3", "sd3-no-t5"])
def test_an_sd3_file_without_text_encoders_takes_them_from_the_config_folder(tiny_model, tmp_path, family):
    """Stability ships SD3 / SD3.5 files with the MMDiT and VAE only: the text encoders come from
    --single_file_config (none for T5 where that model has none), and the result is the same model."""
    folder = tiny_model(family)
    checkpoint = save_sd3_checkpoint(folder, str(tmp_path / "sd3.safetensors"))
    assert families.detect_single_file(checkpoint).family == "sd3"
    with pytest.raises(SystemExit, match="holds no text_encoder, text_encoder_2, text_encoder_3: give "
                                         "--single_file_config"):
        models.resolve_model(model_args(checkpoint, tmp_path))
    info = models.resolve_model(model_args(checkpoint, tmp_path, single_file_config=folder))
    original = models.resolve_model(model_args(folder, tmp_path))
    assert (info.family, info.prediction_type) == ("sd3", "flow") and info.model_config == original.model_config
    assert info.text_parts == original.text_parts
    for part in ["transformer", "vae"] + [encoder for _, encoder in original.text_parts]:
        a, b = (models.load_component(i, part).state_dict() for i in (original, info))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part
    ours = [i.encode_prompt(*models.load_text_encoders(i), PROMPTS) for i in (original, info)]
    assert all(torch.equal(ours[0][key], ours[1][key]) for key in ours[0])


def wide_flux_transformer():
    """FLUX.1's real width (24 heads x 128: diffusers' converter knows no other) with one block of each kind and the
    tiny text widths: 531 M parameters in bf16, filled with seeded noise (no initialisation pass)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-1, 1, generator=generator)
    return model


def test_a_flux_file_in_black_forest_labs_layout_loads_with_its_parts_from_the_config(tiny_model, tmp_path):
    """A FLUX.1 file as Black Forest Labs and fine-tuners ship it (the transformer alone, bf16) converts to a diffusers
    folder whose transformer equals the one the file was written from, in the file's precision; the VAE, text
    encoders and scheduler come from --single_file_config; without it, or for a width diffusers' converter does not
    read, the run stops saying what to do."""
    config = str(tmp_path / "config")
    shutil.copytree(tiny_model("flux"), config, ignore=lambda folder, names: [  # the transformer: its config only
        n for n in names if os.path.basename(folder) == "transformer" and n.startswith("diffusion_pytorch_model")])
    wide = wide_flux_transformer()
    wide.save_config(os.path.join(config, "transformer"))  # the architecture, for from_single_file
    expected = wide.state_dict()
    checkpoint = str(tmp_path / "flux1-ohwx.safetensors")
    save_file({key: value.contiguous() for key, value in flux_to_original(wide, expected).items()}, checkpoint)
    del wide
    assert families.detect_single_file(checkpoint).family == "flux"
    with pytest.raises(SystemExit, match="holds the FLUX transformer alone: give --single_file_config"):
        models.resolve_model(model_args(checkpoint, tmp_path))

    info = models.resolve_model(model_args(checkpoint, tmp_path, single_file_config=config))
    assert (info.family, info.prediction_type, info.guidance_embeds) == ("flux", "flow", True)
    loaded = models.load_component(info, "transformer", torch.bfloat16).state_dict()
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    stored = os.path.join(info.folder, "transformer", "diffusion_pytorch_model.safetensors")
    with safe_open(stored, framework="pt") as handle:  # kept in the file's precision, not widened to fp32
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    original = models.resolve_model(model_args(tiny_model("flux"), tmp_path / "o"))
    vae = (models.load_component(i, "vae").state_dict() for i in (original, info))
    a, b = vae
    assert all(torch.equal(a[k].to(torch.bfloat16).float(), b[k]) for k in a)  # the config's VAE, in the file's bf16

    narrow = models.load_component(original, "transformer")
    save_file({k: v.contiguous() for k, v in flux_to_original(narrow, narrow.state_dict()).items()},
              str(tmp_path / "narrow.safetensors"))
    with pytest.raises(SystemExit, match="a FLUX transformer 32 wide; diffusers' converter reads the FLUX.1 width"):
        models.resolve_model(model_args(str(tmp_path / "narrow.safetensors"), tmp_path / "n",
                                        single_file_config=config))
