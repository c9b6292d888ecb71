"""The toy DreamBench: does DreamBooth learn a subject, and what does each option change? Measured on a toy model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py              # every variant, 3 subjects (~17 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py --family sd3 # the same on the flow-matching toy model
    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py --sweep --subjects 0 1 2 3 4 5 --train_seeds 0 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/toy_quality.py --variants lora full --subjects 0 --steps 200

The subjects are ones the toy world never shows (toy/make_toy_data.py SUBJECTS: shapes painted in two colours, in
stripes), 5 pictures of each, the instance prompt "a ohwx shape" and the class noun "shape". For every subject,
every variant trains with train_dreambooth.main from the toy model (--family sd1: toy/model, a UNet; sd3:
toy/model_sd3, an SD3 transformer trained by flow matching) with the same seed, steps and pictures, then draws the
same prompts at the same seeds. The scores, in the spirit of the DreamBooth paper, read by the toy scorer
(toy/toy_scorer.py), are averaged over the subjects as DreamBench averages its 30:

  subject    subject fidelity: mean cosine of the scorer's centred features between each image of the subject
             prompts and each real picture of the subject (the DINO score's recipe); higher = more like it
  prompt     prompt fidelity: share of what the subject prompts ask for (a background colour, a size, a place)
             that the scorer reads off the images
  drift      prior drift: 1 - mean cosine between the tuned and the base model's images of class and world
             prompts ("a shape", "a red circle on a blue background", ...) at the same seeds; 0 = untouched
  world      share of world prompts still drawn with the right shape and colour (the base model's is the bar)
  eval loss  the stable eval loss on 4 held-out pictures of the subject, at the last step (EMA: the average's)

The ceiling for subject fidelity is what 4 other real pictures of the subject score against the training ones.
The row "base model, other seed" gives the drift's scale: the base model's own class and world pictures drawn at
other seeds. The row "drawn as asked" is a perfect model's: the toy world's renderer draws the subject exactly as
each subject prompt asks (8 pictures a prompt, what the prompt leaves open varied as in the real pictures), scored
the same way.
--sweep runs the recipes of SWEEP instead of the variants: changes to prior preservation (learning rate, rank,
steps, repeats, prior weight and target, DOP, captions that describe each picture, masks, caption dropout, EMA) in
search of one that learns the subject without forgetting (the bar: subject fidelity at least the real pictures',
prompt at least 0.90, drift at most 0.20, world at least 0.90). --train_seeds trains each variant once per seed.
Prints one table per subject as it goes and the mean table (mean ± standard deviation over subjects and training
seeds, the rows that meet the bar marked) at the end; writes table.md, results.json and report.html (the frontier of
subject fidelity against drift, what each variant trains with, every image) under --out.
"""

import argparse
import html
import json
import os
import shutil
import sys
import time
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "toy")]

import make_toy_data  # noqa: E402
from make_toy_model import SHIPPED as TOY_MODELS  # noqa: E402
INSTANCE_PROMPT = "a ohwx shape"
CLASS_PROMPT = "a shape"


class Recipe(NamedTuple):
    """How one variant trains: train_dreambooth flags beyond the shared ones (a later flag wins, so a recipe may set
    --learning_rate or --max_train_steps), and its data: the 24 class pictures as regularisation data, the
    subject's masks, captions ("instance": every picture "a ohwx shape"; "described": what else the picture shows,
    "a small ohwx shape at the left on a blue background", so that its background, size and place are not learned
    as the subject) and the subject's repeats (4: with the class pictures, half the batches show the subject)."""
    flags: tuple = ()
    class_pictures: bool = False
    masks: bool = False
    captions: str = "instance"
    repeats: int = 4


