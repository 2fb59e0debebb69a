"""The frozen DINOv2 encoder: frames -> patch tokens, the latent space the world model lives in.

    frames (B, 3, H, W) in [0, 1]
      -> resize to the model's input size, ImageNet normalisation (what DINOv2 was trained on)
      -> DINOv2 (frozen: eval mode, no gradients)      last_hidden_state (B, 1 + R + h·w, D)
      -> drop the CLS token and the R registers         patch tokens (B, h·w, D)
      -> optional k×k average pooling of the grid       (B, (h/k)·(w/k), D)

Why frozen DINOv2. Its patch tokens already carry object identity, position and pose: the world
model only has to learn how they move, never how to see (DINO-WM). Freezing also makes the latent
space fixed, so the planner's cost, the goal image's tokens and the decoder all agree on it.

Why pooling. DINOv2-S at 224 px gives 16×16 = 256 tokens of width 384 per frame; attention cost
grows with tokens², so averaging k×k neighbouring patches (k = 2: 64 tokens) buys a 4× cheaper
space attention for a coarser picture. The toy world uses a tiny DINOv2 with DINOv2-S's 16×16 patch
grid (4 px patches of its 64 px frames, width 128), pooled 4×4: 16 tokens of 128.

Weights. Real runs load `facebook/dinov2-with-registers-small` (the default) or any other
DINOv2 (with or without registers) by hub id or local folder, with `from_pretrained` and remote
code off. No weights can be downloaded in tests or for the toy default: `make_tiny_dinov2` builds
a tiny randomly initialised DINOv2 from a config and saves it with `save_pretrained`, and it is
loaded back through the very same `from_pretrained` call. (Its random features are still a
fixed, information-preserving function of the image, which is all the toy world needs.)

Token statistics. The world model sees tokens normalised per channel, z = (t − mean)/std, with
mean and std measured on training frames (TokenStats), so that unit-variance noise in the flow
matching is on the same scale as the data in every channel.

Whitening (optional, TokenStats' `whitening`; train.py --whiten-tokens, on in the toy demo). Per
channel, the normalised tokens still vary very unevenly by direction: their (D, D) covariance Σ has
a few large eigenvalues (in the toy, ~40 of a total of 128) and many tiny ones, and what shows in
the small directions barely counts in a squared error. In the toy world that is the rotation and
the gripper: a ±2σ action changes the tokens by 0.24-0.48 of what x changes them (0.06-0.23 of its
share of the squared error that training minimises and the planner compares). Whitening rotates,
rescales and rotates back, z_w = z·W with the ZCA matrix

    Σ = V diag(λ) Vᵀ,      W = V diag(1 / √(λ + ε·λ_max)) Vᵀ      (D, D), symmetric

so every direction with λ ≫ ε·λ_max gets unit variance, and directions with almost none (e.g. the
one LayerNorm removes) are not blown up into noise: the floor ε. Of the whitenings, ZCA is the one
nearest the identity. In the toy (ε = 1e-3) the rotation and gripper changes grow to 0.41-0.70 of
x's (0.17-0.49 of its squared share); the loss, the flow's noise and the planner's cost all live in
the whitened space, while errors are reported per channel (channelwise()), comparable across
models. What it does to learning and planning is measured in the README (`no_whitening`).

Feature cache. `python encoder.py --dataset SRC --out DIR` runs DINOv2 once over every frame of a
dataset and stores the tokens (float16, memory-mapped, row i = absolute frame i); `train.py
--feature-cache` then trains without decoding video or running DINOv2 at all. At DROID's scale
(~26 M frames) the decoding is the cost, so each episode's video is read front to back in chunks
(not one seek per frame) by DataLoader workers while DINOv2 runs; `--shard i/n` (or one shard per
torchrun rank) splits the episodes between processes and machines writing the same cache; every
finished episode is recorded, so a stopped run resumes from `<out>.partial` where it stopped, and
the last shard to finish renames it to `out`. A finished cache is never replaced without
--overwrite.
"""
import argparse
import collections
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import socket
import sys
import time
import urllib.parse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from stats import Moments, Stats

