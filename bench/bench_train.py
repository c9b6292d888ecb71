"""Benchmark: overhead of train_dreambooth.py and cache_latents.py against bare PyTorch loops, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py               # defaults: 30 timed steps, 256 px, batch 2
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --steps 50 --resolution 256 --batch_size 2 --out bench/out
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --profile     # + a cProfile of the trainer loop
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --threads 1   # steadier on a machine shared with others
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --family flux --resolution 128   # a FLUX.1-dev-shaped model

What it builds (under --out, default a temporary folder; bench/out/ is git-ignored):
    model/    a random "small SD-shaped" SD 1.x pipeline: UNet2DConditionModel with block_out_channels
              (64, 128, 128), three cross-attention down/up blocks, cross_attention_dim 64; make_demo's tiny VAE and
              tiny tokenizer, and a tiny CLIP text encoder whose hidden size is the UNet's cross_attention_dim
    images/   --images synthetic subject PNGs (make_demo.draw_subject) of exactly RESOLUTION x RESOLUTION, so every
              image lands in one bucket and the trainer and the bare loop see the same tensor shapes

    --family flux: a random small FLUX.1-dev-shaped pipeline instead (FluxTransformer2DModel: 2 double- and 4
              single-stream blocks of width 128, guidance embedding, resolution-dependent shift; a T5 encoder of
              width 256 and 4 layers read at 512 tokens, a CLIP for the pooled vector, a 16-channel VAE)

What it measures, in this order:
    1. caching: cache_latents.main() on an empty cache, with caches.build_vae_cache timed (the VAE load inside
       it is timed separately and subtracted: what is left is fingerprinting, decode, encode and writing the
       cache files) -> images/s, against a bare loop of vae.encode on random tensors of the same shape and the
       same batch size (--vae_batch_size, the scripts' default 4), same VAE, after one warm-up batch. Both run
       in this process, alternating, --cache_rounds times; the median round of each side counts (a round is
       ~0.5 s, so one burst of outside load can double it).
    2. training throughput: train_dreambooth.py in a subprocess (caches already built by step 1, so the run
       trains from cached latents and text embeddings; no validation, no checkpoints), steps/s from the
       `step_time` field of OUTPUT/logs/train_log.jsonl over the steps after --warmup; against a bare loop in
       its own subprocess: the same UNet loaded the same way, the same peft LoraConfig (to_q/to_k/to_v/to_out.0,
       same rank, gaussian init), AdamW with the trainer's defaults, forward + MSE + backward + step + zero_grad
       on random tensors of the same shapes, timed per step the same way (including the loss .item()).
       The trainer keeps its own defaults otherwise, gradient clipping (--max_grad_norm 1.0) included; its
       step_time ends before the log line, the progress bar and checkpoint/validation (none run here) — --profile
       shows what those cost.
       Both use medians over the same number of post-warm-up steps (means are printed too). --rounds rounds
       run in the order trainer, bare, bare, trainer, ... and the step times of all rounds are pooled.
       --family flux adds a third side, "example": a loop in the manner of diffusers'
       train_dreambooth_lora_flux.py with per-image captions (its usual DreamBooth case) and no latent cache: each
       step encodes the batch's pixels with the VAE and its captions with CLIP and T5 (FluxPipeline.encode_prompt),
       then draws logit-normal sigmas from the scheduler, packs, runs the transformer with guidance 1 and steps
       AdamW. Ours reads both from its caches. The bare loop is the transformer step alone on random tensors.
    3. peak RSS of the training subprocesses, each read from its own rusage (os.wait4, one child at a time;
       the largest over the rounds).
    --profile adds a run of the trainer under cProfile and prints the time of each part of its loop per step.

Everything runs on the CPU (no GPU needed); torch uses its default thread count in every process (--threads N
sets it for all of them).
The numbers are wall-clock timings: other load on the machine shows up as noise (see the mean/median spread).
"""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # common/families/unet.py LORA_TARGETS["attention"] (SD)
PROMPT = "a photo of ohwx toy"
SEED = 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps, after the warm-up (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run first and not timed (default 5)")
    parser.add_argument("--resolution", type=int, default=256, help="image / bucket edge in pixels (default 256)")
    parser.add_argument("--batch_size", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("--vae_batch_size", type=int, default=4, help="images per VAE encode (default 4)")
    parser.add_argument("--images", type=int, default=32, help="synthetic subject images (default 32)")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating training rounds (trainer/bare, then bare/trainer, ...); default 3")
    parser.add_argument("--cache_rounds", type=int, default=5,
                        help="alternating caching rounds (bare VAE, cache_latents); the median of each counts; default 5")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every process (default: torch's default, one per core)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the trainer under cProfile and print where its per-step time goes")
    parser.add_argument("--family", default="sd1", choices=["sd1", "flux"],
                        help="sd1: a small SD 1.x-shaped UNet (default); flux: a small FLUX.1-dev-shaped transformer, "
                             "with a diffusers-example-style loop as a third side")
    parser.add_argument("--_bare_child", default=None, help=argparse.SUPPRESS)  # internal: the bare training loop
    parser.add_argument("--_example_child", default=None, help=argparse.SUPPRESS)  # internal: the example's loop
    args = parser.parse_args(argv)
    if args.resolution % 64:
        parser.error("--resolution must be a multiple of 64 (the trainer's buckets are)")
    counts = (args.steps, args.rounds, args.cache_rounds, args.batch_size, args.vae_batch_size, args.images)
    if min(counts) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --cache_rounds, --batch_size, --vae_batch_size and --images must be 1 or "
                     "more; --warmup 0 or more")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: the model and the images


def build_model(folder, resolution):
    """A random SD 1.x-style pipeline, bigger than the test one: one training step takes ~0.1-0.4 s on a CPU."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import make_demo

    cross_dim = 64
    tokenizer = make_demo.tiny_tokenizer()
    torch.manual_seed(SEED)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, projection_dim=cross_dim, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(64, 128, 128), down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=cross_dim, attention_head_dim=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=make_demo.tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in unet.parameters())


def build_flux_model(folder):
    """A random FLUX.1-dev-shaped pipeline: the transformer, T5 and CLIP at small widths, the real layout."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    import make_demo

    tokenizer, t5_tokenizer = make_demo.tiny_tokenizer(), make_demo.tiny_t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                                         pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=256, d_kv=32, d_ff=512, num_layers=4,
                                 num_heads=8, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=transformer, vae=make_demo.tiny_flow_vae(0.1159, 0.3611), scheduler=scheduler,
                        text_encoder=make_demo.tiny_text_encoder(tokenizer, hidden_size=64), text_encoder_2=t5,
                        tokenizer=tokenizer, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in transformer.parameters())


def make_images(folder, count, resolution):
    import make_demo

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        make_demo.draw_subject(resolution, resolution, seed=i).save(os.path.join(folder, f"subject_{i:03d}.png"))


def model_info(folder):
    from common import models

    ns = argparse.Namespace(pretrained_model_name_or_path=folder, revision=None, variant=None, local_files_only=True,
                            single_file_config=None, cache_dir=None, output_dir=folder)
    return models.resolve_model(ns)


def common_flags(paths, args):
    """Flags train_dreambooth.py and cache_latents.py share, so both plan the same entries and cache paths."""
    return ["--pretrained_model_name_or_path", paths["model"], "--instance_data_dir", paths["images"],
            "--instance_prompt", PROMPT, "--cache_dir", paths["cache"], "--resolution", str(args.resolution),
            "--resolution_type", "pixel_area", "--seed", str(SEED), "--vae_batch_size", str(args.vae_batch_size)]


def trainer_flags(paths, args, output_dir, steps=None):
    """train_dreambooth.py's flags: a LoRA run of `steps` steps (default --warmup + --steps), no checkpoints."""
    steps = args.warmup + args.steps if steps is None else steps
    return common_flags(paths, args) + [
        "--output_dir", output_dir, "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(steps), "--lora_rank", str(args.lora_rank),
        "--learning_rate", "1e-4", "--checkpointing_steps", "0"]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Caching


def bench_cache(paths, args):
    """Caching, measured in this process: --cache_rounds alternating rounds of (bare VAE loop, cache_latents.main on an
    empty cache). Returns the per-round seconds of each side and the VAE load times."""
    import torch

    import cache_latents
    from common import caches, models

    info = model_info(paths["model"])
    size = args.resolution
    batches = [min(args.vae_batch_size, args.images - s) for s in range(0, args.images, args.vae_batch_size)]
    # The bare loop's VAE is loaded the same way build_vae_cache loads its own.
    vae = models.load_component(info, "vae").eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # warm-up, not timed (one-time kernel setup in this process, which both sides share)
        vae.encode(torch.rand(batches[0], 3, size, size, generator=generator) * 2 - 1)

    timings = {"build": 0.0, "load": 0.0, "encoded": 0}
    real_build, real_load = caches.build_vae_cache, models.load_component

    def timed_build(*a, **k):
        t0 = time.perf_counter()
        result = real_build(*a, **k)
        timings["build"] += time.perf_counter() - t0
        timings["encoded"] += result[1]
        return result

    def timed_load(info_, subfolder, *a, **k):
        t0 = time.perf_counter()
        result = real_load(info_, subfolder, *a, **k)
        if subfolder == "vae":
            timings["load"] += time.perf_counter() - t0
        return result

    rounds = []
    log = io.StringIO()
    for _ in range(args.cache_rounds):
        # Bare: vae.encode on random tensors of the images' shape, batch by batch, as build_vae_cache batches them.
        started = time.perf_counter()
        with torch.no_grad():
            for n in batches:
                dist = vae.encode(torch.rand(n, 3, size, size, generator=generator) * 2 - 1).latent_dist
                dist.mean.float(), dist.std.float()
        bare_seconds = time.perf_counter() - started

        # cache_latents.py on an empty cache (the text cache is rebuilt too, outside the timed build_vae_cache).
        shutil.rmtree(paths["cache"], ignore_errors=True)
        timings.update(build=0.0, load=0.0, encoded=0)
        caches.build_vae_cache, models.load_component = timed_build, timed_load
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                t0 = time.perf_counter()
                cache_latents.main(common_flags(paths, args) + ["--output_dir", paths["cache"], "--device", "cpu"])
                script_seconds = time.perf_counter() - t0
        finally:
            caches.build_vae_cache, models.load_component = real_build, real_load
        if timings["encoded"] != args.images:
            with open(os.path.join(paths["root"], "cache_latents.log"), "w", encoding="utf-8") as handle:
                handle.write(log.getvalue())
            raise SystemExit(f"cache_latents encoded {timings['encoded']} of {args.images} images; see "
                             f"{paths['root']}/cache_latents.log")
        rounds.append({"bare": bare_seconds, "build": timings["build"], "load": timings["load"],
                       "encode": timings["build"] - timings["load"], "script": script_seconds})
    with open(os.path.join(paths["root"], "cache_latents.log"), "w", encoding="utf-8") as handle:
        handle.write(log.getvalue())
    del vae
    return rounds


# ---------------------------------------------------------------------------------------------------------------------
# 2 and 3. Training, each side in its own subprocess


def run_child(cmd, log_path):
    """Run one subprocess to completion; returns (wall seconds, peak RSS in MiB) from its own rusage."""
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        _, status, usage = os.wait4(proc.pid, 0)  # this child only: its own ru_maxrss, not a running max
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as handle:
            tail = handle.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def read_step_times(log_file):
    with open(log_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row["step_time"] for row in sorted(rows, key=lambda r: r["step"])]


def child(args):
    """A loop in its own process (--_bare_child / --_example_child PATH): writes its per-step times as JSON to PATH."""
    if args._example_child:
        times, trainable = flux_example_child(args)
    else:
        times, trainable = (flux_bare_child if args.family == "flux" else bare_child)(args)
    with open(args._bare_child or args._example_child, "w", encoding="utf-8") as handle:
        json.dump({"step_time": times, "trainable": trainable}, handle)


def bare_child(args):
    """The bare SD 1.x training loop: the UNet step alone, on random tensors of the trainer's shapes."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from common import models

    info = model_info(args.out_model)
    unet = models.load_component(info, "unet", torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, lora_dropout=0.0,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    cast_training_params(unet, torch.float32)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    latent = args.resolution // info.vae_scale_factor
    cross_dim = info.model_config["cross_attention_dim"]
    generator = torch.Generator().manual_seed(SEED)
    times = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        noisy = torch.randn(args.batch_size, 4, latent, latent, generator=generator)
        target = torch.randn(args.batch_size, 4, latent, latent, generator=generator)
        embeds = torch.randn(args.batch_size, 77, cross_dim, generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        pred = unet(noisy, timesteps, embeds).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    return times, sum(p.numel() for p in params)


def flux_lora(transformer, rank):
    """The LoRA all three FLUX sides train: the trainer's default preset (both streams' attention), gaussian init."""
    from peft import LoraConfig

    from common import families

    targets = families.Flux.lora_targets(transformer, "attention")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=targets))
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def flux_step(transformer, latents, noise, sigmas, embeds, pooled, text_ids):
    """One flow-matching forward and loss on FLUX's packed tokens (as its pipeline packs them), guidance 1."""
    import torch.nn.functional as F

    from common.families import flux

    b, _, h, w = latents.shape
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    tokens = transformer(hidden_states=flux.pack(noisy), timestep=sigmas, guidance=latents.new_ones(b),
                         pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                         img_ids=flux.image_ids(h, w, latents.device), return_dict=False)[0]
    return F.mse_loss(flux.unpack(tokens, h, w).float(), (noise - latents).float())


