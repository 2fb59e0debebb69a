"""Train the world model: LeRobot clips -> frozen DINOv2 tokens -> shortcut forcing on the dynamics model.

    python train.py                                            # toy demo: ~6 min on 2 CPU cores
    python train.py --labeled droid_subset --unlabeled droid   # DROID in LeRobot format
    torchrun --nproc_per_node=8 train.py --labeled ... --unlabeled ...

One training step, in shapes:

    batch from MixedLoader        frames (B, T, 3, H, W) or cached tokens (B, T, N, D),
                                  actions (B, T, 7) in robot units, action_mask (B,)
    frozen encoder (no grad)      z = (DINOv2(frames) - mean) / std          (B, T, N, D)
                                  (then z·W with --whiten-tokens: encoder.py)
    normalise actions             a = (actions - mean) / std, 0 where unlabelled
    shortcut forcing loss         shortcut.shortcut_forcing_loss(model, z, a, action_mask)
    AdamW step, warm-up + cosine learning rate, gradient clipping, EMA of the weights

The clips of both roles (datasets, cameras, frame rates, caches) are training_data.py's. The 95/5
mix happens in the loader: every sample is labelled with probability
`--labeled-fraction`; the others carry no actions and the model sees its learned "no action"
embedding in their place, so the 95 % action-free video still teaches what the world looks like
and how it moves, and the 5 % teaches what the actions do.

The toy demo's recipe (TOY_DEFAULTS, measured in the README's ablations): the tiny preset, batch 16
x 8 frames from a feature cache, 1000 steps at learning rate 2e-3 with 100 warm-up steps, no loss
ramp (--no-ramp), the locally linear action response (--action-jacobian, dynamics.py), labelled
rows trained at the planner's noise levels (--labeled-queries, shortcut.py section 7), every
labelled transition trained once more without its history (--labeled-pairs, section 8) and whitened
tokens (--whiten-tokens 1e-3, encoder.py).

The loop (`train`) is checkpoint.py's: `<out>/checkpoint.pt` is written atomically every
`--save-every` steps, at the end, and on Ctrl-C / SIGTERM. Every random draw of step s (which clips,
which noise, which tau and d) comes from generators seeded by (seed, rank, step), so a run that is
stopped - even killed hard - and resumed with `--resume` reaches exactly the weights of a run that
was never interrupted (on CPU).

Data parallel: under `torchrun` every rank draws different clips (the rank is in the seed), the
gradients are averaged by DistributedDataParallel (NCCL on GPUs, gloo on CPU), and only rank 0
writes checkpoints and logs.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import encoder as encoder_module
import sim
from checkpoint import (CHECKPOINT_FORMAT, TOY_RUN_DIR, RunFolder, StopRequest, check_finite, clamp_warmup, is_due,
                        json_line, make_optimizer, optimizer_step, restore_training_state, resume_from)
from dynamics import DynamicsConfig, DynamicsModel, PRESETS
from shortcut import shortcut_forcing_loss
from training_data import build_datasets, encode_batch, frame_strides, make_loader, prepare_toy_data


@torch.no_grad()
def update_ema(ema_model, model, decay, step):
    """ema <- d * ema + (1 - d) * weights after step `step` (1, 2, ...): a smoothed copy that
    evaluates better and, with --ema-bootstrap, gives steadier bootstrap targets.

    d = min(decay, (1 + step) / (10 + step)) warms up: with a fixed d = 0.999 the random initial
    weights would still carry 0.999^1500 = 22 % of the EMA after 1500 steps (measured on the toy demo:
    its held-out error was worse than copying the last frame). With the warm-up their share,
    the product of the d's, is below 1e-9 after 50 steps; the averaging window grows with the run
    (about step / 9 steps) until it reaches 1 / (1 - decay)."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter.detach(), 1 - decay)


# ----------------------------------------------------------------------------------------------
# Command line.


