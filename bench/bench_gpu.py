"""Real-width LoRA training on one CUDA GPU: SDXL and FLUX.1-dev at their published sizes (random weights), our
train_dreambooth.py against a bare PyTorch loop side by side, in steps/s and peak GPU memory, and the FLUX peak
against bench/flux_memory_plan.py's plan for the same flags.

    HF_HUB_OFFLINE=1 python bench/bench_gpu.py --out /tmp/gpu                       # on a CUDA machine
    HF_HUB_OFFLINE=1 python bench/bench_gpu.py --families flux --steps 10            # one family, fewer steps
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_gpu.py --size small --device cpu   # the same code, small widths

Per family, in this order (each step its own process, so each peak is its own):
    build    the pipeline from the published configs with random weights, made on --device and saved in bf16:
             SDXL's UNet (2.6 B), CLIP-L, CLIP-bigG and VAE; FLUX.1-dev's transformer (11.9 B), CLIP-L, the VAE
             and a T5-XXL of 2 of its 24 layers (the training step reads cached embeddings of the real width,
             so T5's depth costs only the build and the cache). Small tokenizers (make_demo's).
    cache    cache_latents.py: latents and text embeddings of --images synthetic pictures at --resolution.
    trainer  train_dreambooth.py from those caches: LoRA rank 16 on the default (attention) layers, batch 1,
             --mixed_precision bf16, no validation or checkpoints, once per row of RUNS (the flags each adds).
             steps/s = 1 / median step_time of its train_log.jsonl after --warmup steps.
    bare     the same step as a bare loop: the model loaded in bf16, peft LoRA on the same layers, torch.autocast
             bf16, AdamW, on random tensors of the trainer's shapes (SDXL: with its added time ids and pooled
             text embedding; FLUX: packed tokens, 512 text tokens, guidance 1).
Peak memory: the GPU's used memory (torch.cuda.mem_get_info, sampled every 20 ms from this process while the
child runs) minus what was used before it started: what a card must hold, CUDA context and allocator cache
included. On the CPU (--device cpu) the child's peak RSS instead.
The FLUX plan: flux_memory_plan's terms (counted weights, LoRA with AdamW, activations read on the meta device,
1 GiB overhead) for the same precision, rank, target and resolution, with gradient checkpointing.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "examples")]

GiB = 2 ** 30
PROMPT = "a photo of ohwx toy"
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
# The small widths (--size small): the same layouts, so the same code paths, at a CPU's scale.
SMALL = {
    "sdxl_unet": dict(SDXL_UNET, sample_size=32, block_out_channels=(32, 64, 64),
                      transformer_layers_per_block=(1, 1, 2),
                      attention_head_dim=(2, 4, 4), cross_attention_dim=64, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32),
    "sdxl_vae": dict(SDXL_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "clip_l": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "clip_g": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                   hidden_act="gelu"),
    "flux": dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
    "flux_vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_heads=4),
}
# Each training process runs with PyTorch's cuDNN attention off: with torch 2.11 (CUDA 13.0) on an H200, its backward
# pass fails on FLUX's shapes ("mha_graph.execute(...).is_good()", then CUBLAS_STATUS_EXECUTION_FAILED), in the
# bare loop as in the trainer (which now turns it off itself on CUDA); flash attention then serves both.
WITHOUT_CUDNN_ATTENTION = ("import runpy, sys, torch; torch.backends.cuda.enable_cudnn_sdp(False); "
                           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
# The trainer's runs per family: (name, extra flags). The bare loop runs beside the first of each.
RUNS = {
    "sdxl": [("LoRA", []), ("LoRA, checkpointing", ["--gradient_checkpointing"])],
    "flux": [("LoRA, checkpointing", ["--gradient_checkpointing"]),
             ("LoRA, checkpointing, int8 base", ["--gradient_checkpointing", "--base_model_precision", "int8-quanto"])],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--size", default="real", choices=["real", "small"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup (default 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--out", default="bench/out/gpu")
    parser.add_argument("--report", default=None, help="where results.md / results.json go (default: --out)")
    parser.add_argument("--reuse", action="store_true", help="keep a family's model and caches from an earlier run")
    parser.add_argument("--_bare", default=None, help=argparse.SUPPRESS)  # internal: the bare loop of FAMILY
    parser.add_argument("--_checkpointing", action="store_true", help=argparse.SUPPRESS)  # ... with checkpointing
    parser.add_argument("--_build", default=None, help=argparse.SUPPRESS)  # internal: build FAMILY's pipeline
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Building the pipelines


def small(args, name, config):
    return {**config, **SMALL[name]} if args.size == "small" else config


def build_sdxl(folder, args):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flux_memory_plan import CLIP_L
    import make_demo

    tokenizer = make_demo.tiny_tokenizer()
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    clip_l = {**CLIP_L, "projection_dim": 768, "hidden_act": "quick_gelu"}
    with torch.device(args.device):
        torch.manual_seed(0)
        parts = dict(
            unet=UNet2DConditionModel(**small(args, "sdxl_unet", SDXL_UNET)),
            vae=AutoencoderKL(**small(args, "sdxl_vae", SDXL_VAE)),
            text_encoder=CLIPTextModel(CLIPTextConfig(**{**small(args, "clip_l", clip_l), **ids})),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**small(args, "clip_g", CLIP_G), **ids})))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **parts)
    return save(pipe, folder, parts["unet"])


def build_flux(folder, args):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_memory_plan import CLIP_L, FLUX_DEV, FLUX_VAE, T5_XXL
    import make_demo

    tokenizer, t5_tokenizer = make_demo.tiny_tokenizer(), make_demo.tiny_t5_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with torch.device(args.device):
        torch.manual_seed(0)
        parts = dict(
            transformer=FluxTransformer2DModel(**small(args, "flux", FLUX_DEV)),
            vae=AutoencoderKL(**small(args, "flux_vae", FLUX_VAE), shift_factor=0.1159, scaling_factor=0.3611),
            text_encoder=CLIPTextModel(CLIPTextConfig(**{**small(args, "clip_l", CLIP_L), **ids})),
            text_encoder_2=T5EncoderModel(T5Config(**{**small(args, "t5", T5_XXL), "num_layers": 2,
                                                      "vocab_size": len(t5_tokenizer), "pad_token_id": 0,
                                                      "eos_token_id": 1})))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(tokenizer=tokenizer, tokenizer_2=t5_tokenizer, scheduler=scheduler, **parts)
    return save(pipe, folder, parts["transformer"])


def save(pipe, folder, denoiser):
    import torch

    pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in denoiser.parameters())


def make_images(folder, args):
    import make_demo

    os.makedirs(folder, exist_ok=True)
    for i in range(args.images):
        make_demo.draw_subject(args.resolution, args.resolution, seed=i).save(os.path.join(folder, f"{i:02d}.png"))


# ---------------------------------------------------------------------------------------------------------------------
# Running and measuring


class PeakMemory:
    """The peak of a child process: GPU memory in use (sampled, minus the level before it) or its own peak RSS."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.peak = 0
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            self.base, self.total, self.torch = total - free, total, torch

    def run(self, cmd, log_path):
        """Run cmd to completion; returns its wall seconds. Raises SystemExit with the log's tail if it fails."""
        done = threading.Event()

        def sample():
            while not done.wait(0.02):
                free, _ = self.torch.cuda.mem_get_info()
                self.peak = max(self.peak, self.total - free - self.base)

        sampler = threading.Thread(target=sample, daemon=True) if self.cuda else None
        with open(log_path, "w", encoding="utf-8") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if sampler:
                sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
        done.set()
        if sampler:
            sampler.join()
        else:
            self.peak = usage.ru_maxrss * 1024
        if os.waitstatus_to_exitcode(status) != 0:
            with open(log_path, encoding="utf-8") as handle:
                raise SystemExit(f"{' '.join(cmd[1:3])} failed; {log_path}:\n{handle.read()[-4000:]}")
        return wall


