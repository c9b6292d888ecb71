"""--config FILE.json, the flags it feeds, and the data backend config.

No model is loaded here: everything is parsing and validation, so a typo costs a second, not a model load."""

import argparse
import json
import os

import pytest
from conftest import REFERENCE_MASKED_LOSS, REFERENCE_MIXED_RESOLUTION, ROOT, relocate, write_json

import cache_latents
from common import data, flags
import train_dreambooth

def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def train_args(tmp_path, *argv):
    return train_dreambooth.parse_args(["--output_dir", str(tmp_path / "out"), *argv])


def exit_message(excinfo):
    return str(excinfo.value.code if excinfo.value.code is not None else excinfo.value)


# ---------------------------------------------------------------------------------------------------------------------
# --config FILE.json


def test_config_keys_work_with_and_without_leading_dashes(tmp_path):
    config = write_json(tmp_path / "config.json", {"learning_rate": 0.0002, "--lora_rank": 8, "--seed": 3,
                                                   "lr_scheduler": "cosine"})
    args = train_dreambooth.parse_args(["--config", config])
    assert args.learning_rate == pytest.approx(2e-4) and isinstance(args.learning_rate, float)
    assert args.lora_rank == 8 and isinstance(args.lora_rank, int)
    assert args.seed == 3
    assert args.lr_scheduler == "cosine"


def test_config_values_are_converted_with_the_flags_own_type(tmp_path):
    config = write_json(tmp_path / "config.json", {
        "learning_rate": 0.0002, "resolution": 1024, "train_batch_size": 4, "gradient_checkpointing": True,
        "use_8bit_adam": "false", "local_files_only": "yes", "validation_prompt": ["a", "b"],
        "snr_gamma": 5, "lora_alpha": "8",
    })
    args = train_dreambooth.parse_args(["--config", config])
    assert args.learning_rate == 0.0002 and type(args.learning_rate) is float
    assert args.resolution == 1024.0 and type(args.resolution) is float
    assert args.train_batch_size == 4 and type(args.train_batch_size) is int
    assert args.gradient_checkpointing is True
    assert args.use_8bit_adam is False
    assert args.local_files_only is True
    assert args.validation_prompt == ["a", "b"]
    assert args.snr_gamma == 5.0 and type(args.snr_gamma) is float
    assert args.lora_alpha == 8.0 and type(args.lora_alpha) is float


def test_single_string_for_a_list_flag_becomes_a_one_element_list(tmp_path):
    config = write_json(tmp_path / "config.json", {"validation_prompt": "a photo of ohwx dog"})
    assert train_dreambooth.parse_args(["--config", config]).validation_prompt == ["a photo of ohwx dog"]


def test_command_line_wins_over_the_config_file(tmp_path):
    config = write_json(tmp_path / "config.json", {
        "learning_rate": 0.0002, "gradient_checkpointing": True, "validation_prompt": ["a", "b"], "lora_rank": 8,
        "lr_scheduler": "cosine",
    })
    args = train_dreambooth.parse_args(["--config", config, "--learning_rate", "0.5", "--gradient_checkpointing",
                                        "false", "--validation_prompt", "c", "--lr_scheduler", "linear"])
    assert args.learning_rate == 0.5
    assert args.gradient_checkpointing is False
    assert args.validation_prompt == ["c"]
    assert args.lr_scheduler == "linear"
    assert args.lora_rank == 8  # not on the command line: the file's value stands
    # The order of --config among the flags does not matter.
    args = train_dreambooth.parse_args(["--learning_rate", "0.5", "--config", config])
    assert args.learning_rate == 0.5 and args.lora_rank == 8


def test_config_values_replace_defaults_only(tmp_path):
    config = write_json(tmp_path / "config.json", {"lora_rank": 8})
    args = train_dreambooth.parse_args(["--config", config])
    plain = train_dreambooth.parse_args([])
    assert args.lora_rank == 8 and plain.lora_rank == 16
    assert args.learning_rate == plain.learning_rate == 1e-4


