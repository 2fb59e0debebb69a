"""What a training run reads: the clips of its two roles, from datasets, cameras and frame rates
that need not match.

    labelled role     one dataset, one camera (--labeled-camera-key): clips with delta-EE actions
    action-free role  one dataset, one or more cameras (--unlabeled-camera-keys): each camera is a
                      video stream of its own (data.Streams), so DROID's three cameras triple its video

Frame rates: clip frames are --frame-stride frames apart at one common rate, --fps (or the datasets'
own when they agree); a 30 fps set read at 15 fps takes every 2nd frame, and a rate that is not a
whole multiple is refused. Every stream is split into training and validation episodes the same way
(split_episodes, seeded), and reads its DINOv2 tokens from a feature cache when one is given (one
folder per stream, labelled first). The toy demo builds its datasets, its tiny DINOv2 and its caches
on first use (prepare_toy_data).

The batches: data.MixedLoader draws every sample from the labelled role with probability
--labeled-fraction and from the action-free role otherwise, as a pure function of (seed, rank, step).
"""
import os

import torch

import data
import encoder as encoder_module
import sim


def prepare_toy_data(args):
    """The embedded default: toy datasets written by sim.py and a tiny random DINOv2, created once
    (each only where the user did not name their own)."""
    if args.labeled is None or args.unlabeled is None:
        labeled, unlabeled = sim.ensure_toy_datasets()
        args.labeled, args.unlabeled = args.labeled or labeled, args.unlabeled or unlabeled
    if args.encoder == encoder_module.DEFAULT_ENCODER:
        args.encoder = encoder_module.ensure_tiny_dinov2()
    if args.feature_cache is None:
        # Encode the toy frames once (seconds) instead of decoding them and running DINOv2 every step:
        # the same path a DROID user takes with `python encoder.py` and --feature-cache. One cache per
        # dataset, encoder and pooling, next to the dataset.
        name = f"{os.path.basename(os.path.normpath(args.encoder))}-pool{args.pool}"
        args.feature_cache = [encoder_module.ensure_feature_cache(
            root, os.path.join(os.path.dirname(os.path.normpath(root)), "features",
                               f"{os.path.basename(os.path.normpath(root))}-{name}"
                               + ("" if camera == data.CAMERA_KEY else f"-{camera.split('.')[-1]}")),
            args.encoder, args.pool, camera) for root, camera in streams(args)]


def frame_strides(args):
    """Dataset frames between clip frames, per role: --frame-stride at one common rate (--fps, or the
    datasets' own when they agree). Reads only the datasets' metadata: a missing dataset stops the run
    here, before any model is loaded."""
    rates = {role: data.load_metadata(source)[3].fps for role, source in
             (("labeled", args.labeled), ("unlabeled", args.unlabeled))}
    fps = args.fps or (rates["labeled"] if rates["labeled"] == rates["unlabeled"] else None)
    if fps is None:
        raise data.DatasetError(f"the labelled set runs at {rates['labeled']:g} fps and the action-free set at "
                                f"{rates['unlabeled']:g} fps: pass --fps {min(rates.values()):g} to read both at one rate")
    strides = {}
    for role, rate in rates.items():
        stride = args.frame_stride * rate / fps
        if round(stride) < 1 or abs(stride - round(stride)) > 1e-6:
            raise data.DatasetError(f"the {role} set's {rate:g} fps is not a whole multiple of {fps:g} fps "
                                    f"(--fps {fps:g} x --frame-stride {args.frame_stride})")
        strides[role] = round(stride)
    return strides


def streams(args):
    """(dataset, camera) of every video stream: the labelled set's camera first, then each camera of
    the action-free set."""
    return [(args.labeled, args.labeled_camera_key)] + [(args.unlabeled, key) for key in args.unlabeled_camera_keys]


def build_datasets(args, image_size):
    """Training and validation clips of both roles, split by episode (every camera of a dataset the
    same way; no validation sets when --val-every is 0). Several action-free cameras: data.Streams."""
    caches = args.feature_cache or [None] * len(streams(args))
    parts = {"labeled": ([], []), "unlabeled": ([], [])}
    for index, ((source, camera), cache) in enumerate(zip(streams(args), caches)):
        role = "labeled" if index == 0 else "unlabeled"
        common = dict(role=role, camera_key=camera, state_keys=tuple(args.state_keys),
                      clip_length=args.clip_length, frame_stride=args.strides[role],
                      image_size=image_size, streaming=args.streaming, feature_cache=cache)
        full = data.ClipDataset(source, **common)
        train_episodes, val_episodes = data.split_episodes(full.episodes, args.val_fraction, args.seed)
        parts[role][0].append(data.ClipDataset(source, episodes=train_episodes, **common))
        if args.val_every:
            parts[role][1].append(data.ClipDataset(source, episodes=val_episodes, **common))
    return {role: (data.Streams.of(train), data.Streams.of(val) if val else None)
            for role, (train, val) in parts.items()}


def make_loader(datasets, args, split, rank, start_step=0):
    index = 0 if split == "train" else 1
    seed = args.seed if split == "train" else args.seed + 1_000_000
    return data.MixedLoader(datasets["labeled"][index], datasets["unlabeled"][index],
                            labeled_fraction=args.labeled_fraction, batch_size=args.batch_size,
                            seed=seed, num_workers=args.num_workers, rank=rank,
                            start_step=start_step)


@torch.no_grad()
def encode_batch(batch, frozen_encoder, device):
    """Raw tokens (B, T, N, D) of a batch: from the feature cache, or by running DINOv2 now."""
    if "tokens" in batch:
        return batch["tokens"].to(device, torch.float32)
    frames = batch["frames"].to(device)  # (B, T, 3, H, W)
    batch_size, clip_length = frames.shape[:2]
    tokens = frozen_encoder(frames.flatten(0, 1))  # (B*T, N, D)
    return tokens.unflatten(0, (batch_size, clip_length)).float()
