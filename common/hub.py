"""The Hugging Face hub: fetching a base model or VAE given by its id, and publishing a finished run (--push_to_hub):
the output folder becomes a model repo.

    hub.check_push(args.hub_model_id, args.hub_token)     # before training: the repo id's form, a token at hand
    url = hub.push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)

What goes up: the weights (pytorch_lora_weights*.safetensors, or a full fine-tune's pipeline folders and ema/), the
model card README.md, args.json, validation/ (images and grids) and logs/. What stays (LEFT_OUT):
    cache/             VAE latents and text embeddings: large, and rebuilt from the data by anyone who has it
    checkpoint-STEP/   optimiser, scheduler and RNG states: several times the adapter's size, and only good for
                       resuming on this machine; pass ignore_patterns=hub.WITHOUT_CHECKPOINTS to push them too
    .tmpPID/, .NAME.tmp/, .tmpXXXX   half-written temporaries of a write in progress or of a killed run

The token is the argument, else huggingface_hub's own: the HF_TOKEN variable or the one `hf auth login` stored. It
is only ever handed to huggingface_hub, which sends it in the Authorization header; it is never printed or written,
and a text file about to go up that holds it (a copied config, a note) stops the push.

The hub is huggingface_hub's ENDPOINT: https://huggingface.co, or HF_ENDPOINT as it was when huggingface_hub was
first imported (the library reads it once). HF_HUB_OFFLINE=1 blocks the push, with a message saying so.

Used by common/models.py (fetching) and train_dreambooth.py (publishing).
"""

import os
import shlex

import huggingface_hub
from huggingface_hub import errors
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

CHECKPOINTS = "checkpoint-*/"
# Patterns match paths relative to the folder, "/" as separator; huggingface_hub reads "x/" as "x/*" and lets "*"
# cross "/", so "*/.*" catches a hidden temporary at any depth.
LEFT_OUT = ("cache/", CHECKPOINTS, ".*", "*/.*")
WITHOUT_CHECKPOINTS = tuple(pattern for pattern in LEFT_OUT if pattern != CHECKPOINTS)
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".toml", ".csv")  # searched for the token


# ---------------------------------------------------------------------------------------------------------------------
# Fetching


def download_model(ref, args):
    """A hub id -> the local snapshot folder diffusers would load from (only the parts training needs)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(
            ref, revision=args.revision, variant=args.variant, local_files_only=args.local_files_only,
            use_safetensors=None if getattr(args, "allow_pickle", False) else True, safety_checker=None,
            feature_extractor=None, image_encoder=None,
        )
    except Exception as err:
        offline = " (offline: HF_HUB_OFFLINE or --local_files_only is set)" if args.local_files_only or \
            os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise SystemExit(f"could not get model {ref!r} from the hub{offline}: {err}. Check the id, or give a local "
                         "diffusers folder.") from None


def download_vae(ref, args):
    """--pretrained_vae_model_name_or_path as a hub id -> its local snapshot (configs and safetensors weights)."""
    try:
        return huggingface_hub.snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"],
                                                 local_files_only=args.local_files_only)
    except Exception as err:
        raise SystemExit(f"--pretrained_vae_model_name_or_path {ref}: could not get it from the hub: {err}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Publishing


def usable_token(token):
    """The token to push with: the argument, else huggingface_hub's own (HF_TOKEN, then the stored login)."""
    token = token or huggingface_hub.get_token()
    if not token:
        raise SystemExit("--push_to_hub needs a hub token with write access: pass --hub_token TOKEN, set HF_TOKEN, "
                         "or log in once with `hf auth login` (`huggingface-cli login` in older huggingface_hub)")
    return token


def check_push(repo_id, token=None):
    """What can be known before training, so that a long run does not end on a typo: the repo id's form and that
    there is a token. Whether the hub accepts the token is only known when it is asked, at the push."""
    try:
        validate_repo_id(repo_id)
    except errors.HFValidationError:
        raise SystemExit(f"--hub_model_id {repo_id!r} is not a hub repo id: NAME or NAMESPACE/NAME, with letters, "
                         f"digits, '-', '_' and '.' (at most 96 characters)") from None
    usable_token(token)