def test_parse_args_with_config_on_a_plain_parser(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--flag", type=flags.str2bool, nargs="?", const=True, default=False)
    parser.add_argument("--names", nargs="+", default=None)
    config = write_json(tmp_path / "c.json", {"--steps": 7, "flag": "true", "names": "solo"})
    args = flags.parse_args_with_config(parser, ["--config", config])
    assert (args.steps, args.flag, args.names) == (7, True, ["solo"])


@pytest.mark.parametrize("where", ["file", "command_line"])
@pytest.mark.parametrize("name", ["data_config", "data_backend_config"])
def test_data_config_is_an_alias_of_data_backend_config(tmp_path, where, name):
    data = str(tmp_path / "data.json")
    if where == "file":
        args = train_dreambooth.parse_args(["--config", write_json(tmp_path / "config.json", {name: data})])
    else:
        args = train_dreambooth.parse_args([f"--{name}", data])
    assert args.data_backend_config == data
    assert not hasattr(args, "data_config")


def test_unknown_key_names_the_file_and_the_closest_known_key(tmp_path):
    config = write_json(tmp_path / "config.json", {"learnin_rate": 0.0002})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "learnin_rate" in message and "'learning_rate'" in message


def test_unknown_key_with_dashes_is_also_refused(tmp_path):
    config = write_json(tmp_path / "config.json", {"--gradient_checkpionting": True})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "'gradient_checkpointing'" in message


def test_bad_choice_is_an_error_naming_key_and_file(tmp_path):
    config = write_json(tmp_path / "config.json", {"lr_scheduler": "cosnie"})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "lr_scheduler" in message and "cosnie" in message and "cosine" in message


def test_bad_type_is_an_error_naming_key_and_file(tmp_path):
    config = write_json(tmp_path / "config.json", {"train_batch_size": "four"})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "train_batch_size" in message and "four" in message


def test_bad_boolean_in_the_file_is_refused(tmp_path):
    config = write_json(tmp_path / "config.json", {"gradient_checkpointing": "maybe"})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    assert config in exit_message(excinfo) and "gradient_checkpointing" in exit_message(excinfo)


def test_list_for_a_single_value_flag_is_refused(tmp_path):
    config = write_json(tmp_path / "config.json", {"learning_rate": [0.1, 0.2]})
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "learning_rate" in message and "list" in message


def test_config_file_that_is_not_an_object_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", write_json(tmp_path / "list.json", [1, 2])])
    assert "list.json" in exit_message(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", str(tmp_path / "absent.json")])
    assert "absent.json" in exit_message(excinfo) and "no such file" in exit_message(excinfo)
    broken = tmp_path / "broken.json"
    broken.write_text('{"learning_rate": 0.1,', encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        train_dreambooth.parse_args(["--config", str(broken)])
    assert "broken.json" in exit_message(excinfo) and "JSON" in exit_message(excinfo)


@pytest.mark.parametrize("argv, expected", [
    ([], False),
    (["--gradient_checkpointing"], True),
    (["--gradient_checkpointing", "false"], False),
    (["--gradient_checkpointing", "true"], True),
    (["--gradient_checkpointing", "False"], False),
    (["--gradient_checkpointing", "--lora_rank", "4"], True),
])
def test_boolean_flags_accept_bare_true_and_false(argv, expected):
    assert train_dreambooth.parse_args(argv).gradient_checkpointing is expected


def test_boolean_flag_refuses_a_non_boolean_word(capsys):
    with pytest.raises(SystemExit):
        train_dreambooth.parse_args(["--gradient_checkpointing", "sometimes"])
    assert "gradient_checkpointing" in capsys.readouterr().err


def test_cache_latents_accepts_training_keys_in_the_shared_config(tmp_path):
    config = write_json(tmp_path / "config.json", {
        "learning_rate": 0.0002, "lora_rank": 8, "--max_train_steps": 100, "vae_batch_size": 2, "seed": 5,
        "instance_data_dir": str(tmp_path), "instance_prompt": "ohwx",
    })
    args = cache_latents.parse_args(["--config", config])
    assert (args.vae_batch_size, args.seed, args.instance_prompt) == (2, 5, "ohwx")
    assert not hasattr(args, "learning_rate") and not hasattr(args, "lora_rank")


def test_the_training_keys_the_other_scripts_pass_over_are_exactly_the_training_flags():
    import argparse

    shared = argparse.ArgumentParser()
    for add in (flags.add_model_args, flags.add_data_args):
        add(shared)
    assert flags.TRAINING_KEYS == flags.option_names(train_dreambooth.build_parser()) - flags.option_names(shared)


@pytest.mark.parametrize("script", ["cache_latents", "evaluate"])
def test_the_training_config_works_with_the_other_scripts(tmp_path, script):
    import importlib

    config = json.load(open(os.path.join(ROOT, "examples", "config.json")))
    config.update(eval_split=2, eval_steps_interval=50, data_aesthetic_score=6.0, use_ema=True)  # every group
    args = importlib.import_module(script).parse_args(["--config", write_json(tmp_path / "config.json", config)])
    assert args.pretrained_model_name_or_path == config["pretrained_model_name_or_path"]
    if script == "evaluate":  # its own keys are read, not passed over
        assert (args.eval_split, args.data_aesthetic_score) == (2, 6.0)


def test_cache_latents_still_rejects_a_typo(tmp_path):
    config = write_json(tmp_path / "config.json", {"lora_rank": 8, "learnin_rate": 0.0002})
    with pytest.raises(SystemExit) as excinfo:
        cache_latents.parse_args(["--config", config])
    message = exit_message(excinfo)
    assert config in message and "'learning_rate'" in message


def test_cache_latents_checks_its_own_keys_types(tmp_path):
    config = write_json(tmp_path / "config.json", {"vae_batch_size": "many", "learning_rate": 0.1})
    with pytest.raises(SystemExit) as excinfo:
        cache_latents.parse_args(["--config", config])
    assert "vae_batch_size" in exit_message(excinfo) and config in exit_message(excinfo)


# ---------------------------------------------------------------------------------------------------------------------
# The data backend config


def test_reference_masked_loss_example_loads_verbatim(tmp_path):
    data_config = write_text(tmp_path / "multidatabackend.json", relocate(REFERENCE_MASKED_LOSS, tmp_path))
    args = train_args(tmp_path, "--data_backend_config", data_config)
    datasets = data.load_datasets(args)
    by_id = {d.id: d for d in datasets}
    assert list(by_id) == ["dreambooth-data", "dreambooth-conditioning", "an example backend for text embeds."]

    image = by_id["dreambooth-data"]
    assert image.dataset_type == "image" and image.trains
    assert image.conditioning_data == "dreambooth-conditioning"
    assert image.instance_data_dir == str(tmp_path / "training/datasets/test_datasets/dreambooth")
    assert image.cache_dir_vae == str(tmp_path / "training/cache/vae/sdxl/dreambooth-data")
    assert (image.caption_strategy, image.instance_prompt) == ("instanceprompt", "an dreambooth")
    assert (image.resolution, image.resolution_type) == (1024, "pixel_area")
    assert (image.minimum_image_size, image.maximum_image_size, image.target_downsample_size) == (1024, 1024, 1024)
    assert (image.crop, image.crop_aspect, image.crop_style) == (True, "square", "center")
    assert image.repeats == 0 and image.is_regularisation_data is False

    mask = by_id["dreambooth-conditioning"]
    assert (mask.dataset_type, mask.conditioning_type) == ("conditioning", "mask")
    assert not mask.trains
    assert mask.instance_data_dir == str(tmp_path / "training/datasets/test_datasets/dreambooth_mask")

    text = by_id["an example backend for text embeds."]
    assert text.dataset_type == "text_embeds" and text.default is True and not text.trains
    assert data.text_cache_dir(datasets, args) == str(tmp_path / "training/cache/text/sdxl-base/masked_loss")

    assert data.mask_dataset_of(image, datasets) is mask  # masked loss: the image dataset's masks
    notices = []
    data.announce_pending_features(datasets, print_fn=notices.append)
    assert notices == []  # masks are a working feature, nothing pending


def test_reference_mixed_resolution_example_loads_verbatim(tmp_path):
    data_config = write_text(tmp_path / "multidatabackend-dreambooth.json", relocate(REFERENCE_MIXED_RESOLUTION, tmp_path))
    args = train_args(tmp_path, "--data_config", data_config)
    datasets = data.load_datasets(args)
    by_id = {d.id: d for d in datasets}
    assert list(by_id) == ["subjectname-data-512px", "subjectname-data-1024px", "regularisation-data",
                           "regularisation-data-1024px", "textembeds"]
    expected = {  # id: (resolution, repeats, minimum_image_size, is_regularisation_data, cache_dir_vae)
        "subjectname-data-512px": (512, 100, 192, False, "training/vae_cache/subjectname"),
        "subjectname-data-1024px": (1024, 100, 768, False, "training/vae_cache/subjectname-1024px"),
        "regularisation-data": (512, 0, 192, True, "training/vae_cache/regularisation"),
        "regularisation-data-1024px": (1024, 0, 768, True, "training/vae_cache/regularisation-1024px"),
    }
    for name, (resolution, repeats, minimum, regularisation, cache) in expected.items():
        dataset = by_id[name]
        assert dataset.trains and dataset.dataset_type == "image", name
        assert (dataset.resolution, dataset.resolution_type) == (resolution, "pixel_area"), name
        assert dataset.repeats == repeats and dataset.minimum_image_size == minimum, name
        assert dataset.is_regularisation_data is regularisation, name
        assert dataset.cache_dir_vae == str(tmp_path / cache), name
        assert dataset.caption_strategy == "instanceprompt"
    assert by_id["subjectname-data-512px"].crop is False and by_id["subjectname-data-1024px"].crop is False
    assert by_id["subjectname-data-512px"].instance_prompt == "subjectname"
    assert by_id["regularisation-data"].instance_prompt == "a picture of a man"
    assert by_id["regularisation-data"].instance_data_dir == str(tmp_path / "training/datasets/regularisation")
    assert data.text_cache_dir(datasets, args) == str(tmp_path / "training/text_cache/sdxl_base")

    notices = []
    data.announce_pending_features(datasets, print_fn=notices.append)
    assert notices == []  # regularisation data is a working feature (prior loss), nothing pending


def test_us_spelling_of_is_regularisation_data_means_the_same(tmp_path):
    (tmp_path / "reg").mkdir()
    entries = [{"id": "reg-us", "instance_data_dir": str(tmp_path / "reg"), "instance_prompt": "a man",
                "is_regularization_data": True},
               {"id": "reg-uk", "instance_data_dir": str(tmp_path / "reg"), "instance_prompt": "a man",
                "is_regularisation_data": True},
               {"id": "subject", "instance_data_dir": str(tmp_path / "reg"), "instance_prompt": "ohwx",
                "is_regularization_data": False}]
    args = train_args(tmp_path, "--data_backend_config", write_json(tmp_path / "data.json", entries))
    datasets = data.load_datasets(args)
    assert [d.is_regularisation_data for d in datasets] == [True, True, False]
    assert [d.id for d in datasets if d.is_regularisation_data] == ["reg-us", "reg-uk"]


def test_unknown_dataset_key_names_the_closest_known_key(tmp_path):
    (tmp_path / "img").mkdir()
    data_config = write_json(tmp_path / "data.json", [{"id": "a", "instance_data_dir": str(tmp_path / "img"),
                                                "resolutoin": 512}])
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(train_args(tmp_path, "--data_backend_config", data_config))
    message = exit_message(excinfo)
    assert data_config in message and "resolutoin" in message and "'resolution'" in message


def test_wrongly_typed_dataset_value_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    data_config = write_json(tmp_path / "data.json", [{"id": "a", "instance_data_dir": str(tmp_path / "img"),
                                                "crop": "yes please"}])
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(train_args(tmp_path, "--data_backend_config", data_config))
    assert data_config in exit_message(excinfo) and "'crop'" in exit_message(excinfo)


def test_instance_data_dir_and_prompt_build_a_one_dataset_config(tmp_path):
    (tmp_path / "subject").mkdir()
    args = train_args(tmp_path, "--instance_data_dir", str(tmp_path / "subject"), "--instance_prompt",
                      "a photo of ohwx dog")
    [dataset] = data.load_datasets(args)
    assert dataset.instance_data_dir == str(tmp_path / "subject")
    assert (dataset.caption_strategy, dataset.instance_prompt) == ("instanceprompt", "a photo of ohwx dog")
    assert dataset.dataset_type == "image" and dataset.repeats == 0 and dataset.trains


def test_instance_data_dir_in_the_config_file_builds_the_same_dataset(tmp_path):
    (tmp_path / "subject").mkdir()
    config = write_json(tmp_path / "config.json", {"instance_data_dir": str(tmp_path / "subject"),
                                                   "instance_prompt": "a photo of ohwx dog",
                                                   "output_dir": str(tmp_path / "out")})
    [dataset] = data.load_datasets(train_dreambooth.parse_args(["--config", config]))
    assert (dataset.caption_strategy, dataset.instance_prompt) == ("instanceprompt", "a photo of ohwx dog")


def test_instance_data_dir_without_prompt_captions_from_filenames(tmp_path):
    (tmp_path / "subject").mkdir()
    [dataset] = data.load_datasets(train_args(tmp_path, "--instance_data_dir", str(tmp_path / "subject")))
    assert dataset.caption_strategy == "filename" and dataset.instance_prompt is None


def test_no_data_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(train_args(tmp_path))
    message = exit_message(excinfo)
    assert "no data" in message and "--data_backend_config" in message and "--instance_data_dir" in message


def test_missing_instance_folder_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(train_args(tmp_path, "--instance_data_dir", missing, "--instance_prompt", "x"))
    assert missing in exit_message(excinfo)


def test_dataset_without_resolution_takes_the_command_line_resolution(tmp_path):
    (tmp_path / "img").mkdir()
    data_config = write_json(tmp_path / "data.json", [
        {"id": "plain", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x"},
        {"id": "own", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x", "resolution": 1.0,
         "resolution_type": "area"},
    ])
    args = train_args(tmp_path, "--data_backend_config", data_config, "--resolution", "768", "--resolution_type", "pixel")
    plain, own = data.load_datasets(args)
    assert (plain.resolution, plain.resolution_type) == (768.0, "pixel")
    assert (own.resolution, own.resolution_type) == (1.0, "area")
    # Without --resolution the dataset is left for the model's native size (filled in after the model is read).
    [plain] = data.load_datasets(train_args(tmp_path, "--instance_data_dir", str(tmp_path / "img")))
    assert plain.resolution is None and plain.resolution_type == "pixel_area"


def test_cache_dir_vae_defaults_under_output_dir_cache_vae_id(tmp_path):
    (tmp_path / "img").mkdir()
    data_config = write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x"},
        {"id": "explicit", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x",
         "cache_dir_vae": str(tmp_path / "mine")},
    ])
    subject, explicit = data.load_datasets(train_args(tmp_path, "--data_backend_config", data_config))
    assert subject.cache_dir_vae == os.path.join(str(tmp_path / "out"), "cache", "vae", "subject")
    assert explicit.cache_dir_vae == str(tmp_path / "mine")
    # --cache_dir moves the root of the caches; text embeddings default beside the latents.
    args = train_args(tmp_path, "--data_backend_config", data_config, "--cache_dir", str(tmp_path / "caches"))
    datasets = data.load_datasets(args)
    assert datasets[0].cache_dir_vae == os.path.join(str(tmp_path / "caches"), "vae", "subject")
    assert data.text_cache_dir(datasets, args) == os.path.join(str(tmp_path / "caches"), "text")


def test_the_subject_is_the_first_trained_dataset_that_is_not_regularisation():
    reg, subject = data.Dataset(id="reg", is_regularisation_data=True), data.Dataset(id="dog")
    held_out = data.Dataset(id="held", dataset_type="eval")
    assert data.subject_dataset([held_out, reg, subject]) is subject
    with pytest.raises(SystemExit, match="every image dataset is regularisation data"):
        data.subject_dataset([held_out, reg])


def test_duplicate_dataset_ids_are_refused(tmp_path):
    (tmp_path / "img").mkdir()
    entry = {"id": "same", "instance_data_dir": str(tmp_path / "img"), "instance_prompt": "x"}
    data_config = write_json(tmp_path / "data.json", [entry, entry])
    with pytest.raises(SystemExit) as excinfo:
        data.load_datasets(train_args(tmp_path, "--data_backend_config", data_config))
    assert "'same'" in exit_message(excinfo) and data_config in exit_message(excinfo)
