"""Checkpoints, exact resume, the training log, and a full fine-tune's saved pipeline.

Used by train_dreambooth.py (save, resume, log) and evaluate.py (list the checkpoints, read the log). A
checkpoint-STEP folder holds the trainable weights, the optimiser, lr schedule and RNG states, the EMA, the
adapter files as in the output folder, and training_state.json, written last: a folder without it is incomplete
and ignored. A resumed run ends with the weights, checkpoints and log of an uninterrupted one.
"""

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
from safetensors import safe_open

from common import adapters, files, models

STATE_FILE = "training_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
EMA_CHECKPOINT_FILE = "ema.safetensors"
LOG_FILE = "train_log.jsonl"
TRACKER_PROJECT = "dreambooth"  # TensorBoard: OUTPUT_DIR/logs/dreambooth; wandb: the project's name


# What a sharded (FSDP) run refuses, each with the reason: flag -> (is it set?, why it cannot run sharded yet).
SHARDED_REFUSALS = {
    "--validation_prompt": (lambda a: a.validation_prompt, "validation renders on the main process alone, and a "
                            "sharded model needs every process for each forward pass: render the checkpoints' "
                            "adapters with evaluate.py afterwards"),
    "--eval_steps_interval": (lambda a: a.eval_steps_interval, "the stable eval loss runs on the main process alone "
                              "(a sharded forward needs every process): evaluate.py computes it from the checkpoints"),
    "--use_ema": (lambda a: a.use_ema, "the average is kept whole by the main process, which holds a shard only"),
    "--dop_class": (lambda a: a.dop_class is not None, "only instance batches run the base model for it, and a "
                    "sharded forward pass needs every process"),
    "--scheduled_sampling_max_step_offset": (lambda a: a.scheduled_sampling_max_step_offset, "each process rolls "
                                             "out a different number of samples, and a sharded forward pass needs "
                                             "all of them at once"),
    "--lora_type lycoris": (lambda a: a.lora_type == "lycoris", "LyCORIS replaces the layers' forward passes and "
                            "keeps its weights in a network of its own, outside the sharded model"),
    "--train_text_encoder": (lambda a: a.train_text_encoder, "the text encoders run outside the sharded model, each "
                             "process holding them whole"),
    "--base_model_precision": (lambda a: a.base_model_precision != "no_change", "quantised weights cannot be "
                               "sharded; quantise to fit one card instead (the README's memory plan)"),
    "--optimizer adamw8bit": (lambda a: a.optimizer == "adamw8bit" or a.use_8bit_adam,
                              "bitsandbytes' 8-bit state does not take sharded parameters"),
    "--optimizer prodigy": (lambda a: a.optimizer == "prodigy", "its step-size estimate sums over whole parameters; "
                            "each process would estimate from its shard alone"),
    "--optimizer adafactor": (lambda a: a.optimizer == "adafactor", "its factored moments are plain tensors beside "
                              "sharded parameters"),
}


@dataclass
class TrainingState:
    """What a checkpoint holds and a resume restores: the trained model (as prepared: DDP / FSDP), its optimiser and
    lr schedule, the batch stream, the EMA, the seed, the NaN batches skipped so far, and the run's shape
    (`shape`: train_batch_size, gradient_accumulation_steps, model_type, ema_warmup), recorded so a resume with
    another shape is noticed."""

    model: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    sampler: object
    seed: int
    shape: dict
    ema: object = None
    skipped_nan: int = 0


