"""Decode frozen DINOv2 patch tokens back into pixels: an RAE-style ViT decoder, for pictures only.

    python decode.py --train                                   # toy world: tiny decoder, a few min on 2 CPUs
    python decode.py --train --dataset droid --preset base     # DROID frames, DINOv2-S 224 px -> runs/droid/decoder

Why a decoder at all. The world model never sees pixels: it predicts the next frame's DINOv2
patch tokens and the planner compares tokens with a goal's tokens. People, however, want to *look*
at what the model imagines. RAE (Representation Autoencoders, arXiv 2510.11690) showed that the
tokens of a frozen representation encoder such as DINOv2 keep enough of the image that a plain
ViT decoder trained on top of them reconstructs it well. So: encoder frozen, decoder trained, and
gradients never flow into the encoder or into the world model: the decoder only reads tokens.

Shapes (toy world: 64 px frames, tiny DINOv2 with 4 px patches pooled 4x4 -> 4x4 grid):

    tokens z          (B, N, D)          normalised per channel with the TokenStats it was trained with
    linear in         (B, N, E)          + learned position embedding, one per grid cell
    transformer       (B, N, E)          pre-norm blocks, full attention among the N tokens
    linear out        (B, N, 3 p p)      p = image_size / grid side: pixels per token side
    unpatchify        (B, 3, H, W)       token (i, j) paints the p x p square at row i, column j
    + canvas, sigmoid (B, 3, H, W)       in [0, 1]; canvas: a learned per-pixel logit, see Decoder

  toy:   N = 16 (4x4), D = 128, p = 16 (4 px patch x pool 4), 64 x 64 images
  DROID: N = 256 (16x16), D = 384, p = 14 (DINOv2-S patch), 224 x 224 images

Noise augmentation (RAE). The decoder is trained on z + sigma * eps, eps ~ N(0, I), with sigma
drawn per image from U(0, tau), tau = 0.8. Tokens a world model predicts are never exactly real
encoder tokens; a decoder that has only seen clean tokens can turn small off-manifold errors
into large pixel artefacts, one that has seen noisy tokens maps them to a plausible image.

Loss = L1(pixels) + w * perceptual. Perceptual losses such as LPIPS need downloaded network
weights; instead the frozen encoder itself is the feature extractor: re-encode the reconstruction
and compare its normalised tokens with the clean tokens of the original. This asks for images
that look the same *to DINOv2*, which is exactly the sense in which the world model sees them.
Gradients flow through the frozen encoder into the image, never into the encoder's weights.
"""
import argparse
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import encoder as encoder_module
import sim
from checkpoint import (CheckpointError, RunFolder, StopRequest, check_finite, clamp_warmup, is_due, json_line,
                        load_safely, make_optimizer, optimizer_step, restore_training_state, resume_from)

DECODER_FORMAT = "dreamer-dino-wm-decoder/1"
DECODER_KEYS = ("step", "model", "config", "token_stats", "encoder", "mean_image")  # what load_decoder needs
TRAINING_KEYS = DECODER_KEYS + ("optimizer", "scheduler", "metrics")  # and what --resume needs
TOY_DECODER_DIR = os.path.join("runs", "toy", "decoder")


# ----------------------------------------------------------------------------------------------
# The decoder.


@dataclasses.dataclass
class DecoderConfig:
    token_dim: int = 64  # D, from the encoder
    grid: tuple = (4, 4)  # token grid (h, w) after pooling, from the encoder
    image_size: int = 64  # the encoder's input resolution; the decoder paints images of this size
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    @classmethod
    def preset(cls, name, **overrides):
        return cls(**{**PRESETS[name], **overrides})


# tiny: the toy world (16 tokens, 64 px). base: MAE's decoder size (512 wide, 8 blocks) for DROID.
PRESETS = {"tiny": dict(width=128, depth=4, heads=4), "base": dict(width=512, depth=8, heads=16)}
PRESET_LR = {"tiny": 3e-3, "base": 5e-4}  # default --lr: the small decoder tolerates (and needs) a larger step


