"""The reference document's two data configs, and the shipped examples/, run as written with only paths changed."""

import json
import os

from conftest import REFERENCE_MASKED_LOSS, REFERENCE_MIXED_RESOLUTION, ROOT, model_info, write_json
from conftest import relocate as relocate_reference

from common import adapters, data, files, flags, models
import train_dreambooth


def reference_example(text, root):
    """A reference data config (verbatim in conftest.py) with its '/training/...' folders moved under `root`."""
    return json.loads(relocate_reference(text, root))


def relocate(datasets, root):
    """Point every folder of a data config into `root` (the only change the examples get)."""
    for dataset in datasets:
        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir"):
            if key in dataset:
                dataset[key] = str(root / dataset[key].strip("/"))
    return datasets


def square_images(folder, count, size):
    import make_demo

    return make_demo.make_subject_images(str(folder), sizes=((size, size),) * count)


def run_tiny_sdxl(tiny_model, data_config, tmp_path):
    return train_dreambooth.main(["--pretrained_model_name_or_path", tiny_model("sdxl"), "--data_backend_config",
                                  data_config, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                                  "--seed", "0", "--lora_rank", "2"])


def test_reference_four_dataset_example_runs(tiny_model, tmp_path, capsys):
    datasets = reference_example(REFERENCE_MIXED_RESOLUTION, tmp_path)
    square_images(datasets[0]["instance_data_dir"], 1, 1024)
    square_images(datasets[2]["instance_data_dir"], 1, 896)
    run_tiny_sdxl(tiny_model, write_json(tmp_path / "multidatabackend.json", datasets), tmp_path)
    out = capsys.readouterr().out
    assert "an epoch holds 2 instance and 2 regularisation samples" not in out  # repeats 100: 202 instance samples
    assert "an epoch holds 202 instance and 2 regularisation samples" in out
    assert os.path.isfile(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME)
    buckets = {os.path.basename(p).rsplit("-", 1)[1] for d in datasets[:4]
               for p in os.listdir(d["cache_dir_vae"])}
    assert buckets == {"512x512.safetensors", "1024x1024.safetensors"}  # about the resolution, whatever the image
    assert os.listdir(datasets[4]["cache_dir"])  # text embeddings in the text_embeds entry's folder


def test_reference_masked_loss_example_runs(tiny_model, tmp_path):
    datasets = reference_example(REFERENCE_MASKED_LOSS, tmp_path)
    square_images(datasets[0]["instance_data_dir"], 2, 1024)
    square_images(datasets[1]["instance_data_dir"], 2, 1024)
    run_tiny_sdxl(tiny_model, write_json(tmp_path / "multidatabackend.json", datasets), tmp_path)
    assert os.path.isfile(tmp_path / "out" / adapters.LORA_WEIGHTS_NAME)
    entries = [os.path.join(datasets[0]["cache_dir_vae"], name) for name in os.listdir(datasets[0]["cache_dir_vae"])]
    assert len(entries) == 2
    for path in entries:  # each latent carries its image's mask, on the 128 x 128 latent grid of a 1024 px bucket
        assert files.load_tensors(path)["mask"].shape == (1, 128, 128)


def test_shipped_examples_are_valid(tmp_path):
    config = flags.read_config_file(os.path.join(ROOT, "examples", "config.json"), train_dreambooth.build_parser())
    assert config["data_backend_config"] == "examples/multidatabackend.json"
    with open(os.path.join(ROOT, "examples", "multidatabackend.json")) as handle:
        datasets = relocate(json.load(handle), tmp_path)
    for dataset in datasets:
        if "instance_data_dir" in dataset:
            os.makedirs(dataset["instance_data_dir"], exist_ok=True)
    args = train_dreambooth.parse_args(["--data_backend_config", write_json(tmp_path / "data.json", datasets)])
    loaded = data.load_datasets(args)
    assert [d.id for d in loaded if d.is_regularisation_data] == ["regularisation-data", "regularisation-data-1024px"]


def test_shipped_lycoris_config_builds_a_network(tiny_model, tmp_path):
    path = os.path.join(ROOT, "examples", "lycoris_config.json")
    config = adapters.read_lycoris_config(path)
    info = model_info(tiny_model("sd1"))
    network = adapters.add_lycoris(models.load_component(info, "unet"), config, path)
    assert network.loras and {type(m).__name__ for m in network.loras} == {"LokrModule"}
