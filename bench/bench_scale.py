"""How the toolkit scales with the dataset: 100, 1,000 and 10,000 images, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_scale.py                       # 100 / 1k / 10k, 2,000 steps (~3 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_scale.py --sizes 100 1000 --steps 300 --out bench/out/scale

For each size, on a tiny SD-shaped model (examples/make_demo.py) and synthetic pictures of three shapes (square,
portrait, landscape: three buckets):
  discovery   finding, reading the headers of and bucketing every picture (data.load_datasets + plan_datasets)
  cache       cache_latents.py in a fresh process: wall time (with start-up), pictures per second once the
              first latent is written (cache files counted every 0.2 s), its peak resident memory, kB on disk
              per picture
  training    train_dreambooth.py in a fresh process for --steps steps, batch 4: time from launch to the first
              logged step, resident memory (RSS, sampled every 0.2 s) shortly after the first step and at the end,
              and steps per second
The latents themselves are a few kB per picture on disk and are read per batch, so memory should neither follow
the dataset's size nor creep up over the steps; the table says whether it does.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

SHAPES = ((64, 64), (64, 128), (128, 64))  # three buckets at --resolution 64: 64x64, 64x128, 128x64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder)")
    return parser.parse_args(argv)


def make_pictures(folder, count):
    """`count` small synthetic pictures (a few coloured blocks on a background), deterministic, cheap to make."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    os.makedirs(folder, exist_ok=True)
    have = len(os.listdir(folder))
    for i in tqdm(range(have, count), desc=f"pictures for {count}", unit="img", disable=have >= count):
        rng = np.random.default_rng(i)
        width, height = SHAPES[i % len(SHAPES)]
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            x, y = rng.integers(0, width - 16), rng.integers(0, height - 16)
            pixels[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"))


def subset(pool, folder, count):
    """The first `count` pictures of the pool, hard-linked into their own folder."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(pool))[:count]:
        target = os.path.join(folder, name)
        if not os.path.exists(target):
            os.link(os.path.join(pool, name), target)
    return folder


def flags(model, data, work):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of ohwx toy", "--output_dir", os.path.join(work, "out"), "--cache_dir", os.path.join(work, "cache"),
            "--resolution", "64", "--seed", "0"]


def discovery_seconds(argv):
    from common import data
    import train_dreambooth

    args = train_dreambooth.parse_args(argv)
    started = time.perf_counter()
    datasets = data.load_datasets(args)
    plans = data.plan_datasets(datasets, data.crop_seed(args), print_fn=lambda *a: None)
    seconds = time.perf_counter() - started
    buckets = {e.bucket for p in plans.values() for e in p}
    return seconds, sum(len(p) for p in plans.values()), len(buckets)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def log_lines(path):
    """How many steps a train_log.jsonl holds so far."""
    if not os.path.isfile(path):
        return 0
    with open(path) as handle:
        return sum(1 for _ in handle)


def cache_files(folder):
    """How many latent files the cache holds so far."""
    return sum(name.endswith(".safetensors") for _, _, names in os.walk(folder) for name in names)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(top, name)) for top, _, names in os.walk(folder) for name in names)


def rate_after_first(samples, total):
    """Items per second from the first sample that shows progress to the last one (start-up left out)."""
    first = next((s for s in samples if s[2] > 0), None)
    last = samples[-1] if samples else None
    if first is None or last[0] <= first[0]:
        return float("nan")
    return (min(total, last[2]) - first[2]) / (last[0] - first[0])


def watched(command, progress=lambda: 0):
    """Run `command`; returns (seconds, peak RSS MiB, [(seconds since launch, RSS MiB, progress())])."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, peak = [], 0.0
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = rss_mib(process.pid)
            if rss is not None:
                samples.append((time.perf_counter() - started, rss, progress()))
            done.wait(0.2)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = process.communicate()
    done.set()
    thread.join()
    samples.append((time.perf_counter() - started, samples[-1][1] if samples else 0.0, progress()))
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{err[-3000:]}")
    peak = max((s[1] for s in samples), default=0.0)
    return time.perf_counter() - started, peak, samples


def main(argv=None):
    import make_demo

    args = parse_args(argv)
    work = args.out or tempfile.mkdtemp(prefix="bench_scale_")
    model = os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        make_demo.build_tiny_model(model, "sd1", sample_size=8)
    pool = os.path.join(work, "pool")
    make_pictures(pool, max(args.sizes))
    python = sys.executable
    rows = []
    for size in args.sizes:
        run = os.path.join(work, f"n{size}")
        data = subset(pool, os.path.join(run, "data"), size)
        base = flags(model, data, run)
        discovery, found, buckets = discovery_seconds(base)
        cache = os.path.join(run, "cache")
        shutil.rmtree(cache, ignore_errors=True)  # timed from empty, on every run of the bench
        cache_seconds, cache_peak, cache_samples = watched([python, os.path.join(ROOT, "cache_latents.py"), *base],
                                                           lambda: cache_files(cache))
        log = os.path.join(run, "out", "logs", "train_log.jsonl")
        if os.path.exists(log):
            os.remove(log)
        train_seconds, train_peak, samples = watched(
            [python, os.path.join(ROOT, "train_dreambooth.py"), *base, "--max_train_steps", str(args.steps),
             "--train_batch_size", "4", "--learning_rate", "1e-4", "--lora_rank", "4",
             "--checkpointing_steps", str(10 * args.steps)], lambda: log_lines(log))
        first = next((s for s in samples if s[2] >= 1), samples[-1])
        early = next((s for s in samples if s[2] >= max(1, args.steps // 20)), first)
        late = [s for s in samples if s[2] >= args.steps] or samples[-1:]
        steps_per_second = (args.steps - early[2]) / max(1e-9, late[0][0] - early[0])
        row = {"images": size, "found": found, "buckets": buckets, "discovery_s": discovery,
               "cache_s": cache_seconds, "cache_img_per_s": rate_after_first(cache_samples, size),
               "cache_peak_mib": cache_peak, "cache_kb_per_image": folder_bytes(cache) / 1024 / size,
               "first_step_s": first[0], "rss_early_mib": early[1], "rss_end_mib": late[0][1],
               "train_peak_mib": train_peak, "steps_per_s": steps_per_second, "train_s": train_seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = rows[0]
    print(f"\n{'images':>7} {'buckets':>8} {'discovery s':>12} {'cache s':>8} {'cache img/s':>12} {'cache MiB':>10} "
          f"{'kB/img':>7} {'1st step s':>11} {'RSS early':>10} {'RSS end':>8} {'steps/s':>8}"
          f" {'discovery us/img':>17} {'RSS early vs ' + str(base['images']):>16}")
    for r in rows:
        print(f"{r['images']:>7} {r['buckets']:>8} {r['discovery_s']:>12.2f} {r['cache_s']:>8.1f} "
              f"{r['cache_img_per_s']:>12.1f} {r['cache_peak_mib']:>10.0f} {r['cache_kb_per_image']:>7.2f} "
              f"{r['first_step_s']:>11.1f} {r['rss_early_mib']:>10.0f} {r['rss_end_mib']:>8.0f} {r['steps_per_s']:>8.1f}"
              f" {1e6 * r['discovery_s'] / r['images']:>17.0f} {r['rss_early_mib'] - base['rss_early_mib']:>+12.0f} MiB")
    print(f"(cache s: the process's wall time, start-up included; img/s: from its first latent on. RSS early: after "
          f"{max(1, args.steps // 20)} steps; end: after {args.steps}. Discovery runs on pictures just written, so "
          "their headers come from the page cache.)")

    # The two claims, judged: training memory does not follow the dataset beyond its latents (which are read per
    # batch, not held), and does not creep up over the steps.
    small, large = rows[0], rows[-1]
    growth = large["rss_early_mib"] - small["rss_early_mib"]
    latents = (large["cache_kb_per_image"] * large["images"] - small["cache_kb_per_image"] * small["images"]) / 1024
    added = max(1, large["images"] - small["images"])
    print(f"memory against the dataset: {growth:+.0f} MiB from {small['images']} to {large['images']} pictures "
          f"({1024 * growth / added:.2f} kB per added picture; their latents: {latents:.0f} MiB, "
          f"{1024 * latents / added:.2f} kB each): "
          + ("less than the latents themselves" if growth < latents else "GROWS BEYOND THE LATENTS"))
    creep = max(r["rss_end_mib"] - r["rss_early_mib"] for r in rows)
    print(f"memory over {args.steps} steps: at most {creep:+.0f} MiB from the early figure to the end at any size: "
          + ("no growth" if creep <= 5 else "GROWS"))
    with open(os.path.join(work, "scale.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"results: {os.path.join(work, 'scale.json')}")
    return rows


if __name__ == "__main__":
    main()