class Decoder(nn.Module):
    """Normalised patch tokens (B, N, D) -> RGB images (B, 3, H, W) in [0, 1]; `decode` for pictures."""

    def __init__(self, config, token_stats, mean_image=None):
        super().__init__()
        self.config = config
        grid_h, grid_w = config.grid
        if config.image_size % grid_h or config.image_size % grid_w:
            raise ValueError(f"image size {config.image_size} is not a multiple of the token grid {config.grid}")
        self.patch = config.image_size // grid_h  # pixel patch per token (square grid from a square image)
        self.embed = nn.Linear(config.token_dim, config.width)
        self.position = nn.Parameter(torch.randn(1, grid_h * grid_w, config.width) * 0.02)
        block = nn.TransformerEncoderLayer(config.width, config.heads, int(config.mlp_ratio * config.width),
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.depth, norm=nn.LayerNorm(config.width),
                                            enable_nested_tensor=False)
        self.to_pixels = nn.Linear(config.width, 3 * self.patch ** 2)
        # Zero-initialised output: the untrained decoder paints the canvas below, not noise.
        nn.init.zeros_(self.to_pixels.weight)
        nn.init.zeros_(self.to_pixels.bias)
        # A learned per-pixel logit added to every image, started at the training frames' mean image
        # (sigmoid⁻¹ of it): step 0 already scores the mean-image baseline, and the transformer only
        # has to paint what differs from it (in the toy world: the arm over a fixed background).
        canvas = torch.full((3, config.image_size, config.image_size), 0.5) if mean_image is None else mean_image
        self.canvas = nn.Parameter(torch.logit(canvas.float().clamp(0.01, 0.99)))
        # The statistics the input tokens are normalised with. Not in the state dict: the checkpoint
        # keeps them under "token_stats", like the world model's checkpoint.
        self.register_buffer("token_mean", token_stats.mean.float().clone(), persistent=False)
        self.register_buffer("token_std", token_stats.std.float().clone(), persistent=False)

    def forward(self, tokens):
        """tokens (B, N, D), normalised -> images (B, 3, H, W) in [0, 1]."""
        grid_h, grid_w = self.config.grid
        x = self.blocks(self.embed(tokens) + self.position)  # (B, N, E): E = config.width
        x = self.to_pixels(x)  # (B, N, 3 p p)
        p = self.patch
        x = x.view(-1, grid_h, grid_w, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, h, p, w, p)
        return (x.reshape(-1, 3, grid_h * p, grid_w * p) + self.canvas).sigmoid()

    @torch.no_grad()
    def decode(self, tokens, token_stats=None, chunk=256):
        """Pictures of tokens of any leading shape: (..., N, D) -> (..., 3, H, W) in [0, 1].

        `token_stats`: the TokenStats the tokens are normalised with (a world model's, from its
        checkpoint). When given, the tokens are re-expressed in this decoder's own normalisation
        first, so a decoder and a world model trained with different statistics still agree."""
        leading = tokens.shape[:-2]
        tokens = tokens.reshape(-1, *tokens.shape[-2:]).to(self.token_mean.device, torch.float32)
        if token_stats is not None:
            raw = token_stats.denormalize(tokens)
            tokens = (raw - self.token_mean) / self.token_std
        images = torch.cat([self(part) for part in tokens.split(chunk)])
        return images.reshape(*leading, *images.shape[1:])


def load_decoder(path, device="cpu", encoder=None):
    """(Decoder in eval mode, checkpoint dict). `encoder`: the {"name_or_path", "pool"} the tokens
    come from (a world-model checkpoint's "encoder"); a decoder of another encoder is refused,
    since it would paint confident nonsense. Raises CheckpointError with a one-line reason."""
    checkpoint = load_safely(path, DECODER_FORMAT, DECODER_KEYS)
    if encoder is not None and (_encoder_key(encoder) != _encoder_key(checkpoint["encoder"])):
        raise CheckpointError(f"decoder {path!r} was trained on tokens of {checkpoint['encoder']}, "
                              f"these come from {encoder}")
    stats = encoder_module.TokenStats(**checkpoint["token_stats"])
    decoder = Decoder(DecoderConfig(**checkpoint["config"]), stats)
    decoder.load_state_dict(checkpoint["model"])
    return decoder.to(device).eval(), checkpoint


