"""Experiment: what scheduled sampling (rollouts) and EMA do to the eval loss, same seed, same steps, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_rollouts_ema.py                 # 400 steps, 128 px (~4 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_rollouts_ema.py --steps 400 --offset 10 --out bench/out/rollouts

Builds bench_train's small SD-shaped random model (6.9 M-parameter UNet) and synthetic subject images, then trains
the same LoRA twice with train_dreambooth.main, identical except for the rollout flags: once plain, once with
--scheduled_sampling_max_step_offset K (probability ramped from 0 over --ramp steps). Both runs keep an EMA
(--ema_decay with warm-up) and write a checkpoint every --every steps. Each checkpoint's raw and EMA weights are
scored with scores.StableEvalLoss (8 fixed timesteps, fixed noise) on the training images and on held-out
images of the same subject, and the table prints all four columns per step with the wall time of each run.

A random model cannot draw anything, so these numbers say how the options move the denoising loss, not whether
pictures improve.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), os.path.dirname(os.path.abspath(__file__))]

PROMPT = "a photo of ohwx toy"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100, help="checkpoint (and score) every N steps")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--images", type=int, default=8, help="training images")
    parser.add_argument("--held_out", type=int, default=4, help="held-out images of the same subject")
    parser.add_argument("--offset", type=int, default=5, help="--scheduled_sampling_max_step_offset")
    parser.add_argument("--probability", type=float, default=1.0)
    parser.add_argument("--ramp", type=int, default=100, help="--scheduled_sampling_ramp_steps")
    parser.add_argument("--sampler", default="unipc")
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder)")
    return parser.parse_args(argv)


def cached_examples(model, folder, output_dir, resolution):
    """scores.StableEvalLoss's examples for a folder of images (cached exactly as training caches them)."""
    from common import caches, data, models, scores
    import train_dreambooth

    args = train_dreambooth.parse_args(["--pretrained_model_name_or_path", model, "--instance_data_dir", folder,
                                        "--instance_prompt", PROMPT, "--output_dir", output_dir, "--resolution",
                                        str(resolution), "--seed", "0"])
    datasets = data.load_datasets(args)
    info = models.resolve_model(args)
    plans = data.plan_datasets(datasets, data.crop_seed(args), print_fn=lambda *a: None)
    entries, _ = caches.build_vae_cache(plans[datasets[0].id], info, print_fn=lambda *a: None)
    text_dir = data.text_cache_dir(datasets, args)
    caches.build_text_cache([c for e in entries for c in e.captions], info, text_dir, print_fn=lambda *a: None)
    return scores.eval_examples(entries, info, text_dir), info


def main(argv=None):
    import contextlib
    import io

    from safetensors.torch import load_file

    import bench_train
    from common import adapters, checkpoints, objectives, scores
    import make_demo
    import train_dreambooth

    args = parse_args(argv)
    work = args.out or tempfile.mkdtemp(prefix="bench_rollouts_")
    model = os.path.join(work, "model")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        bench_train.build_model(model, args.resolution)
    subject = make_demo.make_subject_images(os.path.join(work, "subject"), sizes=((args.resolution,) * 2,) * args.images)
    held_out = os.path.join(work, "held_out")
    os.makedirs(held_out, exist_ok=True)
    for i in range(args.held_out):  # the same subject drawn with other random placements
        make_demo.draw_subject(args.resolution, args.resolution, seed=1000 + i).save(os.path.join(held_out, f"{i}.png"))
    train_examples, info = cached_examples(model, subject, os.path.join(work, "eval-train"), args.resolution)
    sets = {"train": train_examples,
            "held-out": cached_examples(model, held_out, os.path.join(work, "eval-held"), args.resolution)[0]}
    objective = objectives.for_model(info, argparse.Namespace())

    variants = {"plain": [], "rollouts": ["--scheduled_sampling_max_step_offset", args.offset,
                                          "--scheduled_sampling_probability", args.probability,
                                          "--scheduled_sampling_ramp_steps", args.ramp,
                                          "--scheduled_sampling_sampler", args.sampler]}
    losses, wall = {}, {}
    for name, extra in variants.items():
        out = os.path.join(work, name)
        argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject, "--instance_prompt", PROMPT,
                "--output_dir", out, "--cache_dir", os.path.join(work, "cache"), "--resolution", args.resolution,
                "--seed", 0, "--train_batch_size", 2, "--max_train_steps", args.steps, "--learning_rate",
                args.learning_rate, "--lora_rank", 16, "--checkpointing_steps", args.every, "--use_ema",
                "--ema_decay", args.ema_decay, "--ema_warmup", *extra]
        print(f"training {name} ...", flush=True)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            result = train_dreambooth.main([str(a) for a in argv])
        wall[name] = time.perf_counter() - started
        unet = result["unet"]
        trainable = adapters.trainable_parameters(unet)
        final = {k: v.detach().clone() for k, v in trainable.items()}
        for step in range(0, args.steps + 1, args.every):
            if step == 0:  # the base model: the adapter switched off
                weights = {"raw": None, "ema": None}
            elif step == args.steps:
                weights = {"raw": final, "ema": result["ema"].shadow}
            else:
                folder = os.path.join(out, f"checkpoint-{step}")
                weights = {"raw": load_file(os.path.join(folder, "trainable.safetensors")),
                           "ema": load_file(os.path.join(folder, checkpoints.EMA_CHECKPOINT_FILE))}
            for kind, state in weights.items():
                for set_name, examples in sets.items():
                    if state is None:
                        with adapters.adapter_disabled(unet):
                            loss = scores.StableEvalLoss(info, objective, examples)(unet)["mean"]
                    else:
                        unet.load_state_dict(state, strict=False)
                        loss = scores.StableEvalLoss(info, objective, examples)(unet)["mean"]
                    losses[name, kind, set_name, step] = loss

    columns = [(n, k) for n in variants for k in ("raw", "ema")]
    for set_name in sets:
        print(f"\nstable eval loss on the {set_name} images ({len(sets[set_name])}), 8 fixed timesteps; lower is better")
        print(f"{'step':>6} " + " ".join(f"{n + ' ' + k:>14}" for n, k in columns))
        for step in range(0, args.steps + 1, args.every):
            print(f"{step:>6} " + " ".join(f"{losses[n, k, set_name, step]:>14.5f}" for n, k in columns))
    print("\nwall time: " + ", ".join(f"{n} {wall[n]:.1f} s" for n in variants)
          + f" (rollouts / plain: {wall['rollouts'] / wall['plain']:.2f}x)")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
