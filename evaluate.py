"""Score a DreamBooth run: images, CLIP-T / CLIP-I / DINO and the stable eval loss for every checkpoint.

    python evaluate.py --pretrained_model_name_or_path MODEL --checkpoints output/ --instance_data_dir subject/ \\
        --instance_prompt "ohwx dog" --class_prompt "dog" --prompt_set dreambench --subject_kind live

Evaluates the base model (as step 0), every complete checkpoint-N in --checkpoints (or only those named with
--only) and the final output there, with --weights raw or ema. For each, with the same seeds throughout:
  - images: every prompt (--validation_prompt, --prompts_file or --prompt_set dreambench; "{instance}" becomes
    --validation_instance and "{class}" --validation_class, as in training, or --instance_prompt / --class_prompt
    given here) at --num_images_per_prompt seeds, drawn as training's validation draws them (common/render.py);
  - scores, as in the DreamBooth paper (raw cosines): CLIP-T (each image against its prompt, with the class in
    place of the instance: CLIP does not know the identifier), CLIP-I and DINO (mean pairwise cosine between the
    generated images and the real subject images);
  - with --toy_scorer (toy models): subject fidelity as DINO's, in the toy scorer's feature space;
  - the stable eval loss (scores.StableEvalLoss, the measure training logs with --eval_steps_interval) on the
    data config's eval datasets and/or --eval_split held-out images: pass the training run's data, --seed and
    --eval_split, and the numbers equal the training log's.
Also reads the training config.json (--config; its output_dir is then the run to evaluate), validation settings
included (--num_validation_images, --validation_seed, --validation_num_inference_steps, --validation_guidance_scale,
--validation_resolution, --validation_negative_prompt; the command line wins): `python evaluate.py --config
config.json` draws again, pixel for pixel, the validation images training drew at each checkpoint's step.
Writes to --evaluation_dir (default CHECKPOINTS/evaluation):
    metrics.json, metrics.csv          one entry per evaluated model
    images/NAME/pPP-seedS.png, grids/NAME.png (a row per prompt, a column per seed)
    plots/scores.png, plots/eval_loss_by_timestep.png
    report.html                        everything on one page (common/report.py): scores with the best marked,
                                       plots, the real photos, base vs final per prompt, every checkpoint; small
                                       embedded thumbnails linking to the images: open it in any browser
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import os
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common import (adapters, caches, checkpoints, data, files, flags, images, models, objectives, quantise, render,
                    report, scores)

METRICS, LABELS = report.METRICS, report.LABELS  # the scores: metrics.csv's columns, the report's
GRID_THUMB = 256  # the widest a picture is drawn in a grid (the pictures themselves are saved whole)
GRID_SMALLEST = 128  # a smaller picture (a toy model's 32-64 px) is enlarged in its grid, nearest-neighbour
DINO_MODEL = "facebook/dino-vits16"  # DINO's model when CLIP scores and --dino_model is not named


# ---------------------------------------------------------------------------------------------------------------------
# What to evaluate


def find_targets(folder, only, weights, output_name=None):
    """[(name, step, kind, path)]: the base model, the checkpoints and the final output, in step order.
    kind: "base", "adapter" (a LoRA / LyCORIS file) or "full" (a full fine-tune: a saved pipeline folder, or a
    checkpoint's state file of the UNet / transformer)."""
    suffix = adapters.EMA_SUFFIX if weights == "ema" else ""
    adapter_name = adapters.weight_names(output_name or adapters.output_name_of(folder), suffix)[0]
    targets = [("base", 0, "base", None)]
    for path in checkpoints.list_checkpoints(folder):
        name = os.path.basename(path)
        state = files.read_json(os.path.join(path, checkpoints.STATE_FILE))
        if state.get("model_type") == "full":  # the whole denoiser's weights
            weights_file = os.path.join(path, checkpoints.EMA_CHECKPOINT_FILE if weights == "ema"
                                        else "trainable.safetensors")
            if os.path.isfile(weights_file):
                targets.append((name, state["step"], "full", weights_file))
        elif os.path.isfile(os.path.join(path, adapter_name)):
            targets.append((name, state["step"], "adapter", os.path.join(path, adapter_name)))
        else:
            print(f"skipped {path}: no {adapter_name} in it (written by an older version, or without --use_ema)")
    final = os.path.join(folder, adapter_name)
    if os.path.isfile(final):
        with safe_open(final, framework="pt") as handle:
            step = int((handle.metadata() or {}).get("step", 0)) or None
        targets.append(("final", step, "adapter", final))
    else:
        pipeline = os.path.join(folder, adapters.EMA_SUFFIX[1:]) if weights == "ema" else folder
        if os.path.isfile(os.path.join(pipeline, "model_index.json")):
            log = os.path.join(folder, "logs", checkpoints.LOG_FILE)
            steps = [record["step"] for record in checkpoints.read_log(log)]
            step = max(steps) if steps else None
            targets.append(("final", step, "full", pipeline))
    if only:
        missing = sorted(set(only) - {t[0] for t in targets})
        if missing:
            raise SystemExit(f"--only {' '.join(missing)}: not found in {folder} (there: "
                             f"{', '.join(t[0] for t in targets)})")
        targets = [t for t in targets if t[0] in only or t[0] == "base"]
    if len(targets) == 1:
        raise SystemExit(f"{folder}: no checkpoint-N folder and no trained output ({adapter_name} or "
                         "model_index.json) to evaluate; point --checkpoints at a training --output_dir")
    last = max([t[1] or 0 for t in targets])
    return sorted(targets, key=lambda t: t[1] if t[1] is not None else last + 1)


@contextlib.contextmanager
def weights_of(pipe, target, info):
    """The pipeline with one evaluated model's weights; the base model's again afterwards."""
    _, _, kind, path = target
    name = info.denoiser  # "unet" or "transformer"
    base = getattr(pipe, name)
    device = base.device
    if kind == "adapter":
        adapters.load_adapter(pipe, path)
    elif kind == "full":  # a full fine-tune, in fp32 as it trained; the base model waits in system memory
        base.to("cpu")
        if os.path.isdir(path):  # a saved pipeline: its unet/ or transformer/ folder
            import diffusers

            model_class = getattr(diffusers, base.__class__.__name__)
            folder = os.path.join(path, name)
            model = model_class.from_pretrained(folder, **files.safe_weights(folder, info.allow_pickle))
        else:  # a checkpoint's state file
            model = models.load_component(info, name)
            weights = files.load_tensors(path)  # every parameter; buffers (SD3's position table) stay the base's
            missing = sorted(set(dict(model.named_parameters())) - set(weights))
            if missing:
                raise SystemExit(f"{path} lacks {len(missing)} of the model's parameters (e.g. {missing[0]}): "
                                 "it is not a full fine-tune of this model")
            model.load_state_dict(weights, strict=False)
        setattr(pipe, name, model.to(device).eval())
    try:
        yield pipe
    finally:
        if kind == "adapter":
            adapters.unload_adapter(pipe)
        if kind == "full":
            delattr(pipe, name)
            base.to(device)
        setattr(pipe, name, base)


def read_prompts(args):
    """[(prompt to generate, prompt CLIP-T scores against)]."""
    if args.prompt_set == "dreambench":
        templates = scores.dreambench_prompts(args.subject_kind)
    elif args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            templates = [line.strip() for line in handle if line.strip()]
        if not templates:
            raise SystemExit(f"{args.prompts_file}: no prompts (one per line; {{instance}} and {{class}} are filled)")
    elif args.validation_prompt:
        templates = args.validation_prompt
    else:
        templates = ["a photo of {instance}"]
    if any("{class}" in t for t in templates) and not args.validation_class:
        raise SystemExit("the prompts use {class}: pass --class_prompt (e.g. \"dog\"), or --validation_class as "
                         "training names it")
    return [fill(t, args) for t in templates]


def fill(template, args):
    """(prompt to generate, prompt CLIP-T scores against), {instance} and {class} filled as training's validation
    fills them (train_dreambooth.Validator): the class falls back on the instance."""
    return scores.fill_prompt(template, args.validation_instance, args.validation_class or args.validation_instance)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def write_metrics(folder, settings, prompts, results):
    """metrics.json (everything) and metrics.csv (one row per model)."""
    relative = [{**r, "grid_path": os.path.relpath(r["grid_path"], folder)} for r in results]
    files.write_json_atomic({"settings": settings, "prompts": [p for p, _ in prompts], "results": relative},
                            os.path.join(folder, "metrics.json"))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["name", "step", *METRICS])
    for r in results:
        writer.writerow([r["name"], "" if r["step"] is None else r["step"],
                         *["" if r.get(m) is None else f"{r[m]:.6f}" for m in METRICS]])
    files.write_text_atomic(table.getvalue(), os.path.join(folder, "metrics.csv"))