def build_argument_parser():
    parser = argparse.ArgumentParser(
        description="Train the DINOv2 + Dreamer 4 world model with shortcut forcing on LeRobot data. "
                    "With no --labeled/--unlabeled it trains the embedded toy demo (sim.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data")
    group.add_argument("--toy", action="store_true",
                       help="the data are sim.py's toy world (implied when no dataset is given): toy defaults, "
                            "closed-loop planning in the simulator; --labeled/--unlabeled may name other toy sets")
    group.add_argument("--labeled", help="action-labelled dataset: local path, hub id, or droid_subset")
    group.add_argument("--unlabeled", help="action-free video dataset: local path, hub id, or droid")
    group.add_argument("--labeled-fraction", type=float, default=0.05,
                       help="probability that a training sample comes from the labelled set")
    group.add_argument("--camera-key", default=data.CAMERA_KEY, help="the camera of both datasets, unless the next "
                                                                      "two flags name their own")
    group.add_argument("--labeled-camera-key", help="the labelled set's camera; if not given, --camera-key")
    group.add_argument("--unlabeled-camera-keys", nargs="+", metavar="KEY",
                       help="the action-free set's cameras, each a video stream of its own, e.g. DROID's "
                            "observation.images.exterior_1_left exterior_2_left wrist_left; if not given, --camera-key")
    group.add_argument("--state-keys", nargs="+",
                       default=["observation.state.cartesian_position", "observation.state.gripper_position"],
                       help="state keys whose concatenation is (x, y, z, roll, pitch, yaw, gripper)")
    group.add_argument("--clip-length", type=int, default=8, help="frames per training clip (T)")
    group.add_argument("--frame-stride", type=int, default=1,
                       help="frames between clip frames, counted at the clips' common rate (--fps)")
    group.add_argument("--fps", type=float, help="common frame rate of clips when the datasets' rates differ: each "
                                                 "set is read every (its fps / --fps) frames")
    group.add_argument("--val-fraction", type=float, default=0.1, help="episodes held out for validation")
    group.add_argument("--streaming", action="store_true", help="stream from the hub instead of downloading")
    group.add_argument("--feature-cache", nargs="+", metavar="DIR",
                       help="token caches written by `python encoder.py`: the labelled set's, then one per "
                            "action-free camera")
    group.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    group = parser.add_argument_group("encoder")
    group.add_argument("--encoder", default=encoder_module.DEFAULT_ENCODER,
                       help="DINOv2 hub id or local folder (the toy demo uses a tiny local one)")
    group.add_argument("--pool", type=int, default=1, help="k x k average pooling of the patch grid")
    group.add_argument("--stats-batches", type=int, default=8, help="batches used for token statistics")
    group.add_argument("--whiten-tokens", type=float, default=0.0, metavar="EPS",
                       help="ZCA-whiten the normalised tokens, eigenvalue floor EPS x the largest (encoder.py; "
                            "0: per-channel only; the toy demo: 1e-3)")
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default="small", choices=sorted(PRESETS))
    group.add_argument("--time-every", type=int, help="a time-attention layer every k-th layer")
    group.add_argument("--head", choices=["linear", "dh"], help="output head (dh: RAE-style wide head)")
    group.add_argument("--k-max", type=int, help="finest shortcut grid: d_min = 1 / k_max")
    group = parser.add_argument_group("objective")
    group.add_argument("--mode", default="shortcut", choices=["shortcut", "diffusion"],
                       help="shortcut forcing, or plain diffusion forcing (ablation)")
    group.add_argument("--pred", default="x", choices=["x", "v"], help="x- or v-prediction (ablation)")
    group.add_argument("--bootstrap-fraction", type=float, default=0.25)
    group.add_argument("--ramp", action=argparse.BooleanOptionalAction, default=True,
                       help="weight each frame's loss by w(tau) = 0.9 tau + 0.1 (Dreamer 4's ramp)")
    group.add_argument("--ema-bootstrap", action="store_true", help="bootstrap targets from EMA weights")
    group.add_argument("--context-noise", type=float, default=0.9,
                       help="signal level of a rollout's past frames (1: clean), also of --labeled-queries' context")
    group.add_argument("--labeled-queries", action=argparse.BooleanOptionalAction, default=False,
                       help="labelled clips at the planner's noise levels: every other frame clean, the rest noise")
    group.add_argument("--labeled-pairs", action=argparse.BooleanOptionalAction, default=False,
                       help="train every labelled transition once more as a 2-frame clip, without its history")
    group.add_argument("--action-jacobian", action=argparse.BooleanOptionalAction, default=False,
                       help="add a locally linear action response J·a to the model's output")
    group.add_argument("--action-noise", type=float, default=0.0, metavar="SIGMA",
                       help="add N(0, SIGMA^2) to the labelled actions the model sees in training, targets "
                            "unchanged (normalised units): a ridge penalty on the action response (ablation)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, default=100_000)
    group.add_argument("--batch-size", type=int, default=32, help="clips per step per rank")
    group.add_argument("--lr", type=float, default=3e-4)
    group.add_argument("--warmup", type=int, default=1000, help="warm-up steps")
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--grad-clip", type=float, default=1.0)
    group.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables EMA)")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 on a CPU with bf16 matmuls: faster, "
                            "the same losses on the demo: README)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model: the first steps compile (~2-3 min on 2 CPU cores), then the "
                            "steps run faster (the tiny preset: ~1.2x on CPU, 2.7x on an H200; README), the same "
                            "losses")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group = parser.add_argument_group("output")
    group.add_argument("--out", help="run folder; if not given, the resumed checkpoint's folder, runs/toy for the demo, "
                                     "runs/<name> otherwise")
    group.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its checkpoint")
    group.add_argument("--overwrite", action="store_true", help="start afresh over an existing run folder")
    group.add_argument("--save-every", type=int, default=1000)
    group.add_argument("--log-every", type=int, default=10)
    group.add_argument("--val-every", type=int, default=500)
    group.add_argument("--val-batches", type=int, default=4)
    group.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (off by default)")
    return parser