DEFAULT_ENCODER = "facebook/dinov2-with-registers-small"
TOY_ENCODER_DIR = os.path.join("toy_data", "dinov2_tiny_p4")
TOY_POOL = 4  # the toy's 16x16 patch grid pooled to 4x4 = 16 tokens per frame
COARSE_ENCODER_DIR = os.path.join("toy_data", "dinov2_tiny_p8")  # the earlier toy encoder, for the ablation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hub_reachable(timeout=5.0):
    """Whether the Hugging Face hub answers at all (one TCP connection; assumed yes behind a proxy)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_dinov2(name_or_path):
    """A DINOv2 from a local folder, the hub cache, or the hub. Without a copy and without the hub, one
    line saying how to pass a local copy (instead of a minute of download retries)."""
    from transformers import AutoModel
    try:
        return AutoModel.from_pretrained(name_or_path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as error:  # missing or malformed folder, or not in the cache yet
        reason = (str(error).splitlines() or [""])[0]
    if not os.path.isdir(name_or_path) and os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable():
        try:
            return AutoModel.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as error:  # unknown or malformed hub id
            reason = (str(error).splitlines() or [""])[0]
    elif not os.path.isdir(name_or_path):
        reason = (f"not in the local cache, and the hub cannot be reached; download it where there is a network "
                  f"(huggingface-cli download {name_or_path} --local-dir DIR) and pass --encoder DIR")
    raise OSError(f"cannot load DINOv2 {name_or_path!r}: {reason}")


class Encoder(nn.Module):
    """Frozen DINOv2 patch tokens. Attributes: image_size, token_dim D, num_tokens N, grid (h, w),
    name_or_path, pool."""

    def __init__(self, name_or_path=DEFAULT_ENCODER, pool=1, image_size=None):
        super().__init__()
        self.model = load_dinov2(name_or_path)
        config = self.model.config
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise OSError(f"{name_or_path!r} is a {config.model_type!r} model, not DINOv2")
        self.model.eval().requires_grad_(False)
        self.name_or_path, self.pool = name_or_path, pool
        # Released DINOv2 checkpoints declare 518 px (their last pretraining stage: 37x37 = 1369 patches);
        # they interpolate their position embeddings, so by default frames go in at 224 px (16x16 = 256
        # patches of 14 px, as DINO-WM and V-JEPA 2-AC use), or at the model's own size when smaller.
        self.image_size, patch = image_size or min(config.image_size, 224), config.patch_size
        if self.image_size % patch:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {patch}")
        side = self.image_size // patch
        if side % pool:
            raise ValueError(f"pool {pool} does not divide the {side}x{side} patch grid")
        self.skip = 1 + getattr(config, "num_register_tokens", 0)  # CLS (+ registers) come first
        self.patch_side = side
        self.grid = (side // pool, side // pool)
        self.num_tokens, self.token_dim = self.grid[0] * self.grid[1], config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # frozen: stays in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, frames):
        """(B, 3, H, W) in [0, 1] -> (B, N, D) patch tokens."""
        if frames.shape[-2:] != (self.image_size, self.image_size):
            frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        hidden = self.model(pixel_values=(frames - self.mean) / self.std).last_hidden_state
        patches = hidden[:, self.skip:]  # (B, h·w, D)
        if self.pool > 1:
            B, _, D = patches.shape
            grid = patches.transpose(1, 2).reshape(B, D, self.patch_side, self.patch_side)
            patches = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (B, N, D)
        return patches


def make_tiny_dinov2(path, image_size=64, patch_size=4, hidden_size=128, layers=2, heads=4, registers=4, seed=0):
    """A tiny, randomly initialised DINOv2 with registers saved with save_pretrained: what tests
    and the toy demo load through from_pretrained, exactly like a hub id.

    Its size is measured, not guessed: how much of the gripper's pose a linear read-out recovers
    from the 16 pooled tokens (R², 3000 random poses, held-out 1000) grows with the patch grid and
    the width: 8 px patches × width 64 gave position 0.87-0.98, rotation 0.64-0.90, gripper 0.28;
    4 px patches (DINOv2-S's 16×16 grid) × width 128 give 0.94-0.99, 0.84-0.94 and 0.55, and a
    world model trained on them learns what the actions do faster (README). Wider still (384)
    reads out better but trains worse: the tiny model's width is 128."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       intermediate_size=4 * hidden_size, num_register_tokens=registers)
    Dinov2WithRegistersModel(config).save_pretrained(path)
    return path


def ensure_tiny_dinov2(path=TOY_ENCODER_DIR, **sizes):
    """The toy default's encoder (or a tiny DINOv2 of other `sizes`, make_tiny_dinov2's), created once."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny_dinov2(path, **sizes)
    return path


class TokenStats(Stats):
    """Per-channel mean and std (D,) of raw tokens, z = (tokens − mean)/std, then, when `whitening`
    (D, D) is given, z·whitening (the module docstring's ZCA)."""

    def __init__(self, mean, std, whitening=None):
        super().__init__(mean, std)
        self.whitening = None if whitening is None else torch.as_tensor(whitening, dtype=torch.float32)
        self.unwhitening = None if whitening is None else torch.linalg.inv(self.whitening.double()).float()

    @classmethod
    def from_batches(cls, token_batches, max_batches=8, whiten=0.0):
        """Over every token of the first `max_batches` batches of raw tokens (any shape (..., D));
        whiten = ε > 0 adds the ZCA whitening of the per-channel normalised tokens, floor ε·λ_max."""
        moments = Moments(products=whiten > 0)
        for tokens in itertools.islice(token_batches, max_batches):
            moments.add(tokens)
        stats = moments.stats(cls)
        if whiten > 0:
            std = stats.std.double()
            stats = cls(stats.mean, stats.std, zca_whitening(moments.covariance() / torch.outer(std, std), whiten))
        return stats

    def channelwise(self):
        """The same statistics without the whitening: the per-channel scale errors are reported in."""
        return TokenStats(self.mean, self.std)

    def renormalize(self, values, target):
        """Tokens normalised with these statistics -> the same tokens normalised with `target`'s."""
        return target.normalize(self.denormalize(values))

    def normalize(self, values):
        normalised = super().normalize(values)  # (..., D)
        return normalised if self.whitening is None else normalised @ self.whitening.to(normalised)

    def denormalize(self, values):
        if self.whitening is not None:
            values = values @ self.unwhitening.to(values)
        return super().denormalize(values)

    def as_dict(self):
        extra = {} if self.whitening is None else dict(whitening=self.whitening)
        return dict(super().as_dict(), **extra)


def zca_whitening(covariance, floor):
    """W = V diag(1/√(λ + floor·λ_max)) Vᵀ for covariance = V diag(λ) Vᵀ (D, D): z·W has unit variance
    in every direction whose variance is well above floor·λ_max."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    eigenvalues = eigenvalues.clamp_min(0)
    scale = (eigenvalues + floor * eigenvalues.max()).rsqrt()
    return ((vectors * scale) @ vectors.T).float()


# ----------------------------------------------------------------------------------------------
# Feature cache: encode every frame of a dataset once.


def check_cache_destination(out, overwrite=False):
    """A folder that is not a cache is never replaced; a finished cache only with overwrite=True (on
    DROID one typo in --out would otherwise delete days of encoding)."""
    if not os.path.exists(out):
        return
    meta_path = os.path.join(out, "meta.json")
    if not os.path.isfile(meta_path):
        raise data.DatasetError(f"{out!r} exists and is not a feature cache; choose another --out")
    if not overwrite:
        with open(meta_path) as file:
            source = json.load(file).get("source", "?")
        raise data.DatasetError(f"{out!r} already holds a feature cache (of {source}); pass --overwrite to "
                                f"replace it, or choose another --out")


class EpisodeFrames(torch.utils.data.Dataset):
    """Item k: the k-th chunk of at most `chunk` consecutive frames of one episode, decoded in order,
    as (episode, absolute index of its first frame, frames (L, 3, S, S) in [0, 1]). A video is read
    front to back, one decoder call per chunk, instead of one seek per frame; DataLoader workers
    decode chunks in parallel while the main process runs DINOv2."""

    def __init__(self, repo_id, root, metadata, camera_key, image_size, episodes, chunk=64):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        self.metadata, self.camera_key, self.image_size = metadata, camera_key, image_size
        self.video = self.metadata.features[camera_key]["dtype"] == "video"
        # downloads what is missing (videos included) and gives the local root; images come from its rows
        self.lerobot = LeRobotDataset(repo_id, root=root, episodes=list(episodes), download_videos=self.video,
                                      video_backend=data.video_backend())
        lengths = self.metadata.episodes["length"]
        self.chunks = [(int(e), start, min(start + chunk, int(lengths[e]))) for e in episodes
                       for start in range(0, int(lengths[e]), chunk)]

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, k):
        episode, start, stop = self.chunks[k]
        info = self.metadata.episodes[episode]
        first = int(info["dataset_from_index"]) + start
        if self.video:
            from lerobot.datasets.video_utils import decode_video_frames
            offset = info[f"videos/{self.camera_key}/from_timestamp"]
            times = [float(offset + i / self.metadata.fps) for i in range(start, stop)]
            path = os.path.join(self.lerobot.root, self.metadata.get_video_file_path(episode, self.camera_key))
            frames = decode_video_frames(path, times, 1e-4, data.video_backend())  # (L, 3, h, w)
        else:  # image datasets: the rows LeRobotDataset reads, already (3, h, w) tensors
            if not hasattr(self, "row_of"):
                self.row_of = {int(index): row for row, index in enumerate(self.lerobot.hf_dataset["index"])}
            frames = torch.stack([self.lerobot.hf_dataset[self.row_of[first + i]][self.camera_key]
                                  for i in range(stop - start)])
        return episode, first, data.square_resize(frames.float(), self.image_size)


def write_feature_cache(source, out, encoder, camera_key, batch_size=64, num_workers=0, device="cpu",
                        overwrite=False, shard=(0, 1)):
    """tokens.npy (total_frames, N, D) float16 with row i = absolute frame i, plus meta.json and
    token_stats.json, in `out`. Work happens in `<out>.partial`: shard (i, n) encodes the episodes
    e with e % n == i and records each finished episode in done-i-of-n.txt, so shards run in parallel
    (processes, machines, torchrun ranks) and a crashed shard resumes where it stopped. The shard that
    finds every episode done finishes the cache and renames it to `out`. Returns (out or None while
    other shards are still running, frames/s of this process)."""
    check_cache_destination(out, overwrite)
    repo_id, root, episode_filter, metadata = data.load_metadata(source)
    data.check_camera(source, metadata.features, camera_key)
    partial = out.rstrip("/") + ".partial"
    episodes = [e for e in range(metadata.total_episodes) if episode_filter is None or episode_filter(e)]
    shape = (metadata.total_frames, encoder.num_tokens, encoder.token_dim)
    with cache_lock(partial):
        os.makedirs(partial, exist_ok=True)
        tokens_path = os.path.join(partial, "tokens.npy")
        if overwrite and os.path.isfile(tokens_path) and np.load(tokens_path, mmap_mode="r").shape != shape:
            shutil.rmtree(partial)  # an unfinished cache of another encoder: replaced, as asked
            os.makedirs(partial)
        if not os.path.isfile(tokens_path):
            np.lib.format.open_memmap(tokens_path, mode="w+", dtype=np.float16, shape=shape).flush()
    tokens = np.load(tokens_path, mmap_mode="r+")
    if tokens.shape != shape:
        raise data.DatasetError(f"{partial!r} holds an unfinished cache of another shape {tokens.shape}; remove it")
    index, count = shard
    done_path = os.path.join(partial, f"done-{index}-of-{count}.txt")
    finished = finished_episodes(partial)
    todo = [e for e in episodes if e % count == index and e not in finished]
    frames = EpisodeFrames(repo_id, root, metadata, camera_key, encoder.image_size, todo, chunk=batch_size)
    start_time, encoded = time.perf_counter(), 0
    remaining = collections.Counter(episode for episode, _, _ in frames.chunks)  # chunks still to encode
    loader = torch.utils.data.DataLoader(frames, batch_size=None, num_workers=num_workers)
    with open(done_path, "a") as done, tqdm(total=sum(c[2] - c[1] for c in frames.chunks), unit="frame",
                                            desc=f"encoding {source} (shard {index}/{count})") as progress:
        for episode, first, chunk in loader:
            tokens[first:first + len(chunk)] = encoder(chunk.to(device)).cpu().numpy().astype(np.float16)
            encoded += len(chunk)
            progress.update(len(chunk))
            remaining[episode] -= 1
            if remaining[episode] == 0:  # the whole episode is on disk: never encoded again
                tokens.flush()
                done.write(f"{episode}\n")
                done.flush()
    seconds = time.perf_counter() - start_time
    meta = dict(source=source, encoder=encoder.name_or_path, pool=encoder.pool, camera_key=camera_key,
                image_size=encoder.image_size, num_frames=metadata.total_frames, seconds=seconds)
    return finish_cache(partial, out, tokens, metadata, episodes, meta), encoded / max(seconds, 1e-9)


def finish_cache(partial, out, tokens, metadata, episodes, meta):
    """When every episode is done: token_stats.json (from up to 20,000 frames), meta.json, and the
    rename of `<out>.partial` to `out`. Returns `out`, or None while other shards are still running."""
    with cache_lock(partial):
        if not os.path.isdir(partial):  # another shard finished the cache while this one waited for the lock
            remove_lock(partial)
            return out if os.path.isdir(out) else None
        if not set(episodes) <= finished_episodes(partial):
            return None  # other shards are still running
        rows = np.concatenate([np.arange(metadata.episodes[e]["dataset_from_index"],
                                         metadata.episodes[e]["dataset_to_index"]) for e in episodes])
        sample = np.sort(np.random.default_rng(0).permutation(rows)[:20_000])
        moments = Moments()
        moments.add(torch.from_numpy(np.asarray(tokens[sample], np.float32)))
        moments.stats(TokenStats).save(os.path.join(partial, "token_stats.json"))
        with open(os.path.join(partial, "meta.json"), "w") as file:
            json.dump(meta, file, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(partial, out)
        remove_lock(partial)
    return out


def finished_episodes(partial):
    """Episodes every shard has recorded as done in `<out>.partial` (any sharding, earlier runs included)."""
    done = set()
    for name in os.listdir(partial) if os.path.isdir(partial) else []:
        if name.startswith("done-"):
            with open(os.path.join(partial, name)) as file:
                done.update(int(line) for line in file if line.strip())
    return done


@contextlib.contextmanager
def cache_lock(partial):
    """An exclusive lock on `<out>.partial` between the processes writing one cache (POSIX flock on the
    file `<out>.partial.lock` beside it, so that taking the lock never makes the folder again once the
    cache is finished and renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
    with open(lock_path(partial), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(partial):
    """`<out>.partial.lock`: the file cache_lock locks, beside the folder."""
    return partial.rstrip("/") + ".lock"


def remove_lock(partial):
    """The lock file of a finished cache (held by the caller; a shard that waited may already have removed it)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path(partial))


def ensure_feature_cache(source, out, name_or_path, pool, camera_key):
    """A feature cache of `source` for this encoder and pooling, written only if missing or stale."""
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as file:
            meta = json.load(file)
        if (meta["encoder"], meta["pool"], meta["camera_key"]) == (name_or_path, pool, camera_key):
            return out
    return write_feature_cache(source, out, Encoder(name_or_path, pool), camera_key, overwrite=True)[0]


def parse_shard(text):
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n with 0 <= i < n (e.g. 0/8)") from None
    return index, count


def main(argv=None):
    parser = argparse.ArgumentParser(description="Encode every frame of a LeRobot dataset with frozen DINOv2 "
                                     "once, into a feature cache that train.py --feature-cache reads. Resumable; "
                                     "shardable across processes and machines (--shard, or one shard per torchrun rank).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", required=True, help="local LeRobot folder, hub id, or an alias (data.py)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="DINOv2 hub id or local folder")
    parser.add_argument("--pool", type=int, default=1, help="k x k average pooling of the patch grid")
    parser.add_argument("--image-size", type=int, help="input size in pixels; if not given, 224 or the model's if smaller")
    parser.add_argument("--camera-key", default=data.CAMERA_KEY)
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing feature cache in --out")
    parser.add_argument("--shard", type=parse_shard, help="i/n: encode every n-th episode from the i-th; if not "
                                                           "given, RANK/WORLD_SIZE under torchrun, else 0/1 (all)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per DINOv2 call (and per decoded chunk)")
    parser.add_argument("--num-workers", type=int, default=2, help="processes decoding video beside DINOv2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if min(args.pool, args.batch_size, args.image_size or 1) < 1 or args.num_workers < 0:
        parser.error("--pool, --batch-size and --image-size must be positive, --num-workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if args.shard is None:
        args.shard = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        if args.device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        check_cache_destination(args.out, args.overwrite)  # before any model or video is loaded
        data.load_metadata(args.dataset)
        encoder = Encoder(args.encoder, pool=args.pool, image_size=args.image_size).to(args.device)
        out, frames_per_second = write_feature_cache(args.dataset, args.out, encoder, args.camera_key, args.batch_size,
                                                     args.num_workers, args.device, args.overwrite, args.shard)
    except (data.DatasetError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if out is None:
        print(f"shard {args.shard[0]}/{args.shard[1]} done ({frames_per_second:.0f} frames/s); the last shard to "
              f"finish writes {args.out}")
    else:
        print(f"wrote {out} ({frames_per_second:.0f} frames/s); train with --feature-cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
