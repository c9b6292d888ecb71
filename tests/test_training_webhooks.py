"""Training talks to webhooks: its events, validation previews from a Tiny AutoEncoder, errors, and a
dead server that changes nothing."""

import base64
import io
import json
import os
import time

import pytest
import torch
from conftest import train_argv, write_json
from PIL import Image

from common import adapters
import train_dreambooth

TOKEN = "hook-token-never-printed"
HUB_TOKEN = "hf_hubtokenneverprinted"


@pytest.fixture(scope="session")
def tiny_taesd(tmp_path_factory):
    """tiny_taesd(latent_channels) -> a tiny random AutoencoderTiny (8x upsampling, like TAESD; 16 channels like
    taesd3 / taef1), saved as a local folder."""
    from diffusers import AutoencoderTiny

    def build(latent_channels=4):
        folder = str(tmp_path_factory.mktemp(f"taesd{latent_channels}"))
        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                        num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4,
                        latent_channels=latent_channels).save_pretrained(folder)
        return folder

    return build


def received(server):
    return [json.loads(request["body"]) for request in server.requests]


@pytest.mark.parametrize("family,every,denoising_steps", [("sd1", 2, [2, 4, 5]), ("flux", None, [1, 2, 3, 4, 5]),
                                                          ("if", 2, [2, 4, 5]), ("if-ii", 2, [2, 4, 5])])
def test_training_sends_its_events_and_validation_previews(tiny_model, subject_dir, tmp_path, serve, tiny_taesd,
                                                           capfd, monkeypatch, family, every, denoising_steps):
    """FLUX: its previews unpack the pipeline's packed tokens for the 16-channel Tiny AutoEncoder; IF's in-progress
    image is the picture, previewed with no Tiny AutoEncoder (stage II: enlarging a subject picture, at its size).
    Previews come every --validation_preview_steps N denoising steps and at the last; by default every step, as the
    reference sends them."""
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)  # a hub token in the environment is never written either
    server = serve()
    config = write_json(tmp_path / "hooks.json", {"webhook_type": "raw", "callback_url": server.url + "/hook",
                                                  "auth_token": TOKEN, "message_prefix": "[toy] "})
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model(family), subject_dir, out, "--max_train_steps", "2",
                                     "--checkpointing_steps", "1", "--validation_prompt", "a photo of ohwx toy",
                                     "--validation_steps", "2", "--num_validation_images", "1",
                                     "--validation_num_inference_steps", "5", "--validation_preview",
                                     *(["--validation_preview_steps", every] if every else []),
                                     *([] if family == "if-ii" else ["--validation_resolution", "64"]),
                                     *([] if family.startswith("if") else  # IF: no Tiny AutoEncoder
                                       ["--preview_vae", tiny_taesd(16 if family == "flux" else 4)]),
                                     "--webhook_config", config))
    events = received(server)
    assert [e["type"] for e in events] == ["training_started", "checkpoint_saved",
                                           *["preview_image"] * len(denoising_steps), "validation_image",
                                           "training_finished"]
    assert all(e["message"].startswith("[toy] ") for e in events)
    assert events[1]["data"]["step"] == 1 and events[1]["data"]["path"].endswith("checkpoint-1")
    previews = [e for e in events if e["type"] == "preview_image"]
    assert [p["data"]["denoising_step"] for p in previews] == denoising_steps
    pictures = [Image.open(io.BytesIO(base64.b64decode(p["images"][0]))) for p in previews]
    validation = Image.open(io.BytesIO(base64.b64decode(events[-2]["images"][0])))
    assert all(picture.format == "PNG" and picture.size == validation.size for picture in pictures)
    assert validation.size == (64, 64) or family == "if-ii"  # stage II: a subject picture's size (32 px buckets)
    assert len({picture.tobytes() for picture in pictures}) == len(pictures)  # the latents change while denoising
    assert validation.tobytes() == Image.open(out / "validation" / "step-2" / "prompt00-seed0.png").tobytes()
    assert all(r["headers"]["Authorization"] == f"Bearer {TOKEN}" for r in server.requests)

    # The tokens are sent / used, never written: not in the console output, the log, the metadata or any file.
    printed = capfd.readouterr()
    assert TOKEN not in printed.out + printed.err and HUB_TOKEN not in printed.out + printed.err
    for folder, _, names in os.walk(out):
        for name in names:
            data = open(os.path.join(folder, name), "rb").read()
            assert TOKEN.encode() not in data and HUB_TOKEN.encode() not in data, name