def _encoder_key(encoder):  # the same local folder may be named by different relative paths
    name = encoder["name_or_path"]
    return os.path.realpath(name) if os.path.isdir(name) else name, encoder["pool"]


# ----------------------------------------------------------------------------------------------
# Pictures: strips of frames (PNG) and side-by-side animations (GIF), used by plan.py and eval.py too.


def _to_uint8(image):
    """(3, H, W) float in [0, 1], tensor or array -> (H, W, 3) uint8."""
    image = torch.as_tensor(image).detach().float().cpu().clamp(0, 1)
    return (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _grid(rows, labels=None, scale=1, gap=2):
    """rows: list of lists of (3, H, W) images (rows may differ in length) -> PIL image, white gaps,
    optional text label to the left of each row."""
    height, width = np.asarray(rows[0][0]).shape[-2:]
    height, width = height * scale, width * scale
    margin = 8 + 6 * max(len(label) for label in labels) if labels else 0
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (margin + columns * (width + gap) + gap, len(rows) * (height + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = gap + r * (height + gap)
        if labels:
            draw.text((4, top + height // 2 - 5), labels[r], fill="black")
        for c, image in enumerate(row):
            tile = Image.fromarray(_to_uint8(image)).resize((width, height), Image.NEAREST)
            canvas.paste(tile, (margin + gap + c * (width + gap), top))
    return canvas


def save_image_strip(path, rows, labels=None, scale=1):
    """PNG of R rows of frames, e.g. rows = [truth (T, 3, H, W), decoded (T, 3, H, W)] in [0, 1],
    labels = ["truth", "decoded"]. Rows may have different lengths."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _grid([list(row) for row in rows], labels, scale).save(path)
    return path


def save_gif(path, rows, fps=4, scale=1):
    """Animated GIF whose frame t shows frame t of every row side by side (truth | decoded | ...).
    All rows must have the same length T."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = [_grid([[row[t] for row in rows]], scale=scale) for t in range(len(rows[0]))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


# ----------------------------------------------------------------------------------------------
# Training.


def reconstruction_loss(decoder, frozen_encoder, token_stats, frames, tokens, noise_tau, perceptual_weight,
                        generator):
    """L1 + perceptual loss of decoding noised tokens. frames (B, 3, H, W) in [0, 1], tokens (B, N, D)
    their normalised clean tokens (detached)."""
    sigma = noise_tau * torch.rand(tokens.shape[0], 1, 1, generator=generator, device=tokens.device)  # (B, 1, 1)
    noisy = tokens + sigma * torch.randn(tokens.shape, generator=generator, device=tokens.device)
    images = decoder(noisy)  # (B, 3, H, W)
    loss = (images - frames).abs().mean()
    if perceptual_weight > 0:
        # Frozen encoder as the perceptual network. Encoder.forward runs under no_grad for everyone
        # else; its undecorated function lets the gradient reach the image while the encoder's
        # weights, requires_grad False, stay as they are.
        features = token_stats.normalize(encoder_module.Encoder.forward.__wrapped__(frozen_encoder, images))
        loss = loss + perceptual_weight * (features - tokens).pow(2).mean()
    return loss


def psnr_and_l1(images, targets):
    """Mean per-image PSNR (dB, peak 1) and mean absolute error of images (B, 3, H, W) in [0, 1]."""
    mse = (images - targets).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item(), (images - targets).abs().mean().item()


def frame_batches(dataset, batch_size, seed, num_workers=0, start_step=0):
    """Endless frame batches (B, 3, H, W) from a dataset of 1-frame clips. data.StepBatches draws batch
    k from an RNG seeded by (seed, k), so a resumed run sees exactly the frames an uninterrupted one
    would; with labelled fraction 0 every sample comes from its second ("unlabelled") pool."""
    batches = data.StepBatches(dataset, dataset, 0.0, batch_size, seed, rank=0, start_step=start_step)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=num_workers)
    return (batch["frames"][:, 0] for batch in loader)


def build_frame_datasets(args, image_size):
    """(train, held-out) datasets of single frames over every source, split by episode."""
    train_parts, val_parts = [], []
    for source in args.dataset:
        common = dict(role="unlabeled", camera_key=args.camera_key, clip_length=1, image_size=image_size)
        full = data.ClipDataset(source, **common)
        train_episodes, val_episodes = data.split_episodes(full.episodes, args.val_fraction, args.seed)
        train_parts.append(data.ClipDataset(source, episodes=train_episodes, **common))
        val_parts.append(data.ClipDataset(source, episodes=val_episodes, **common))
    return torch.utils.data.ConcatDataset(train_parts), torch.utils.data.ConcatDataset(val_parts)


def build_argument_parser():
    parser = argparse.ArgumentParser(
        description="Train an RAE-style decoder from frozen DINOv2 tokens to pixels (pictures of what the world "
                    "model imagines). With no --dataset it trains on the toy world's datasets (sim.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train a decoder (the only action of this CLI)")
    parser.add_argument("--dataset", nargs="+", help="LeRobot datasets (local paths, hub ids, droid, droid_subset); "
                                                     "default: the toy labelled + unlabelled datasets")
    parser.add_argument("--camera-key", default=data.CAMERA_KEY)
    parser.add_argument("--encoder", help=f"DINOv2 hub id or local folder; if not given, the toy tiny DINOv2 "
                                          f"with no --dataset, else {encoder_module.DEFAULT_ENCODER}")
    parser.add_argument("--pool", type=int, help=f"k x k pooling of the patch grid; if not given, {encoder_module.TOY_POOL} on the "
                                                     f"toy world, else 1")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--noise-tau", type=float, default=0.8, help="token noise sigma ~ U(0, tau)")
    parser.add_argument("--perceptual", type=float, default=0.1, help="weight of the frozen-encoder feature loss")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help=f"peak learning rate; None: per preset, {PRESET_LR}")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="episodes held out")
    parser.add_argument("--val-frames", type=int, default=64, help="held-out frames scored every --val-every")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--stats-batches", type=int, default=8, help="batches for token statistics and mean image")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"output folder; if not given, the resumed checkpoint's folder, {TOY_DECODER_DIR} on "
                                      f"the toy world, else runs/<first dataset>/decoder")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue from a decoder checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start afresh over an existing output folder")
    return parser


def parse_arguments(argv=None):
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if not args.train:
        parser.error("nothing to do: pass --train (other files use load_decoder / Decoder.decode)")
    args.toy = args.dataset is None
    args.lr = args.lr or PRESET_LR[args.preset]
    if args.toy:
        args.pool = encoder_module.TOY_POOL if args.pool is None else args.pool
        default_out = TOY_DECODER_DIR
    else:
        args.encoder = args.encoder or encoder_module.DEFAULT_ENCODER
        args.pool = 1 if args.pool is None else args.pool
        default_out = os.path.join("runs", os.path.basename(os.path.normpath(args.dataset[0])), "decoder")
    # a resumed run writes where its checkpoint lives
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else default_out)
    if min(args.steps, args.batch_size, args.val_frames, args.val_every, args.save_every, args.pool,
           args.stats_batches) <= 0 or args.num_workers < 0 or args.warmup < 0:
        parser.error("--steps, --batch-size, --val-frames, --val-every, --save-every, --pool and --stats-batches "
                     "must be positive; --num-workers and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if not 0 < args.val_fraction < 1 or args.noise_tau < 0 or args.perceptual < 0:
        parser.error("--val-fraction must be in (0, 1); --noise-tau and --perceptual must be >= 0")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    args.warmup = clamp_warmup(args.warmup, args.steps)
    return args


@dataclasses.dataclass
class HeldOut:
    """A fixed sample of held-out frames, kept in memory and scored every --val-every steps."""
    frames: torch.Tensor  # (V, 3, H, W) in [0, 1]
    tokens: torch.Tensor  # (V, N, D) normalised
    baseline_psnr: float  # the mean training image's score: what an untrained decoder paints
    baseline_l1: float


def load_frames(args, device):
    """The frozen encoder and the (train, held-out) frame datasets."""
    if args.toy:
        args.dataset = list(sim.ensure_toy_datasets())
        args.encoder = args.encoder or encoder_module.ensure_tiny_dinov2()
    try:
        frozen_encoder = encoder_module.Encoder(args.encoder, pool=args.pool).to(device)
        return (frozen_encoder, *build_frame_datasets(args, frozen_encoder.image_size))
    except (data.DatasetError, OSError, ValueError) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}")


