"""Flow matching (SD3, FLUX.1): the noise levels, shift and weights are diffusers' own; FLUX's packed tokens are its
pipeline's; the first step's loss is the objective computed by hand; the LoRA reloads in the stock pipelines in a
fresh process and reproduces our prediction; what does not apply is refused."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import first_step, model_info, predict, train_argv, unet_inputs
from ldm_checkpoint import mmdit_to_original

from common import data, families, files, models, objectives
from common.families import flux
import train_dreambooth


def flow(family_model, **flags):
    options = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, flow_shift=None)
    return objectives.for_model(model_info(family_model), argparse.Namespace(**{**options, **flags}))


def test_packed_tokens_and_their_ids_are_the_flux_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 6, 10)
    assert torch.equal(flux.pack(latents), packed)
    assert torch.equal(flux.unpack(packed, 6, 10), latents)
    # The pipeline's unpack takes pixel sizes (8 px per latent cell)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), latents)
    assert torch.equal(flux.image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_noise_levels_are_diffusers_density_then_the_schedulers_shift(tiny_model):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    latents = torch.zeros(3, 16, 32, 48)
    for family, scheme in (("sd3", "logit_normal"), ("flux", "mode"), ("flux-schnell", "uniform")):
        objective = flow(tiny_model(family), weighting_scheme=scheme)
        noise, sigmas = objective.draw(latents, torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
        assert torch.equal(noise, torch.randn(latents.shape, generator=generator))
        u = compute_density_for_timestep_sampling(scheme, 3, 0.0, 1.0, 1.29, generator=generator)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model(family), subfolder="scheduler")
        if family == "flux":  # resolution-dependent: the mu FluxPipeline uses for 16 x 24 tokens
            mu = calculate_shift(16 * 24, 256, 4096, 0.5, 1.15)
            expected = scheduler.time_shift(mu, 1.0, u)
        else:  # SD3 3.0, schnell 1.0: the static shift the scheduler applies to its sigmas
            shift = scheduler.config.shift
            expected = shift * u / (1 + (shift - 1) * u)
            assert objective.shift == {"sd3": 3.0, "flux-schnell": 1.0}[family]
        assert torch.allclose(sigmas, expected, atol=1e-6)
    fixed = flow(tiny_model("flux"), flow_shift=2.0)
    assert torch.allclose(fixed.shifted(torch.tensor([0.5]), latents.shape), torch.tensor([2 / 3]))


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap", "sigma_sqrt"])
def test_loss_weights_are_diffusers_sd3_weighting(tiny_model, scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.tensor([0.1, 0.5, 0.9])
    weights = flow(tiny_model("sd3"), weighting_scheme=scheme).loss_weights(sigmas)
    if scheme == "logit_normal":
        assert weights is None  # all ones: no weighting
    else:
        assert torch.allclose(weights, compute_loss_weighting_for_sd3(scheme, sigmas))


def test_flow_rollout_is_the_flow_match_euler_sampler_and_the_recomputed_target_implies_x0(tiny_model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    objective = flow(tiny_model("sd3"))
    clean, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    field = torch.randn(1, 16, 4, 4)

    def velocity(x, sigma):  # any model: a velocity that depends on x and the noise level
        return torch.tanh(x + field) * (1 + sigma.view(-1, 1, 1, 1))

    sigma, k = 0.4, 5
    rolled = objective.rollout(velocity, clean, noise, torch.tensor(sigma), k)
    levels = [sigma + (k - j) / 1000 for j in range(k + 1)]
    sampler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sampler.set_timesteps(sigmas=levels)
    x = (1 - levels[0]) * clean + levels[0] * noise
    for i, t in enumerate(sampler.timesteps[:k]):
        x = sampler.step(velocity(x, torch.tensor([sampler.sigmas[i]])), t, x).prev_sample
    assert torch.allclose(rolled, x, atol=1e-5)
    assert not torch.allclose(rolled, objective.add_noise(clean, noise, torch.tensor([sigma])), atol=1e-3)
    implied = objective.implied_noise(clean, rolled, torch.tensor([sigma]))
    target = objective.target(clean, implied, torch.tensor([sigma]))
    assert torch.allclose(rolled - sigma * target, clean, atol=1e-5)  # x_s - s v = x0: the true clean latent


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma", "flux2-klein"])
def test_first_step_loss_equals_the_flow_matching_objective_computed_by_hand(tiny_model, subject_dir, tmp_path, family):
    """The logged loss of step 1 is MSE(v_pred, eps - x0) at x_s = (1 - s) x0 + s eps, with s drawn as diffusers'
    compute_density_for_timestep_sampling and shifted as the scheduler does, the latent normalised by the VAE's
    shift and scale, and the transformer called as its pipeline calls it (FLUX: packed tokens, ids, guidance;
    Chroma: packed tokens, ids and the pipeline's attention mask, text and image tokens; FLUX.2 klein: the latent
    patchified and normalised by the VAE's batch norm, its pipeline's empirical shift, 4-D ids)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    guidance = ["--flux_guidance_value", "2.5"] if family == "flux" else []
    logged, info, entry, caption, generator = first_step(tiny_model(family), subject_dir, tmp_path / "out", *guidance)
    cached = files.load_tensors(entry.cache_path)
    latents = (cached["mean"] + cached["std"] * torch.randn(cached["mean"].shape, generator=generator))[None]
    shape = latents.shape  # the VAE's grid, in which training draws the noise
    if family == "flux2-klein":  # the pipeline's own patchify and batch-norm statistics, in its (B, 4C, h, w) grid
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(info.folder, local_files_only=True)
        bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        latents = (Flux2KleinPipeline._patchify_latents(latents) - pipe.vae.bn.running_mean.view(1, -1, 1, 1)) / bn_std
    else:
        latents = (latents - info.vae_config["shift_factor"]) * info.vae_config["scaling_factor"]
    noise = torch.randn(shape, generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", 1, 0.0, 1.0, generator=generator)
    if family == "flux2-klein":
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        mu = compute_empirical_mu(latents.shape[2] * latents.shape[3], 50)  # its pipeline's, at its 50 steps
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        noise = Flux2KleinPipeline._patchify_latents(noise)  # the same numbers, in the patchified grid
    elif family == "sd3":
        sigma = 3.0 * u / (1 + 2.0 * u)
    else:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(latents.shape[2] * latents.shape[3] // 4, 256, 4096, 0.5, 1.15)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    noisy = (1 - sigma) * latents + sigma * noise
    tokenizers, encoders = models.load_text_encoders(info)
    text = info.encode_prompt(tokenizers, encoders, [caption])
    transformer = models.load_component(info, "transformer").eval()
    with torch.no_grad():
        if family == "flux2-klein":
            embeds, text_ids = pipe.encode_prompt([caption], device="cpu")
            ids = Flux2KleinPipeline._prepare_latent_ids(noisy)
            tokens = transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=sigma, guidance=None,
                                 encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids).sample
            pred = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids)
        elif family == "chroma":
            from diffusers import ChromaPipeline

            pipe = ChromaPipeline.from_pretrained(info.folder, local_files_only=True)
            embeds, text_ids, mask, *_ = pipe.encode_prompt([caption], do_classifier_free_guidance=False,
                                                            device="cpu", max_sequence_length=512)
            height, width = latents.shape[2:]
            tokens = ChromaPipeline._pack_latents(noisy, 1, 16, height, width)
            out = transformer(hidden_states=tokens, timestep=sigma, encoder_hidden_states=embeds, txt_ids=text_ids,
                              img_ids=ChromaPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu",
                                                                              torch.float32),
                              attention_mask=pipe._prepare_attention_mask(1, tokens.shape[1], torch.float32, mask),
                              ).sample
            pred = ChromaPipeline._unpack_latents(out, height * 8, width * 8, 8)
        elif family == "sd3":
            pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text["prompt_embeds"],
                               pooled_projections=text["pooled_prompt_embeds"]).sample
        else:
            from diffusers import FluxPipeline

            height, width = latents.shape[2:]
            tokens = transformer(hidden_states=FluxPipeline._pack_latents(noisy, 1, 16, height, width),
                                 timestep=sigma, guidance=torch.tensor([2.5]),
                                 encoder_hidden_states=text["prompt_embeds"],
                                 pooled_projections=text["pooled_prompt_embeds"],
                                 txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3),
                                 img_ids=FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu",
                                                                               torch.float32)).sample
            pred = FluxPipeline._unpack_latents(tokens, height * 8, width * 8, 8)
    expected = torch.nn.functional.mse_loss(pred, noise - latents).item()
    assert logged == pytest.approx(expected, rel=1e-5)


