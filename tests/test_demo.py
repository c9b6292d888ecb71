"""The demo's own steps (as `make demo` runs them, shortened) keep working on both toy models: masks from cut-outs,
class pictures, caches, training with masks and prior loss, evaluation with the toy scorer."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import cache_latents
import evaluate
import make_demo
import make_masks
import make_regularisation
from common import adapters, images
import train_dreambooth


sys.path.insert(0, os.path.join(make_demo.ROOT, "toy"))
from make_toy_model import SHIPPED as TOY_MODELS  # noqa: E402


@pytest.mark.parametrize("family", sorted(TOY_MODELS))  # make demo, and make demo FAMILY=sd3
def test_demo_steps_run_and_train_with_masks_and_class_pictures(tmp_path, family):
    root = tmp_path / "demo"
    make_demo.main([str(root), TOY_MODELS[family]])
    make_masks.main(["--input_dir", str(root / "cutouts"), "--output_dir", str(root / "subject_masks"),
                     "--method", "alpha", "--preview", str(root / "masks_preview.png")])
    # A mask is white on the subject (where the cut-out is opaque) and black on the background.
    alpha = np.asarray(Image.open(root / "cutouts" / "ohwx_00.png").getchannel("A"))
    mask = np.asarray(Image.open(root / "subject_masks" / "ohwx_00.png"))
    assert mask.shape == alpha.shape == (64, 64)
    assert (mask[alpha == 255] >= 240).all() and (mask[alpha == 0] <= 15).all()
    make_regularisation.main(["--pretrained_model_name_or_path", TOY_MODELS[family], "--class_prompt", "a shape",
                              "--num_images", "4", "--output_dir", str(root / "class"), "--resolution", "64",
                              "--num_inference_steps", "4", "--device", "cpu", "--dtype", "fp32"])
    plans = cache_latents.main(["--config", str(root / "config.json")])
    assert all(e.mask_path for e in plans["subject"]) and len(plans["class"]) == 4
    # (--data_sampling uniform: half the batches are class batches, so a few steps surely include some)
    result = train_dreambooth.main(["--config", str(root / "config.json"), "--max_train_steps", "3",
                                    "--data_sampling", "uniform", "--lora_target", "attention",
                                    "--validation_steps", "3", "--validation_num_inference_steps", "2"])
    assert os.path.isfile(root / "output" / adapters.LORA_WEIGHTS_NAME)
    assert Image.open(root / "output" / "validation" / "step-3" / "grid.png").size == (images.ROW_LABEL_WIDTH + 2 * 64, 3 * 64)
    assert result["steps"] == 3
    logged = [json.loads(line) for line in open(root / "output" / "logs" / "train_log.jsonl")]
    assert any("loss/prior" in line for line in logged)  # the class pictures were trained on
    # evaluate.py reads the same config: the final eval loss is the one training logged at its last step.
    results = evaluate.main(["--config", str(root / "config.json"), "--instance_prompt", "ohwx shape",
                             "--class_prompt", "shape", "--validation_prompt", "a {instance}",
                             "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--clip_model", "none",
                             "--toy_scorer", os.path.join(make_demo.ROOT, "toy", "scorer.safetensors")])
    assert results[-1]["name"] == "final" and results[-1]["eval_loss"] == logged[-1]["eval_loss"]
    assert all(-1 <= r["toy_subject"] <= 1 for r in results)
    assert os.path.isfile(root / "output" / "evaluation" / "report.html")
