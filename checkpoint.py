"""Checkpoints and the life of a training run: what train.py and decode.py share, and what plan.py,
eval.py and bench.py read.

A checkpoint is one file of tensors and plain Python values (weights, optimizer and schedule state,
the statistics the model was trained with, the arguments), tagged with a format string. It is
written atomically (a temporary file next to it, then a rename), so a crash mid-write leaves the
previous checkpoint intact, and read with `torch.load(weights_only=True)`, which never runs code
from the file: a checkpoint from a stranger cannot execute anything.

Both training programs run the same loop, in the same named steps:

    resumed = resume_from(args.resume, FORMAT, KEYS)           # the checkpoint to continue, or None
    folder = RunFolder(args.out, args.resume, args.overwrite)  # checked before any long work
    optimizer, scheduler = make_optimizer(parameters, lr, weight_decay, warmup, steps)
    start = restore_training_state(resumed, model, optimizer, scheduler)
    log = folder.open_log(resumed_step)                        # cut back to the resumed step
    with StopRequest() as stop:                                # Ctrl-C / SIGTERM: finish the step, save
        for step in range(start, steps):
            loss = ...                                         # the program's own loss
            check_finite(loss, step, folder)
            optimizer_step(loss, model, optimizer, scheduler, grad_clip)
            if is_due(step + 1, save_every, steps) or stop.signal_name:
                folder.save(payload, model)                    # never a NaN or infinite state
            if stop.signal_name:
                break

Never lose work, never lie about it. A run folder carries a marker (run.json); a folder that
holds other files and no marker (nor checkpoint) is refused unless --overwrite, and a checkpoint
is replaced only by a resume of it or with --overwrite. A resumed run writes where its checkpoint
lives unless told otherwise, and its log is cut back to the checkpoint's step. Weights are checked
before every save: a diverged state is never written, and the messages name the checkpoint that
is really on disk (or say that none was saved). A disk that fills up mid-write leaves the previous
checkpoint and no temporary file behind.

Every random draw of step s comes from generators seeded by (seed, rank, step), and the schedule
is a function of the step alone, so a run stopped (even killed hard) and resumed reaches exactly the
weights of a run that was never interrupted (on CPU).

The learning rate: linear warm-up to the peak over `warmup` steps, then cosine decay to a tenth of
it at the last step. A warm-up at least as long as the run would never reach the peak: it is
clamped to a tenth of the run, with a one-line note.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch

from dynamics import DynamicsConfig, DynamicsModel

CHECKPOINT_FORMAT = "dreamer-dino-wm/1"
# What a world-model checkpoint must hold to be loaded (WORLD_MODEL_KEYS) and to be continued.
WORLD_MODEL_KEYS = ("step", "toy", "model", "ema", "model_config", "train_args", "action_stats", "token_stats",
                    "encoder")
TRAINING_KEYS = WORLD_MODEL_KEYS + ("optimizer", "scheduler")
TOY_RUN_DIR = os.path.join("runs", "toy")  # where `python train.py` puts the demo's world model
RUN_MARKER = "run.json"  # in every run folder: what wrote it, and when


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, or not one of ours (the CLIs print it on one line)."""


# ----------------------------------------------------------------------------------------------
# One file, tensors and plain values only, written atomically.


def save_atomic(payload, path):
    """torch.save to a temporary file next to `path`, then rename over it. A crash mid-write leaves
    the previous file intact: os.replace is atomic on POSIX and Windows."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:  # disk full, Ctrl-C twice: no half-written file stays behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def load_safely(path, expected_format=CHECKPOINT_FORMAT, required=()):
    """Read a checkpoint with weights_only=True (no code from the file ever runs) and check that it
    is ours and holds the `required` keys. Raises CheckpointError with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, pickle with code in it, not a torch file at all
        reason = (str(error).splitlines() or ["empty or truncated file"])[0][:160]
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(error).__name__}: {reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise CheckpointError(f"{path!r} is not a checkpoint of this project "
                              f"(expected format {expected_format!r})")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"{path!r} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    return payload


def load_world_model(path, device="cpu", use_ema=True):
    """The dynamics model of a training checkpoint (EMA weights when present), in eval mode, and
    the checkpoint dict (config, action and token statistics, encoder name)."""
    checkpoint = load_safely(path, required=WORLD_MODEL_KEYS)
    # mlp_multiple = 1: checkpoints written before the field existed have unrounded MLP widths
    model = DynamicsModel(DynamicsConfig(**{"mlp_multiple": 1, **checkpoint["model_config"]}))
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") is not None else checkpoint["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), checkpoint


# ----------------------------------------------------------------------------------------------
# The steps of a training run, in the order the loop takes them.


def resume_from(path, expected_format=CHECKPOINT_FORMAT, required=TRAINING_KEYS):
    """The checkpoint to continue (None without --resume); one line and exit when it is unreadable,
    incomplete or holds NaN or infinite weights."""
    if not path:
        return None
    try:
        resumed = load_safely(path, expected_format, required)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    if not finite_weights(resumed["model"]):
        raise SystemExit(f"error: {path} holds NaN or infinite weights: it cannot be continued")
    return resumed


def writable_folder(folder):
    """Create `folder` if needed and check that a file can be written in it (one line and exit if not):
    called before long work, so that a typo in --out costs seconds, not the run."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise SystemExit(f"error: cannot write to {folder!r}: {error.strerror or error}")
    return folder


def finite_weights(state_dict):
    """Whether every floating-point tensor of a state dict is finite (no NaN, no infinity)."""
    return all(torch.isfinite(tensor).all() for tensor in state_dict.values() if tensor.is_floating_point())


def json_line(record):
    """One JSON line; NaN and infinite numbers become null (a bare NaN is not JSON)."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