def check_sharding(accelerator, args):
    """FSDP shards the model across the processes (each holds 1/N of every parameter), for a model whose full
    fine-tune does not fit one card. accelerate selects it from an FSDP config on GPUs only: on CPUs the same config
    would run as plain data parallel, so that is refused rather than swapped silently. Sharded runs use FSDP2 (per
    parameter: the trainable weights stay addressable by name), and refuse what needs the whole model on one
    process, each with its reason. Returns the accelerator."""
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return accelerator
    if accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit(f"the accelerate config asks for FSDP, but accelerate shards only on GPUs: here it would "
                         f"run as {accelerator.distributed_type.value} (each process holding the whole model). "
                         "Use a config without FSDP (DDP) on this machine.")
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SystemExit("the accelerate config asks for FSDP version 1; this trainer shards with FSDP2 (set "
                         "'fsdp_version: 2' as examples/fsdp.yaml does): FSDP1 flattens the parameters, so the LoRA "
                         "and checkpoint weights could not be found by name")
    refused = [f"{flag}: {why}" for flag, (used, why) in SHARDED_REFUSALS.items() if used(args)]
    if refused:
        raise SystemExit("not available in a sharded (FSDP) run yet:\n  " + "\n  ".join(refused))
    return accelerator


def is_sharded(accelerator):
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def whole_weights(accelerator, model, names):
    """For saving: under FSDP the named parameters are gathered from every process's shard (every process takes
    part) and put into the main process's model whole, in system memory, for the duration of the block; then the
    shards return. The block's saving code reads the model as in an unsharded run. Without FSDP: nothing to do."""
    if not is_sharded(accelerator):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules, swapped, sharded_class = dict(model.named_modules()), [], type(model)
    try:
        for name in names:
            owner, attr = name.rpartition(".")[::2]
            module = modules[owner]
            shard = module._parameters[attr]
            whole = shard.full_tensor()  # a collective: every process gathers every parameter, in the same order
            if accelerator.is_main_process:
                module._parameters[attr] = torch.nn.Parameter(whole.detach().cpu(), requires_grad=shard.requires_grad)
                swapped.append((module, attr, shard))
            del whole
        # fully_shard renamed the model's class (FSDPFluxTransformer2DModel): a saved config must name the real one
        model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
        yield
    finally:
        model.__class__ = sharded_class
        for module, attr, shard in swapped:
            module._parameters[attr] = shard


def load_whole_weights(accelerator, model, path):
    """A checkpoint's whole trainable weights (trainable.safetensors) into the model: copied, or under FSDP read by
    the main process alone (a full fine-tune's file is the whole model) and sent out cut into each process's shard."""
    if not is_sharded(accelerator):
        model.load_state_dict(files.load_tensors(path), strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = files.load_tensors(path) if accelerator.is_main_process else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=False))


def optimizer_file(accelerator):
    """Unsharded: one optimizer.pt, the main process's. Sharded: each process's own shard of the state."""
    return f"optimizer_{accelerator.process_index}.pt" if is_sharded(accelerator) else "optimizer.pt"


def optimizer_state(optimizer):
    """The optimiser's state to save: sharded moments (DTensors) as this process's plain local tensors, so the file
    loads with weights_only like any other."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    return {**state, "state": {key: {name: value.to_local() if isinstance(value, DTensor) else value
                                     for name, value in moments.items()}
                               for key, moments in state["state"].items()}}


def restore_optimizer(optimizer, state):
    """optimizer_state's inverse: each local moment becomes a shard of its parameter's layout again."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, moments in state["state"].items():
        param = params[int(key)]
        if isinstance(param, DTensor):
            for name, value in moments.items():
                if value.shape == param.to_local().shape and value.dim():
                    moments[name] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                       run_check=False, shape=param.shape, stride=param.stride())
    optimizer.load_state_dict(state)


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first. A folder without its state file (a broken copy) is skipped, loudly."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            path = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(name[len("checkpoint-"):]), path))
            else:
                print(f"warning: {path} is incomplete (no {STATE_FILE}); it is ignored")
    return [path for _, path in sorted(found)]