PRIOR = ("--prior_loss_target", "base_model")
DOP = ("--dop_class", "shape", "--dop_trigger", "ohwx shape")  # "a shape" stays the base model's
VARIANTS = {
    "lora": Recipe(),
    "lora + prior (base_model)": Recipe(PRIOR, class_pictures=True),
    "lora + prior (dataset)": Recipe(("--prior_loss_target", "dataset"), class_pictures=True),
    "lora + masks": Recipe(masks=True),
    "lora + rollouts": Recipe(("--scheduled_sampling_max_step_offset", "3")),  # ramped over half the steps
    "lora + ema": Recipe(("--use_ema", "--ema_decay", "0.99", "--ema_warmup")),
    "lycoris lokr": Recipe(("--lora_type", "lycoris")),
    "full": Recipe(("--model_type", "full")),
    "lora + dora": Recipe(("--use_dora",)),
    "lora + caption dropout": Recipe(("--caption_dropout_probability", "0.1")),
    "lora + prodigy": Recipe(("--optimizer", "prodigy", "--learning_rate", "1.0")),
    "lora + dop": Recipe(DOP),
    "lora + text encoder": Recipe(("--train_text_encoder",)),
    "lora + text encoder (lr / 10)": Recipe(("--train_text_encoder", "--text_encoder_lr", "1e-4")),
}
SHORT = {"lora + prior (base_model)": "prior_base", "lora + prior (dataset)": "prior_dataset",
         "lora + masks": "masks", "lora + rollouts": "rollouts", "lora + ema": "ema", "lycoris lokr": "lokr",
         "lora + dora": "dora", "lora + caption dropout": "caption_dropout", "lora + prodigy": "prodigy",
         "lora + dop": "dop", "lora + text encoder": "text_encoder",
         "lora + text encoder (lr / 10)": "text_encoder_lr"}
# --sweep: recipes for learning the subject without forgetting it, each a change from "prior" (LoRA with prior
# preservation against the base model, the best variant above).
SWEEP = {
    "prior": Recipe(PRIOR, class_pictures=True),
    "prior, described": Recipe(PRIOR, class_pictures=True, captions="described"),
    "prior, described, dop": Recipe(PRIOR + DOP, class_pictures=True, captions="described"),
    "prior, dop": Recipe(PRIOR + DOP, class_pictures=True),
    "prior, masks": Recipe(PRIOR, class_pictures=True, masks=True),
    "prior, described, dop, masks": Recipe(PRIOR + DOP, class_pictures=True, captions="described", masks=True),
    "prior, weight 2": Recipe(PRIOR + ("--prior_loss_weight", "2"), class_pictures=True),
    "prior, weight 0.5": Recipe(PRIOR + ("--prior_loss_weight", "0.5"), class_pictures=True),
    "prior, lr 5e-4": Recipe(PRIOR + ("--learning_rate", "5e-4"), class_pictures=True),
    "prior, lr 2e-3": Recipe(PRIOR + ("--learning_rate", "2e-3"), class_pictures=True),
    "prior, rank 4": Recipe(PRIOR + ("--lora_rank", "4"), class_pictures=True),
    "prior, rank 16": Recipe(PRIOR + ("--lora_rank", "16"), class_pictures=True),
    "prior, attention layers": Recipe(PRIOR + ("--lora_target", "attention"), class_pictures=True),
    "prior, 150 steps": Recipe(PRIOR + ("--max_train_steps", "150"), class_pictures=True),
    "prior, 400 steps": Recipe(PRIOR + ("--max_train_steps", "400"), class_pictures=True),
    "prior, repeats 2": Recipe(PRIOR, class_pictures=True, repeats=2),
    "prior, repeats 8": Recipe(PRIOR, class_pictures=True, repeats=8),
    "prior, caption dropout": Recipe(PRIOR + ("--caption_dropout_probability", "0.1"), class_pictures=True),
    "prior, ema": Recipe(PRIOR + ("--use_ema", "--ema_decay", "0.99", "--ema_warmup"), class_pictures=True),
    "prior (dataset), described, dop": Recipe(("--prior_loss_target", "dataset") + DOP, class_pictures=True,
                                              captions="described"),
    # Described captions with more learning: they keep prompt fidelity, can more steps or capacity win the subject?
    "prior, described, lr 2e-3": Recipe(PRIOR + ("--learning_rate", "2e-3"), class_pictures=True,
                                        captions="described"),
    "prior, described, 400 steps": Recipe(PRIOR + ("--max_train_steps", "400"), class_pictures=True,
                                          captions="described"),
    "prior, described, weight 2": Recipe(PRIOR + ("--prior_loss_weight", "2"), class_pictures=True,
                                         captions="described"),
    "prior, described, rank 16": Recipe(PRIOR + ("--lora_rank", "16"), class_pictures=True, captions="described"),
    "prior, described, text encoder": Recipe(PRIOR + ("--train_text_encoder",), class_pictures=True,
                                             captions="described"),
}
RECIPES = {**VARIANTS, **SWEEP}