RELOAD = """
import json, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import predict, stock_pipeline
numbers = {{}}
for family, (model, out, case) in {cases!r}.items():
    case = torch.load(case)
    pipe = stock_pipeline(model)
    base = predict(pipe.transformer, case["inputs"])
    pipe.load_lora_weights(out)
    reloaded = predict(pipe.transformer, case["inputs"])
    numbers[family] = {{"ours": (reloaded - case["expected"]).abs().max().item(),
                        "moved": (reloaded - base).abs().max().item()}}
print(json.dumps(numbers))
"""
TARGETS = {"sd3": "attention_ff", "flux": "all", "flux-schnell": "attention", "chroma": "attention_ff",
           "flux2-klein": "attention"}


def test_flow_lora_reloads_in_the_stock_pipeline_in_a_fresh_process(tiny_model, subject_dir, tmp_path):
    """The saved LoRA loads with StableDiffusion3Pipeline / FluxPipeline / ChromaPipeline / Flux2KleinPipeline
    .load_lora_weights in another process (one for all five) and gives the trained transformer's prediction, for each
    --lora_target preset."""
    cases = {}
    for family, target in TARGETS.items():
        model, out = tiny_model(family), tmp_path / family
        ours = train_dreambooth.main(train_argv(model, subject_dir, out, "--lora_target", target))["unet"].eval()
        inputs = unet_inputs(ours, family)
        torch.save({"inputs": inputs, "expected": predict(ours, inputs)}, str(tmp_path / f"{family}.pt"))
        cases[family] = (model, str(out), str(tmp_path / f"{family}.pt"))
    tests = os.path.dirname(os.path.abspath(__file__))
    script = RELOAD.format(root=os.path.dirname(tests), tests=tests, cases=cases)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(numbers) == set(TARGETS)
    assert all(n["ours"] < 1e-5 and n["moved"] > 1e-4 for n in numbers.values()), numbers


