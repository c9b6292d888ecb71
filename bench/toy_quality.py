"""The toy DreamBench: does DreamBooth learn a subject, and what does each option change? Measured on the toy model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py              # every variant, 3 subjects (~25 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py --variants lora full --subjects 0 --steps 200

The subjects are ones the toy world never shows (toy/make_toy_data.py SUBJECTS: shapes painted in two colours, in
stripes), 5 pictures of each, the instance prompt "a ohwx shape" and the class noun "shape". For every subject,
every variant trains with train_dreambooth.main from the shipped toy model (toy/model) with the same seed, steps
and pictures, then draws the same prompts at the same seeds. The scores, in the spirit of the DreamBooth paper,
read by the toy scorer (toy/toy_scorer.py), are averaged over the subjects as DreamBench averages its 30:

  subject    subject fidelity: mean cosine of the scorer's centred features between each image of the subject
             prompts and each real picture of the subject (the DINO score's recipe); higher = more like it
  prompt     prompt fidelity: share of what the subject prompts ask for (a background colour, a size, a place)
             that the scorer reads off the images
  drift      prior drift: 1 - mean cosine between the tuned and the base model's images of class and world
             prompts ("a shape", "a red circle on a blue background", ...) at the same seeds; 0 = untouched
  world      share of world prompts still drawn with the right shape and colour (the base model's is the bar)
  eval loss  the stable eval loss on 4 held-out pictures of the subject, at the last step (EMA: the average's)

The ceiling for subject fidelity is what 4 other real pictures of the subject score against the training ones.
Prints one table per subject as it goes and the mean table at the end; writes table.md, results.json and
report.html (every image) under --out.
"""

import argparse
import html
import json
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "toy")]

import make_toy_data  # noqa: E402

TOY_MODEL = os.path.join(ROOT, "toy", "model")
INSTANCE_PROMPT = "a ohwx shape"
CLASS_PROMPT = "a shape"

# Each variant: extra train_dreambooth flags, and whether it trains with regularisation pictures / masks.
VARIANTS = {
    "lora": ([], False, False),
    "lora + prior (base_model)": (["--prior_loss_target", "base_model"], True, False),
    "lora + prior (dataset)": (["--prior_loss_target", "dataset"], True, False),
    "lora + masks": ([], False, True),
    "lora + rollouts": (["--scheduled_sampling_max_step_offset", "3"], False, False),  # ramped over half the steps
    "lora + ema": (["--use_ema", "--ema_decay", "0.99", "--ema_warmup"], False, False),
    "lycoris lokr": (["--lora_type", "lycoris"], False, False),
    "full": (["--model_type", "full"], False, False),
    "lora + dora": (["--use_dora"], False, False),
    "lora + caption dropout": (["--caption_dropout_probability", "0.1"], False, False),
    "lora + prodigy": (["--optimizer", "prodigy", "--learning_rate", "1.0"], False, False),
    "lora + dop": (["--dop_class", "shape", "--dop_trigger", "ohwx shape"], False, False),  # "a shape" stays the base's
    "lora + text encoder": (["--train_text_encoder"], False, False),
    "lora + text encoder (lr / 10)": (["--train_text_encoder", "--text_encoder_lr", "1e-4"], False, False),
}
SHORT = {"lora + prior (base_model)": "prior_base", "lora + prior (dataset)": "prior_dataset",
         "lora + masks": "masks", "lora + rollouts": "rollouts", "lora + ema": "ema", "lycoris lokr": "lokr",
         "lora + dora": "dora", "lora + caption dropout": "caption_dropout", "lora + prodigy": "prodigy",
         "lora + dop": "dop", "lora + text encoder": "text_encoder",
         "lora + text encoder (lr / 10)": "text_encoder_lr"}


def subject_prompts(subject):
    """[(prompt, {head: value it asks for})]: the subject in other contexts than its pictures show."""
    _, colour, stripes = make_toy_data.SUBJECTS[subject]
    free = [c for c in sorted(make_toy_data.COLOURS) if c not in (colour, stripes)]
    return [(f"{INSTANCE_PROMPT} on a {free[0]} background", {"background": free[0]}),
            (f"{INSTANCE_PROMPT} on a {free[2]} background", {"background": free[2]}),
            (f"{INSTANCE_PROMPT} on a {free[4]} background", {"background": free[4]}),
            ("a small ohwx shape", {"size": "small"}),
            ("a large ohwx shape", {"size": "large"}),
            ("a ohwx shape at the left", {"place": "at the left"}),
            ("a ohwx shape at the top", {"place": "at the top"}),
            (f"a large ohwx shape in the center on a {free[1]} background",
             {"size": "large", "place": "in the center", "background": free[1]})]


