"""common/hub.py against a local stand-in for the hub (tests/hub_server.py): what arrives byte for byte, what stays
behind (cache/, checkpoint-*/, temporaries), where the token goes (the Authorization header, never the output), and
the messages of a push that cannot happen.

Most pushes run in a child process whose environment has HF_ENDPOINT pointing at the fake hub and no HF_HUB_OFFLINE:
huggingface_hub reads both once, when it is imported, and this process imported it under tests/conftest.py's
HF_HUB_OFFLINE=1. A child reads them as a real training run does, and its output and exit status are the real ones.
The in-process tests use FakeHub.use_in_this_process instead."""

import json
import os
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
from conftest import ROOT
from hub_server import hub_server  # noqa: F401  (the fixture, found by pytest in this module)
from PIL import Image
from safetensors.numpy import save_file

from common import hub

TOKEN = "hf_s3cretTokenDoNotPrint"
PUSH = """
import os, sys
from common import hub
print("URL", hub.push_folder(sys.argv[1], sys.argv[2], token=os.environ.get("PUSH_TOKEN")))
"""
UPLOADED = ["README.md", "args.json", "logs/train_log.jsonl", "pytorch_lora_weights.safetensors",
            "validation/step-5/0.png", "validation/step-5/grid.png"]


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def output_dir(tmp_path):
    """A folder shaped like a LoRA run's output, with the parts that must not go up beside the parts that must."""
    folder = tmp_path / "output"
    rng = np.random.default_rng(0)
    weights = {"unet.down.lora_A.weight": rng.standard_normal((4, 32), dtype=np.float32),
               "unet.down.lora_B.weight": rng.standard_normal((32, 4), dtype=np.float32)}
    os.makedirs(folder)
    save_file(weights, str(folder / "pytorch_lora_weights.safetensors"), metadata={"step": "5"})
    write(folder / "README.md", b"---\nlicense: other\ntags:\n- lora\n---\n# ohwx dog\n")
    write(folder / "args.json", json.dumps({"max_train_steps": 5, "seed": 0}).encode())
    write(folder / "logs" / "train_log.jsonl", b'{"step": 1, "loss": 0.5}\n')
    png(folder / "validation" / "step-5" / "0.png", 1)
    png(folder / "validation" / "step-5" / "grid.png", 2)
    write(folder / "cache" / "latents" / "a.safetensors", rng.bytes(256))
    write(folder / "cache" / "text" / "b.safetensors", rng.bytes(256))
    write(folder / "checkpoint-5" / "optimizer.pt", rng.bytes(256))
    save_file(weights, str(folder / "checkpoint-5" / "trainable.safetensors"))
    write(folder / ".tmp99999" / "args.json", b"{half")  # a killed run's temporary
    write(folder / "validation" / ".tmp99999" / "grid.png", b"half")
    return str(folder)


