"""Benchmark: memory, speed and loss of LoRA training on a quantised base UNet (--base_model_precision), side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py                  # defaults: 50 steps, 256 px, batch 2
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py --out bench/out/memory --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py --runs "no_change fp32" int8-quanto   # a subset

The runs, one small SD-shaped UNet for all (bench_train.build_model: UNet2DConditionModel with block_out_channels
(64, 128, 128), three cross-attention blocks, ~6.9 M parameters; its images from bench_train.make_images):
    no_change fp32   --base_model_precision no_change --mixed_precision no    (the reference)
    no_change bf16   --base_model_precision no_change --mixed_precision bf16  (the frozen UNet loaded in bf16)
    int8-quanto, int4-quanto, fp8-quanto (optimum-quanto), nf4-bnb (bitsandbytes NF4, Linear layers only),
                     each with --mixed_precision --quantised_mixed_precision (default no: fp32 compute, so the
                     base precision is the only difference from the reference)

What it measures:
    1. Bytes held by the frozen base weights, in this process: the UNet loaded and quantised exactly as
       train_dreambooth.py does it (models.load_component(info, "unet", weight_dtype), then
       quantise.quantize_model(unet, precision, weight_dtype)). The real storage is counted: every parameter and
       buffer is walked down to plain tensors (optimum-quanto's WeightQBytesTensor / WeightQBitsTensor through
       __tensor_flatten__, recursively: int8/fp8 data, scale, int4 shift, the PackedTensor's uint8 data;
       bitsandbytes' Params4bit: its packed uint8 data plus its quant_state's absmax, code, offset and, nested,
       state2's absmax and code), and each storage is counted once (untyped_storage().nbytes(), deduplicated).
         base MiB             everything the UNet holds: parameters and buffers
         quantised-layer MiB  the weights of the quantised layers alone (quanto's QLinear/QConv2d, bnb's
                              Linear4bit; biases are not quantised and not counted), against the same weights in
                              bf16 (numel x 2): "vs bf16". Goals: int8 <= 0.55, int4 and nf4 <= 0.3. For the
                              no_change runs the column shows the nn.Linear/nn.Conv2d weights (what quanto
                              quantises) as a reference: 2.00 in fp32, 1.00 in bf16.
       One forward pass of each quantised UNet follows (it builds quanto's C++ extension here if it is missing,
       ~30 s with ninja, so no compiler counts in a training run's RSS) and gives the relative error of its
       output against the fp32 UNet's on the same input ("fwd err", printed with the bytes).
    2. Peak RSS and steps/s of a real LoRA run per precision: train_dreambooth.py in a subprocess, one at a time,
       from caches built beforehand (cache_latents.main; the run must report nothing to encode), --steps steps
       (default 50), every run with the same seed and flags (bench_train.trainer_flags: batch 2, LoRA rank 16,
       lr 1e-4, no checkpoints, no validation), so each sees the same batches, latent samples, noise and
       timesteps. Peak RSS from the child's own rusage (os.wait4); steps/s = 1 / median step_time of
       OUTPUT/logs/train_log.jsonl after --warmup steps.
    3. Loss against the fp32 run: `loss` of each step from the same log. "vs fp32" is the relative difference of
       the mean loss over all steps; "worst MA10" the largest relative difference of the moving averages
       (window 10) at any point. Goal: within 10 %. The curves go to loss_curves.png under --out when matplotlib
       is importable, else to loss_curves.csv (step, loss and MA10 of every run); all numbers to results.json.
       Mind what this can see: the UNet is random, its prediction small beside the unit-variance noise target
       (loss ~1.09), so even a large error in its output moves the loss little; "fwd err" of step 1 is the
       sharper view of what a precision does to the base model.

Everything runs on the CPU. Work folder: --out (bench/out/ is git-ignored), default a temporary folder of which
only the results (results.json, the curves, the logs) are kept. --threads N sets torch's threads in every process.
Mind the scale: the model is tiny (26 MiB in fp32), so peak RSS is mostly the Python/torch/diffusers runtime
(~400 MiB before any model) and the byte counts of step 1 are what scale to a real UNet. Peak RSS is the host's:
the UNet is loaded in full precision and quantised on the CPU (as train_dreambooth.py does), so a quantised run
peaks above the fp32 one (the loaded weights, their quantised copy and quantisation temporaries all count).
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402  (puts the repository root and examples/ on sys.path)
from bench_train import ROOT, SEED, build_model, common_flags, load_note, make_images, model_info  # noqa: E402
from bench_train import run_child, set_threads, trainer_flags  # noqa: E402

# (label, --base_model_precision, --mixed_precision; None: --quantised_mixed_precision)
RUNS = [
    ("no_change fp32", "no_change", "no"),
    ("no_change bf16", "no_change", "bf16"),
    ("int8-quanto", "int8-quanto", None),
    ("int4-quanto", "int4-quanto", None),
    ("fp8-quanto", "fp8-quanto", None),
    ("nf4-bnb", "nf4-bnb", None),
]
REFERENCE = "no_change fp32"
SIZE_GOALS = {"int8-quanto": 0.55, "int4-quanto": 0.3, "nf4-bnb": 0.3}  # quantised-layer bytes / bf16 bytes
LOSS_GOAL = 0.10  # relative difference from the fp32 run, mean and worst moving average
MA_WINDOW = 10
MiB = 1024 * 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first steps left out of steps/s (their loss still counts; default 5)")
    parser.add_argument("--resolution", type=int, default=256, help="image / bucket edge in pixels (default 256)")
    parser.add_argument("--batch_size", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("--images", type=int, default=16, help="synthetic subject images (default 16)")
    parser.add_argument("--vae_batch_size", type=int, default=4, help="images per VAE encode when caching")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--quantised_mixed_precision", default="no", choices=["no", "bf16"],
                        help="--mixed_precision of the quantised runs (default no: fp32 compute like the reference)")
    parser.add_argument("--runs", nargs="+", default=[label for label, _, _ in RUNS],
                        choices=[label for label, _, _ in RUNS], metavar="RUN",
                        help="which runs (default all): " + ", ".join(repr(label) for label, _, _ in RUNS))
    parser.add_argument("--out", default=None,
                        help="work folder (default: a temporary folder; only the results are kept there)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every process (default: torch's default, one per core)")
    args = parser.parse_args(argv)
    if args.resolution % 64:
        parser.error("--resolution must be a multiple of 64 (the trainer's buckets are)")
    if min(args.steps, args.batch_size, args.images, args.vae_batch_size, args.lora_rank) < 1:
        parser.error("--steps, --batch_size, --images, --vae_batch_size and --lora_rank must be 1 or more")
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be 0 or more and below --steps")
    args.runs = [run for run in RUNS if run[0] in args.runs]  # in the table's order
    args.runs = [(label, precision, mixed or args.quantised_mixed_precision) for label, precision, mixed in args.runs]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# 1. Bytes of the frozen base weights


def plain_tensors(tensor):
    """The plain tensors that hold a (possibly quantised) tensor's data."""
    import torch

    state = getattr(tensor, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit: packed uint8 data + its quantisation state
        yield tensor.data
        while state is not None:
            for part in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(part, torch.Tensor):
                    yield part
            state = state.state2 if getattr(state, "nested", False) else None
    elif hasattr(tensor, "__tensor_flatten__"):  # optimum-quanto's tensor subclasses (and their PackedTensor data)
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def storage_bytes(tensors):
    """Bytes held by the storages behind `tensors`, each storage counted once."""
    storages = {}
    for tensor in tensors:
        for plain in plain_tensors(tensor):
            storage = plain.untyped_storage()
            key = storage.data_ptr() or id(storage)
            storages[key] = max(storages.get(key, 0), storage.nbytes())
    return sum(storages.values())


def quantised_layers(model, precision):
    """(name, module, logical weight numel) of the layers `precision` quantised: for no_change, the nn.Linear and
    nn.Conv2d layers (those quanto quantises), as a reference."""
    import torch

    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if precision.endswith("-quanto"):
            from optimum.quanto.nn import QModuleMixin

            hit = isinstance(module, QModuleMixin)
        elif precision == "nf4-bnb":
            import bitsandbytes as bnb

            hit = isinstance(module, bnb.nn.Linear4bit)
        else:
            hit = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        if hit:
            state = getattr(weight, "quant_state", None)  # Params4bit: numel() is the packed size
            numel = math.prod(state.shape) if state is not None else weight.numel()
            layers.append((name, module, numel))
    return layers


def measure_base(info, precision, mixed, sample, reference_output):
    """Load and quantise the UNet as train_dreambooth.py does; count its bytes; one forward pass."""
    import torch

    from common import models, quantise

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16}[mixed]
    unet = models.load_component(info, "unet", weight_dtype)  # train_dreambooth.py: the same two calls
    quantise.quantize_model(unet, precision, weight_dtype)
    unet.requires_grad_(False).eval()

    total = storage_bytes([*unet.parameters(), *unet.buffers()])
    layers = quantised_layers(unet, precision)
    layer_bytes = storage_bytes([module.weight for _, module, _ in layers])
    bf16_bytes = 2 * sum(numel for _, _, numel in layers)
    kinds = {}
    for _, module, _ in layers:
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    groups = {}
    for _, module, _ in layers:
        if hasattr(module, "weight_group_size") and precision.startswith(("int4", "int2")):
            groups[module.weight_group_size] = groups.get(module.weight_group_size, 0) + 1

    latents, timesteps, embeds = sample
    with torch.no_grad():
        output = unet(latents.to(weight_dtype), timesteps, embeds.to(weight_dtype)).sample.float()
    error = None if reference_output is None else \
        ((output - reference_output).norm() / reference_output.norm()).item()
    return {"total_bytes": total, "layer_bytes": layer_bytes, "layer_bf16_bytes": bf16_bytes,
            "layer_params": sum(numel for _, _, numel in layers), "layer_kinds": kinds,
            "int_group_sizes": {str(k): v for k, v in groups.items()}, "forward_error": error}, output


