"""The demo's own steps (as `make demo` runs them, shortened) keep working: masks from cut-outs, caches, training,
evaluation."""

import json
import os

import numpy as np
from PIL import Image

import cache_latents
import evaluate
import make_demo
import make_masks
import train_dreambooth


def test_demo_steps_run_and_train_with_masks(tmp_path):
    root = tmp_path / "demo"
    make_demo.main([str(root)])
    make_masks.main(["--input_dir", str(root / "cutouts"), "--output_dir", str(root / "subject_masks"),
                     "--method", "alpha", "--mask_padding", "4", "--mask_blur", "2",
                     "--preview", str(root / "masks_preview.png")])
    # A mask is white on the subject (where the cut-out is opaque) and black far from it.
    alpha = np.asarray(Image.open(root / "cutouts" / "subject_00.png").getchannel("A"))
    mask = np.asarray(Image.open(root / "subject_masks" / "subject_00.png"))
    assert (mask[alpha == 255] >= 240).all() and mask[0, 0] == 0 and mask.shape == alpha.shape  # padded, feathered
    plans = cache_latents.main(["--config", str(root / "config.json")])
    assert all(e.mask_path for e in plans["subject"])
    result = train_dreambooth.main(["--config", str(root / "config.json"), "--max_train_steps", "3",
                                    "--validation_steps", "3", "--validation_num_inference_steps", "2"])
    assert os.path.isfile(root / "output" / train_dreambooth.LORA_WEIGHTS_NAME)
    assert Image.open(root / "output" / "validation" / "step-3" / "grid.png").size == (2 * 192, 2 * 192)
    assert result["steps"] == 3
    # evaluate.py reads the same config: the final eval loss is the one training logged at its last step.
    results = evaluate.main(["--config", str(root / "config.json"), "--instance_prompt", "ohwx toy", "--class_prompt",
                             "toy", "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--clip_model", "none"])
    logged = [json.loads(line) for line in open(root / "output" / "logs" / "train_log.jsonl")]
    assert results[-1]["name"] == "final" and results[-1]["eval_loss"] == logged[-1]["eval_loss"]
    assert os.path.isfile(root / "output" / "evaluation" / "report.html")