def flux_bare_child(args):
    """The bare FLUX loop: the transformer step alone, on random tensors of the trainer's shapes."""
    import torch

    from common import models

    info = model_info(args.out_model)
    transformer = models.load_component(info, "transformer", torch.float32)
    params = flux_lora(transformer, args.lora_rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    latent, text = args.resolution // info.vae_scale_factor, info.model_config["joint_attention_dim"]
    generator = torch.Generator().manual_seed(SEED)
    times = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        shape = (args.batch_size, 16, latent, latent)
        loss = flux_step(transformer, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
                         torch.rand(args.batch_size, generator=generator),
                         torch.randn(args.batch_size, 512, text, generator=generator),
                         torch.randn(args.batch_size, 64, generator=generator), torch.zeros(512, 3))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    return times, sum(p.numel() for p in params)


def flux_example_child(args):
    """In the manner of diffusers' train_dreambooth_lora_flux.py with per-image captions and no latent cache: each
    step encodes the pixels (VAE) and the captions (CLIP + T5 at 512 tokens) again, then trains as the bare loop."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    pipe = FluxPipeline.from_pretrained(args.out_model, local_files_only=True)
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        frozen.requires_grad_(False)
    params = flux_lora(pipe.transformer, args.lora_rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    sigmas_table = pipe.scheduler.sigmas  # the scheduler's training sigmas, as the example indexes them
    generator = torch.Generator().manual_seed(SEED)
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2 - 1
        captions = [f"{PROMPT}, picture {step * args.batch_size + i}" for i in range(args.batch_size)]
        with torch.no_grad():
            latents = (pipe.vae.encode(pixels).latent_dist.sample(generator) - shift) * scale
            embeds, pooled, text_ids = pipe.encode_prompt(captions, captions, max_sequence_length=512)
        u = compute_density_for_timestep_sampling("logit_normal", args.batch_size, logit_mean=0.0, logit_std=1.0,
                                                  generator=generator)
        sigmas = sigmas_table[(u * (len(sigmas_table) - 1)).long()]
        loss = flux_step(pipe.transformer, latents, torch.randn(latents.shape, generator=generator), sigmas, embeds,
                         pooled, text_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    return times, sum(p.numel() for p in params)


def summarise(times):
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "n": len(times),
            "min": min(times), "max": max(times)}


def run_trainer(paths, args, tag):
    trainer_out = os.path.join(paths["root"], "trainer")
    shutil.rmtree(trainer_out, ignore_errors=True)
    wall, rss = run_child([sys.executable, os.path.join(ROOT, "train_dreambooth.py"),
                           *trainer_flags(paths, args, trainer_out)], os.path.join(paths["root"], f"trainer{tag}.log"))
    times = read_step_times(os.path.join(trainer_out, "logs", "train_log.jsonl"))
    if len(times) != args.warmup + args.steps:
        raise SystemExit(f"trainer logged {len(times)} steps, expected {args.warmup + args.steps}")
    with open(os.path.join(paths["root"], f"trainer{tag}.log"), encoding="utf-8") as handle:
        log = handle.read()
    if "nothing to encode" not in log:
        print(f"  warning: the trainer built caches inside its run (see trainer{tag}.log)")
    found = re.search(r"training ([\d,]+) parameters", log)
    trainable = int(found.group(1).replace(",", "")) if found else None
    return {"times": times[args.warmup:], "rss": rss, "wall": wall, "trainable": trainable}


def run_bare(paths, args, tag, side="bare"):
    bare_json = os.path.join(paths["root"], f"{side}_steps{tag}.json")
    wall, rss = run_child(
        [sys.executable, os.path.abspath(__file__), f"--_{side}_child", bare_json, "--out", paths["root"],
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--resolution", str(args.resolution),
         "--batch_size", str(args.batch_size), "--lora_rank", str(args.lora_rank), "--family", args.family],
        os.path.join(paths["root"], f"{side}{tag}.log"))
    with open(bare_json, encoding="utf-8") as handle:
        result = json.load(handle)
    return {"times": result["step_time"][args.warmup:], "rss": rss, "wall": wall, "trainable": result["trainable"]}


def bench_train(paths, args):
    """--rounds rounds, in the order trainer, bare, bare, trainer, ... so slow drift in the machine's load hits
    both sides alike. Returns {"trainer": [round results], "bare": [round results]}."""
    sides = ("trainer", "bare", "example") if args.family == "flux" else ("trainer", "bare")
    results = {side: [] for side in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            if side == "trainer":
                results[side].append(run_trainer(paths, args, f"-{r + 1}"))
            else:
                results[side].append(run_bare(paths, args, f"-{r + 1}", side))
            last = results[side][-1]
            s = summarise(last["times"])
            print(f"  round {r + 1} {side:7s}: step ms median {1000 * s['median']:7.1f}  mean {1000 * s['mean']:7.1f}  "
                  f"min {1000 * s['min']:7.1f}  max {1000 * s['max']:7.1f}   peak RSS {last['rss']:5.0f} MiB"
                  f"   process wall {last['wall']:5.1f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Optional: where the trainer's time goes (cProfile)


PROFILE_ROWS = [  # (label, file suffix, function name): functions called inside the training loop
    ("unet forward (UNet2DConditionModel.forward)", "unet_2d_condition.py", "forward"),
    ("backward (accelerator.backward)", "accelerator.py", "backward"),
    ("optimizer.step (AdamW)", "adam.py", "step"),
    ("clip_grad_norm_ (--max_grad_norm 1.0)", "accelerator.py", "clip_grad_norm_"),
    ("zero_grad", "optimizer.py", "zero_grad"),
    ("lr_scheduler.step", "lr_scheduler.py", "step"),
    ("files.load_tensors (cache file reads)", "files.py", "load_tensors"),
    ("torch.stack", "~", "<built-in method torch.stack>"),
    ("torch.randn", "~", "<built-in method torch.randn>"),
    ("sampler.next (BatchSampler)", "train_dreambooth.py", "next"),
    ("batch_generator", "train_dreambooth.py", "batch_generator"),
    ("noise_scheduler.add_noise", "scheduling_ddpm.py", "add_noise"),
    ("accelerator.reduce", "accelerator.py", "reduce"),
    ("tensor.item", "~", "<method 'item' of 'torch._C.TensorBase' objects>"),
    ("JsonlLog.log (outside step_time)", "checkpoints.py", "log"),
    ("tqdm set_postfix + update (outside step_time)", "std.py", "set_postfix"),
    ("", "std.py", "update"),
]


def bench_profile(paths, args):
    import pstats

    out = os.path.join(paths["root"], "trainer-profile")
    shutil.rmtree(out, ignore_errors=True)
    prof = os.path.join(paths["root"], "trainer.prof")
    wall, _ = run_child([sys.executable, "-m", "cProfile", "-o", prof, os.path.join(ROOT, "train_dreambooth.py"),
                         *trainer_flags(paths, args, out)], os.path.join(paths["root"], "trainer-profile.log"))
    steps = args.warmup + args.steps
    stats = pstats.Stats(prof).stats
    step_times = read_step_times(os.path.join(out, "logs", "train_log.jsonl"))
    rows, pending = [], None
    for label, suffix, name in PROFILE_ROWS:
        calls = cum = 0.0
        for (filename, _, func), (_, ncalls, _, cumtime, _) in stats.items():
            if func == name and filename.endswith(suffix):
                calls += ncalls
                cum += cumtime
        if label:
            if pending:
                rows.append(pending)
            pending = [label, calls, cum]
        else:  # continuation row: add to the previous label
            pending[1] += calls
            pending[2] += cum
    rows.append(pending)
    print(f"\ncProfile of train_dreambooth.py ({steps} steps, profiler on: Python-level costs are inflated; "
          f"sum of step_time {sum(step_times):.2f} s, child wall {wall:.1f} s):")
    print(f"  {'':48s} {'calls':>7s} {'total s':>8s} {'ms/step':>8s}")
    for label, calls, cum in rows:
        print(f"  {label:48s} {int(calls):7d} {cum:8.3f} {1000 * cum / steps:8.2f}")
    print(f"  (full profile: {prof}; e.g. python -c \"import pstats; pstats.Stats('{prof}').sort_stats('cumtime')"
          ".print_stats(40)\")")


# ---------------------------------------------------------------------------------------------------------------------


def set_threads(threads):
    """--threads N: N torch threads in this process and (through the environment) in every child it starts."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # for the children
        import torch

        torch.set_num_threads(threads)


def load_note():
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    if args._bare_child or args._example_child:
        args.out_model = os.path.join(args.out, "model")
        return child(args)

    started = time.perf_counter()
    temporary = args.out is None
    root = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench_train-"))
    paths = {"root": root, "model": os.path.join(root, "model"), "images": os.path.join(root, "images"),
             "cache": os.path.join(root, "cache")}
    try:
        os.makedirs(root, exist_ok=True)
        for key in ("model", "images"):
            shutil.rmtree(paths[key], ignore_errors=True)
        if args.family == "flux":
            params, denoiser = build_flux_model(paths["model"]), "FLUX transformer"
        else:
            params, denoiser = build_model(paths["model"], args.resolution), "UNet"
        make_images(paths["images"], args.images, args.resolution)
        print(f"bench folder {root}: {denoiser} {params / 1e6:.1f} M params, {args.images} images of "
              f"{args.resolution}x{args.resolution}, batch {args.batch_size}, LoRA rank {args.lora_rank}, "
              f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s); {load_note()}", flush=True)

        print("caching (seconds for all images; cache_latents = build_vae_cache minus its VAE load):", flush=True)
        cache_rounds = bench_cache(paths, args)
        for r, c in enumerate(cache_rounds, 1):
            print(f"  round {r}: bare VAE {c['bare']:.2f} s   cache_latents {c['encode']:.2f} s (build_vae_cache "
                  f"{c['build']:.2f} s, VAE load {c['load']:.2f} s; cache_latents.main {c['script']:.2f} s in all)")
        # The median round of each side (rounds alternate, so slow drift in outside load hits both alike).
        bare_ips = args.images / statistics.median(c["bare"] for c in cache_rounds)
        cache_ips = args.images / statistics.median(c["encode"] for c in cache_rounds)

        print("training (step_time after the warm-up; caches already built):", flush=True)
        train = bench_train(paths, args)
        t = summarise([x for run in train["trainer"] for x in run["times"]])
        b = summarise([x for run in train["bare"] for x in run["times"]])
        trainer_rss = max(run["rss"] for run in train["trainer"])
        bare_rss = max(run["rss"] for run in train["bare"])
        counts = {side: runs[0]["trainable"] for side, runs in train.items()}
        print("  trainable (LoRA) parameters: " + "   ".join(f"{side} {n:,}" for side, n in counts.items())
              + ("" if len(set(counts.values())) == 1 else "   <- DIFFERENT: the loops do not train the same"),
              flush=True)

        if args.profile:
            bench_profile(paths, args)

        trainer_sps, bare_sps = 1 / t["median"], 1 / b["median"]
        print(f"\n{load_note()} at the end")
        spread = max(abs(statistics.median(run["times"]) / pooled["median"] - 1)
                     for side, pooled in (("trainer", t), ("bare", b)) for run in train[side])
        if spread > 0.15 or os.getloadavg()[0] > 0.75 * os.cpu_count() + 1:
            print(f"warning: noisy measurement (a round's median is {100 * spread:.0f}% off its side's pooled median, "
                  "or the machine is busy): rerun, raise --rounds, or use --threads 1")
        print(f"train steps/s   trainer {trainer_sps:6.2f}   bare {bare_sps:6.2f}   ratio {trainer_sps / bare_sps:.2f}"
              f"   (median of {t['n']} step times each; by mean: ratio {b['mean'] / t['mean']:.2f}; target >= 0.9)")
        print(f"peak RSS MiB    trainer {trainer_rss:6.0f}   bare {bare_rss:6.0f}   ratio {trainer_rss / bare_rss:.2f}")
        if "example" in train:
            e = summarise([x for run in train["example"] for x in run["times"]])
            example_rss = max(run["rss"] for run in train["example"])
            print(f"vs the diffusers-example-style loop (VAE + CLIP + T5 every step): steps/s {1 / e['median']:6.2f}, "
                  f"trainer / example {e['median'] / t['median']:.2f}x;   peak RSS {example_rss:6.0f} MiB, "
                  f"trainer / example {trainer_rss / example_rss:.2f}")
        print(f"cache img/s     cache_latents {cache_ips:6.1f}   bare VAE {bare_ips:6.1f}   "
              f"ratio {cache_ips / bare_ips:.2f}   (median of {args.cache_rounds} rounds)")
        print(f"(total bench time {time.perf_counter() - started:.0f} s"
              + (")" if temporary else f"; logs in {root})"))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