@torch.no_grad()
def measure_statistics(args, resumed, frozen_encoder, train_set, device):
    """Token statistics and the mean image (the canvas' start and the baseline): from the checkpoint
    when resuming, else from the same training frames."""
    if resumed is not None:
        return encoder_module.TokenStats(**resumed["token_stats"]), resumed["mean_image"].to(device)
    stats_frames = [frames.to(device) for _, frames in
                    zip(range(args.stats_batches), frame_batches(train_set, args.batch_size, args.seed,
                                                                 start_step=10_000_000))]
    token_stats = encoder_module.TokenStats.from_batches((frozen_encoder(frames) for frames in stats_frames),
                                                         max_batches=args.stats_batches)
    return token_stats, torch.cat(stats_frames).mean(0)  # (3, H, W)


@torch.no_grad()
def held_out_frames(args, val_set, frozen_encoder, token_stats, mean_image, device):
    picks = np.random.default_rng(args.seed + 1).choice(len(val_set), min(args.val_frames, len(val_set)), replace=False)
    frames = torch.stack([val_set[int(i)]["frames"][0] for i in picks]).to(device)  # (V, 3, H, W)
    baseline_psnr, baseline_l1 = psnr_and_l1(mean_image.expand_as(frames), frames)
    return HeldOut(frames, token_stats.normalize(frozen_encoder(frames)), baseline_psnr, baseline_l1)