def child_env(tmp_path, endpoint, token=None, env_token=None, **extra):
    """The environment of a pushing child: the fake hub, an empty HF_HOME (no stored login is read, nothing is
    written to the real one), the token where the test puts it and nowhere else."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", **extra)
    if token:
        env["PUSH_TOKEN"] = token  # the --hub_token path, kept off the child's command line
    if env_token:
        env["HF_TOKEN"] = env_token  # huggingface_hub's own look-up
    return env


def push_in_child(folder, repo_id, env):
    return subprocess.run([sys.executable, "-c", PUSH, folder, repo_id], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def on_disk(folder, paths):
    return {path: open(os.path.join(folder, path), "rb").read() for path in paths}


def files_holding(folder, secret):
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, name) for name in names
                  if secret.encode() in open(os.path.join(root, name), "rb").read()]
    return found


# ---------------------------------------------------------------------------------------------------------------------
# What arrives


@pytest.mark.parametrize("token_from, upload_path", [("argument", "xet pipeline"), ("HF_TOKEN", "single commit")])
def test_push_uploads_the_outputs_byte_for_byte_and_leaves_cache_and_checkpoints(tmp_path, output_dir, hub_server,
                                                                                 token_from, upload_path):
    # huggingface_hub takes its streamed pipeline when hf_xet is installed, one create_commit when it is switched off
    extra = {"HF_HUB_DISABLE_XET": "1"} if upload_path == "single commit" else {}
    env = child_env(tmp_path, hub_server.url, token=TOKEN if token_from == "argument" else None,
                    env_token=TOKEN if token_from == "HF_TOKEN" else None, **extra)
    done = push_in_child(output_dir, "dog-lora", env)
    assert done.returncode == 0, done.stderr
    assert f"URL {hub_server.url}/user/dog-lora\n" in done.stdout  # a bare NAME lands under the token's owner
    arrived = hub_server.files("user/dog-lora")
    assert sorted(arrived) == UPLOADED
    assert arrived == on_disk(output_dir, UPLOADED)
    assert hub_server.repos["user/dog-lora"]["private"] is False
    assert hub_server.repos["user/dog-lora"]["commits"] == ["Upload DreamBooth training output"]
    assert hub_server.authorizations == {f"Bearer {TOKEN}"}  # every request carried it
    assert TOKEN not in done.stdout + done.stderr
    assert files_holding(tmp_path, TOKEN) == []  # not in the output, nor in HF_HOME (where hf_xet writes its logs)
    assert hub_server.unexpected == []


def test_checkpoints_go_up_when_asked(output_dir, hub_server, monkeypatch):
    hub_server.use_in_this_process(monkeypatch)
    printed = []
    hub.push_folder(output_dir, "me/dog-lora", token=TOKEN, say=printed.append,
                    ignore_patterns=hub.WITHOUT_CHECKPOINTS)
    arrived = hub_server.files("me/dog-lora")
    checkpoint = ["checkpoint-5/optimizer.pt", "checkpoint-5/trainable.safetensors"]
    assert sorted(arrived) == sorted(UPLOADED + checkpoint)
    assert arrived == on_disk(output_dir, UPLOADED + checkpoint)
    assert printed[0].startswith("pushing 8 files (") and printed[-1] == f"pushed to {hub_server.url}/me/dog-lora"
    assert not any(TOKEN in line for line in printed)
    assert hub_server.unexpected == []


# ---------------------------------------------------------------------------------------------------------------------
# Pushes that cannot happen


@pytest.mark.parametrize("case", ["token refused", "no token", "no network", "offline"])
def test_a_push_that_cannot_happen_exits_nonzero_saying_what_to_do(tmp_path, output_dir, hub_server, dead_url, case):
    endpoint = dead_url.rsplit("/", 1)[0] if case == "no network" else hub_server.url
    hub_server.refuse = 401 if case == "token refused" else None
    env = child_env(tmp_path, endpoint, token=None if case == "no token" else TOKEN,
                    **({"HF_HUB_OFFLINE": "1"} if case == "offline" else {}))
    done = push_in_child(output_dir, "dog-lora", env)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    expected = {"token refused": ["refused to let you write to dog-lora (401)", "--hub_token", "hf auth login",
                                  "huggingface-cli login", f"stay in {output_dir}"],
                "no token": ["needs a hub token", "--hub_token", "HF_TOKEN", "hf auth login"],
                "no network": [f"cannot reach the hub at {endpoint}", "no network", f"stay in {output_dir}"],
                "offline": ["HF_HUB_OFFLINE is set. Unset it to push", f"stay in {output_dir}"]}[case]
    assert [part for part in expected if part not in message] == []
    assert TOKEN not in done.stdout + done.stderr
    assert hub_server.repos == {}
    if case == "token refused":
        assert hub_server.authorizations == {f"Bearer {TOKEN}"}  # it did reach the hub, which said no
    else:
        assert hub_server.requests == []


def test_a_private_push_never_fills_an_existing_public_repo(output_dir, hub_server, monkeypatch):
    hub_server.use_in_this_process(monkeypatch)
    hub_server.repos["me/public-dog"] = {"private": False, "files": {}, "commits": []}
    with pytest.raises(SystemExit, match="me/public-dog already exists and is public"):
        hub.push_folder(output_dir, "me/public-dog", token=TOKEN, private=True, say=lambda line: None)
    assert hub_server.files("me/public-dog") == {}
    url = hub.push_folder(output_dir, "me/private-dog", token=TOKEN, private=True, say=lambda line: None)
    assert url == f"{hub_server.url}/me/private-dog"
    assert hub_server.repos["me/private-dog"]["private"] is True
    assert sorted(hub_server.files("me/private-dog")) == UPLOADED
    assert hub_server.unexpected == []


def test_a_file_holding_the_token_stops_the_push_before_anything_is_sent(output_dir, hub_server, monkeypatch):
    hub_server.use_in_this_process(monkeypatch)
    write(os.path.join(output_dir, "notes.txt"), f"pushed with {TOKEN}\n".encode())
    with pytest.raises(SystemExit) as stopped:
        hub.push_folder(output_dir, "me/dog-lora", token=TOKEN, say=lambda line: None)
    assert "notes.txt contains your hub token" in str(stopped.value) and TOKEN not in str(stopped.value)
    assert hub_server.requests == []


def test_a_linked_file_stops_the_push_and_a_linked_cache_folder_stays_behind(output_dir, hub_server, monkeypatch,
                                                                            tmp_path):
    hub_server.use_in_this_process(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "token", TOKEN.encode())
    os.rename(os.path.join(output_dir, "cache"), elsewhere / "cache")
    os.symlink(elsewhere / "cache", os.path.join(output_dir, "cache"))  # a cache kept on another disk: fine
    os.symlink(elsewhere / "token", os.path.join(output_dir, "token"))
    with pytest.raises(SystemExit, match="token is a symbolic link, and the hub would get the file it points to"):
        hub.push_folder(output_dir, "me/dog-lora", token=TOKEN, say=lambda line: None)
    assert hub_server.requests == []
    os.remove(os.path.join(output_dir, "token"))
    hub.push_folder(output_dir, "me/dog-lora", token=TOKEN, say=lambda line: None)
    assert sorted(hub_server.files("me/dog-lora")) == UPLOADED


def test_check_push_catches_a_bad_repo_id_or_a_missing_token_before_training(monkeypatch):
    hub.check_push("me/dog-lora", TOKEN)  # fine: nothing is asked of the hub
    with pytest.raises(SystemExit, match="--hub_model_id 'my dog lora' is not a hub repo id: NAME or NAMESPACE/NAME"):
        hub.check_push("my dog lora", TOKEN)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no stored login
    with pytest.raises(SystemExit, match="needs a hub token with write access: pass --hub_token TOKEN"):
        hub.check_push("me/dog-lora")


# ---------------------------------------------------------------------------------------------------------------------
# From training


def test_a_training_run_with_push_to_hub_publishes_its_output_folder(tiny_model, subject_dir, tmp_path, hub_server,
                                                                      monkeypatch, capsys):
    """--push_to_hub --hub_model_id --hub_token: at the end of the run the output folder's files arrive byte for
    byte (the adapter, the card naming the hub repo, args.json without the token, validation images, the logs and
    TensorBoard events); cache/ and checkpoint-*/ stay; the token is in no output and no file."""
    import train_dreambooth
    from conftest import train_argv

    hub_server.use_in_this_process(monkeypatch)
    out = tmp_path / "out"
    train_dreambooth.main(train_argv(tiny_model("sd1"), subject_dir, out, "--max_train_steps", "2",
                                     "--checkpointing_steps", "1", "--validation_prompt", "a ohwx toy",
                                     "--num_validation_images", "1", "--validation_num_inference_steps", "2",
                                     "--push_to_hub", "--hub_model_id", "me/ohwx-toy", "--hub_token", TOKEN))
    arrived = hub_server.files("me/ohwx-toy")
    local = sorted(os.path.relpath(os.path.join(root, name), out).replace(os.sep, "/")
                   for root, _, names in os.walk(out) for name in names)
    expected = [p for p in local if not p.startswith(("cache/", "checkpoint-"))]
    assert sorted(arrived) == expected and arrived == on_disk(str(out), expected)
    assert {"README.md", "args.json", "pytorch_lora_weights.safetensors", "validation/step-2/grid.png"} <= set(arrived)
    assert any(p.startswith("logs/dreambooth/") for p in arrived)  # the TensorBoard events
    assert 'pipe.load_lora_weights("me/ohwx-toy"' in arrived["README.md"].decode()
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and files_holding(tmp_path, TOKEN) == []
    assert hub_server.authorizations == {f"Bearer {TOKEN}"} and hub_server.unexpected == []