def measure(args, cmd, log_path):
    meter = PeakMemory(args.device)
    wall = meter.run(cmd, log_path)
    return wall, meter.peak


def common_flags(paths, args):
    return ["--pretrained_model_name_or_path", paths["model"], "--instance_data_dir", paths["images"],
            "--instance_prompt", PROMPT, "--cache_dir", paths["cache"], "--resolution", str(args.resolution),
            "--seed", "0", "--mixed_precision", "bf16"]


def run_trainer(paths, args, name, extra):
    out = os.path.join(paths["root"], "trainer_" + name.replace(", ", "_").replace(" ", "-"))
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", WITHOUT_CUDNN_ATTENTION, os.path.join(ROOT, "train_dreambooth.py"),
           *common_flags(paths, args),
           "--output_dir", out, "--train_batch_size", "1", "--max_train_steps", str(args.warmup + args.steps),
           "--lora_rank", str(args.lora_rank), "--learning_rate", "1e-4", "--checkpointing_steps", "0",
           "--report_to", "none", *extra]
    wall, peak = measure(args, cmd, out + ".log")
    with open(os.path.join(out, "logs", "train_log.jsonl"), encoding="utf-8") as handle:
        rows = sorted((json.loads(line) for line in handle if line.strip()), key=lambda r: r["step"])
    with open(out + ".log", encoding="utf-8") as handle:
        built_caches = "nothing to encode" not in handle.read()
    return {"step_times": [r["step_time"] for r in rows][args.warmup:], "loss": [r["loss"] for r in rows],
            "wall": wall, "peak": peak, "built_caches": built_caches}