def slug(name):
    """A variant's folder name."""
    return SHORT.get(name) or "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


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


def drawn_as_asked(subject, per_prompt=8):
    """The subject drawn exactly as each subject prompt asks, by the toy world's own renderer, with what a prompt
    leaves open (size, place, background) varied as in the real pictures: what a perfect model would draw.
    Returns (images, {head: value asked} per image)."""
    import random

    shape, colour, stripes = make_toy_data.SUBJECTS[subject]
    backgrounds = [c for c in sorted(make_toy_data.COLOURS) if c not in (colour, stripes)]
    rng = random.Random(subject)
    drawn, asked = [], []
    for _, ask in subject_prompts(subject):
        for _ in range(per_prompt):
            attributes = {"size": rng.choice(sorted(make_toy_data.SIZES)), "background": rng.choice(backgrounds),
                          "place": rng.choice(sorted(make_toy_data.PLACES)), **ask}
            drawn.append(make_toy_data.draw(shape, colour, stripes=stripes, **attributes)[0])
            asked.append(ask)
    return drawn, asked


AS_ASKED = "drawn as asked"
RESEEDED = "base model, other seed"


WORLD_PROMPTS = [("a red circle on a blue background", {"shape": "circle", "colour": "red"}),
                 ("a large green square at the top", {"shape": "square", "colour": "green"}),
                 ("a yellow triangle on a black background", {"shape": "triangle", "colour": "yellow"}),
                 ("a small purple diamond in the center", {"shape": "diamond", "colour": "purple"})]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=sorted(TOY_MODELS),
                        help="which toy model: sd1 (toy/model, a UNet) or sd3 (toy/model_sd3, flow matching)")
    parser.add_argument("--model", default=None, help="a toy model folder (default: the --family's shipped one)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"any of the variants ({', '.join(VARIANTS)}; all by default) or --sweep's recipes")
    parser.add_argument("--sweep", action="store_true", help=f"run the recipes of the sweep ({', '.join(SWEEP)})")
    parser.add_argument("--subjects", type=int, nargs="+", default=[0, 1, 2],
                        help=f"toy subjects (0-{len(make_toy_data.SUBJECTS) - 1})")
    parser.add_argument("--train_seeds", type=int, nargs="+", default=[0],
                        help="train every variant once per seed (the spread in the tables is over subjects and seeds)")
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
    parser.add_argument("--out", default=None, help="default: bench/out/toy_quality (sd1) or toy_quality_sd3")
    args = parser.parse_args(argv)
    args.model = args.model or TOY_MODELS[args.family]
    args.out = args.out or os.path.join(ROOT, "bench", "out", "toy_quality" + ("" if args.family == "sd1" else "_sd3"))
    if any(not 0 <= n < len(make_toy_data.SUBJECTS) for n in args.subjects):
        parser.error(f"--subjects: each from 0 to {len(make_toy_data.SUBJECTS) - 1}")
    args.variants = args.variants or list(SWEEP if args.sweep else VARIANTS)
    unknown = [v for v in args.variants if v not in RECIPES]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(RECIPES)}")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"{args.model}: no toy model there (train one with python toy/make_toy_model.py)")
    return args


def write_pictures(work, subject, count):
    """Training pictures + masks, and 4 held-out pictures of the same subject (for the eval loss), each with its
    described caption beside it (NAME.txt, read by captions "described")."""
    from common import files

    for folder, seed, n in (("subject", 0, count), ("held_out", 1, 4)):
        for i, (image, mask, found) in enumerate(make_toy_data.subject_samples(subject, n, seed)):
            files.save_image_atomic(image, os.path.join(work, folder, f"{i:02d}.png"))
            described = make_toy_data.caption("ohwx shape", found["colour"], found["size"], found["place"],
                                              found["background"], omit=("colour",))
            files.write_text_atomic(described, os.path.join(work, folder, f"{i:02d}.txt"))
            if folder == "subject":
                files.save_image_atomic(mask, os.path.join(work, "masks", f"{i:02d}.png"))