class RunFolder:
    """A run's output folder: <out>/checkpoint.pt, log.jsonl and the marker run.json. Checked when
    made (rank 0): writable; a folder of other things is refused unless `overwrite`; an existing
    checkpoint is replaced only by a resume of that very file or with `overwrite`. It saves
    checkpoints, never a NaN or infinite one, and knows the step of the checkpoint on disk."""

    def __init__(self, out, resume=None, overwrite=False, rank=0, resumed_step=None):
        self.out, self.checkpoint_path = out, os.path.join(out, "checkpoint.pt")
        exists = os.path.isfile(self.checkpoint_path)
        resuming_here = bool(resume) and exists and os.path.samefile(resume, self.checkpoint_path)
        self.saved_step = resumed_step if resuming_here else None  # the step the file on disk holds
        if rank != 0:
            return
        if os.path.isdir(out) and os.listdir(out) and not overwrite and not any(
                os.path.exists(os.path.join(out, name)) for name in (RUN_MARKER, "checkpoint.pt")):
            raise SystemExit(f"error: {out!r} holds other files and is not a run folder (no {RUN_MARKER}); "
                             f"choose another --out, or pass --overwrite to write into it")
        if exists and not resuming_here and not overwrite:
            action = f"continue it with --resume {self.checkpoint_path}" if not resume else "it is not the one resumed"
            raise SystemExit(f"error: {self.checkpoint_path} already exists ({action}); start afresh there with "
                             f"--overwrite, or choose another --out")
        writable_folder(out)
        with open(os.path.join(out, RUN_MARKER), "w") as file:
            json.dump(dict(command=sys.argv, started=time.strftime("%Y-%m-%d %H:%M:%S")), file, indent=1)

    def last_good(self):
        if self.saved_step is None:
            return "No checkpoint of this run was saved."
        return f"The last good checkpoint, step {self.saved_step}, is intact: {self.checkpoint_path}."

    def save(self, payload, *modules):
        """Write `payload` atomically, after checking that the weights of `modules` are all finite."""
        if not all(finite_weights(module.state_dict()) for module in modules if module is not None):
            raise SystemExit(f"error: the weights became NaN or infinite by step {payload['step']}; not saved. "
                             f"{self.last_good()}")
        try:
            save_atomic(payload, self.checkpoint_path)
        except OSError as error:
            raise SystemExit(f"error: cannot write {self.checkpoint_path} ({error.strerror or error}). "
                             f"{self.last_good()}")
        self.saved_step = payload["step"]

    def open_log(self, resumed_step=None):
        """log.jsonl for appending json_line()s: a resumed run keeps the records up to its step (the
        ones after it would appear twice), a fresh run starts a new file."""
        path = os.path.join(self.out, "log.jsonl")
        kept = []
        if resumed_step is not None and os.path.isfile(path):
            with open(path) as file:
                for line in file:
                    with contextlib.suppress(ValueError):
                        if json.loads(line).get("step", 0) <= resumed_step:
                            kept.append(line)
        log_file = open(path, "w")
        log_file.writelines(kept)
        return log_file


def learning_rate_factor(step, warmup_steps, total_steps, final_fraction=0.1):
    """Linear warm-up to 1, then cosine decay to `final_fraction` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def clamp_warmup(warmup_steps, total_steps):
    """A warm-up at least as long as the run would never reach the peak learning rate: use a tenth
    of the run instead, and say so on one line."""
    if warmup_steps < total_steps:
        return warmup_steps
    clamped = total_steps // 10
    print(f"note: --warmup {warmup_steps} is not shorter than the run's {total_steps} steps: "
          f"warming up for {clamped} steps instead", file=sys.stderr)
    return clamped


def make_optimizer(parameters, lr, weight_decay, warmup_steps, total_steps):
    """AdamW (betas 0.9, 0.95) and its warm-up + cosine schedule, stepped once per training step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps))
    return optimizer, scheduler


def restore_training_state(resumed, model, optimizer, scheduler):
    """Load weights, optimizer and schedule from a resumed checkpoint; returns its step (0 without)."""
    if resumed is None:
        return 0
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    return resumed["step"]


def check_finite(loss, step, folder):
    """Stop the run (one line, non-zero exit) when the loss is NaN or infinite: nothing is saved."""
    if not torch.isfinite(loss):
        raise SystemExit(f"error: the loss became {loss.item()} at step {step}; stopping. {folder.last_good()}")


def optimizer_step(loss, model, optimizer, scheduler, grad_clip=None):
    """Backward, clip the gradient norm (when grad_clip is given), step the optimizer and the
    schedule. Returns the gradient norm before clipping (None without clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gradient_norm = None if grad_clip is None else torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return gradient_norm


def is_due(done, every, total_steps):
    """Whether something done every `every` steps (0: never) is due after step `done`; always at the end."""
    return bool(every) and (done % every == 0 or done == total_steps)


class StopRequest:
    """While active, Ctrl-C / SIGTERM only set a flag: the loop finishes its step, saves a checkpoint
    and exits cleanly. The previous handlers come back on exit."""

    def __enter__(self):
        self.signal_name = None
        self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signal_number, frame):
        if self.signal_name is not None:  # asked twice: stop now, without waiting for the step
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signal_number).name

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