def run_bare(paths, args, family, checkpointing):
    result_path = os.path.join(paths["root"], "bare.json")
    cmd = [sys.executable, "-c", WITHOUT_CUDNN_ATTENTION, os.path.abspath(__file__), "--_bare", family,
           "--out", args.out, "--size", args.size, "--device", args.device, "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora_rank", str(args.lora_rank)]
    if checkpointing:
        cmd.append("--_checkpointing")
    wall, peak = measure(args, cmd, os.path.join(paths["root"], "bare.log"))
    with open(result_path, encoding="utf-8") as handle:
        result = json.load(handle)
    return {"step_times": result["step_times"][args.warmup:], "loss": result["loss"], "wall": wall, "peak": peak}


def paths_of(args, family):
    root = os.path.join(args.out, family)
    return {"root": root, "model": os.path.join(root, "model"), "images": os.path.join(root, "images"),
            "cache": os.path.join(root, "cache")}


def bare_child(args):
    """The bare loop (--_bare FAMILY): writes its step times and losses to FAMILY/bare.json."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from bench_train import flux_step, model_info
    from common import models

    family, paths = args._bare, paths_of(args, args._bare)
    info = model_info(paths["model"])
    name = "unet" if family == "sdxl" else "transformer"
    model = models.load_component(info, name, torch.bfloat16).to(args.device)
    model.requires_grad_(False)
    targets = info.lora_targets(model, "attention")
    model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=targets))
    cast_training_params(model, torch.float32)
    if args._checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side, device = args.resolution // info.vae_scale_factor, args.device
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            if family == "sdxl":
                config = info.model_config
                pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
                timesteps = torch.randint(0, 1000, (1,), generator=generator, device=device)
                time_ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]],
                                        device=device, dtype=torch.float32)
                pred = model(randn(1, 4, side, side), timesteps, randn(1, 77, config["cross_attention_dim"]),
                             added_cond_kwargs={"text_embeds": randn(1, pooled), "time_ids": time_ids}).sample
                loss = F.mse_loss(pred.float(), randn(1, 4, side, side))
            else:
                config = info.model_config
                loss = flux_step(model, randn(1, 16, side, side), randn(1, 16, side, side),
                                 torch.rand(1, generator=generator, device=device),
                                 randn(1, 512, config["joint_attention_dim"]),
                                 randn(1, config["pooled_projection_dim"]),
                                 torch.zeros(512, 3, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - started)
    with open(os.path.join(paths["root"], "bare.json"), "w", encoding="utf-8") as handle:
        json.dump({"step_times": times, "loss": losses}, handle)


def plan_peak(args, precision):
    """flux_memory_plan's training peak for this precision at --resolution, with gradient checkpointing (bytes)."""
    import flux_memory_plan

    plan_args = argparse.Namespace(lora_rank=args.lora_rank, lora_target="attention")
    return flux_memory_plan.training_peak(plan_args, precision, args.resolution)