def test_lora_layers_names_the_modules_and_a_wrong_name_is_refused(tiny_model, subject_dir, tmp_path):
    model = tiny_model("flux")
    result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "out", "--lora_layers",
                                              "attn.to_k,proj_mlp", "--max_train_steps", "1", "--lora_format", "comfyui"))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in result["unet"].named_parameters() if ".lora_A" in name}
    assert adapted == {"transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_k",
                       "single_transformer_blocks.0.proj_mlp"}
    # The ComfyUI file fuses them into the original modules; the untrained parts (q, v) hold zeros
    comfyui = files.load_tensors(str(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors"))
    assert sorted({key.split(".")[0] for key in comfyui}) == ["lora_unet_double_blocks_0_img_attn_qkv",
                                                              "lora_unet_single_blocks_0_linear1"]
    up, width = comfyui["lora_unet_single_blocks_0_linear1.lora_up.weight"], 32  # 4 parts of rank 4: q, k, v, mlp
    assert up.shape == (3 * width + 4 * width, 16) and comfyui["lora_unet_single_blocks_0_linear1.alpha"] == 16
    assert not up[:width].any() and up[width:2 * width, 4:8].any() and not up[2 * width:3 * width].any()
    with pytest.raises(SystemExit, match="--lora_layers"):
        train_dreambooth.main(train_argv(model, subject_dir, tmp_path / "bad", "--lora_layers", "no_such_layer"))


@pytest.mark.parametrize("family,flags,message", [
    ("flux", ["--snr_gamma", "5"], "--snr_gamma apply to noise prediction"),
    ("sd3", ["--noise_offset", "0.1"], "--noise_offset apply to noise prediction"),
    ("sd1", ["--weighting_scheme", "cosmap"], "apply to flow matching"),
    ("sd1", ["--flow_shift", "auto"], "apply to flow matching"),
    ("flux", ["--scheduled_sampling_max_step_offset", "2", "--scheduled_sampling_sampler", "unipc"],
     "rollouts step with Euler"),
    # what FLUX.2 klein and Chroma do not take, each with its reason
    ("flux2-klein", ["--validation_preview", "--validation_prompt", "x", "--webhook_config", "hooks.json"],
     "--validation_preview applies to families with a Tiny AutoEncoder"),
    ("flux2-klein", ["--lora_format", "comfyui"], "--lora_format applies to the families with a kohya"),
    ("flux2-klein", ["--train_text_encoder"], "reads its captions with Qwen3ForCausalLM alone"),
    ("flux2-klein", ["--validation_prompt", "x", "--validation_negative_prompt", "blurry"],
     "takes none \\(it guides against the empty caption\\)"),
    ("chroma", ["--lora_format", "comfyui"], "not IF, Chroma or FLUX.2 klein"),
    ("chroma", ["--gradient_checkpointing"], "checkpointed single-stream blocks are called without the text's"),
    ("flux2-klein", ["--text_encoder_2_precision", "int8-quanto"], "has no text_encoder_2; its text encoders are"),
    ("chroma", ["--flux_guidance_value", "2"], "--flux_guidance_value applies to a guidance-distilled FLUX.1"),
])
def test_flags_of_the_other_objective_are_refused_before_any_weights_load(tiny_model, subject_dir, tmp_path, family,
                                                                          flags, message):
    (tmp_path / "hooks.json").write_text('{"webhook_type": "raw", "callback_url": "http://127.0.0.1:9/"}')
    flags = [str(tmp_path / flag) if flag == "hooks.json" else flag for flag in flags]
    with pytest.raises(SystemExit, match=message):
        train_dreambooth.main(train_argv(tiny_model(family), subject_dir, tmp_path / "out", *flags))
    assert not os.path.exists(tmp_path / "out" / "cache")  # nothing was encoded


def test_flow_buckets_are_multiples_of_16_and_t5_embeddings_are_cached_in_the_compute_dtype(tiny_model, subject_dir,
                                                                                          tmp_path, capsys):
    from common import caches

    argv = train_argv(tiny_model("flux"), subject_dir, tmp_path / "out", "--resolution", "72",
                      "--mixed_precision", "bf16")
    args = train_dreambooth.parse_args(argv)
    datasets, info, plans = data.prepare(args, print_fn=lambda *a: None)
    sizes = {tuple(e.transform["target_size"]) for e in plans[datasets[0].id]}
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes) and any(w % 64 or h % 64 for w, h in sizes), sizes
    paths = caches.build_text_cache(["a photo of ohwx toy"], info, str(tmp_path / "text"))
    assert files.load_tensors(paths["a photo of ohwx toy"])["prompt_embeds"].dtype == torch.bfloat16
    assert "512x32 bfloat16 per caption" in capsys.readouterr().out


def random_lora(model, family, seed=1):
    """A rank-2 LoRA on every Linear, alpha 3 (so alpha / rank is not 1), with random up and down matrices."""
    from common import adapters

    info = families.BY_NAME[family]
    adapters.add_lora(model, adapters.LoraSettings(rank=2, alpha=3, init="default"), info.lora_targets(model, "all"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return adapters.kohya_transformer_lora(model, info)


def flux_transformer(double, single, width, fill=True):
    """FLUX.1 transformer blocks at a chosen width: diffusers' kohya converter splits a single block's fused linear1
    at the real model's widths (3072 x 3 + 12288), so that block is checked at full width (random weights)."""
    from diffusers import FluxTransformer2DModel

    heads, head_dim, axes = (24, 128, (16, 56, 56)) if width == "full" else (2, 16, (4, 4, 8))
    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=axes)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters() if fill else ():  # (fill=False: weights to be loaded)
            param.normal_(0, 0.02, generator=generator)
    return model


@pytest.mark.parametrize("double,single,width", [(2, 0, "tiny"), (0, 1, "full")])
def test_flux_comfyui_layout_loads_through_diffusers_kohya_converter(tmp_path, double, single, width):
    """--lora_format comfyui for FLUX writes kohya's layout of the original checkpoint (double_blocks.N.img_attn.qkv,
    single_blocks.N.linear1, final_layer, ...), which ComfyUI reads by those names; diffusers' own kohya converter
    (FluxPipeline.lora_state_dict) turns it back into a LoRA that gives our prediction, every module included."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    ours = flux_transformer(double, single, width)
    base = {key: value.clone() for key, value in ours.state_dict().items()}
    state = random_lora(ours, "flux")
    assert any(key.startswith("lora_unet_final_layer_adaLN_modulation_1") for key in state)
    save_file(state, str(tmp_path / "comfyui.safetensors"))
    converted, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "comfyui.safetensors"), return_alphas=True)
    # diffusers' converter leaves the embedders' keys (img_in, txt_in, time_in, ...) without the "transformer."
    # prefix its own loader filters on; ComfyUI maps them by name. Prefix them here so they are checked too.
    converted = {key if key.startswith("transformer.") else "transformer." + key: value
                 for key, value in converted.items()}
    loaded = flux_transformer(double, single, width, fill=False)
    loaded.load_state_dict(base)
    FluxPipeline.load_lora_into_transformer(converted, network_alphas=alphas, transformer=loaded)
    generator = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 4, 64, generator=generator),
                  encoder_hidden_states=torch.randn(1, 3, 32, generator=generator),
                  pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([1.0]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    with torch.no_grad():
        expected, got = ours(**inputs)[0], loaded(**inputs)[0]
        ours.disable_adapters()
        moved = (expected - ours(**inputs)[0]).abs().max()
    assert (expected - got).abs().max() < 1e-4 * max(1.0, moved) and moved > 1e-2


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_sd3_comfyui_layout_is_the_original_checkpoints_and_merges_to_our_prediction(variant):
    """--lora_format comfyui for SD3 writes kohya's layout of the original MMDiT checkpoint (joint_blocks.N.x_block.
    attn.qkv, ...). Our layout is the exact inverse of diffusers' single-file converter (every weight comes back), and
    the LoRA merged into those original weights the way ComfyUI applies it (W += alpha / rank * up @ down), converted
    by diffusers, gives our prediction. SD3.5 adds dual attention (attn2) and query/key norms."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    def transformer():
        torch.manual_seed(0)
        extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if variant == "sd3.5" else {}
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                     caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32, **extra)

    ours = transformer()
    weights = {key: value.clone() for key, value in ours.state_dict().items()}
    original = mmdit_to_original(ours, weights)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(weights) and all(torch.equal(back[key], weights[key]) for key in weights)
    state = random_lora(ours, "sd3")
    merged = dict(original)
    for key in [key for key in state if key.endswith(".lora_down.weight")]:
        name = key[:-len(".lora_down.weight")]
        target = next(k for k in original if k.endswith(".weight") and "lora_unet_" + k[:-7].replace(".", "_") == name)
        down, up = state[key], state[f"{name}.lora_up.weight"]
        merged[target] = original[target] + state[f"{name}.alpha"] / down.shape[0] * up @ down
    loaded = transformer()
    loaded.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(merged))
    generator = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
                  pooled_projections=torch.randn(1, 64, generator=generator), timestep=torch.tensor([500.0]),
                  return_dict=False)
    with torch.no_grad():
        expected, got = ours(**inputs)[0], loaded(**inputs)[0]
        ours.disable_adapters()
        moved = (expected - ours(**inputs)[0]).abs().max()
    assert (expected - got).abs().max() < 1e-5 and moved > 1e-2
