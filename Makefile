# Two commands do all the set-up on a fresh machine (each creates .venv and installs on first use):
#   make demo   build a tiny random model and a synthetic subject under demo/, mask it, cache it, train a LoRA,
#               evaluate every checkpoint into a report
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Nothing is downloaded at run time by the demo or the tests.
export HF_HUB_OFFLINE := 1

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/make_demo.py demo
	$(PY) make_masks.py --input_dir demo/cutouts --output_dir demo/subject_masks --method alpha \
		--mask_padding 4 --mask_blur 2 --preview demo/masks_preview.png
	$(PY) cache_latents.py --config demo/config.json
	$(PY) train_dreambooth.py --config demo/config.json
	$(PY) evaluate.py --config demo/config.json --instance_prompt "ohwx toy" --class_prompt toy \
		--validation_prompt "a photo of {instance}" "a photo of {instance} on the beach" \
		--num_images_per_prompt 2 --num_inference_steps 10 --image_resolution 192 --clip_model none
	@echo "LoRA: demo/output/pytorch_lora_weights.safetensors   images: demo/output/validation/   masks: demo/masks_preview.png"
	@echo "report: demo/output/evaluation/report.html (scores need CLIP/DINO models: drop --clip_model none where the hub is reachable)"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/bench_train.py

.PHONY: demo test bench
