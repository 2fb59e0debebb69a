"""Checkpoints and the life of a training run: what train.py and decode.py share, and what plan.py,
eval.py and bench.py read.

A checkpoint is one file of tensors and plain Python values (weights, optimizer and schedule state,
the statistics the model was trained with, the arguments), tagged with a format string. It is
written atomically (a temporary file next to it, then a rename), so a crash mid-write leaves the
previous checkpoint intact, and read with `torch.load(weights_only=True)`, which never runs code
from the file: a checkpoint from a stranger cannot execute anything.

Both training programs run the same loop, in the same named steps:

    resumed = resume_from(args.resume, FORMAT)                 # the checkpoint to continue, or None
    path = check_output_folder(args.out, args.resume, args.overwrite)
    optimizer, scheduler = make_optimizer(parameters, lr, weight_decay, warmup, steps)
    start = restore_training_state(resumed, model, optimizer, scheduler)
    with StopRequest() as stop:                                # Ctrl-C / SIGTERM: finish the step, save
        for step in range(start, steps):
            loss = ...                                         # the program's own loss
            check_finite(loss, step, path)
            optimizer_step(loss, model, optimizer, scheduler, grad_clip)
            if is_due(step + 1, save_every, steps) or stop.signal_name:
                save_atomic(payload, path)
            if stop.signal_name:
                break

Every random draw of step s comes from generators seeded by (seed, rank, step), and the schedule
is a function of the step alone, so a run stopped (even killed hard) and resumed reaches exactly the
weights of a run that was never interrupted (on CPU).

The learning rate: linear warm-up to the peak over `warmup` steps, then cosine decay to a tenth of
it at the last step. A warm-up at least as long as the run would never reach the peak: it is
clamped to a tenth of the run, with a one-line note.
"""
import math
import os
import signal
import sys

import torch

from dynamics import DynamicsConfig, DynamicsModel

CHECKPOINT_FORMAT = "dreamer-dino-wm/1"
TOY_RUN_DIR = os.path.join("runs", "toy")  # where `python train.py` puts the demo's world model


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, or not one of ours (the CLIs print it on one line)."""


# ----------------------------------------------------------------------------------------------
# One file, tensors and plain values only, written atomically.


def save_atomic(payload, path):
    """torch.save to a temporary file next to `path`, then rename over it. A crash mid-write leaves
    the previous file intact: os.replace is atomic on POSIX and Windows."""
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_safely(path, expected_format=CHECKPOINT_FORMAT):
    """Read a checkpoint with weights_only=True (no code from the file ever runs) and check that it
    is ours. Raises CheckpointError with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, pickle with code in it, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise CheckpointError(f"{path!r} is not a checkpoint of this project "
                              f"(expected format {expected_format!r})")
    return payload


def load_world_model(path, device="cpu", use_ema=True):
    """The dynamics model of a training checkpoint (EMA weights when present), in eval mode, and
    the checkpoint dict (config, action and token statistics, encoder name)."""
    checkpoint = load_safely(path)
    model = DynamicsModel(DynamicsConfig(**checkpoint["model_config"]))
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") is not None else checkpoint["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), checkpoint


# ----------------------------------------------------------------------------------------------
# The steps of a training run, in the order the loop takes them.


def resume_from(path, expected_format=CHECKPOINT_FORMAT):
    """The checkpoint to continue (None without --resume); one line and exit when it is unreadable."""
    if not path:
        return None
    try:
        return load_safely(path, expected_format)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")


def check_output_folder(out, resume, overwrite, rank=0):
    """Create `out` and check that it is writable; refuse to replace its checkpoint unless the run
    resumes or --overwrite says so. Returns the checkpoint path `<out>/checkpoint.pt`."""
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as error:
            raise SystemExit(f"error: cannot write to output folder {out!r}: {error.strerror}")
        if os.path.exists(checkpoint_path) and not resume and not overwrite:
            raise SystemExit(f"error: {checkpoint_path} already exists; continue it with --resume "
                             f"{checkpoint_path}, start afresh with --overwrite, or choose another --out")
    return checkpoint_path


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


def check_finite(loss, step, checkpoint_path):
    """Stop the run (one line, non-zero exit) when the loss is NaN or infinite: nothing is saved."""
    if not torch.isfinite(loss):
        raise SystemExit(f"error: the loss became {loss.item()} at step {step}; stopping. The last good "
                         f"checkpoint ({checkpoint_path}) is intact.")


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