def data_config(work, name, class_dir):
    """The data config of variant `name` on one subject's pictures."""
    from common import files

    recipe = RECIPES[name]
    captions = ({"caption_strategy": "instanceprompt", "instance_prompt": INSTANCE_PROMPT}
                if recipe.captions == "instance" else {"caption_strategy": "textfile"})
    datasets = [{"id": "subject", "type": "local", "instance_data_dir": os.path.join(work, "subject"), **captions,
                 "resolution": 64, "resolution_type": "pixel", "repeats": recipe.repeats,
                 "cache_dir_vae": os.path.join(work, "cache", "subject")},
                {"id": "held-out", "type": "local", "dataset_type": "eval",
                 "instance_data_dir": os.path.join(work, "held_out"), **captions, "resolution": 64,
                 "resolution_type": "pixel", "cache_dir_vae": os.path.join(work, "cache", "held_out")},
                {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
                 "cache_dir": os.path.join(work, "cache", "text")}]
    if recipe.masks:
        datasets[0]["conditioning_data"] = "masks"
        datasets.append({"id": "masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
                         "instance_data_dir": os.path.join(work, "masks")})
    if recipe.class_pictures:
        datasets.append({"id": "class", "type": "local", "is_regularisation_data": True,
                         "instance_data_dir": class_dir, "caption_strategy": "textfile",
                         "resolution": 64, "resolution_type": "pixel",
                         "cache_dir_vae": class_dir + "_cache"})
    path = os.path.join(work, "data", slug(name) + ".json")
    files.write_text_atomic(json.dumps(datasets, indent=2), path)
    return path


def flag_value(flags, name, default):
    """The last value given for `name` in a flag list (as argparse reads it), or `default`."""
    values = [value for flag, value in zip(flags, flags[1:]) if flag == name]
    return values[-1] if values else default