# ---------------------------------------------------------------------------------------------------------------------
# The run


def image_scorer(args, real_paths, device):
    """score(pictures, their scoring prompts) -> {"clip_t", "clip_i", "dino", "toy_subject"}, as asked: against the
    real subject images, whose embeddings are computed once here. The models load before anything is cached, so
    a refused one (pickle weights) stops the run with nothing written."""
    scorer = toy = real = real_clip = real_dino = None
    clip, dino = (None if name == "none" else name for name in (args.clip_model, args.dino_model))
    if clip or dino:
        scorer = scores.Scorer(clip, dino, device, args.allow_pickle)
        real = [images.load_image(path) for path in real_paths]
        real_clip = scorer.clip_images(real) if scorer.clip is not None else None
        real_dino = scorer.dino_images(real) if scorer.dino is not None else None
    if args.toy_scorer:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy"))
        import toy_scorer

        toy = toy_scorer.load_scorer(args.toy_scorer)
        real = real or [images.load_image(path) for path in real_paths]

    def score(pictures, score_prompts):
        result = scorer.scores(pictures, score_prompts, real_clip, real_dino) if scorer is not None else {}
        if toy is not None:
            result["toy_subject"] = toy_scorer.subject_fidelity(toy, pictures, real)
        return result

    return score