# The toy demo's recipe: what `python train.py` with no dataset trains. Against Dreamer 4's defaults it
# drops the ramp weight and adds the locally linear action response, the planner's noise levels on
# labelled clips (shortcut.py section 7, dynamics.py) and whitened tokens (encoder.py): each measured
# in the README's ablations.
TOY_DEFAULTS = dict(preset="tiny", pool=encoder_module.TOY_POOL, steps=1000, batch_size=16, lr=2e-3, warmup=100,
                    save_every=250, val_every=250, labeled_fraction=0.05, ramp=False, action_jacobian=True,
                    labeled_queries=True, labeled_pairs=True, whiten_tokens=1e-3)


def parse_arguments(argv=None):
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if args.toy or (args.labeled is None and args.unlabeled is None):
        # The toy world: parse again with the toy defaults, so that flags given explicitly still win.
        parser.set_defaults(toy=True, **TOY_DEFAULTS)
        args = parser.parse_args(argv)
    elif args.labeled is None or args.unlabeled is None:
        parser.error("pass both --labeled and --unlabeled (or neither, for the toy demo)")
    if not 0.0 <= args.labeled_fraction <= 1.0:
        parser.error("--labeled-fraction must be in [0, 1]")
    if args.clip_length < 2:
        parser.error("--clip-length must be at least 2 (the model predicts frame t from frames < t)")
    positive = dict(steps=args.steps, batch_size=args.batch_size, save_every=args.save_every, log_every=args.log_every,
                    val_batches=args.val_batches, frame_stride=args.frame_stride, pool=args.pool,
                    stats_batches=args.stats_batches, fps=args.fps or 1)
    for name, value in positive.items():
        if value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.num_workers < 0 or args.val_every < 0 or args.warmup < 0 or args.action_noise < 0:
        parser.error("--num-workers, --val-every, --warmup and --action-noise must be >= 0")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    if args.val_fraction == 0 and args.val_every > 0:
        parser.error("--val-fraction 0 holds out no episode to validate on: pass --val-every 0 as well")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    args.labeled_camera_key = args.labeled_camera_key or args.camera_key
    args.unlabeled_camera_keys = args.unlabeled_camera_keys or [args.camera_key]
    if args.feature_cache and len(args.feature_cache) != 1 + len(args.unlabeled_camera_keys):
        parser.error(f"--feature-cache takes {1 + len(args.unlabeled_camera_keys)} folders: the labelled set's, then "
                     f"one per action-free camera ({' '.join(args.unlabeled_camera_keys)})")
    args.warmup = clamp_warmup(args.warmup, args.steps)
    if args.out is None:  # a resumed run writes where its checkpoint lives
        name = os.path.basename(os.path.normpath(args.unlabeled)).replace("/", "_") if not args.toy else None
        args.out = (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                    TOY_RUN_DIR if args.toy else os.path.join("runs", name))
    return args