def files_to_push(folder, ignore_patterns):
    """The paths (relative, "/"-separated, sorted) that upload_folder will send: the same filter it applies. It
    sends what a linked file points to (a linked folder it skips), so a link that would go up stops the push: it
    could lead anywhere, ~/.cache/huggingface/token included."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    paths = sorted(filter_repo_objects(found, ignore_patterns=list(ignore_patterns)))
    for path in paths:
        if os.path.islink(os.path.join(folder, path)):
            raise SystemExit(f"{os.path.join(folder, path)} is a symbolic link, and the hub would get the file it "
                             f"points to: replace it with a copy, or remove it, before pushing")
    return paths


def refuse_leaked_token(folder, paths, token):
    """Stop before uploading a text file that holds the token (a config or note a person copied into the folder):
    a public repo would publish it. Only the file is named, never the token."""
    for path in paths:
        if path.lower().endswith(TEXT_SUFFIXES):
            with open(os.path.join(folder, path), "rb") as handle:
                if token.encode() in handle.read():
                    raise SystemExit(f"{os.path.join(folder, path)} contains your hub token; remove it (and revoke "
                                     f"the token if the file was ever shared) before pushing")


def retry_hint(repo_id, folder, ignore_patterns):
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in ignore_patterns)
    return (f"The trained files stay in {folder}; push them later with: "
            f"hf upload {repo_id} {shlex.quote(folder)} . {excludes}")


def refusal(err, repo_id, folder, ignore_patterns, endpoint):
    """The SystemExit message for a failed push: what went wrong, and what to do about it."""
    hint = retry_hint(repo_id, folder, ignore_patterns)
    if isinstance(err, errors.OfflineModeIsEnabled):  # not a "cannot reach": the library would not even try
        return f"cannot push to the hub: HF_HUB_OFFLINE is set. Unset it to push. {hint}"
    if not isinstance(err, errors.HfHubHTTPError):  # no answer at all: DNS, refused connection, timeout
        return (f"cannot reach the hub at {endpoint} ({type(err).__name__}): no network, or HF_ENDPOINT points "
                f"nowhere. {hint}")
    status = err.response.status_code
    said = f" The hub said: {err.server_message.strip().rstrip('.')}." if err.server_message else ""
    if status in (401, 403):
        return (f"the hub refused to let you write to {repo_id} ({status}).{said} Pass a token with write access "
                f"as --hub_token TOKEN (https://huggingface.co/settings/tokens), or log in once with "
                f"`hf auth login` (`huggingface-cli login` in older huggingface_hub); the repo's namespace must be "
                f"your user or an organisation you can write to. {hint}")
    if status == 404:
        return (f"the hub has no repo {repo_id} you can write to (404).{said} Check --hub_model_id: NAMESPACE/NAME, "
                f"or just NAME for your own user. {hint}")
    return f"the hub refused the push to {repo_id} ({status}).{said} {hint}"


COMMIT_MESSAGE = "Upload DreamBooth training output"


def push_folder(folder, repo_id, token=None, private=False, say=print, ignore_patterns=LEFT_OUT):
    """Create the model repo `repo_id` (kept if it exists) and upload `folder` to it, less `ignore_patterns`, in one
    push. private=True makes a new repo private, and refuses to fill an existing public one. Returns the repo's
    URL; raises SystemExit with a message a person can act on when the hub refuses or cannot be reached."""
    check_push(repo_id, token)
    paths = files_to_push(folder, ignore_patterns)
    if not paths:
        raise SystemExit(f"{folder}: nothing to push (no files outside {', '.join(ignore_patterns)})")
    token = usable_token(token)
    refuse_leaked_token(folder, paths, token)
    api = huggingface_hub.HfApi(token=token)  # its endpoint: huggingface_hub's, read from HF_ENDPOINT at import
    size = sum(os.path.getsize(os.path.join(folder, path)) for path in paths)
    say(f"pushing {len(paths)} files ({size / 2**20:.1f} MiB) from {folder} to {repo_id} on {api.endpoint}")
    try:
        # private=None, not False, for a public repo: False would override an organisation that defaults to private
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.model_info(url.repo_id).private:
            raise SystemExit(f"{url.repo_id} already exists and is public, and --hub_private_repo does not change "
                             f"an existing repo: make it private on the hub, or choose another --hub_model_id")
        # url.repo_id has the namespace the hub chose when repo_id was a bare NAME; a list, because upload_folder
        # appends its own patterns to the one it is given
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=COMMIT_MESSAGE,
                          ignore_patterns=list(ignore_patterns))
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.HTTPError) as err:
        raise SystemExit(refusal(err, repo_id, folder, ignore_patterns, api.endpoint)) from None
    say(f"pushed to {url}")
    return str(url)
