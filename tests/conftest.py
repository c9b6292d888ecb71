"""Fixtures: tiny randomly initialised diffusers models (built in well under a second) and small image sets.

The model configs live in examples/make_demo.py (the demo builds the same tiny models); each family is built
once per test session into a temporary folder and loaded from there like any local model."""

import http.server
import json
import os
import socket
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded during the tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import pytest  # noqa: E402

import make_demo  # noqa: E402


FLOW = ("sd3", "flux", "chroma")  # tiny models (by name prefix) trained by flow matching


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, prediction_type="epsilon") -> path of a saved tiny pipeline (cached per session)."""
    built = {}

    def get(family="sd1", prediction_type="epsilon"):
        if family.startswith(FLOW):  # flow matching: there is no other prediction type
            prediction_type = "flow"
        key = (family, prediction_type)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"model-{family}-{prediction_type}")
            built[key] = make_demo.build_tiny_model(str(folder), family, prediction_type)
        return built[key]

    return get


@pytest.fixture
def subject_dir(tmp_path):
    """Eight synthetic subject images: four square, two portrait, two landscape."""
    return make_demo.make_subject_images(str(tmp_path / "subject"))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle)
    return str(path)


def first_batches_are_prior_then_mixed(data_config, seed, steps):
    """True when, for this seed, the batch stream starts with a regularisation batch and has another one after
    the first instance batch (so a test sees the prior loss both at step 0 and once the adapter has learned)."""
    from common import data
    import train_dreambooth

    args = train_dreambooth.parse_args(["--data_backend_config", data_config])
    datasets = data.load_datasets(args)
    plans = data.plan_datasets(datasets, seed)
    sampler = train_dreambooth.BatchSampler(datasets, plans, 1, seed)
    kinds = [sampler.next()[0][0].is_regularisation for _ in range(steps)]
    return kinds[0] and False in kinds and True in kinds[kinds.index(False):]


def model_info(path, **overrides):
    """models.resolve_model for a local model folder, with the flags a script would pass."""
    import argparse

    from common import models

    values = dict(pretrained_model_name_or_path=str(path), output_dir="unused", cache_dir=None, variant=None,
                  revision=None, local_files_only=True, single_file_config=None)
    return models.resolve_model(argparse.Namespace(**{**values, **overrides}))


def stock_pipeline(path):
    """The model's own diffusers pipeline, as a user loads it (an SD3 without T5 says so, as diffusers asks)."""
    from diffusers import DiffusionPipeline

    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as handle:
        missing = {name: None for name, value in json.load(handle).items() if value == [None, None]}
    return DiffusionPipeline.from_pretrained(path, local_files_only=True, **missing)