@torch.no_grad()
def validate(decoder, held_out):
    """Decoded held-out frames (V, 3, H, W) and their (PSNR, L1)."""
    decoder.eval()
    images = decoder(held_out.tokens)
    decoder.train()
    return images, psnr_and_l1(images, held_out.frames)


def write_record(log_file, decoder, held_out, done, loss):
    _, (psnr, l1) = validate(decoder, held_out)
    record = dict(step=done, loss=loss, val_psnr=psnr, val_l1=l1, baseline_psnr=held_out.baseline_psnr,
                  baseline_l1=held_out.baseline_l1)
    log_file.write(json_line(record))
    log_file.flush()
    return record


def checkpoint_payload(args, step, decoder, optimizer, scheduler, token_stats, mean_image, metrics):
    return dict(format=DECODER_FORMAT, step=step, model=decoder.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), config=dataclasses.asdict(decoder.config), train_args=vars(args),
                token_stats=token_stats.as_dict(), mean_image=mean_image.cpu(),
                encoder=dict(name_or_path=args.encoder, pool=args.pool), metrics=metrics)


def build_decoder(args, resumed, frozen_encoder, token_stats, mean_image, device):
    """Decoder, optimizer and schedule, restored from `resumed` when given; and the first step."""
    config = DecoderConfig.preset(args.preset, token_dim=frozen_encoder.token_dim, grid=tuple(frozen_encoder.grid),
                                  image_size=frozen_encoder.image_size)
    if resumed is not None and (resumed["config"] != dataclasses.asdict(config)
                                or resumed["encoder"] != dict(name_or_path=args.encoder, pool=args.pool)):
        raise SystemExit(f"error: {args.resume} holds a decoder of another configuration or encoder; "
                         f"resume with the flags it was trained with")
    decoder = Decoder(config, token_stats, mean_image).to(device)
    optimizer, scheduler = make_optimizer(decoder.parameters(), args.lr, args.weight_decay, args.warmup, args.steps)
    return decoder, optimizer, scheduler, restore_training_state(resumed, decoder, optimizer, scheduler)