def model_config_from_arguments(args, encoder):
    overrides = {name: value for name, value in
                 dict(time_every=args.time_every, head=args.head, k_max=args.k_max).items() if value is not None}
    overrides.update(action_jacobian=args.action_jacobian)
    config = DynamicsConfig.preset(args.preset, token_dim=encoder.token_dim, num_tokens=encoder.num_tokens,
                                   **overrides)
    return dataclasses.replace(config, max_frames=max(config.max_frames, args.clip_length))


# ----------------------------------------------------------------------------------------------
# Set-up: distributed, data, encoder, statistics, model.


def setup_distributed(args):
    """Under torchrun (RANK/WORLD_SIZE in the environment) join the process group."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return rank, world_size


@dataclasses.dataclass
class Run:
    """What a training run holds from step to step, and what its checkpoint saves."""
    args: argparse.Namespace
    device: torch.device
    frozen_encoder: encoder_module.Encoder
    datasets: dict  # role -> (train, validation) ClipDataset
    config: DynamicsConfig
    action_stats: data.ActionStats
    token_stats: encoder_module.TokenStats
    model: DynamicsModel
    ema_model: DynamicsModel  # None when --ema 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def check_resumable(args, resumed):
    if resumed is None:
        return
    if resumed["train_args"]["preset"] != args.preset or resumed["toy"] != args.toy:
        raise SystemExit(f"error: {args.resume} was trained with preset "
                         f"{resumed['train_args']['preset']!r} (toy={resumed['toy']}); this run asks for "
                         f"{args.preset!r} (toy={args.toy}): pass the same data and --preset to resume")
    if resumed["step"] >= args.steps:
        raise SystemExit(f"error: {args.resume} is already at step {resumed['step']}, not before --steps "
                         f"{args.steps}: nothing to train (pass a larger --steps to continue it)")


def load_data(args, rank, world_size, device):
    """The frozen encoder, the model configuration its tokens imply, and the datasets (their metadata
    checked first: a missing dataset costs seconds, not a model download)."""
    try:
        if args.toy:
            if rank == 0:
                prepare_toy_data(args)
            if world_size > 1:
                dist.barrier()
            if rank != 0:
                prepare_toy_data(args)  # now only fills in paths: rank 0 wrote the files
        args.strides = frame_strides(args)
        if os.path.realpath(args.labeled) == os.path.realpath(args.unlabeled) and args.labeled_fraction < 1:
            print(f"warning: {args.labeled} plays both roles: the action-free samples are its labelled clips with "
                  f"the actions hidden, not other video", file=sys.stderr)
        frozen_encoder = encoder_module.Encoder(args.encoder, pool=args.pool).to(device)
        return frozen_encoder, model_config_from_arguments(args, frozen_encoder), build_datasets(
            args, frozen_encoder.image_size)
    except (data.DatasetError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}")


def measure_statistics(args, resumed, datasets, frozen_encoder, device):
    """Action and token statistics: from the checkpoint when resuming, else measured on the training
    data (rank 0's view is enough; every rank computes the same numbers: the draws are seeded alike)."""
    if resumed is not None:
        return data.ActionStats(**resumed["action_stats"]), encoder_module.TokenStats(**resumed["token_stats"])
    stats_loader = make_loader(datasets, args, "train", rank=0, start_step=10_000_000)
    token_stats = encoder_module.TokenStats.from_batches(
        (encode_batch(batch, frozen_encoder, device) for batch in stats_loader), max_batches=args.stats_batches,
        whiten=args.whiten_tokens)
    return data.ActionStats.from_dataset(datasets["labeled"][0]), token_stats


def set_up(args, rank, world_size, resumed):
    """Everything the loop needs, restored from `resumed` when given. Returns (Run, first step)."""
    device = torch.device(args.device)
    frozen_encoder, config, datasets = load_data(args, rank, world_size, device)
    action_stats, token_stats = measure_statistics(args, resumed, datasets, frozen_encoder, device)
    if resumed is not None and resumed["model_config"] != dataclasses.asdict(config):
        raise SystemExit(f"error: {args.resume} holds a model of another configuration; resume with the "
                         f"flags it was trained with")
    torch.manual_seed(args.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = DynamicsModel(config).to(device)  # (such as writing a feature cache on the first run)
    ema_model = DynamicsModel(config).to(device).eval() if args.ema > 0 else None
    if ema_model is not None:
        ema_model.load_state_dict(model.state_dict())
        ema_model.requires_grad_(False)
    optimizer, scheduler = make_optimizer(model.parameters(), args.lr, args.weight_decay, args.warmup, args.steps)
    start_step = restore_training_state(resumed, model, optimizer, scheduler)
    if resumed is not None and ema_model is not None and resumed["ema"] is not None:
        ema_model.load_state_dict(resumed["ema"])
    if rank == 0:
        print(f"model: preset {args.preset}, {model.num_parameters() / 1e6:.2f} M parameters, "
              f"{config.num_tokens} tokens x {config.token_dim} per frame; device {device}, {world_size} rank(s)")
    return Run(args, device, frozen_encoder, datasets, config, action_stats, token_stats, model, ema_model,
               optimizer, scheduler), start_step


def training_network(run, world_size):
    """The module the loss calls: the model, compiled (--compile) and wrapped for data parallelism."""
    network = torch.compile(run.model) if run.args.compile else run.model
    if world_size > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        network.config = run.config  # the loss reads model.config (k_max, shapes) through the wrapper
    return network


# ----------------------------------------------------------------------------------------------
# The steps of the loop.


def batch_loss(run, batch, network, generator, training=True):
    """Shortcut forcing loss of one batch: encode, normalise, mask the unlabelled rows' actions.
    With --action-noise σ (training only) the model sees a + ε, ε ~ N(0, σ²), and still predicts the
    frame that a produced: for the linear part of the response, J·(a + ε), that is least squares plus
    σ²·|J|² (Bishop 1995), a ridge against fitting a few labelled episodes with a too large response."""
    args = run.args
    tokens = run.token_stats.normalize(encode_batch(batch, run.frozen_encoder, run.device))  # (B, T, N, D)
    action_mask = batch["action_mask"].to(run.device)  # (B,)
    actions = run.action_stats.normalize(batch["actions"].to(run.device))  # (B, T, 7)
    if training and args.action_noise > 0:
        actions = actions + args.action_noise * torch.randn(actions.shape, generator=generator, device=run.device)
    actions = actions * action_mask[:, None, None]
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and run.device.type == "cuda")
    with torch.autocast(run.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
        return shortcut_forcing_loss(
            network, tokens, actions, action_mask, k_max=run.config.k_max,
            bootstrap_fraction=args.bootstrap_fraction, ema_model=run.ema_model if args.ema_bootstrap else None,
            pred=args.pred, ramp=args.ramp, mode=args.mode, generator=generator,
            context_noise=args.context_noise, labeled_queries=args.labeled_queries,
            labeled_pairs=args.labeled_pairs)


@torch.no_grad()
def validation_loss(run, rank):
    """Mean loss over --val-batches held-out batches, each with its own fixed noise."""
    network = run.ema_model if run.ema_model is not None else run.model
    losses = []
    for index, batch in zip(range(run.args.val_batches), make_loader(run.datasets, run.args, "val", rank)):
        generator = torch.Generator(run.device).manual_seed(run.args.seed + 7_777_777 + index)
        losses.append(batch_loss(run, batch, network, generator, training=False)[0].item())
    return sum(losses) / len(losses)


def checkpoint_payload(run, step):
    return dict(format=CHECKPOINT_FORMAT, step=step, toy=run.args.toy, model=run.model.state_dict(),
                ema=None if run.ema_model is None else run.ema_model.state_dict(),
                optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                model_config=dataclasses.asdict(run.config), train_args=dict(vars(run.args)),
                action_stats=run.action_stats.as_dict(), token_stats=run.token_stats.as_dict(),
                encoder=dict(name_or_path=run.args.encoder, pool=run.args.pool))


class TrainingLog:
    """Rank 0's records: <out>/log.jsonl (continued by a resumed run from its step, new otherwise), Weights & Biases
    when asked for, and the progress bar's numbers. Validation time does not count against frames/s."""

    def __init__(self, run, folder, world_size, start_step):
        args = run.args
        self.run, self.start_step = run, start_step
        self.frames_per_step = args.batch_size * args.clip_length * world_size
        self.file = folder.open_log(start_step if args.resume else None)
        self.wandb_run = None
        if args.wandb:
            import wandb  # only imported, and only contacted, when asked for
            self.wandb_run = wandb.init(project=args.wandb, config=vars(args), resume="allow")
        self.timer = time.perf_counter()

    def write(self, done, loss, parts, gradient_norm):
        args = self.run.args
        elapsed = time.perf_counter() - self.timer
        record = dict(step=done, loss=loss.item(), flow=float(parts["flow"]), bootstrap=float(parts["bootstrap"]),
                      grad_norm=gradient_norm.item(), lr=self.run.scheduler.get_last_lr()[0],
                      frames_per_s=self.frames_per_step * min(args.log_every, done - self.start_step) / elapsed)
        if args.labeled_pairs:  # the mean loss of this batch's labelled transitions (0 when it drew none)
            record["pairs"] = float(parts["pairs"])
        if is_due(done, args.val_every, args.steps):
            record["val_loss"] = validation_loss(self.run, rank=0)
        self.timer = time.perf_counter()
        self.file.write(json_line(record))
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=done)
        return dict(loss=f"{record['loss']:.4f}", flow=f"{record['flow']:.4f}", boot=f"{record['bootstrap']:.4f}",
                    lr=f"{record['lr']:.1e}", fps=f"{record['frames_per_s']:.0f}")


# ----------------------------------------------------------------------------------------------
# The run.


def train(args):
    rank, world_size = setup_distributed(args)
    torch.manual_seed(args.seed)
    resumed = resume_from(args.resume)
    check_resumable(args, resumed)
    folder = RunFolder(args.out, args.resume, args.overwrite, rank, resumed and resumed["step"])
    run, start_step = set_up(args, rank, world_size, resumed)
    network = training_network(run, world_size)
    log = TrainingLog(run, folder, world_size, start_step) if rank == 0 else None
    loader = make_loader(run.datasets, args, "train", rank, start_step=start_step)
    progress = tqdm(total=args.steps, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    step = start_step
    run.model.train()
    with StopRequest() as stop:
        for step, batch in zip(range(start_step, args.steps), loader):
            generator = torch.Generator(run.device).manual_seed(args.seed * 1_000_003 + rank * 7919 + step)
            loss, parts = batch_loss(run, batch, network, generator)
            check_finite(loss, step, folder)
            gradient_norm = optimizer_step(loss, run.model, run.optimizer, run.scheduler, args.grad_clip)
            if run.ema_model is not None:
                update_ema(run.ema_model, run.model, args.ema, step + 1)
            done = step + 1
            if rank == 0 and is_due(done, args.log_every, args.steps):
                progress.set_postfix(log.write(done, loss, parts, gradient_norm))
            progress.update(1)
            if rank == 0 and (is_due(done, args.save_every, args.steps) or stop.signal_name):
                folder.save(checkpoint_payload(run, done), run.model, run.ema_model)
            if stop.signal_name:
                break
    progress.close()
    if world_size > 1:
        dist.destroy_process_group()
    return finish(args, rank, log, stop, step, folder.checkpoint_path)


def finish(args, rank, log, stop, step, checkpoint_path):
    """Close the log and say what to run next (or how to continue a stopped run)."""
    if rank != 0:
        return 0
    log.file.close()
    if stop.signal_name:
        print(f"{stop.signal_name}: stopped after step {step + 1}; checkpoint {checkpoint_path}. "
              f"Continue with: python train.py ... --resume {checkpoint_path}")
        return 130
    print(f"checkpoint: {checkpoint_path} (step {args.steps})")
    if args.toy:
        goals_dir = sim.write_goal_images(os.path.join(args.out, "goals"), n=4, seed=args.seed)
        print(f"next: python plan.py --goal {os.path.join(goals_dir, 'goal_0.png')}   "
              f"(closed-loop MPC in the toy world)\n      python eval.py --checkpoint {checkpoint_path}")
    else:
        print(f"next: python plan.py --checkpoint {checkpoint_path} --goal GOAL.png --obs NOW.png")
    return 0


def main(argv=None):
    return train(parse_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