def unet_inputs(unet, family, seed=0, size=8):
    """A fixed noisy latent, timestep and conditioning for comparing UNet (or SD3 / FLUX transformer) predictions."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    if family.startswith(FLOW):
        return transformer_inputs(config, family, generator, size)
    if family.startswith("if"):  # pixels (3 channels); T5's 77 positions, projected by the UNet (encoder_hid_dim);
        # stage II: the enlarged low-resolution picture as 3 more channels, its noise level as the class label
        inputs = {"sample": torch.randn(1, config.in_channels, 2 * size, 2 * size, generator=generator),
                  "timestep": torch.tensor([321]),
                  "encoder_hidden_states": torch.randn(1, 77, config.encoder_hid_dim, generator=generator)}
        return {**inputs, "class_labels": torch.tensor([100])} if family == "if-ii" else inputs
    inputs = {"sample": torch.randn(1, 4, size, size, generator=generator), "timestep": torch.tensor([321]),
              "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator)}
    if family in ("sdxl", "sdxl-refiner"):  # the refiner's time ids: sizes, crop and an aesthetic score (5 values)
        time_ids = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0] if family == "sdxl" else [64.0, 64.0, 0.0, 0.0, 7.0]
        pooled = config.projection_class_embeddings_input_dim - len(time_ids) * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([time_ids])}
    return inputs


def transformer_inputs(config, family, generator, size):
    """SD3: a latent, a timestep of 0-1000; FLUX: packed tokens with their ids, a noise level, dev's guidance;
    Chroma: FLUX's without a pooled vector, with the text's attention mask (the image tokens' appended); FLUX.2 klein:
    patchified tokens with 4-D ids."""
    import torch

    from common.families import flux

    text = torch.randn(1, 10, config.joint_attention_dim, generator=generator)
    if family == "flux2-klein":  # patchified latents as 16-channel tokens; 4-D ids, the text's along the layer axis
        from common.families.flux2 import position_ids

        tokens = torch.randn(1, size * size // 4, config.in_channels, generator=generator)
        return {"hidden_states": tokens, "timestep": torch.tensor([0.321]), "encoder_hidden_states": text,
                "txt_ids": position_ids(1, layers=10), "img_ids": position_ids(1, size // 2, size // 2)}
    pooled = None if family == "chroma" else torch.randn(1, config.pooled_projection_dim, generator=generator)
    latent = torch.randn(1, 16, size, size, generator=generator)
    if family == "chroma":
        mask = torch.cat([torch.tensor([[1.0] * 6 + [0.0] * 4]), torch.ones(1, size * size // 4)], dim=1)
        return {"hidden_states": flux.pack(latent), "timestep": torch.tensor([0.321]), "encoder_hidden_states": text,
                "img_ids": flux.image_ids(size, size), "txt_ids": torch.zeros(10, 3), "attention_mask": mask}
    if family.startswith("sd3"):
        return {"hidden_states": latent, "timestep": torch.tensor([321.0]), "encoder_hidden_states": text,
                "pooled_projections": pooled}
    inputs = {"hidden_states": flux.pack(latent), "timestep": torch.tensor([0.321]), "encoder_hidden_states": text,
              "pooled_projections": pooled, "img_ids": flux.image_ids(size, size), "txt_ids": torch.zeros(10, 3)}
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([1.0])
    return inputs


def predict(unet, inputs):
    """The UNet's (or transformer's) prediction in eval mode (no dropout), without gradients."""
    import torch

    with torch.no_grad():
        return unet.eval()(**inputs, return_dict=False)[0]


def resolution_for(model):
    """What the tests train a tiny model at: 64 px (8 x 8 latents); IF, in pixel space, at 32 px (stage II enlarges
    8 px pictures to that)."""
    with open(os.path.join(model, "model_index.json"), encoding="utf-8") as handle:
        return 32 if json.load(handle)["_class_name"].startswith("IF") else 64


def train_argv(model, data_dir, output_dir, *extra, prompt="a photo of ohwx toy", resolution=None):
    """Command-line flags for a short, fast training run on a tiny model (at resolution_for(model) unless given)."""
    resolution = resolution or resolution_for(model)
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data_dir, "--instance_prompt", prompt,
            "--output_dir", str(output_dir), "--resolution", str(resolution), "--seed", "7", "--train_batch_size", "2",
            "--max_train_steps", "4", "--learning_rate", "1e-3", "--lora_rank", "4", *map(str, extra)]


def first_step(model, data_dir, output_dir, *extra):
    """Train one step of batch 1 at learning rate 0 and replay what it drew: (the logged loss, the model's info, the
    batch's cache entry and caption, the batch's generator, positioned where the step began drawing)."""
    import train_dreambooth
    from common import data

    argv = train_argv(model, data_dir, output_dir, "--max_train_steps", "1", "--train_batch_size", "1",
                      "--learning_rate", "0", *extra)
    train_dreambooth.main(argv)
    with open(os.path.join(output_dir, "logs", "train_log.jsonl"), encoding="utf-8") as handle:
        logged = json.loads(handle.readline())["loss"]
    datasets, info, plans = data.prepare(train_dreambooth.parse_args(argv), print_fn=lambda *a: None)
    [(entry, caption)] = train_dreambooth.BatchSampler(datasets, plans, 1, 7).next()
    return logged, info, entry, caption, train_dreambooth.batch_generator(7, 0)


def resumed_weights(argv, whole, resumed, checkpoint):
    """Train again from `whole`'s folder `checkpoint` into `resumed` (the same flags, --resume_from_checkpoint
    latest); returns (the uninterrupted run's adapter file, the resumed run's) as tensor dicts."""
    import shutil

    from safetensors.torch import load_file

    import train_dreambooth

    os.makedirs(resumed)
    shutil.copytree(os.path.join(whole, checkpoint), os.path.join(resumed, checkpoint))
    train_dreambooth.main([*argv[:argv.index("--output_dir")], "--output_dir", str(resumed),
                           *argv[argv.index("--output_dir") + 2:], "--resume_from_checkpoint", "latest"])
    return [load_file(os.path.join(folder, "pytorch_lora_weights.safetensors")) for folder in (whole, resumed)]


# ---------------------------------------------------------------------------------------------------------------------
# Shared by several test files

# The two data backend examples of the reference document (shared/reference/000_64cdcace096bbce0.txt), verbatim.
# Only their "/training/..." paths are moved under tmp_path by `relocate`.

REFERENCE_MASKED_LOSS = r"""
[
    {
        "id": "dreambooth-data",
        "type": "local",
        "dataset_type": "image",
        "conditioning_data": "dreambooth-conditioning",
        "instance_data_dir": "/training/datasets/test_datasets/dreambooth",
        "cache_dir_vae": "/training/cache/vae/sdxl/dreambooth-data",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "an dreambooth",
        "metadata_backend": "discovery",
        "resolution": 1024,
        "minimum_image_size": 1024,
        "maximum_image_size": 1024,
        "target_downsample_size": 1024,
        "crop": true,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution_type": "pixel_area"
    },
    {
        "id": "dreambooth-conditioning",
        "type": "local",
        "dataset_type": "conditioning",
        "instance_data_dir": "/training/datasets/test_datasets/dreambooth_mask",
        "resolution": 1024,
        "minimum_image_size": 1024,
        "maximum_image_size": 1024,
        "target_downsample_size": 1024,
        "crop": true,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution_type": "pixel_area",
        "conditioning_type": "mask"
    },
    {
        "id": "an example backend for text embeds.",
        "dataset_type": "text_embeds",
        "default": true,
        "type": "local",
        "cache_dir": "/training/cache/text/sdxl-base/masked_loss"
    }
]
"""

REFERENCE_MIXED_RESOLUTION = r"""
[
    {
        "id": "subjectname-data-512px",
        "type": "local",
        "instance_data_dir": "/training/datasets/subjectname",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "subjectname",
        "cache_dir_vae": "/training/vae_cache/subjectname",
        "repeats": 100,
        "crop": false,
        "resolution": 512,
        "resolution_type": "pixel_area",
        "minimum_image_size": 192
    },
    {
        "id": "subjectname-data-1024px",
        "type": "local",
        "instance_data_dir": "/training/datasets/subjectname",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "subjectname",
        "cache_dir_vae": "/training/vae_cache/subjectname-1024px",
        "repeats": 100,
        "crop": false,
        "resolution": 1024,
        "resolution_type": "pixel_area",
        "minimum_image_size": 768
    },
    {
        "id": "regularisation-data",
        "type": "local",
        "instance_data_dir": "/training/datasets/regularisation",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "a picture of a man",
        "cache_dir_vae": "/training/vae_cache/regularisation",
        "repeats": 0,
        "resolution": 512,
        "resolution_type": "pixel_area",
        "minimum_image_size": 192,
        "is_regularisation_data": true
    },
    {
        "id": "regularisation-data-1024px",
        "type": "local",
        "instance_data_dir": "/training/datasets/regularisation",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "a picture of a man",
        "cache_dir_vae": "/training/vae_cache/regularisation-1024px",
        "repeats": 0,
        "resolution": 1024,
        "resolution_type": "pixel_area",
        "minimum_image_size": 768,
        "is_regularisation_data": true
    },
    {
        "id": "textembeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": true,
        "cache_dir": "/training/text_cache/sdxl_base"
    }
]
"""


def relocate(text, root):
    """The reference JSON with every '/training/...' path moved under `root`; instance folders created."""
    moved = text.replace('"/training/', json.dumps(str(root) + "/training/")[:-1])
    for entry in json.loads(moved):
        if "instance_data_dir" in entry:
            os.makedirs(entry["instance_data_dir"], exist_ok=True)
    return moved


def prior_data(tmp_path, subject_dir, class_images=4, repeats=1, resolution=64):
    reg = make_demo.make_subject_images(str(tmp_path / "class"), sizes=((64, 64),) * class_images)
    return write_json(tmp_path / "data.json", [
        {"id": "subject", "instance_data_dir": subject_dir, "instance_prompt": "a photo of ohwx toy",
         "resolution": resolution, "repeats": repeats},
        {"id": "class", "instance_data_dir": reg, "instance_prompt": "a photo of a toy", "resolution": resolution,
         "is_regularization_data": True},
    ])


def prior_argv(model, data, output_dir, seed, *extra):
    return ["--pretrained_model_name_or_path", model, "--data_backend_config", data, "--output_dir", str(output_dir),
            "--seed", str(seed), "--train_batch_size", "1", "--learning_rate", "5e-3", "--lora_rank", "4",
            *map(str, extra)]


@pytest.fixture(scope="session")
def tiny_clipseg(tmp_path_factory):
    """A tiny random CLIPSeg model with its processor, saved as a local folder (64 px input, the real one 352)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

    import torch

    folder = str(tmp_path_factory.mktemp("clipseg"))
    tokenizer = make_demo.tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, image_size=64,
                  patch_size=16)
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=32,
                                                      extract_layers=[1, 2], reduce_dim=16,
                                                      decoder_num_attention_heads=2, decoder_intermediate_size=32))
    model.save_pretrained(folder)
    image_processor = ViTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory):
    """(CLIP folder, DINO folder): tiny random CLIPModel + CLIPProcessor and ViTModel + image processor, 32 px."""
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, ViTConfig,
                              ViTImageProcessorPil, ViTModel)

    import torch

    clip_folder, dino_folder = (str(tmp_path_factory.mktemp(name)) for name in ("clip", "dino"))
    tokenizer = make_demo.tiny_tokenizer()
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **layers)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **layers),
                         projection_dim=16)).save_pretrained(clip_folder)
    pixels = dict(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                              "width": 32}),
                  tokenizer=tokenizer).save_pretrained(clip_folder)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **layers), add_pooling_layer=False).save_pretrained(dino_folder)
    ViTImageProcessorPil(**pixels).save_pretrained(dino_folder)
    return clip_folder, dino_folder


# Local HTTP servers for the webhook and hub tests


def serve_locally(handler):
    """Start a threaded HTTP server on a free local port with this request handler class: (server, its URL)."""
    handler.log_message = lambda self, *args: None  # keep pytest's output quiet
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class Server:
    """A local HTTP server that answers every POST with `status`, or never (until the test ends) when `hang`."""

    def __init__(self, status=200, hang=False):
        self.requests, self.status, self.hang = [], status, hang
        self.release = threading.Event()  # lets hanging handlers go at teardown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                        "body": body})
                if server.hang:
                    server.release.wait(10)
                    return
                self.send_response(server.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd, self.url = serve_locally(Handler)

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    """serve(status=200, hang=False) -> a running Server, stopped at the end of the test."""
    servers = []

    def start(**kwargs):
        servers.append(Server(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def dead_url():
    """The URL of a port nobody listens on: bound once to get a free number, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