def eval_loss_examples(args, info, datasets, eval_entries, device):
    """The stable eval loss's inputs, cached exactly as training caches them (so the numbers equal its log)."""
    if not eval_entries:
        print("no eval loss: the data has no eval dataset and --eval_split is 0")
        return []
    eval_entries, _ = caches.build_vae_cache(eval_entries, info, device, args.vae_batch_size)
    text_dir = data.text_cache_dir(datasets, args)
    caches.build_text_cache([e.captions[0] for e in eval_entries], info, text_dir, device)
    return scores.eval_examples(eval_entries, info, text_dir, args.eval_seed)


@dataclass
class Evaluation:
    """What every evaluated model is measured with: the pipeline (its denoiser's weights swapped per model), the
    prompts ((drawn, scored) pairs) or a refiner's sources, how pictures are drawn (`plan`: a render.Round), the
    image scores (`score`: image_scorer's), the stable eval loss (None without eval images), and the output folder."""

    args: argparse.Namespace
    info: object
    pipe: object
    prompts: list
    sources: list
    plan: render.Round
    score: object
    eval_loss: scores.StableEvalLoss
    out: str


def evaluate_model(job, target):
    """One model's pictures (saved, and a grid), scores and eval loss: a metrics.json entry."""
    args, info, pipe, sources, out = job.args, job.info, job.pipe, job.sources, job.out
    name, step = target[0], target[1]
    result = {"name": name, "step": step, "source": target[3]}
    drawn = [generate for generate, _ in job.prompts]
    with weights_of(pipe, target, info):
        rows = render.render(pipe, drawn, dataclasses.replace(job.plan, desc=f"images ({name})"), sources,
                             lambda p, seed: report.image_path(out, name, p, seed))
        # The grid: a row per prompt, a column per seed, each labelled; small pictures enlarged, big ones shrunk.
        shown = [[images.enlarged(image, GRID_SMALLEST) for image in row] for row in rows]
        shown_sources = [(c, images.enlarged(image, GRID_SMALLEST)) for c, image in sources] if sources else None
        width, height = shown[0][0].size
        scale = min(1.0, GRID_THUMB / width)
        cell = (max(1, round(width * scale)), max(1, round(height * scale)))
        labels = [info.source_label] if sources else []
        labels += [f"seed {args.validation_seed + i}" for i in range(len(rows[0]))]
        result["grid_path"] = os.path.join(out, "grids", f"{name}.png")
        grid = render.prompt_grid(shown, drawn, shown_sources, column_labels=labels, cell=cell)
        files.save_image_atomic(grid, result["grid_path"])
        result.update(job.score([image for row in rows for image in row],
                                [job.prompts[p][1] for p, row in enumerate(rows) for _ in row]))
        if job.eval_loss is not None:  # an adapter with text-encoder layers (--train_text_encoder): captions read by
            encoders = [getattr(pipe, name) for _, name in info.text_parts]  # them, now
            trained = any(hasattr(module, "lora_A") for encoder in encoders for module in encoder.modules())
            tokenizers = [getattr(pipe, name) for name, _ in info.text_parts]
            embed = adapters.TextReader(info, None, (tokenizers, encoders), job.plan.autocast) if trained else None
            loss = job.eval_loss(models.denoiser_of(pipe), embed)
            result["eval_loss"], result["eval_loss_per_timestep"] = loss["mean"], loss["per_timestep"]
    return result


