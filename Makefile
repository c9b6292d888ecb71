# Two commands do all the set-up on a fresh machine (each creates .venv and installs on first use):
#   make demo   a toy subject under demo/ on the shipped toy model (toy/model): mask it, make class pictures,
#               cache, train a LoRA, evaluate every checkpoint into a report (before/after images)
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
		--preview demo/masks_preview.png
	$(PY) make_regularisation.py --pretrained_model_name_or_path toy/model --class_prompt "a shape" --num_images 16 \
		--output_dir demo/class --resolution 64 --num_inference_steps 20 --guidance_scale 5
	$(PY) cache_latents.py --config demo/config.json
	$(PY) train_dreambooth.py --config demo/config.json
	$(PY) evaluate.py --config demo/config.json --validation_instance "ohwx shape" --validation_class shape \
		--validation_prompt "a {instance}" "a {instance} on a green background" "a large {instance} at the left" \
		--num_images_per_prompt 3 --num_inference_steps 20 --guidance_scale 5 --clip_model none \
		--toy_scorer toy/scorer.safetensors
	@echo "before: demo/output/evaluation/grids/base.png   after: demo/output/evaluation/grids/final.png"
	@echo "the subject's pictures: demo/subject/   masks: demo/masks_preview.png   class pictures: demo/class_preview.png"
	@echo "report: demo/output/evaluation/report.html   LoRA: demo/output/pytorch_lora_weights.safetensors"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/bench_train.py

.PHONY: demo test bench