def resume_checkpoint_path(args):
    """The checkpoint --resume_from_checkpoint names (latest: the newest complete one), or None to start fresh."""
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; starting fresh")
            return None
        return found[-1]
    path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise SystemExit(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, state, step, output_dir, keep=None, save_outputs=None):
    """Write output_dir/checkpoint-STEP atomically: everything goes into a hidden temporary folder, the state file
    last, then one rename. A run killed at any moment leaves either the whole checkpoint or none. `save_outputs(folder,
    step)` adds the adapter files, so a checkpoint loads (and evaluates) exactly like a final output; `keep` (the
    newest N) rotates the older ones out."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        # Each process keeps its own RNG state (dropout draws differ per rank).
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(tmp, f"rng_{accelerator.process_index}.pt"))
        if is_sharded(accelerator) or accelerator.is_main_process:  # sharded: each process its shard of the state
            torch.save(optimizer_state(state.optimizer), os.path.join(tmp, optimizer_file(accelerator)))
        model = accelerator.unwrap_model(state.model)
        with whole_weights(accelerator, model, adapters.trainable_parameters(model)):
            if accelerator.is_main_process:
                weights = adapters.trainable_parameters(model)
                files.save_safetensors_atomic(weights, os.path.join(tmp, "trainable.safetensors"))
                torch.save(state.lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                if accelerator.scaler is not None:
                    torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
                if state.ema is not None:
                    files.save_safetensors_atomic(state.ema.shadow, os.path.join(tmp, EMA_CHECKPOINT_FILE))
                if save_outputs is not None:
                    save_outputs(tmp, step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in os.listdir(tmp):
                if os.path.isfile(os.path.join(tmp, name)):
                    with open(os.path.join(tmp, name), "rb") as handle:
                        os.fsync(handle.fileno())
            ema = state.ema
            files.write_json_atomic({
                "step": step, "batches_drawn": state.sampler.drawn, "seed": state.seed,
                "train_batch_size": state.shape["train_batch_size"],
                "gradient_accumulation_steps": state.shape["gradient_accumulation_steps"],
                "num_processes": accelerator.num_processes, "model_type": state.shape["model_type"],
                "ema_updates": ema.updates if ema is not None else None,
                "ema_warmup": state.shape["ema_warmup"] if ema is not None else None,
                "skipped_nan_batches": state.skipped_nan,  # --skip_nan_steps counts over the whole run, resumes too
            }, os.path.join(tmp, STATE_FILE))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException as err:  # a full disk, a write error, an interrupt: the temporary folder goes, older
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints stay as they are
        full = isinstance(err, files.DiskFull)
        if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and not full):
            raise
        reason = (f"the disk is full while writing {os.path.basename(err.path)}" if full
                  else f"{type(err).__name__}: {err}")
        raise SystemExit(f"could not write checkpoint {final} ({reason}); nothing of it was kept and the earlier "
                         "checkpoints are intact. Free some disk space and rerun with --resume_from_checkpoint "
                         "latest.") from None
    if accelerator.is_main_process and keep:  # rotation: keep the newest --checkpoints_total_limit checkpoints
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def drop_poisoned_batch(state, loss, step, limit, output_dir, say):
    """A NaN or infinite loss: its gradients are dropped and the step still counts (so the data order and the
    schedule stay the run's); past `limit` (--skip_nan_steps) such batches the run stops, naming the last good
    checkpoint in `output_dir`. Counts the batch in state.skipped_nan."""
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped_nan += 1
    if state.skipped_nan > limit:
        latest = list_checkpoints(output_dir)
        raise SystemExit(
            f"loss became {loss} at step {step}; stopping"
            + (f" ({state.skipped_nan - 1} bad batches skipped before)" if limit else "")
            + f". Last good checkpoint: {latest[-1] if latest else 'none'}. Try a lower --learning_rate, "
            "--mixed_precision no, or --skip_nan_steps N to drop up to N bad batches.")
    say(f"\nloss became {loss} at step {step}: batch skipped ({state.skipped_nan} of at most {limit})")
    with warnings.catch_warnings():  # a scheduler step with no optimiser step yet is what we mean here
        warnings.simplefilter("ignore", UserWarning)
        state.lr_scheduler.step()


def load_state(path):
    """A checkpoint's optimiser / schedule / RNG file: plain tensors and numbers only (weights_only), so a
    tampered file cannot run code on load; anything else is refused, naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError for a foreign object, RuntimeError / EOFError for a damaged file
        raise SystemExit(f"{path}: not a training state file this script wrote ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); it is damaged or was replaced. Resume from another "
                         "checkpoint, or delete this one.") from None


def load_checkpoint(path, accelerator, state):
    """Restore weights, optimizer, lr schedule, RNG and the EMA into `state` (a TrainingState); returns the
    checkpoint's training_state.json."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        saved = json.load(handle)
    model, ema = accelerator.unwrap_model(state.model), state.ema
    weights_path = os.path.join(path, "trainable.safetensors")
    with safe_open(weights_path, framework="pt") as handle:
        missing = set(adapters.trainable_parameters(model)) - set(handle.keys())
    if missing:
        raise SystemExit(f"{path} does not match this run's trainable weights (missing e.g. {sorted(missing)[0]}); "
                         "was it written with other --model_type / --lora_* settings?")
    if is_sharded(accelerator) and saved["num_processes"] != accelerator.num_processes:
        raise SystemExit(f"{path} holds the optimiser state of {saved['num_processes']} sharded processes; resume it "
                         f"with {saved['num_processes']} (this run has {accelerator.num_processes})")
    load_whole_weights(accelerator, model, weights_path)
    optimizer_path = os.path.join(path, optimizer_file(accelerator))
    if not os.path.isfile(optimizer_path):
        written = "an unsharded" if os.path.isfile(os.path.join(path, "optimizer.pt")) else "a sharded (FSDP)"
        raise SystemExit(f"{path} has no {os.path.basename(optimizer_path)}: {written} run of {saved['num_processes']} "
                         "process(es) wrote it; resume it with the same accelerate config and number of processes")
    restore_optimizer(state.optimizer, load_state(optimizer_path))
    state.lr_scheduler.load_state_dict(load_state(os.path.join(path, "scheduler.pt")))
    if accelerator.scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        accelerator.scaler.load_state_dict(load_state(os.path.join(path, "scaler.pt")))
    rng_file = os.path.join(path, f"rng_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        rng = load_state(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    ema_file = os.path.join(path, EMA_CHECKPOINT_FILE)
    if ema is not None and saved.get("ema_warmup", ema.warmup) != ema.warmup:  # its decays would differ from here on
        print(f"warning: {path} was written with --ema_warmup {saved['ema_warmup']}, this run has {ema.warmup}: "
              "the average will differ from an uninterrupted run's")
    if ema is not None and os.path.isfile(ema_file):
        for name, value in files.load_tensors(ema_file).items():
            ema.shadow[name].copy_(value)
        ema.updates = saved["ema_updates"]
    elif ema is not None:
        print(f"warning: {path} holds no EMA (the run had no --use_ema); the average starts from the resumed weights")
        with torch.no_grad():
            for name, param in adapters.trainable_parameters(model).items():
                ema.shadow[name].copy_(param)
        ema.updates = 0
    return saved


def resume(accelerator, state, resume_path):
    """Resume `state` (a TrainingState) from `resume_path` (or start afresh when None): weights, optimiser,
    schedule, RNG and EMA restored, the batch stream replayed up to the checkpoint, the NaN batches skipped so far
    counted. Returns the first step."""
    if not resume_path:
        return 0
    saved = load_checkpoint(resume_path, accelerator, state)
    for key in ("train_batch_size", "gradient_accumulation_steps", "num_processes"):
        current = accelerator.num_processes if key == "num_processes" else state.shape[key]
        if saved.get(key) != current:
            accelerator.print(f"warning: {key} was {saved.get(key)} in {resume_path}, now {current}: the data order "
                              "will differ from an uninterrupted run")
    for _ in range(saved["batches_drawn"]):  # replay the batch stream up to the checkpoint
        state.sampler.next()
    state.skipped_nan = saved.get("skipped_nan_batches", 0)
    accelerator.print(f"resumed from {resume_path} at step {saved['step']}")
    return saved["step"]


def save_full_model(info, model, frozen, output_dir, ema=None, trainable=None):
    """A full fine-tune (trained in fp32) as a pipeline in output_dir, with the frozen parts in fp32 beside it, and
    with an EMA its average as output_dir/ema, loadable the same way."""
    vae, tokenizers, text_encoders = frozen
    vae = vae and vae.to(torch.float32)  # (IF has none)
    text_encoders = [encoder.to(torch.float32) for encoder in text_encoders]
    save_full_pipeline(info, model, vae, tokenizers, text_encoders, output_dir)
    if ema is not None:
        with ema.applied(trainable):
            save_full_pipeline(info, model, vae, tokenizers, text_encoders,
                               os.path.join(output_dir, adapters.EMA_SUFFIX[1:]))


def save_full_pipeline(info, unet, vae, tokenizers, text_encoders, output_dir):
    """A full fine-tune as a complete diffusers pipeline in output_dir, moved into place file by file with
    model_index.json last, so the folder only looks like a model once it is one."""
    pipe = models.build_pipeline(info, unet, vae, tokenizers, text_encoders)
    tmp = os.path.join(output_dir, ".pipeline.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):  # an earlier pipeline here stops being a model while its parts are replaced
        os.remove(index)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "model_index.json"):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        files.fault_point("write")
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


# ---------------------------------------------------------------------------------------------------------------------
# The training log


def read_log(path, until_step=None):
    """The records of a train_log.jsonl (up to `until_step`), without a last line a killed run left unfinished."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cut off by a kill mid-write
                if until_step is None or record["step"] <= until_step:
                    records.append(record)
    return records


class JsonlLog:
    """One JSON object per line, and the same numbers (and the validation grids) to the --report_to trackers.

    The log is the run's record, so it must read like an uninterrupted run's: a resumed run (`resumed_at` = the
    checkpoint's step) keeps the lines up to that step and drops the rest (steps it will redo, and a line a kill
    cut in half); a run that starts afresh starts an empty log. TensorBoard purges its events past that step too.
    `accelerator`: an Accelerator made with log_with (tracker_names); `config`: the run's flags for the trackers."""

    def __init__(self, folder, resumed_at=None, accelerator=None, config=None):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOG_FILE)
        kept = read_log(path, until_step=resumed_at) if resumed_at is not None else []
        files.write_text_atomic("".join(json.dumps(record) + "\n" for record in kept), path)
        self.handle = open(path, "a", encoding="utf-8")
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self.accelerator is not None:
            # Trackers take scalars: a list (validation prompts, lora scales) goes as its text.
            flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                    for key, value in (config or {}).items()}
            purge = {"tensorboard": {"purge_step": resumed_at}} if resumed_at is not None else {}
            self.accelerator.init_trackers(TRACKER_PROJECT, config=flat, init_kwargs=purge)

    def log(self, step, values):
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, step, name, path):
        """An image file (a validation grid) to every tracker, at `step`."""
        if self.accelerator is None:
            return
        import numpy as np

        from common.images import load_image

        picture = np.asarray(load_image(path))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, picture, step, dataformats="HWC")
                tracker.writer.flush()
            else:  # wandb (wandb.Image of each array)
                tracker.log_images({name: [picture]}, step=step)

    def close(self):
        self.handle.close()


def tracker_names(report_to):
    """--report_to as accelerate's log_with: all means tensorboard, and wandb where it is installed."""
    import importlib.util

    wandb = ["wandb"] if importlib.util.find_spec("wandb") is not None else []
    return {"none": None, "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", *wandb]}[report_to]