def summary(result):
    times = result["step_times"]
    return {"steps_per_s": 1 / statistics.median(times), "median_s": statistics.median(times),
            "peak_gib": result["peak"] / GiB, "wall_s": result["wall"],
            "loss_finite": all(v == v and abs(v) != float("inf") for v in result["loss"]),
            **({"built_caches": result["built_caches"]} if "built_caches" in result else {})}


def bench_family(args, family, rows):
    paths = paths_of(args, family)
    if not (args.reuse and os.path.isdir(paths["cache"])):
        shutil.rmtree(paths["root"], ignore_errors=True)
        os.makedirs(paths["root"])
        started = time.perf_counter()
        measure(args, [sys.executable, os.path.abspath(__file__), "--_build", family, "--out", args.out,
                       "--size", args.size, "--device", args.device], os.path.join(paths["root"], "build.log"))
        make_images(paths["images"], args)
        print(f"{family}: built in {time.perf_counter() - started:.0f} s", flush=True)
        wall, peak = measure(args, [sys.executable, os.path.join(ROOT, "cache_latents.py"),
                                    *common_flags(paths, args), "--output_dir", paths["root"],
                                    "--device", args.device], os.path.join(paths["root"], "cache.log"))
        print(f"{family}: cached in {wall:.0f} s, peak {peak / GiB:.1f} GiB", flush=True)
    for i, (name, extra) in enumerate(RUNS[family]):
        sides = [("trainer", lambda: run_trainer(paths, args, name, extra))]
        if i == 0:
            sides.append(("bare", lambda: run_bare(paths, args, family, "--gradient_checkpointing" in extra)))
        for side, run in sides:
            try:
                row = {"family": family, "run": name, "side": side, **summary(run())}
            except SystemExit as error:  # one failing run (an int8 kernel missing, say) leaves the others' rows
                print(f"{family} {name} {side}: FAILED\n{error}", flush=True)
                continue
            if family == "flux" and side == "trainer":
                precision = extra[extra.index("--base_model_precision") + 1] if "--base_model_precision" in extra \
                    else "no_change"
                try:
                    row["plan_gib"] = plan_peak(args, precision) / GiB
                except ImportError as error:  # the plan measures every precision's bytes (bitsandbytes too)
                    print(f"no plan: {error}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_report(args, rows)


def write_report(args, rows):
    lines = ["| family | run | side | steps/s | s/step | peak GiB | plan GiB | loss finite |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        plan = f"{row['plan_gib']:.1f}" if "plan_gib" in row else ""
        lines.append(f"| {row['family']} | {row['run']} | {row['side']} | {row['steps_per_s']:.2f} | "
                     f"{row['median_s']:.3f} | {row['peak_gib']:.1f} | {plan} | {row['loss_finite']} |")
    report = args.report or args.out
    os.makedirs(report, exist_ok=True)
    with open(os.path.join(report, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(report, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1)


def device_name(device):
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


def main(argv=None):
    args = parse_args(argv)
    if args._bare:
        return bare_child(args)
    if args._build:
        paths = paths_of(args, args._build)
        count = (build_sdxl if args._build == "sdxl" else build_flux)(paths["model"], args)
        print(f"{args._build}: denoiser of {count / 1e9:.2f} B parameters")
        return None
    os.makedirs(args.out, exist_ok=True)
    print(f"{device_name(args.device)}, {args.size} widths, {args.resolution} px, batch 1, LoRA rank "
          f"{args.lora_rank}, {args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for family in args.families:
        bench_family(args, family, rows)
    with open(os.path.join(args.report or args.out, "results.md"), encoding="utf-8") as handle:
        print(handle.read())
    return rows


if __name__ == "__main__":
    main()