def train_variant(args, work, name, class_dir, seed=0):
    import train_dreambooth

    recipe = RECIPES[name]
    extra = list(recipe.flags)
    output = os.path.join(work, "runs", slug(name) + (f"_seed{seed}" if seed else ""))
    shutil.rmtree(output, ignore_errors=True)
    full = "--model_type" in extra
    steps = int(flag_value(extra, "--max_train_steps", args.steps))
    argv = ["--pretrained_model_name_or_path", args.model, "--data_backend_config",
            data_config(work, name, class_dir), "--output_dir", output, "--seed", str(seed),
            "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.full_learning_rate if full else args.learning_rate),
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20", "--lora_rank", str(args.rank),
            "--lora_target", args.lora_target,
            "--checkpointing_steps", str(10 * steps), "--eval_steps_interval", str(steps), *extra]
    if "--scheduled_sampling_max_step_offset" in extra:
        argv += ["--scheduled_sampling_ramp_steps", str(steps // 2)]
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


def model_info(folder):
    """The model folder's family and configs, as the training scripts read them."""
    from common import models

    return models.resolve_model(argparse.Namespace(
        pretrained_model_name_or_path=folder, output_dir=folder, cache_dir=None, variant=None, revision=None,
        local_files_only=True, single_file_config=None))


def load_variant(model, output=None, full=False, ema=False):
    """The family's pipeline of the base model, a LoRA / LyCORIS output on it, or a full fine-tune; `ema`: the
    run's averaged weights."""
    from common import adapters, models

    pipe = models.load_pipeline(model_info((os.path.join(output, "ema") if ema else output) if full else model))
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
                     guidance_scale=args.guidance_scale, **args.drawing,
                     generator=[torch.Generator().manual_seed(1000 * s + i) for i in range(len(prompts))]).images
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


SCORES = ("subject", "prompt", "drift", "world", "eval_loss", "seconds")
# The bar for learning the subject without forgetting (subject fidelity also at least the real pictures' own).
BAR = {"prompt": 0.90, "drift": 0.20, "world": 0.90}


def mean_rows(runs):
    """{variant: {score: mean, "spread": {score: standard deviation}}} over `runs` ([{variant: row}], one per
    subject and training seed); a score missing from a variant's rows is None."""
    import statistics

    rows = {}
    for name in runs[0]:
        row, spread = {}, {}
        for key in SCORES:
            values = [run[name][key] for run in runs if run[name].get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            spread[key] = statistics.pstdev(values) if len(values) > 1 else None
        rows[name] = {**row, "spread": spread}
    return rows


def meets_bar(row, ceiling):
    if any(row[key] is None for key in ("subject", *BAR)):
        return False
    return (row["subject"] >= ceiling and row["prompt"] >= BAR["prompt"] and row["drift"] <= BAR["drift"]
            and row["world"] >= BAR["world"])


def table(rows, ceiling=None):
    """A markdown table; with spreads (mean_rows), each score as mean ± standard deviation; with `ceiling`, a
    column marks the rows that meet the bar."""
    def cell(r, key, digits, width):
        if r.get(key) is None:
            return " " * width
        spread = (r.get("spread") or {}).get(key)
        text = f"{r[key]:.{digits}f}" + (f" ±{spread:.{digits}f}" if spread is not None else "")
        return f"{text:>{width}}"

    spreads = any(r.get("spread") for r in rows.values())
    widths = {"subject": 13 if spreads else 7, "prompt": 11 if spreads else 6, "drift": 13 if spreads else 5,
              "world": 11 if spreads else 5, "eval_loss": 15 if spreads else 9, "seconds": 7}
    digits = {"subject": 3, "prompt": 2, "drift": 3, "world": 2, "eval_loss": 4, "seconds": 0}
    titles = {"eval_loss": "eval loss", "seconds": "train s"}
    width = max(26, *(len(name) for name in rows))
    head = f"| {'variant':<{width}} | " + " | ".join(f"{titles.get(k, k):>{widths[k]}}" for k in SCORES) + " |"
    head += " bar |" if ceiling is not None else ""
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for name, r in rows.items():
        line = f"| {name:<{width}} | " + " | ".join(cell(r, k, digits[k], widths[k]) for k in SCORES) + " |"
        if ceiling is not None:
            line += " yes |" if meets_bar(r, ceiling) else "     |"
        lines.append(line)
    return "\n".join(lines)


def frontier_plot(path, rows, ceiling, as_asked=None, reseeded=None):
    """Subject fidelity against prior drift for every variant (means, with the spread as error bars): what learning
    the subject costs in forgetting. Marked: the bar's corner (dashed), the subject drawn as asked and the base
    model's own pictures at other seeds (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name, r in rows.items():
        spread = r.get("spread") or {}
        axis.errorbar(r["drift"], r["subject"], xerr=spread.get("drift"), yerr=spread.get("subject"), marker="o",
                      capsize=2, elinewidth=0.6, alpha=0.8)
        axis.annotate(name, (r["drift"], r["subject"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axis.set_xlim(left=0)
    axis.axhline(ceiling, color="tab:green", linestyle="--", linewidth=1)
    if as_asked is not None:
        axis.axhline(as_asked, color="tab:gray", linestyle=":", linewidth=1)
        axis.text(axis.get_xlim()[1], as_asked, f"{AS_ASKED} ", fontsize=8, ha="right", va="bottom", color="tab:gray")
    axis.axvline(BAR["drift"], color="tab:red", linestyle="--", linewidth=1)
    if reseeded is not None:
        axis.set_xlim(right=max(axis.get_xlim()[1], reseeded * 1.08))  # the line stays inside the axes
        axis.axvline(reseeded, color="tab:gray", linestyle=":", linewidth=1)
        axis.text(reseeded, axis.get_ylim()[0], f" {RESEEDED}", fontsize=8, rotation=90, va="bottom",
                  color="tab:gray")
    axis.text(BAR["drift"], ceiling, "the bar: above and to the left of here ", fontsize=8, ha="right", va="bottom")
    axis.set_xlabel("prior drift (1 - similarity to the base model's class and world pictures; lower is better)")
    axis.set_ylabel("subject fidelity (higher is better)")
    axis.set_title("Learning against forgetting (dashed: real pictures against each other, drift 0.20)", fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(path, args, per_subject, pictures, reals, ceilings, mean):
    from common import files, images, report

    folder = os.path.dirname(path)
    ceiling = sum(ceilings.values()) / len(ceilings)
    plot = os.path.join(folder, "images", "frontier.png")
    frontier_plot(plot, {k: v for k, v in mean.items() if k not in ("base model", AS_ASKED, RESEEDED)}, ceiling,
                  mean[AS_ASKED]["subject"], mean[RESEEDED]["drift"])
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
            name_slug = f"subject{subject}_" + slug(name)
            subject_sheet = os.path.join(folder, "images", f"{name_slug}_subject.png")
            per_prompt = len(drawn["subject"]) // len(asked)
            images.contact_sheet(drawn["subject"], [p for p, _ in asked for _ in range(per_prompt)], subject_sheet,
                                 thumb=96)
            prior_sheet = os.path.join(folder, "images", f"{name_slug}_prior.png")
            if drawn["prior"]:
                images.contact_sheet(drawn["prior"], PRIOR_PROMPTS, prior_sheet, thumb=96)
            r = rows[name]
            scores = ", ".join(f"{key} {r[key]:.3f}" for key in ("subject", "prompt", "drift", "world")
                               if r[key] is not None)
            sections.append(f"<h3>{html.escape(name)}</h3><p>{scores}</p>"
                            f'<img src="{report.embedded(subject_sheet)}"> '
                            + (f'<img src="{report.embedded(prior_sheet)}">' if drawn["prior"] else ""))
    recipes = "".join(f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(describe(RECIPES[name]))}</code></td>"
                      f"</tr>" for name in args.variants)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Toy DreamBench</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{image-rendering:pixelated;vertical-align:top}}
pre{{background:#f4f4f4;padding:1em}} td{{padding:0 1em 0 0}}</style></head><body>
<h1>Toy DreamBench ({args.family} toy model): {len(per_subject)} subjects</h1>
<p>{args.steps} steps, batch {args.batch_size}, training seeds {", ".join(map(str, args.train_seeds))} for every
variant and subject. Mean ± standard deviation over the {len(per_subject)} subjects and the training seeds (real
pictures against each other: {ceiling:.3f}; the bar: subject at least that, prompt at least {BAR["prompt"]}, drift at
most {BAR["drift"]}, world at least {BAR["world"]}):</p>
<pre>{html.escape(table(mean, ceiling))}</pre>
<img src="{report.embedded(plot)}" alt="subject fidelity against prior drift">
<h2>What each variant trains with</h2><table>{recipes}</table>
<p>Per subject, left: the subject prompts ({args.seeds} seeds each); right: class and world prompts at the base
model's seeds (prior drift compares them). Pictures of the first training seed.</p>
{"".join(sections)}
</body></html>
"""
    files.write_text_atomic(page, path)


def describe(recipe):
    """A recipe as the flags and data it adds to the shared settings."""
    data = [f"repeats {recipe.repeats}", f"{recipe.captions} captions"]
    data += ["24 class pictures"] if recipe.class_pictures else []
    data += ["masks"] if recipe.masks else []
    return " ".join(recipe.flags) + (" " if recipe.flags else "") + "(" + ", ".join(data) + ")"


def main(argv=None):
    import statistics

    import make_regularisation
    import toy_scorer

    args = parse_args(argv)
    work = os.path.abspath(args.out)
    os.makedirs(work, exist_ok=True)
    started = time.monotonic()
    scorer = toy_scorer.load_scorer()
    args.drawing = model_info(args.model).drawing_call_options()
    class_dir = os.path.join(work, "class")
    if any(RECIPES[v].class_pictures for v in args.variants):
        make_regularisation.main(["--pretrained_model_name_or_path", args.model, "--class_prompt", CLASS_PROMPT,
                                  "--num_images", "24", "--output_dir", class_dir,
                                  "--resolution", "64", "--num_inference_steps", str(args.num_inference_steps),
                                  "--guidance_scale", str(args.guidance_scale), "--batch_size", "8",
                                  "--device", "cpu", "--dtype", "fp32"])
    base = load_variant(args.model)
    base_prior = draw(base, PRIOR_PROMPTS, 1, args)
    # The drift's scale: the base model itself at other seeds (its pictures of the same prompts drawn afresh).
    reseeded = {"subject": None, "prompt": None, "world": None, "eval_loss": None, "seconds": None,
                "drift": 1 - toy_scorer.paired_similarity(scorer, draw(base, PRIOR_PROMPTS, 2, args)[1::2], base_prior)}
    runs, per_subject, images, reals, ceilings = [], {}, {}, {}, {}
    for subject in args.subjects:
        subject_work = os.path.join(work, f"subject{subject}")
        write_pictures(subject_work, subject, args.images)
        reals[subject] = [image for image, _, _ in make_toy_data.subject_samples(subject, args.images, 0)]
        held_out = [image for image, _, _ in make_toy_data.subject_samples(subject, 4, 1)]
        ceilings[subject] = toy_scorer.subject_fidelity(scorer, held_out, reals[subject])
        base_row, base_images = score(base, args, scorer, subject, reals[subject], base_prior, base_prior)
        base_row.update(eval_loss=None, seconds=None)
        perfect, perfect_asked = drawn_as_asked(subject)
        perfect_row = {"subject": toy_scorer.subject_fidelity(scorer, perfect, reals[subject]),
                       "prompt": toy_scorer.prompt_fidelity(scorer, perfect, perfect_asked),
                       "drift": None, "world": None, "eval_loss": None, "seconds": None}
        subject_runs = [{"base model": dict(base_row), RESEEDED: reseeded, AS_ASKED: perfect_row}
                        for _ in args.train_seeds]
        images[subject] = {"base model": base_images, AS_ASKED: {"subject": perfect, "prior": []}}
        for name in args.variants:
            for seed, run in zip(args.train_seeds, subject_runs):
                output, seconds, eval_loss, full = train_variant(args, subject_work, name, class_dir, seed)
                if run["base model"]["eval_loss"] is None:  # the step-0 line of any run is the base model's
                    first = json.loads(open(os.path.join(output, "logs", "train_log.jsonl")).readline())
                    run["base model"]["eval_loss"] = first.get("eval_loss")
                pipe = load_variant(args.model, output, full, ema="--use_ema" in RECIPES[name].flags)
                row, drawn = score(pipe, args, scorer, subject, reals[subject], base_prior)
                run[name] = {**row, "eval_loss": eval_loss, "seconds": seconds}
                images[subject].setdefault(name, drawn)
        runs += subject_runs
        per_subject[subject] = mean_rows(subject_runs)
        print(f"\nsubject {subject} ({' / '.join(make_toy_data.SUBJECTS[subject])}; real pictures against each "
              f"other: {ceilings[subject]:.3f}):\n{table(per_subject[subject])}", flush=True)
    mean = mean_rows(runs)
    ceiling = statistics.fmean(ceilings.values())
    text = (f"mean ± standard deviation over subjects {', '.join(map(str, args.subjects))} and training seeds "
            f"{', '.join(map(str, args.train_seeds))} (real pictures against each other: {ceiling:.3f}; "
            f"{(time.monotonic() - started) / 60:.1f} min in all)\n{table(mean, ceiling)}")
    with open(os.path.join(work, "table.md"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(work, "results.json"), "w") as handle:
        json.dump({"settings": vars(args), "mean": mean, "runs": runs,
                   "subjects": {str(k): v for k, v in per_subject.items()},
                   "real_vs_real": {str(k): v for k, v in ceilings.items()}}, handle, indent=2)
    write_report(os.path.join(work, "report.html"), args, per_subject, images, reals, ceilings, mean)
    print(f"\n{text}\n\nreport: {os.path.join(work, 'report.html')}")
    return mean


if __name__ == "__main__":
    main()
