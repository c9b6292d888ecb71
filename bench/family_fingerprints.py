"""A digest of everything a fixed-seed run writes, per family: run it before and after a change that must not change
behaviour (a refactor) and compare the two files.

    python bench/family_fingerprints.py --out before.json            # on the old code
    python bench/family_fingerprints.py --out after.json             # on the new code
    python bench/family_fingerprints.py --compare before.json after.json

Each family's tiny model (examples/make_demo.py) trains 4 steps with masks, a regularisation dataset (base-model
target), DOP, caption dropout, rollouts, LoRA dropout, EMA, the eval loss, validation images, a checkpoint and the
kohya layout where the family has one; then a few single-feature runs (full fine-tune, LyCORIS, text-encoder LoRA, SD
2 v-prediction, SD3 without T5), make_regularisation.py and evaluate.py. The digest covers every file written
(weights and metadata byte for byte, pictures, model cards, args.json) and the training log without its timings.
Paths are fixed (under --work), so the bytes can match. Prints one line per run; --compare names what differs.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux", "flux-schnell", "chroma", "flux2-klein", "if",
            "if-ii"]
SKIPPED = ("logs/dreambooth", "run/logs/dreambooth")  # TensorBoard's event files carry wall-clock times


def digest_folder(folder):
    """{relative path: sha256} of every file under `folder`; the training log without its timings."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative.startswith(SKIPPED) or "/cache/" in f"/{relative}":
                continue
            with open(path, "rb") as handle:
                content = handle.read()
            if name == "train_log.jsonl":
                records = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
                content = json.dumps([{k: v for k, v in r.items() if k != "step_time"} for r in records]).encode()
            if name.endswith(".safetensors"):  # safetensors writes its metadata keys in a random order
                content = safetensors_content(path)
            result[relative] = hashlib.sha256(content).hexdigest()[:16]
    return result


def safetensors_content(path):
    """The file's metadata (sorted) and every tensor's dtype, shape and bytes (by name), as one byte string."""
    from safetensors import safe_open

    parts = []
    with safe_open(path, framework="pt") as handle:
        parts.append(json.dumps(handle.metadata() or {}, sort_keys=True).encode())
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            parts += [key.encode(), str(tensor.dtype).encode(), str(tuple(tensor.shape)).encode(),
                      tensor.view(-1).view(torch_uint8()).numpy().tobytes()]
    return b"\0".join(parts)


def torch_uint8():
    import torch

    return torch.uint8


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    return path


def resolution_of(family):
    return 32 if family.startswith("if") else 64