def bench_bytes(paths, args):
    import torch

    info = model_info(paths["model"])
    latent = args.resolution // info.vae_scale_factor
    generator = torch.Generator().manual_seed(SEED)
    sample = (torch.randn(1, 4, latent, latent, generator=generator), torch.tensor([500]),
              torch.randn(1, 77, info.model_config["cross_attention_dim"], generator=generator))
    results, reference = {}, None
    if REFERENCE not in (label for label, _, _ in args.runs):  # the forward error needs the fp32 output
        _, reference = measure_base(info, "no_change", "no", sample, None)
    for label, precision, mixed in args.runs:
        started = time.perf_counter()
        try:
            result, output = measure_base(info, precision, mixed, sample, reference)
        except Exception as err:  # noqa: BLE001 - a broken precision is a result, not the end of the benchmark
            results[label] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {label:15s} FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        if label == REFERENCE:
            reference = output
        results[label] = result
        ratio = result["layer_bytes"] / result["layer_bf16_bytes"]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(result["layer_kinds"].items()))
        groups = "" if not result["int_group_sizes"] else "; group size " + ", ".join(
            f"{'none (per channel)' if k == 'None' else k}: {n}" for k, n in sorted(result["int_group_sizes"].items()))
        error = "" if result["forward_error"] is None else f"; fwd err {result['forward_error']:.4f}"
        print(f"  {label:15s} base {result['total_bytes'] / MiB:6.2f} MiB; layers ({kinds}{groups}): "
              f"{result['layer_params'] / 1e6:.2f} M weights in {result['layer_bytes'] / MiB:6.2f} MiB = "
              f"{ratio:.3f} x bf16{error}   ({time.perf_counter() - started:.1f} s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# 2 and 3. Training runs


def slug(label):
    return label.replace(" ", "-")


def read_log(path):
    with open(path, encoding="utf-8") as handle:
        rows = sorted((json.loads(line) for line in handle if line.strip()), key=lambda row: row["step"])
    return [row["loss"] for row in rows], [row["step_time"] for row in rows]


def run_training(paths, args, label, precision, mixed):
    output_dir = os.path.join(paths["root"], f"train-{slug(label)}")
    log_path = os.path.join(paths["root"], f"train-{slug(label)}.log")
    shutil.rmtree(output_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth.py"),
           *trainer_flags(paths, args, output_dir, steps=args.steps),
           "--base_model_precision", precision, "--mixed_precision", mixed]
    try:
        wall, rss = run_child(cmd, log_path)
    except SystemExit as err:  # run_child's message carries the log's tail
        return {"error": str(err)}
    losses, times = read_log(os.path.join(output_dir, "logs", "train_log.jsonl"))
    if len(losses) != args.steps:
        return {"error": f"logged {len(losses)} steps, expected {args.steps}; see {log_path}"}
    with open(log_path, encoding="utf-8") as handle:
        cached = "nothing to encode" in handle.read()
    timed = times[args.warmup:]
    return {"losses": losses, "step_times": times, "rss_mib": rss, "wall_s": wall, "cached": cached,
            "steps_per_s": 1 / statistics.median(timed), "steps_per_s_mean": len(timed) / sum(timed)}


def moving_average(values, window):
    return [statistics.fmean(values[i:i + window]) for i in range(len(values) - window + 1)]


def compare_losses(losses, reference):
    mean, ref_mean = statistics.fmean(losses), statistics.fmean(reference)
    window = min(MA_WINDOW, len(losses))
    diffs = [(a - b) / b for a, b in zip(moving_average(losses, window), moving_average(reference, window))]
    worst = max(range(len(diffs)), key=lambda i: abs(diffs[i]))
    return {"mean_loss_rel": (mean - ref_mean) / ref_mean, "ma_worst_rel": diffs[worst],
            "ma_worst_step": worst + window}  # the window ending at this step


def write_curves(root, runs):
    """loss_curves.png (matplotlib) or loss_curves.csv: per-step loss and MA10 of every run. Returns the path."""
    labels = [label for label, result in runs.items() if "losses" in result]
    if not labels:
        return None
    steps = len(runs[labels[0]]["losses"])
    window = min(MA_WINDOW, steps)
    averages = {label: [None] * (window - 1) + moving_average(runs[label]["losses"], window) for label in labels}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.join(root, "loss_curves.csv")
        import csv

        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", *(f"loss {label}" for label in labels),
                             *(f"ma{window} {label}" for label in labels)])
            for i in range(steps):
                writer.writerow([i + 1, *(f"{runs[label]['losses'][i]:.6f}" for label in labels),
                                 *("" if averages[label][i] is None else f"{averages[label][i]:.6f}"
                                   for label in labels)])
        return path
    path = os.path.join(root, "loss_curves.png")
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for label in labels:
        top.plot(range(1, steps + 1), runs[label]["losses"], label=label, linewidth=1)
        bottom.plot(range(1, steps + 1), averages[label], label=label, linewidth=1.5)
    top.set_ylabel("loss")
    bottom.set_ylabel(f"loss, moving average ({window})")
    bottom.set_xlabel("step")
    top.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------------------


