"""Benchmark: a DeepFloyd IF stage I LoRA, train_dreambooth.py against diffusers' train_dreambooth_lora.py, side by
side in one run on the same small IF pipeline.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_if.py --example PATH/train_dreambooth_lora.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_if.py --example PATH/train_dreambooth_lora.py --steps 160 --rounds 3

--example is diffusers' examples/dreambooth/train_dreambooth_lora.py (from a clone of github.com/huggingface/diffusers;
it trains IF stage I, and this bench gives it the flags its README gives for IF: --pre_compute_text_embeddings
--tokenizer_max_length 77 --text_encoder_use_attention_mask). It imports torchvision for four image transforms,
and torchvision cannot be installed beside this torch, so the bench puts a stand-in on the example's path: those
four transforms (Resize, CenterCrop, ToTensor, Normalize, with PIL and numpy), doing nothing else; the pictures
are already the training size, so they only turn a picture into a tensor in [-1, 1].

What it builds (under --out, default a temporary folder):
    model/    examples/make_demo.py's tiny IF stage I pipeline (IFPipeline: a UNet of block_out_channels (32, 64)
              with IF's simple cross-attention blocks, 3 channels in and 6 out, a T5 of width 32), at 64 px
    images/   --images synthetic subject pictures of exactly 64 x 64 (make_demo.draw_subject): one bucket, the
              same tensors on both sides

What it measures, per side (LoRA rank --lora_rank on the attention and IF's add_k/add_v projections on both
sides, AdamW lr 1e-4, batch --batch_size, fp32, no checkpoints, no validation, the text embedded once):
    steps/s   each side runs twice, for --warmup steps and for --warmup + --steps steps, in fresh processes; the
              difference of the two wall times over --steps steps is the time per step, without start-up,
              loading or caching. --rounds rounds run in the order ours, example, example, ours, ...; the median
              of each side's rounds counts.
    peak RSS  of the longer run, from the child's own rusage (os.wait4).
Everything runs on the CPU; torch uses its default thread count (--threads N sets it in every process).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

PROMPT = "a photo of sks toy"

# The four torchvision transforms train_dreambooth_lora.py uses, for a machine without torchvision.
TORCHVISION_STAND_IN = '''
import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    LANCZOS = Image.LANCZOS


class Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, image):
        for step in self.steps:
            image = step(image)
        return image


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        scale = self.size / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        return image if size == image.size else image.resize(size, self.interpolation.value)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


RandomCrop = CenterCrop  # the pictures are the training size: nothing to crop


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std
'''


# Runs the example with the stand-in importable only once transformers, peft and diffusers are loaded (they would
# take a torchvision they find for a real one and import more of it).
LAUNCHER = "-c", """
import runpy, sys
import diffusers, peft, transformers, transformers.models.t5.modeling_t5  # noqa: F401
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--example", required=True,
                        help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--steps", type=int, default=80,
                        help="timed steps (default 80; with fewer, the start-up time of each run, which varies by a "
                             "second or so, shows in the result)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the short run (default 5)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.example):
        raise SystemExit(f"--example {args.example}: no such file; give diffusers' "
                         "examples/dreambooth/train_dreambooth_lora.py")
    return args


def build(work, count):
    """The tiny IF pipeline, the pictures, and the torchvision stand-in."""
    import make_demo

    model = os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        make_demo.build_tiny_model(model, "if")
    pictures = os.path.join(work, "images")
    os.makedirs(pictures, exist_ok=True)
    for i in range(count):
        make_demo.draw_subject(64, 64, seed=i).save(os.path.join(pictures, f"subject_{i:03d}.png"))
    stand_in = os.path.join(work, "stand_in", "torchvision", "transforms")
    os.makedirs(stand_in, exist_ok=True)
    with open(os.path.join(stand_in, "__init__.py"), "w", encoding="utf-8") as handle:
        handle.write(TORCHVISION_STAND_IN)
    with open(os.path.join(os.path.dirname(stand_in), "__init__.py"), "w", encoding="utf-8") as handle:
        handle.write("from . import transforms  # noqa: F401\n")
    return model, pictures


def command(side, args, model, pictures, output_dir, steps):
    shared = ["--pretrained_model_name_or_path", model, "--instance_data_dir", pictures, "--instance_prompt", PROMPT,
              "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", str(args.batch_size),
              "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--seed", "0"]
    if side == "ours":
        return [sys.executable, os.path.join(ROOT, "train_dreambooth.py"), *shared, "--lora_rank", str(args.lora_rank),
                "--lora_target", "attention", "--checkpointing_steps", "0", "--lr_scheduler", "constant"]
    return [sys.executable, *LAUNCHER, os.path.join(os.path.dirname(output_dir), "stand_in"), args.example, *shared,
            "--rank", str(args.lora_rank), "--checkpointing_steps", "100000",
            "--pre_compute_text_embeddings", "--tokenizer_max_length", "77", "--text_encoder_use_attention_mask",
            "--lr_scheduler", "constant", "--report_to", "tensorboard", "--dataloader_num_workers", "0"]


def run(cmd, log_path, env):
    """Wall seconds and peak RSS (MiB) of one child, from its own rusage."""
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path, encoding="utf-8") as handle:
            raise SystemExit(f"a training run failed; log {log_path}:\n{handle.read()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def measure(side, args, model, pictures, work, env, tag):
    """(seconds per step without start-up, peak RSS MiB of the longer run) for one round of one side."""
    times, rss = [], 0.0
    for steps in (args.warmup, args.warmup + args.steps):
        output_dir = os.path.join(work, f"{side}-{tag}-{steps}")
        shutil.rmtree(output_dir, ignore_errors=True)
        wall, rss = run(command(side, args, model, pictures, output_dir, steps), output_dir + ".log", env)
        times.append(wall)
    return (times[1] - times[0]) / args.steps, rss


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="bench_if-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    try:
        model, pictures = build(work, args.images)
        results = {"ours": [], "example": []}
        order = [side for r in range(args.rounds) for side in (("ours", "example") if r % 2 == 0 else
                                                               ("example", "ours"))]
        for i, side in enumerate(order):
            results[side].append(measure(side, args, model, pictures, work, env, i))
            print(f"round {i // 2 + 1} {side}: {1 / results[side][-1][0]:.2f} steps/s, peak RSS "
                  f"{results[side][-1][1]:.0f} MiB", flush=True)
        speed = {side: 1 / statistics.median(step for step, _ in rounds) for side, rounds in results.items()}
        rss = {side: max(peak for _, peak in rounds) for side, rounds in results.items()}
        print(f"\nIF stage I LoRA, tiny pipeline at 64 px, batch {args.batch_size}, rank {args.lora_rank}, "
              f"{args.steps} timed steps, {args.rounds} rounds (median)")
        print(f"train steps/s   ours {speed['ours']:6.2f}   diffusers' example {speed['example']:6.2f}   "
              f"ratio {speed['ours'] / speed['example']:.2f}")
        print(f"peak RSS MiB    ours {rss['ours']:6.0f}   diffusers' example {rss['example']:6.0f}   "
              f"ratio {rss['ours'] / rss['example']:.2f}")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