WORLD_PROMPTS = [("a red circle on a blue background", {"shape": "circle", "colour": "red"}),
                 ("a large green square at the top", {"shape": "square", "colour": "green"}),
                 ("a yellow triangle on a black background", {"shape": "triangle", "colour": "yellow"}),
                 ("a small purple diamond in the center", {"shape": "diamond", "colour": "purple"})]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=TOY_MODEL, help="the toy model (toy/make_toy_model.py)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of: {', '.join(VARIANTS)}")
    parser.add_argument("--subjects", type=int, nargs="+", default=[0, 1, 2], help="toy subjects (0-3)")
    parser.add_argument("--images", type=int, default=5, help="pictures of the subject to train on")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="LoRA and LyCORIS")
    parser.add_argument("--full_learning_rate", type=float, default=1e-4, help="the full fine-tune's")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora_target", default="all", help="LoRA layers (train_dreambooth --lora_target); the "
                        "subject's stripes are fine detail that the convolutions at full latent size draw")
    parser.add_argument("--seeds", type=int, default=2, help="images per subject prompt")
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "toy_quality"))
    args = parser.parse_args(argv)
    if any(not 0 <= n < len(make_toy_data.SUBJECTS) for n in args.subjects):
        parser.error(f"--subjects: each from 0 to {len(make_toy_data.SUBJECTS) - 1}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"{args.model}: no toy model there (train one with python toy/make_toy_model.py)")
    return args


def write_pictures(work, subject, count):
    """Training pictures + masks, and 4 held-out pictures of the same subject (for the eval loss)."""
    from common import files

    for folder, seed, n in (("subject", 0, count), ("held_out", 1, 4)):
        for i, (image, mask, _) in enumerate(make_toy_data.subject_samples(subject, n, seed)):
            files.save_image_atomic(image, os.path.join(work, folder, f"{i:02d}.png"))
            if folder == "subject":
                files.save_image_atomic(mask, os.path.join(work, "masks", f"{i:02d}.png"))


def data_config(work, regularisation, masks, class_dir):
    # repeats 4: 5 pictures x 5 beside 24 class pictures, so half the batches show the subject (the trainer's own
    # advice for prior preservation; without class pictures it changes nothing but the epoch's length).
    datasets = [{"id": "subject", "type": "local", "instance_data_dir": os.path.join(work, "subject"),
                 "caption_strategy": "instanceprompt", "instance_prompt": INSTANCE_PROMPT, "resolution": 64,
                 "resolution_type": "pixel", "repeats": 4, "cache_dir_vae": os.path.join(work, "cache", "subject")},
                {"id": "held-out", "type": "local", "dataset_type": "eval",
                 "instance_data_dir": os.path.join(work, "held_out"), "caption_strategy": "instanceprompt",
                 "instance_prompt": INSTANCE_PROMPT, "resolution": 64, "resolution_type": "pixel",
                 "cache_dir_vae": os.path.join(work, "cache", "held_out")},
                {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
                 "cache_dir": os.path.join(work, "cache", "text")}]
    if masks:
        datasets[0]["conditioning_data"] = "masks"
        datasets.append({"id": "masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
                         "instance_data_dir": os.path.join(work, "masks")})
    if regularisation:
        datasets.append({"id": "class", "type": "local", "is_regularisation_data": True,
                         "instance_data_dir": class_dir, "caption_strategy": "textfile",
                         "resolution": 64, "resolution_type": "pixel",
                         "cache_dir_vae": class_dir + "_cache"})
    name = f"data{'_reg' if regularisation else ''}{'_masks' if masks else ''}.json"
    path = os.path.join(work, name)
    with open(path, "w") as handle:
        json.dump(datasets, handle, indent=2)
    return path


def train_variant(args, work, name, class_dir):
    import train_dreambooth

    extra, regularisation, masks = VARIANTS[name]
    output = os.path.join(work, "runs", SHORT.get(name, name))
    shutil.rmtree(output, ignore_errors=True)
    full = "--model_type" in extra
    argv = ["--pretrained_model_name_or_path", args.model, "--data_backend_config",
            data_config(work, regularisation, masks, class_dir), "--output_dir", output, "--seed", "0",
            "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.full_learning_rate if full else args.learning_rate),
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20", "--lora_rank", str(args.rank),
            "--lora_target", args.lora_target,
            "--checkpointing_steps", str(10 * args.steps), "--eval_steps_interval", str(args.steps), *extra]
    if "--scheduled_sampling_max_step_offset" in extra:
        argv += ["--scheduled_sampling_ramp_steps", str(args.steps // 2)]
    if "--lora_type" in extra:
        config = os.path.join(work, "lokr.json")
        with open(config, "w") as handle:
            json.dump({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                       "apply_preset": {"target_module": ["Attention", "FeedForward"]}}, handle)
        argv += ["--lycoris_config", config]
    started = time.monotonic()
    train_dreambooth.main(argv)
    seconds = time.monotonic() - started
    logged = [json.loads(line) for line in open(os.path.join(output, "logs", "train_log.jsonl"))]
    last = [r for r in logged if "eval_loss" in r][-1]
    return output, seconds, last.get("eval_loss/ema", last["eval_loss"]), full


def load_variant(model, output=None, full=False, ema=False):
    """The base model, a LoRA / LyCORIS output on it, or a full fine-tune; `ema`: the run's averaged weights."""
    from diffusers import StableDiffusionPipeline

    from common import adapters

    if full:
        pipe = StableDiffusionPipeline.from_pretrained(os.path.join(output, "ema") if ema else output)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model)
    if output and not full:
        suffix = adapters.EMA_SUFFIX if ema else ""
        name = adapters.LORA_WEIGHTS_NAME.replace(".safetensors", suffix + ".safetensors")
        adapters.load_adapter(pipe, os.path.join(output, name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompts, seeds, args):
    """Every prompt at seeds 0..seeds-1 (seed s of every prompt in one batch): [image] in prompt-major order."""
    import torch

    images = [[None] * seeds for _ in prompts]
    for s in range(seeds):
        batch = pipe(list(prompts), height=64, width=64, num_inference_steps=args.num_inference_steps,
                     guidance_scale=args.guidance_scale, generator=[torch.Generator().manual_seed(1000 * s + i)
                                                                    for i in range(len(prompts))]).images
        for i, image in enumerate(batch):
            images[i][s] = image
    return [image for row in images for image in row]


PRIOR_PROMPTS = [CLASS_PROMPT] * 4 + [p for p, _ in WORLD_PROMPTS]


def score(pipe, args, scorer, subject, real, base_prior, prior=None):
    """The row of one model on one subject, and its images ({"subject": [...], "prior": [...]}). Its class and
    world prompts (`prior`) are drawn here unless given: they do not depend on the subject, so the base model's
    (`base_prior`, which drift is measured against) are drawn once."""
    import toy_scorer

    asked = subject_prompts(subject)
    drawn = draw(pipe, [p for p, _ in asked], args.seeds, args)
    prior = draw(pipe, PRIOR_PROMPTS, 1, args) if prior is None else prior
    read = toy_scorer.predict(scorer, prior[4:])
    row = {"subject": toy_scorer.subject_fidelity(scorer, drawn, real),
           "prompt": toy_scorer.prompt_fidelity(scorer, drawn, [a for _, a in asked for _ in range(args.seeds)]),
           "world": sum(r["shape"] == a["shape"] and r["colour"] == a["colour"]
                        for r, (_, a) in zip(read, WORLD_PROMPTS)) / len(WORLD_PROMPTS),
           "drift": 1 - toy_scorer.paired_similarity(scorer, prior, base_prior)}
    return row, {"subject": drawn, "prior": prior}


def mean_rows(per_subject):
    """Each variant's scores averaged over the subjects (eval loss and train time too)."""
    first = next(iter(per_subject.values()))
    return {name: {key: (sum(rows[name][key] for rows in per_subject.values()) / len(per_subject)
                         if first[name].get(key) is not None else None) for key in first[name]}
            for name in first}


def table(rows):
    head = f"| {'variant':<26} | subject | prompt | drift | world | eval loss | train s |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for name, r in rows.items():
        loss = "" if r.get("eval_loss") is None else f"{r['eval_loss']:.4f}"
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {name:<26} | {r['subject']:7.3f} | {r['prompt']:6.2f} | {r['drift']:5.3f} | "
                     f"{r['world']:5.2f} | {loss:>9} | {seconds:>7} |")
    return "\n".join(lines)


def write_report(path, args, per_subject, pictures, reals, ceilings):
    from common import files, images, report

    folder = os.path.dirname(path)
    sections = []
    for subject, rows in per_subject.items():
        asked = subject_prompts(subject)
        sheet = os.path.join(folder, "images", f"subject{subject}_real.png")
        images.contact_sheet(reals[subject], [f"real {i}" for i in range(len(reals[subject]))], sheet, thumb=96)
        sections.append(f"<h2>Subject {subject}: {html.escape(' / '.join(make_toy_data.SUBJECTS[subject]))}</h2>"
                        f"<p>Real pictures against each other: subject fidelity {ceilings[subject]:.3f}.</p>"
                        f"<pre>{html.escape(table(rows))}</pre>"
                        f'<h3>The training pictures</h3><img src="{report.embedded(sheet)}">')
        for name, drawn in pictures[subject].items():
            slug = f"subject{subject}_" + SHORT.get(name, name).replace(" ", "_")
            subject_sheet = os.path.join(folder, "images", f"{slug}_subject.png")
            images.contact_sheet(drawn["subject"], [p for p, _ in asked for _ in range(args.seeds)], subject_sheet,
                                 thumb=96)
            prior_sheet = os.path.join(folder, "images", f"{slug}_prior.png")
            images.contact_sheet(drawn["prior"], PRIOR_PROMPTS, prior_sheet, thumb=96)
            r = rows[name]
            sections.append(f"<h3>{html.escape(name)}</h3><p>subject {r['subject']:.3f}, prompt {r['prompt']:.2f}, "
                            f"drift {r['drift']:.3f}, world {r['world']:.2f}</p>"
                            f'<img src="{report.embedded(subject_sheet)}"> '
                            f'<img src="{report.embedded(prior_sheet)}">')
    ceiling = sum(ceilings.values()) / len(ceilings)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Toy DreamBench</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{image-rendering:pixelated;vertical-align:top}}
pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>Toy DreamBench: {len(per_subject)} subjects</h1>
<p>{args.steps} steps, batch {args.batch_size}, seed 0 for every variant and subject. Mean over the subjects (real
pictures against each other: {ceiling:.3f}):</p>
<pre>{html.escape(table(mean_rows(per_subject)))}</pre>
<p>Per subject, left: the subject prompts ({args.seeds} seeds each); right: class and world prompts at the base
model's seeds (prior drift compares them).</p>
{"".join(sections)}
</body></html>
"""
    files.write_text_atomic(page, path)


def main(argv=None):
    import make_regularisation
    import toy_scorer

    args = parse_args(argv)
    work = os.path.abspath(args.out)
    os.makedirs(work, exist_ok=True)
    started = time.monotonic()
    scorer = toy_scorer.load_scorer()
    class_dir = os.path.join(work, "class")
    if any(VARIANTS[v][1] for v in args.variants):
        make_regularisation.main(["--pretrained_model_name_or_path", args.model, "--class_prompt", CLASS_PROMPT,
                                  "--num_images", "24", "--output_dir", class_dir,
                                  "--resolution", "64", "--num_inference_steps", str(args.num_inference_steps),
                                  "--guidance_scale", str(args.guidance_scale), "--batch_size", "8",
                                  "--device", "cpu", "--dtype", "fp32"])
    base = load_variant(args.model)
    base_prior = draw(base, PRIOR_PROMPTS, 1, args)
    per_subject, images, reals, ceilings = {}, {}, {}, {}
    for subject in args.subjects:
        subject_work = os.path.join(work, f"subject{subject}")
        write_pictures(subject_work, subject, args.images)
        reals[subject] = [image for image, _, _ in make_toy_data.subject_samples(subject, args.images, 0)]
        held_out = [image for image, _, _ in make_toy_data.subject_samples(subject, 4, 1)]
        ceilings[subject] = toy_scorer.subject_fidelity(scorer, held_out, reals[subject])
        base_row, base_images = score(base, args, scorer, subject, reals[subject], base_prior, base_prior)
        rows, images[subject] = {"base model": base_row}, {"base model": base_images}
        for name in args.variants:
            output, seconds, eval_loss, full = train_variant(args, subject_work, name, class_dir)
            if "eval_loss" not in base_row:  # the step-0 line of any run is the base model's eval loss
                first = json.loads(open(os.path.join(output, "logs", "train_log.jsonl")).readline())
                base_row["eval_loss"] = first.get("eval_loss")
            pipe = load_variant(args.model, output, full, ema="--use_ema" in VARIANTS[name][0])
            row, drawn = score(pipe, args, scorer, subject, reals[subject], base_prior)
            rows[name] = {**row, "eval_loss": eval_loss, "seconds": seconds}
            images[subject][name] = drawn
        base_row.setdefault("eval_loss", None)
        base_row["seconds"] = None
        per_subject[subject] = rows
        print(f"\nsubject {subject} ({' / '.join(make_toy_data.SUBJECTS[subject])}; real pictures against each "
              f"other: {ceilings[subject]:.3f}):\n{table(rows)}", flush=True)
    mean = mean_rows(per_subject)
    ceiling = sum(ceilings.values()) / len(ceilings)
    text = (f"mean over subjects {', '.join(map(str, args.subjects))} (real pictures against each other: "
            f"{ceiling:.3f}; {(time.monotonic() - started) / 60:.1f} min in all)\n{table(mean)}")
    with open(os.path.join(work, "table.md"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(work, "results.json"), "w") as handle:
        json.dump({"settings": vars(args), "mean": mean, "subjects": {str(k): v for k, v in per_subject.items()},
                   "real_vs_real": {str(k): v for k, v in ceilings.items()}}, handle, indent=2)
    write_report(os.path.join(work, "report.html"), args, per_subject, images, reals, ceilings)
    print(f"\n{text}\n\nreport: {os.path.join(work, 'report.html')}")
    return mean


if __name__ == "__main__":
    main()
