# Two commands do all the set-up on a fresh machine (each creates .venv and installs on first use):
#   make demo   a toy subject under demo/ on the shipped toy model (toy/model): mask it, make class pictures,
#               cache, train a LoRA, evaluate every checkpoint into a report (before/after images)
#   make test   run the test suite
# make demo FAMILY=sd3 runs the same workflow on the flow-matching toy model (toy/model_sd3), under demo_sd3/.
PYTHON ?= python3
FAMILY ?= sd1
TOY_MODEL_sd1 := toy/model
TOY_MODEL_sd3 := toy/model_sd3
DEMO_sd1 := demo
DEMO_sd3 := demo_sd3
TOY_MODEL := $(TOY_MODEL_$(FAMILY))
DEMO := $(DEMO_$(FAMILY))
ifeq ($(TOY_MODEL),)
$(error FAMILY=$(FAMILY): the toy models are FAMILY=sd1 (toy/model, the default) and FAMILY=sd3 (toy/model_sd3))
endif
VENV := .venv
PY := $(VENV)/bin/python
# Nothing is downloaded at run time by the demo or the tests.
export HF_HUB_OFFLINE := 1

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/make_demo.py $(DEMO) $(TOY_MODEL)
	$(PY) make_masks.py --input_dir $(DEMO)/cutouts --output_dir $(DEMO)/subject_masks --method alpha \
		--preview $(DEMO)/masks_preview.png
	$(PY) make_regularisation.py --pretrained_model_name_or_path $(TOY_MODEL) --class_prompt "a shape" --num_images 16 \
		--output_dir $(DEMO)/class --resolution 64 --num_inference_steps 20 --guidance_scale 5
	$(PY) cache_latents.py --config $(DEMO)/config.json
	$(PY) train_dreambooth.py --config $(DEMO)/config.json
	$(PY) evaluate.py --config $(DEMO)/config.json --validation_instance "ohwx shape" --validation_class shape \
		--validation_prompt "a {instance}" "a {instance} on a green background" "a large {instance} at the left" \
		--num_images_per_prompt 3 --num_inference_steps 20 --guidance_scale 5 --clip_model none \
		--toy_scorer toy/scorer.safetensors
	@echo "before: $(DEMO)/output/evaluation/grids/base.png   after: $(DEMO)/output/evaluation/grids/final.png"
	@echo "the subject's pictures: $(DEMO)/subject/   masks: $(DEMO)/masks_preview.png   class pictures: $(DEMO)/class_preview.png"
	@echo "report: $(DEMO)/output/evaluation/report.html   LoRA: $(DEMO)/output/pytorch_lora_weights.safetensors"

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/bench_train.py

.PHONY: demo test bench