def test_a_dead_webhook_neither_stops_nor_slows_training(tiny_model, subject_dir, tmp_path, dead_url, capsys):
    config = write_json(tmp_path / "hooks.json", {"webhook_type": "raw", "callback_url": dead_url,
                                                  "auth_token": TOKEN})
    model = tiny_model("sd1")
    timings = {}
    for name, extra in (("plain", []), ("hooked", ["--webhook_config", config])):
        started = time.perf_counter()
        result = train_dreambooth.main(train_argv(model, subject_dir, tmp_path / name, "--max_train_steps", "3",
                                                  "--checkpointing_steps", "1", "--cache_dir", tmp_path / "cache",
                                                  *extra))
        timings[name] = time.perf_counter() - started
        assert result["steps"] == 3 and os.path.isfile(tmp_path / name / adapters.LORA_WEIGHTS_NAME)
    out = capsys.readouterr().out
    assert out.count("warning: webhook raw") == 1 and "could not be delivered" in out and TOKEN not in out
    assert timings["hooked"] < timings["plain"] + 3.0, timings


def test_an_error_that_stops_training_is_reported_with_its_message(tiny_model, subject_dir, tmp_path, serve):
    server = serve()
    config = write_json(tmp_path / "hooks.json", {"webhook_type": "raw", "callback_url": server.url})
    with pytest.raises(SystemExit, match="no usable images"):
        os.makedirs(tmp_path / "empty")
        train_dreambooth.main(train_argv(tiny_model("sd1"), str(tmp_path / "empty"), tmp_path / "out",
                                         "--webhook_config", config))
    [event] = received(server)
    assert event["type"] == "error" and "no usable images" in event["message"]


def test_preview_settings_are_checked_before_model_work(tiny_model, subject_dir, tmp_path):
    with pytest.raises(SystemExit, match="needs --validation_prompt and --webhook_config"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--validation_preview"))
    bad = write_json(tmp_path / "hooks.json", {"webhook_type": "slack", "webhook_url": "https://x"})
    with pytest.raises(SystemExit, match="hooks.json"):
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, tmp_path / "out", "--webhook_config", bad))
    assert not os.path.exists(tmp_path / "out")


def test_no_token_or_webhook_secret_is_written_when_a_run_fails(tiny_model, subject_dir, tmp_path, serve, capfd,
                                                                monkeypatch):
    """A run that stops on an error (a NaN loss here) reports it to the webhooks and on the console; the raw
    webhook's token, the secret in a Discord webhook's URL and the hub token reach no message, file or log."""
    discord_secret = "discordsecretneverprinted"
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    server = serve()
    config = write_json(tmp_path / "hooks.json", [
        {"webhook_type": "raw", "callback_url": server.url + "/hook", "auth_token": TOKEN},
        {"webhook_type": "discord", "webhook_url": f"{server.url}/api/webhooks/123/{discord_secret}"}])
    real = train_dreambooth.masked_mse
    monkeypatch.setattr(train_dreambooth, "masked_mse", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as failed:
        train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--webhook_config", config))
    assert "loss became nan at step 1" in str(failed.value)
    errors = [r for r in server.requests if b"loss became nan" in r["body"]]
    assert len(errors) == 2  # both webhooks heard of the error
    secrets = (TOKEN, discord_secret, HUB_TOKEN)
    printed = capfd.readouterr()
    for text in (str(failed.value), printed.out, printed.err, *(r["body"].decode("utf-8", "replace")
                                                                for r in server.requests)):
        assert not any(secret in text for secret in secrets)
    written = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    assert written  # the run got as far as its log
    for path in written:
        data = open(path, "rb").read()
        assert not any(secret.encode() in data for secret in secrets), path