def data_config(work, family, subject, masks, reg):
    resolution = resolution_of(family)
    return write_json(os.path.join(work, f"data-{family}.json"), [
        {"id": "subject", "instance_data_dir": subject, "instance_prompt": "a photo of ohwx toy",
         "resolution": resolution, "conditioning_data": "masks", "cache_dir_vae": os.path.join(work, f"vae-{family}")},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": masks},
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a photo of a toy", "resolution": resolution,
         "is_regularization_data": True, "cache_dir_vae": os.path.join(work, f"vae-reg-{family}")},
        {"id": "text", "dataset_type": "text_embeds", "default": True,
         "cache_dir": os.path.join(work, f"text-{family}")},
    ])


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def runs(work):
    """(name, function that writes into its folder) for every run."""
    import make_demo
    from PIL import Image, ImageDraw

    import evaluate
    import make_regularisation
    import train_dreambooth

    subject = make_demo.make_subject_images(os.path.join(work, "subject"))
    reg = make_demo.make_subject_images(os.path.join(work, "class"), sizes=((64, 64),) * 3)
    masks = os.path.join(work, "masks")
    os.makedirs(masks, exist_ok=True)
    for name in sorted(os.listdir(subject)):
        width, height = Image.open(os.path.join(subject, name)).size
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, width * 2 // 3, height), fill=255)
        mask.save(os.path.join(masks, name))
    models = {}

    def model(family, prediction_type="epsilon"):
        key = (family, prediction_type)
        if key not in models:
            folder = os.path.join(work, "models", f"{family}-{prediction_type}")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            kind = "flow" if family.startswith(("sd3", "flux")) else prediction_type
            models[key] = make_demo.build_tiny_model(folder, family, kind)
        return models[key]

    def simple(family, out, *extra, prediction_type="epsilon"):
        return ["--pretrained_model_name_or_path", model(family, prediction_type), "--instance_data_dir", subject,
                "--instance_prompt", "a photo of ohwx toy", "--output_dir", out, "--resolution",
                str(resolution_of(family)), "--seed", "7", "--train_batch_size", "2", "--max_train_steps", "3",
                "--learning_rate", "1e-3", "--lora_rank", "4", "--cache_dir", os.path.join(work, f"cache-{family}"),
                *map(str, extra)]

    def combined(family):
        def run(out):
            config = data_config(work, family, subject, masks, reg)
            argv = ["--pretrained_model_name_or_path", model(family), "--data_backend_config", config,
                    "--output_dir", out, "--seed", "11", "--train_batch_size", "2", "--max_train_steps", "4",
                    "--learning_rate", "2e-3", "--lora_rank", "4", "--lora_dropout", "0.1",
                    "--dop_class", "toy", "--dop_trigger", "ohwx toy", "--caption_dropout_probability", "0.25",
                    "--scheduled_sampling_max_step_offset", "2", "--scheduled_sampling_probability", "0.5",
                    "--use_ema", "--ema_decay", "0.7", "--eval_split", "1", "--eval_steps_interval", "2",
                    "--validation_prompt", "a photo of ohwx toy", "--validation_steps", "4",
                    "--num_validation_images", "1", "--validation_num_inference_steps",
                    "5" if family == "sdxl-refiner" else "2",  # the refiner runs strength 0.2 of them
                    "--checkpointing_steps", "2"]
            if not family.startswith(("if", "chroma", "flux2")):  # no kohya layout written
                argv += ["--lora_format", "comfyui"]
            quiet(train_dreambooth.main, argv)
        return run

    for family in FAMILIES:
        yield f"combined-{family}", combined(family)
    yield "full-sd1", lambda out: quiet(train_dreambooth.main, simple("sd1", out, "--model_type", "full",
                                                                       "--learning_rate", "1e-4", "--use_ema"))
    yield "lycoris-flux", lambda out: quiet(train_dreambooth.main, simple("flux", out, "--lora_type", "lycoris",
                                                                           "--lycoris_config", write_json(
                                                                               os.path.join(work, "lokr.json"),
                                                                               {"algo": "lokr", "linear_dim": 4,
                                                                                "linear_alpha": 1, "factor": 4})))
    yield "lycoris-sd1", lambda out: quiet(train_dreambooth.main, simple("sd1", out, "--lora_type", "lycoris",
                                                                          "--lycoris_config", write_json(
                                                                              os.path.join(work, "locon.json"),
                                                                              {"algo": "locon", "linear_dim": 4,
                                                                               "linear_alpha": 2})))
    for family in ("sdxl", "flux", "sd3"):
        yield f"text-encoder-{family}", (lambda f: lambda out: quiet(
            train_dreambooth.main, simple(f, out, "--train_text_encoder", "--lora_format", "comfyui")))(family)
    yield "dora-sd1", lambda out: quiet(train_dreambooth.main, simple("sd1", out, "--use_dora",
                                                                       "--lora_target", "all"))
    yield "v-sd2", lambda out: quiet(train_dreambooth.main, simple("sd2", out, "--snr_gamma", "5",
                                                                    prediction_type="v_prediction"))
    yield "no-t5-sd3", lambda out: quiet(train_dreambooth.main, simple("sd3-no-t5", out))
    for family in ("sd1", "sd3", "flux", "if"):
        yield f"regularisation-{family}", (lambda f: lambda out: quiet(make_regularisation.main, [
            "--pretrained_model_name_or_path", model(f), "--class_prompt", "a photo of a toy", "--num_images", "2",
            "--output_dir", os.path.join(out, "reg"), "--num_inference_steps", "2", "--resolution",
            str(resolution_of(f)), "--device", "cpu", "--dtype", "fp32"]))(family)
    for family in ("sd1", "flux", "if-ii"):
        def evaluation(out, f=family):
            trained = os.path.join(work, "runs", f"combined-{f}")
            shutil.copytree(trained, os.path.join(out, "run"))
            config = data_config(work, f, subject, masks, reg)
            quiet(evaluate.main, ["--pretrained_model_name_or_path", model(f), "--data_backend_config", config,
                                  "--checkpoints", os.path.join(out, "run"), "--instance_prompt", "ohwx toy",
                                  "--validation_prompt", "a photo of {instance}", "--num_images_per_prompt", "1",
                                  "--num_inference_steps", "2", "--clip_model", "none", "--eval_split", "1",
                                  "--seed", "11"])
            shutil.rmtree(os.path.join(out, "run", "evaluation", "images"), ignore_errors=True)
        yield f"evaluate-{family}", evaluation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/family_fingerprints", help="where models and runs go (fixed paths)")
    parser.add_argument("--out", default=None, help="the digests as JSON")
    parser.add_argument("--only", nargs="+", default=None, help="run names (prefixes) to run")
    parser.add_argument("--compare", nargs=2, default=None, help="two digest files: print what differs")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(path, encoding="utf-8")) for path in args.compare)
        same = True
        for name in sorted(set(before) | set(after)):
            a, b = before.get(name, {}), after.get(name, {})
            differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            print(f"{name:<28} {'identical' if not differ else 'DIFFERS: ' + ', '.join(differ)}")
            same &= not differ
        print("every run identical" if same else "some runs differ")
        return 0 if same else 1
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(os.path.join(args.work, "runs"))
    results = {}
    for name, run in runs(args.work):
        if args.only and not name.startswith(tuple(args.only)):
            continue
        out = os.path.join(args.work, "runs", name)
        run(out)
        results[name] = digest_folder(out)
        combined = hashlib.sha256(json.dumps(results[name], sort_keys=True).encode()).hexdigest()[:16]
        print(f"{name:<28} {len(results[name]):>3} files  {combined}", flush=True)
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