def goal_note(value, goal):
    return f"{value:.2f} ({'ok' if value <= goal else 'MISSED'}: goal <= {goal:g})"


def print_table(args, sizes, runs):
    header = (f"{'precision':15s} {'base MiB':>8s} {'quantised-layer MiB':>19s} {'vs bf16':<24s} "
              f"{'peak RSS MiB':>12s} {'steps/s':>7s} {'mean loss':>9s}  {'vs fp32':<16s} {'worst MA10 vs fp32':<24s}")
    header = header.rstrip()
    print(header)
    print("-" * len(header))
    for label, precision, _ in args.runs:
        size, run = sizes.get(label, {}), runs.get(label, {})
        if "error" in size:
            size_cells = f"{'FAILED':>8s} {'':>19s} {'':24s}"
        else:
            ratio = size["layer_bytes"] / size["layer_bf16_bytes"]
            ratio_text = goal_note(ratio, SIZE_GOALS[precision]) if precision in SIZE_GOALS else f"{ratio:.2f}"
            size_cells = (f"{size['total_bytes'] / MiB:8.2f} {size['layer_bytes'] / MiB:19.2f} {ratio_text:24s}")
        if "error" in run:
            run_cells = f"{'FAILED (see its log)':>30s}"
        else:
            mean = statistics.fmean(run["losses"])
            if label == REFERENCE or "compare" not in run:
                versus = worst = "(reference)" if label == REFERENCE else "(no fp32 run)"
            else:
                c = run["compare"]
                mark = "ok" if abs(c["mean_loss_rel"]) <= LOSS_GOAL else "MISSED"
                versus = f"{100 * c['mean_loss_rel']:+.2f} % {mark}"
                mark = "ok" if abs(c["ma_worst_rel"]) <= LOSS_GOAL else "MISSED"
                worst = f"{100 * c['ma_worst_rel']:+.2f} % @{c['ma_worst_step']} {mark}"
            run_cells = (f"{run['rss_mib']:12.0f} {run['steps_per_s']:7.2f} {mean:9.4f}  {versus:<16s} {worst:<24s}")
        print(f"{label:15s} {size_cells} {run_cells}".rstrip())
    quantised_mixed = args.quantised_mixed_precision
    print(f"(quantised runs: --mixed_precision {quantised_mixed}; vs bf16 = the quantised layers' weight bytes / the "
          f"same weights in bf16; loss goals: within {100 * LOSS_GOAL:g} % of fp32; steps/s = 1 / median step_time "
          f"after {args.warmup} warm-up steps; MA10 @N: the window ending at step N)")


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    import torch

    started = time.perf_counter()
    temporary = args.out is None
    root = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench_memory-"))
    paths = {"root": root, "model": os.path.join(root, "model"), "images": os.path.join(root, "images"),
             "cache": os.path.join(root, "cache")}
    os.makedirs(root, exist_ok=True)
    for key in ("model", "images", "cache"):
        shutil.rmtree(paths[key], ignore_errors=True)
    try:
        unet_params = build_model(paths["model"], args.resolution)
        make_images(paths["images"], args.images, args.resolution)
        print(f"bench folder {root}: UNet {unet_params / 1e6:.2f} M params, {args.images} images of "
              f"{args.resolution}x{args.resolution}, batch {args.batch_size}, LoRA rank {args.lora_rank}, "
              f"{args.steps} steps per run; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{load_note()}", flush=True)

        import cache_latents

        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            cache_latents.main(common_flags(paths, args) + ["--output_dir", paths["cache"], "--device", "cpu"])
        with open(os.path.join(root, "cache_latents.log"), "w", encoding="utf-8") as handle:
            handle.write(log.getvalue())
        print(f"caches built in {time.perf_counter() - t0:.1f} s", flush=True)

        print("1. bytes of the frozen base weights (load + quantise.quantize_model, as in training):", flush=True)
        sizes = bench_bytes(paths, args)

        print(f"2. training: train_dreambooth.py, {args.steps} steps per run, one run at a time:", flush=True)
        runs = {}
        for label, precision, mixed in args.runs:
            run = runs[label] = run_training(paths, args, label, precision, mixed)
            if "error" in run:
                print(f"  {label:15s} FAILED: {run['error']}", flush=True)
                continue
            print(f"  {label:15s} {run['steps_per_s']:5.2f} steps/s (mean {run['steps_per_s_mean']:5.2f})   "
                  f"peak RSS {run['rss_mib']:5.0f} MiB   mean loss {statistics.fmean(run['losses']):.4f}   "
                  f"process wall {run['wall_s']:5.1f} s" + ("" if run["cached"] else
                                                           "   warning: it encoded images itself (cache missed)"),
                  flush=True)
        reference = runs.get(REFERENCE, {}).get("losses")
        for label, run in runs.items():
            if reference and "losses" in run and label != REFERENCE:
                run["compare"] = compare_losses(run["losses"], reference)
        curves = write_curves(root, runs)
        with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as handle:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "bytes": sizes, "training": runs}, handle,
                      indent=1)

        print(f"\n{load_note()} at the end; total bench time {time.perf_counter() - started:.0f} s")
        print_table(args, sizes, runs)
        print(f"loss curves: {curves}; all numbers: {os.path.join(root, 'results.json')}; logs: {root}")
        failed = [label for label, _, _ in args.runs if "error" in sizes.get(label, {}) or "error" in runs[label]]
        return 1 if failed else 0
    finally:
        if temporary:  # keep the results and logs, drop the model, images, caches and run folders
            for name in os.listdir(root):
                if os.path.isdir(os.path.join(root, name)):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
