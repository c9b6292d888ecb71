"""Files: written whole or not at all, read without running anyone's code, and kept inside their folders.

Every script writes through here (masks, class images, caches, adapters, checkpoints, validation images,
reports), so a run killed at any moment leaves either a whole file under its real name or a temporary that the
next run removes. Also: fingerprints for cache validity, JSON reading with messages that name the file, the
refusal of pickled weights, and the checks that keep outputs inside the folders they belong to.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil

from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
UMASK = os.umask(0o022)  # the process's umask (read by setting it, so set straight back)
os.umask(UMASK)


# ---------------------------------------------------------------------------------------------------------------------
# Writing atomically


def fault_point(name):
    """A place where a fault test may kill this process: with DREAMBOOTH_KILL_AT="NAME:N" in the environment the
    N-th arrival at point NAME sends SIGKILL to the process itself (no cleanup runs, as after a power cut).
    Points: "write" (a finished temporary file, not yet renamed into place), "backward" (a training step's
    gradients computed, the weights not yet updated), "step" (a training step done and logged).
    With DREAMBOOTH_FAULT_LOG=FILE every arrival is appended there, so a test can choose where to kill."""
    if os.environ.get("DREAMBOOTH_FAULT_LOG"):
        with open(os.environ["DREAMBOOTH_FAULT_LOG"], "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    wanted = os.environ.get("DREAMBOOTH_KILL_AT")
    if not wanted or wanted.rsplit(":", 1)[0] != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(wanted.rsplit(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS = {}


def fsync_replace(tmp_path, final_path):
    """Flush a finished temporary file to disk and rename it into place: readers see all of it or nothing. It gets
    the permissions of any new file (0644 under the usual umask), not the 0600 of a private temporary file."""
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp_path, 0o666 & ~UMASK)
    fault_point("write")
    os.replace(tmp_path, final_path)


def tmp_name(path):
    """Where `path` is written before it is renamed into place: .tmpPID/NAME, in a hidden folder of this process
    beside it. safetensors writes through a temporary file of its own (.tmpXXXXXX beside its target), so that one
    lands in our folder too, and whatever a killed run leaves is found, with its process id, in one place."""
    return os.path.join(os.path.dirname(path), f".tmp{os.getpid()}", os.path.basename(path))


def disk_full(err):
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskFull(SystemExit):
    """A write that ran out of space: the message names the file; `path` is that file (a caller writing a folder
    of files, such as a checkpoint, can say which folder)."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary name to write `path` to; afterwards it is flushed and renamed into place, or, if writing
    failed, removed (the previous `path`, if any, is untouched). A full disk is a SystemExit naming the file."""
    tmp = tmp_name(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        yield tmp
        fsync_replace(tmp, path)
    except OSError as err:
        if disk_full(err):
            raise DiskFull(f"{path}: the disk is full ({err.strerror}); nothing half-written was kept. Free some "
                           "space (or point the output / cache folders elsewhere) and run the same command again: "
                           "it goes on from what is finished.", path) from None
        raise
    finally:
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)  # what is left in it was never renamed into place


def save_safetensors_atomic(tensors, path, metadata=None):
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_image_atomic(image, path):
    """Save a PIL image (format from the extension) so that a killed run never leaves a half-written file."""
    with atomic_file(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])


def write_text_atomic(text, path):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(obj, path):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)


def remove_stale_temporaries(folder):
    """Delete the temporaries a killed run left behind: file folders (.tmpPID/, see tmp_name) and checkpoint or
    pipeline folders (.NAME.tmp/). They were never renamed into place, so never trusted. The temporaries of a
    process still running are left alone."""
    if not os.path.isdir(folder):
        return
    for root, dirs, _ in os.walk(folder):
        for name in list(dirs):
            found = re.fullmatch(r"\.tmp(\d+)", name)
            if (found and not process_alive(int(found.group(1)))) or (name.startswith(".") and name.endswith(".tmp")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                dirs.remove(name)


def process_alive(pid):
    if pid == os.getpid():
        return False  # ours are never left over from an earlier write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Reading, and fingerprints


def read_json(path, flag=None):
    """A JSON file, or a SystemExit that names the file (and the flag that named it) and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise SystemExit(f"{flag + ' ' if flag else ''}{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def load_tensors(path):
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_digest(path, samples=16, block=1 << 16):
    """A cheap fingerprint of a large weights file: its size plus 16 blocks spread through it.

    A fine-tune changes nearly every byte, so two different checkpoints of one architecture never collide,
    yet fingerprinting a 5 GB text encoder reads 1 MB instead of 5 GB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for i in range(samples):
            handle.seek(max(0, (size - block) * i // max(1, samples - 1)))
            digest.update(handle.read(block))
    return digest.hexdigest()


def file_fingerprint(path):
    """What identifies an image's content for the cache: size, modification time and content hash."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


# ---------------------------------------------------------------------------------------------------------------------
# Safe loading: no pickles


def safe_weights(ref, allow_pickle=False, where=None):
    """The from_pretrained options that keep pickles out of a model given by local folder or hub id:
        Model.from_pretrained(ref, **safe_weights(ref, args.allow_pickle))
    A local folder with pickle weights and no safetensors exits here, naming the folder (or `where`); any other
    is loaded with use_safetensors=True, so a hub download cannot fall back to a pickle either. With
    allow_pickle (--allow_pickle) nothing is checked and from_pretrained takes whatever the model has."""
    if allow_pickle:
        return {}
    if os.path.isdir(ref):
        files = os.listdir(ref)
        pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise SystemExit(f"{where or os.path.join(ref, '')} has only pickle weights ({', '.join(pickles)}); "
                             "loading a pickle can run code. Convert it to safetensors (load it once where you "
                             "trust it and save_pretrained with safe_serialization=True), or pass --allow_pickle if "
                             "you trust its source.")
    return {"use_safetensors": True}


def refuse_pickle_only_weights(ref, folder, model_index):
    """Exit if a weighted component of a diffusers folder has pickle weights and no safetensors: unpickling a file
    someone else made can run any code. (The loaders are also told to take safetensors only.)"""
    for name, spec in model_index.items():
        part = os.path.join(folder, name)
        if not name.startswith("_") and isinstance(spec, list) and os.path.isdir(part):
            safe_weights(part, where=f"{ref}: {name}/")


# ---------------------------------------------------------------------------------------------------------------------
# Paths: outputs stay inside their folders


def inside(path, folder):
    """True when `path` is `folder` or lies under it, both resolved (symbolic links followed, `..` applied)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def folders_overlap(a, b):
    """True when two folders are the same or one lies inside the other."""
    return inside(a, b) or inside(b, a)


def confined(path, folder):
    """`path`, after checking that writing it stays inside `folder`: a name built from a data file's relative path
    must not lead elsewhere through a symbolic link planted in the output or cache tree."""
    if not inside(path, folder):
        raise SystemExit(f"{path} resolves to {os.path.realpath(path)}, outside {folder}, where it was meant to be "
                         "written (a symbolic link in that folder leads out of it); remove the link or choose "
                         "another folder")
    return path


def safe_folder_name(text):
    """`text` as one folder name: no separators or parent steps. A name that had to change gets a hash of the
    original, so two ids that clean up alike ("..", "~") still get folders of their own."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return name if name == text else f"{name or 'dataset'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