def check_args(args):
    args.checkpoints = args.checkpoints or args.output_dir
    if not args.checkpoints:
        raise SystemExit("--checkpoints: which training --output_dir to evaluate (or --config with its config.json)")
    if not os.path.isdir(args.checkpoints):
        raise SystemExit(f"--checkpoints {args.checkpoints}: no such folder (a training --output_dir)")
    if args.num_images_per_prompt < 1:
        raise SystemExit("--num_images_per_prompt must be 1 or more")
    if not args.validation_instance:
        raise SystemExit("--instance_prompt (e.g. \"ohwx dog\") is needed: it fills {instance} in the prompts (and "
                         "captions --instance_data_dir images; a data config's own captions are kept); or "
                         "--validation_instance, as a training config names it")
    if args.dino_model is None:  # DINO comes with CLIP unless named: --clip_model none alone still skips the scores
        args.dino_model = "none" if args.clip_model == "none" else DINO_MODEL
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    quantise.check_text_encoder_precisions(args)
    if args.base_model_precision != "no_change":
        print(f"note: the run trained on a {args.base_model_precision} base; evaluate.py loads it unquantised, so "
              "its eval loss differs slightly from the training log")
    args.output_dir = args.output_dir or args.checkpoints  # as in training: the cache root is OUTPUT_DIR/cache


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    out = args.evaluation_dir or os.path.join(args.checkpoints, "evaluation")
    targets = find_targets(args.checkpoints, args.only, args.weights, args.output_name)
    prompts = read_prompts(args)

    # --- Data: the subject's images (CLIP-I / DINO references) and the eval-loss images, planned as training did.
    datasets, info, plans = data.prepare(args)
    subject = data.subject_dataset(datasets)
    real_paths = [e.path for e in plans[subject.id]]
    eval_entries = data.eval_sets(datasets, plans, args.eval_split)
    # A refiner (IF stage II) cannot draw from a prompt: it refines (enlarges) subject images, their captions as
    # prompts, as in training.
    sources = None
    if info.draws_from_pictures:
        sources = render.refine_sources(info, plans[subject.id], args.num_images_per_prompt, args.validation_seed)
        prompts = [fill(caption, args) for caption, _ in sources]
        print(f"warning: the prompts are ignored: {info.sources_note(len(sources))}")
    # What the pipeline cannot draw (sizes, too few img2img steps, a negative prompt it takes none of) is refused
    # before any model work.
    size, *more = render.picture_sizes(info, args.image_resolution, "--image_resolution")
    if more and not sources:
        print(f"note: evaluate.py draws one size, the first of --image_resolution ({render.size_label(size)}); give "
              "--image_resolution to choose another")
    if args.guidance_scale is None:
        args.guidance_scale = info.guidance_scale
    options = render.drawing_options(info, args.num_inference_steps, args.guidance_scale, args.negative_prompt,
                                     size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    score = image_scorer(args, real_paths, device)
    examples = eval_loss_examples(args, info, datasets, eval_entries, device)
    objective = objectives.for_model(info, args)

    # The pipeline as training's validation builds it: UNet and text encoders in the compute dtype, the VAE in fp32.
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    tokenizers, text_encoders = models.load_text_encoders(info, device, dtype)
    pipe = models.build_pipeline(info, models.load_component(info, info.denoiser, dtype).to(device),
                                 models.load_vae(info, device), tokenizers, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    os.makedirs(out, exist_ok=True)
    settings = {"model": str(info.ref), "checkpoints": args.checkpoints, "weights": args.weights,
                "instance": args.validation_instance, "class": args.validation_class,
                "prompt_set": args.prompt_set, "subject_kind": args.subject_kind,
                "num_images_per_prompt": args.num_images_per_prompt, "validation_seed": args.validation_seed,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "negative_prompt": args.negative_prompt, "resolution": render.size_label(size),
                "mixed_precision": args.mixed_precision, "clip_model": args.clip_model,
                "dino_model": args.dino_model, "toy_scorer": args.toy_scorer, "eval_images": len(examples),
                "eval_timesteps": args.eval_timesteps, "eval_seed": args.eval_seed, "real_images": len(real_paths)}
    print(f"evaluating {len(targets)} models x {len(prompts)} prompts x {1 if sources else args.num_images_per_prompt} "
          "images")
    eval_loss = scores.StableEvalLoss(info, objective, examples, args.eval_timesteps, args.eval_seed, autocast) \
        if examples else None
    job = Evaluation(args, info, pipe, prompts, sources,
                     render.Round(args.num_images_per_prompt, args.validation_seed, options, autocast), score,
                     eval_loss, out)
    results = []
    for target in tqdm(targets, desc="models", unit="model"):
        results.append(evaluate_model(job, target))
        write_metrics(out, settings, prompts, results)  # after every model: a crash later keeps what is done

    # --- The plots and the page.
    page = report.write_report(out, settings, results, prompts, real_paths)
    widths = {m: max(11, len(LABELS[m]) + 2) for m in METRICS}
    print(f"\n{'name':<16}{'step':>7}" + "".join(f"{LABELS[m]:>{widths[m]}}" for m in METRICS))
    for r in results:
        print(f"{r['name']:<16}{'' if r['step'] is None else r['step']:>7}"
              + "".join(f"{'-' if r.get(m) is None else format(r[m], '.4f'):>{widths[m]}}" for m in METRICS))
    print(f"\nreport: {page}")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    flags.add_model_args(parser)
    flags.add_data_args(parser)
    parser.set_defaults(output_dir=None)
    flags.add_eval_args(parser)
    flags.add_conditioning_args(parser)
    group = parser.add_argument_group("what to evaluate")
    group.add_argument("--checkpoints", default=None, help="a training --output_dir: its checkpoint-N folders and "
                                                          "final output (default: --output_dir, e.g. from --config)")
    group.add_argument("--evaluation_dir", default=None, help="where results go (default CHECKPOINTS/evaluation)")
    group.add_argument("--only", nargs="+", default=None, help="names to evaluate, e.g. checkpoint-400 final")
    group.add_argument("--weights", default="raw", choices=["raw", "ema"], help="ema: the --use_ema averages")
    # Named as in evaluate.py and as in training (--num_validation_images ...): a training config's validation
    # settings apply here, so its validation images are drawn again; the command line wins.
    group = parser.add_argument_group("images (a training config's validation settings apply)")
    group.add_argument("--validation_prompt", nargs="+", default=None, help="prompts; {instance} and {class} filled")
    group.add_argument("--validation_instance", default=None,
                       help="fills {instance}, as in training (default: --instance_prompt; an --instance_prompt on "
                            "the command line wins over a config's --validation_instance)")
    group.add_argument("--validation_class", default=None,
                       help="the class noun, e.g. \"dog\": fills {class} and stands in for the instance in CLIP-T's "
                            "text; --class_prompt on the command line does the same, and wins over a config's")
    group.add_argument("--prompts_file", default=None, help="one prompt per line")
    group.add_argument("--prompt_set", default="custom", choices=["custom", "dreambench"],
                       help="dreambench: the 25 DreamBench prompt templates for --subject_kind")
    group.add_argument("--subject_kind", default="object", choices=["object", "live"],
                       help="which DreamBench prompt list: objects or live subjects (animals)")
    group.add_argument("--num_images_per_prompt", "--num_validation_images", type=int, default=4,
                       help="seeds per prompt")
    group.add_argument("--validation_seed", type=int, default=0, help="image i of every prompt uses seed + i")
    group.add_argument("--num_inference_steps", "--validation_num_inference_steps", type=int, default=25,
                       help="sampler steps per image")
    group.add_argument("--guidance_scale", "--validation_guidance_scale", type=float, default=None,
                       help="default: the family's (7.5 SD/SDXL, 7.0 SD3, 3.5 FLUX.1-dev)")
    group.add_argument("--negative_prompt", "--validation_negative_prompt", default=None,
                       help="negative prompt for every image")
    group.add_argument("--image_resolution", "--validation_resolution", type=flags.picture_sizes, default=None,
                       help="the pictures' size: a square's side or WIDTHxHEIGHT (of a training config's several, the "
                            "first). Default: the model's native size")
    group = parser.add_argument_group("precision (as the run trained, so the eval loss equals its log)")
    group.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                       help="the training run's: adapters are evaluated on a base in this dtype, under autocast")
    group.add_argument("--base_model_precision", default="no_change",
                       help="read from a training config; the base is evaluated unquantised (noted when set)")
    group = parser.add_argument_group("scores")
    group.add_argument("--clip_model", default="openai/clip-vit-base-patch32",
                       help="'none' skips CLIP-T and CLIP-I (and DINO, unless --dino_model names one)")
    group.add_argument("--dino_model", default=None,
                       help=f"'none' skips DINO; DINO scores without CLIP too (default: {DINO_MODEL} when CLIP scores)")
    group.add_argument("--toy_scorer", default=None, help="for toy models (toy/): subject fidelity read by the toy "
                                                          "world's scorer, e.g. toy/scorer.safetensors")
    return parser


def placeholder_words(args, typed):
    """What {instance} and {class} become: training's --validation_instance / --validation_class (from its config),
    unless evaluate.py's own --instance_prompt / --class_prompt are on the command line (`typed`: the command line
    alone). {instance} falls back on the instance caption. A config's class_prompt is not the class: training
    captions its class images with it ("a photo of a dog")."""
    instance = typed.validation_instance or typed.instance_prompt or args.validation_instance or args.instance_prompt
    return instance, typed.validation_class or typed.class_prompt or args.validation_class


def parse_args(argv=None):
    # The training config.json works here too: its training keys are known, not typos.
    args = flags.parse_args_with_config(build_parser(), argv, also_known=flags.TRAINING_KEYS)
    typed = build_parser().parse_args(argv)  # without the config: what this command line itself says
    args.validation_instance, args.validation_class = placeholder_words(args, typed)
    return args


if __name__ == "__main__":
    main()