def train(args):
    torch.manual_seed(args.seed)
    resumed = resume_from(args.resume, DECODER_FORMAT, TRAINING_KEYS)
    if resumed is not None and resumed["step"] >= args.steps:
        raise SystemExit(f"error: {args.resume} is already at step {resumed['step']}, not before --steps "
                         f"{args.steps}: nothing to train (pass a larger --steps to continue it)")
    folder = RunFolder(args.out, args.resume, args.overwrite, resumed_step=resumed and resumed["step"])
    device = torch.device(args.device)
    frozen_encoder, train_set, val_set = load_frames(args, device)
    token_stats, mean_image = measure_statistics(args, resumed, frozen_encoder, train_set, device)
    held_out = held_out_frames(args, val_set, frozen_encoder, token_stats, mean_image, device)
    decoder, optimizer, scheduler, start_step = build_decoder(args, resumed, frozen_encoder, token_stats, mean_image,
                                                              device)
    print(f"decoder: preset {args.preset}, {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f} M parameters, "
          f"{frozen_encoder.num_tokens} tokens x {decoder.config.token_dim} -> 3 x {decoder.config.image_size}^2; "
          f"held-out mean-image baseline {held_out.baseline_psnr:.2f} dB")
    log_file = folder.open_log(resumed and resumed["step"])
    batches = frame_batches(train_set, args.batch_size, args.seed, args.num_workers, start_step)
    progress = tqdm(total=args.steps, initial=start_step, dynamic_ncols=True)
    # step 0: the untrained decoder
    metrics = write_record(log_file, decoder, held_out, 0, None) if resumed is None else resumed["metrics"]
    step = start_step
    decoder.train()
    with StopRequest() as stop:
        for step, frames in zip(range(start_step, args.steps), batches):
            frames = frames.to(device)  # (B, 3, H, W)
            with torch.no_grad():  # detached: the decoder never changes the encoder
                tokens = token_stats.normalize(frozen_encoder(frames))  # (B, N, D)
            generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
            loss = reconstruction_loss(decoder, frozen_encoder, token_stats, frames, tokens, args.noise_tau,
                                       args.perceptual, generator)
            check_finite(loss, step, folder)
            optimizer_step(loss, decoder, optimizer, scheduler)
            done = step + 1
            if is_due(done, args.val_every, args.steps) or stop.signal_name:
                metrics = write_record(log_file, decoder, held_out, done, loss.item())
                progress.set_postfix(loss=f"{loss.item():.4f}", val_psnr=f"{metrics['val_psnr']:.2f}dB")
            progress.update(1)
            if is_due(done, args.save_every, args.steps) or stop.signal_name:
                folder.save(checkpoint_payload(args, done, decoder, optimizer, scheduler, token_stats, mean_image,
                                               metrics), decoder)
            if stop.signal_name:
                break
    progress.close()
    log_file.close()
    if stop.signal_name:
        print(f"{stop.signal_name}: stopped after step {step + 1}; continue with --resume {folder.checkpoint_path}")
        return 130
    images, _ = validate(decoder, held_out)
    picture = save_image_strip(os.path.join(args.out, "recon.png"), [held_out.frames[:8], images[:8]],
                               labels=["truth", "decoded"], scale=max(1, 128 // decoder.config.image_size))
    print(f"checkpoint: {folder.checkpoint_path}; held-out PSNR {metrics['val_psnr']:.2f} dB "
          f"(mean image {held_out.baseline_psnr:.2f} dB); pictures: {picture}")
    return 0


def main(argv=None):
    return train(parse_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
