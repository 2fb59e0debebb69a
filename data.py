"""LeRobot clips for the world model: clip windows, delta end-effector actions, and the 95/5 mix.

What the world model trains on is a clip of T frames taken every s-th frame of one episode,

    frames   (T, 3, H, W)  in [0, 1], resized and centre-cropped to the encoder's square input
    actions  (T, 7)        actions[t] = delta_ee(state[t-1], state[t]), actions[0] = 0
                           (block t of the model carries the action that led from frame t-1 to t)
    action_mask            True for a labelled clip; False for action-free video, whose actions
                           are exactly zero and never even read from the dataset

Delta end-effector actions (as V-JEPA 2-AC derives them for DROID). A state is
(x, y, z, roll, pitch, yaw, gripper) with the angles extrinsic xyz Euler (scipy's "xyz", DROID's
convention), i.e. R = Rz(yaw)·Ry(pitch)·Rx(roll). Between states a and b:

    Δp = p_b − p_a                         translation, in the robot's base frame
    ΔR = R_b · R_aᵀ                        the rotation that takes R_a to R_b: R_b = ΔR · R_a
    Δr = rotation vector of ΔR             axis · angle, 3 numbers, angle in [0, π]
    Δg = g_b − g_a
    action = (Δp, Δr, Δg) ∈ R⁷

Why never subtract Euler angles: yaw 3.13 and yaw −3.13 are 0.02 rad apart, but their difference
is 6.26; and Euler differences depend on the order of the axes. ΔR·R_a is exact everywhere and
`apply_delta_ee` inverts `delta_ee` exactly, which is what sim.py uses to step the toy world.

The 95/5 mix. `MixedLoader` draws each sample of a batch from the labelled set with probability
`labeled_fraction` (0.05 by default) and from the action-free set otherwise. The batch for step
k is a pure function of (seed, rank, k): a resumed run sees exactly the batches it would have
seen, and each data-parallel rank sees different clips.

Sources: a local folder holding a LeRobot v3.0 dataset, a hub id (downloaded by lerobot, or
streamed with `streaming=True` for corpora too big for the disk), or an alias: `droid` (the full
DROID in LeRobot format, used as action-free video) and `droid_subset` (labelled episodes of the
same repo, disjoint by episode from what `droid` uses); `airoa-moma` and `agibot_alpha`, whose
states are not one 6-DoF end-effector pose: action-free video as they are (their cameras: the
`--unlabeled-camera-keys` flag; a wrong key is refused with the list of the dataset's keys). Several
cameras of one dataset become one action-free set of separate video streams (`Streams`).
"""
import json
import os

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from stats import Stats

DROID_REPO = "lerobot/droid_1.0.1"
datasets.disable_progress_bars()  # lerobot's parquet loading would print a bar per dataset opened
# Every DROID_LABELED_EVERY-th episode is labelled (droid_subset), the others are video (droid): 1 in 20 = 5 %.
DROID_LABELED_EVERY = 20
# More real corpora by name: hub id, and why they cannot be the labelled set as they are.
ALIASES = {"airoa-moma": ("airoa-org/airoa-moma", "its states are the HSR robot's joint positions, not an "
                                                   "end-effector pose"),
           "agibot_alpha": ("cadene/agibot_alpha_v30", "its states hold two arms' end-effector positions and "
                                                       "quaternions (observation.state.end.*), not one pose")}
CAMERA_KEY = "observation.images.exterior_1_left"
STATE_KEYS = ("observation.state.cartesian_position", "observation.state.gripper_position")


class DatasetError(Exception):
    """Bad data or an unreachable dataset; the CLIs print it as one line and exit non-zero."""


# ----------------------------------------------------------------------------------------------
# Rotations and delta end-effector actions (numpy, float64, any leading shape).


def euler_to_matrix(rpy):
    """(..., 3) roll, pitch, yaw (extrinsic xyz) -> (..., 3, 3) = Rz(yaw) · Ry(pitch) · Rx(roll)."""
    roll, pitch, yaw = np.moveaxis(np.asarray(rpy, dtype=np.float64), -1, 0)
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.stack([
        np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
        np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
        np.stack([-sp, cp * sr, cp * cr], -1),
    ], -2)


def matrix_to_euler(matrix):
    """Inverse of euler_to_matrix: (..., 3, 3) -> (..., 3), pitch in [−π/2, π/2], roll and yaw in (−π, π].

    At pitch = ±π/2 (gimbal lock) roll and yaw turn about the same axis and only roll ∓ yaw is
    defined: the first row and column lose roll and yaw, and R = [[0, ±sin(roll ∓ yaw), ...],
    [0, cos(roll ∓ yaw), ...], [∓1, 0, 0]]. There we return yaw = 0 and roll from the 2x2 block."""
    matrix = np.asarray(matrix, dtype=np.float64)
    pitch = np.arcsin(np.clip(-matrix[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(matrix[..., 2, 1], matrix[..., 2, 2])
    yaw = np.arctan2(matrix[..., 1, 0], matrix[..., 0, 0])
    locked = np.hypot(matrix[..., 0, 0], matrix[..., 1, 0]) < 1e-9  # |cos(pitch)| ~ 0
    locked_roll = np.arctan2(-matrix[..., 2, 0] * matrix[..., 0, 1], matrix[..., 1, 1])
    return np.stack([np.where(locked, locked_roll, roll), pitch, np.where(locked, 0.0, yaw)], -1)


def rotvec_to_matrix(rotvec):
    """Rodrigues' formula: r = θ·k (unit axis k) -> R = I + sin θ·K + (1 − cos θ)·K², K = [k]×."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    x, y, z = np.moveaxis(rotvec, -1, 0)
    zero = np.zeros_like(x)
    cross = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], -2)
    angle = np.linalg.norm(rotvec, axis=-1)[..., None, None]
    small = angle < 1e-8  # Taylor limits: sin θ/θ -> 1, (1 − cos θ)/θ² -> 1/2
    safe = np.where(small, 1.0, angle)
    first = np.where(small, 1.0, np.sin(safe) / safe)
    second = np.where(small, 0.5, (1 - np.cos(safe)) / safe ** 2)
    return np.eye(3) + first * cross + second * (cross @ cross)


def matrix_to_rotvec(matrix):
    """(..., 3, 3) -> (..., 3) axis·angle with angle in [0, π]. cos θ = (trace R − 1)/2 and the
    skew part R − Rᵀ = 2 sin θ·K give the axis; near θ = π (sin θ ≈ 0) the axis comes from the
    diagonal of R = 2kkᵀ − I instead."""
    matrix = np.asarray(matrix, dtype=np.float64)
    angle = np.arccos(np.clip((np.trace(matrix, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0))
    skew = np.stack([matrix[..., 2, 1] - matrix[..., 1, 2], matrix[..., 0, 2] - matrix[..., 2, 0],
                     matrix[..., 1, 0] - matrix[..., 0, 1]], -1)
    sin = np.sin(angle)
    scale = np.where(sin > 1e-6, angle / (2 * np.where(sin > 1e-6, sin, 1.0)), 0.5)
    rotvec = skew * scale[..., None]
    near_pi = angle > np.pi - 1e-3
    if np.any(near_pi):  # symmetric part: (R + Rᵀ)/2 = cos θ·I + (1 − cos θ)·kkᵀ
        cos = np.cos(angle)[..., None, None]
        outer = ((matrix + np.swapaxes(matrix, -1, -2)) / 2 - cos * np.eye(3)) / (1 - cos)  # kkᵀ
        largest = np.argmax(np.diagonal(outer, axis1=-2, axis2=-1), -1)
        row = np.take_along_axis(outer, largest[..., None, None].repeat(3, -1), -2)[..., 0, :]  # k_i · k
        axis = row / np.linalg.norm(row, axis=-1, keepdims=True)
        axis = axis * np.where(np.sum(axis * skew, -1, keepdims=True) < 0, -1.0, 1.0)  # sin θ·k = skew / 2
        rotvec = np.where(near_pi[..., None], axis * angle[..., None], rotvec)
    return rotvec


def delta_ee(state, next_state):
    """(..., 7), (..., 7) -> (..., 7) action (Δp, rotation vector of R_next·R_stateᵀ, Δgripper)."""
    state, next_state = np.asarray(state, np.float64), np.asarray(next_state, np.float64)
    rotation = euler_to_matrix(next_state[..., 3:6]) @ np.swapaxes(euler_to_matrix(state[..., 3:6]), -1, -2)
    return np.concatenate([next_state[..., :3] - state[..., :3], matrix_to_rotvec(rotation),
                           next_state[..., 6:7] - state[..., 6:7]], -1)


def apply_delta_ee(state, action):
    """The exact inverse of delta_ee: p + Δp, R_new = ΔR · R, g + Δg."""
    state, action = np.asarray(state, np.float64), np.asarray(action, np.float64)
    rotation = rotvec_to_matrix(action[..., 3:6]) @ euler_to_matrix(state[..., 3:6])
    return np.concatenate([state[..., :3] + action[..., :3], matrix_to_euler(rotation),
                           state[..., 6:7] + action[..., 6:7]], -1)


# ----------------------------------------------------------------------------------------------
# Opening a LeRobot dataset: local folder, hub id, or alias, with errors a person can act on.


def resolve_source(source):
    """(repo_id, root, episode filter) of a source. Aliases split DROID by episode: `droid_subset`
    keeps every DROID_LABELED_EVERY-th episode, `droid` the others, so the roles never share one."""
    if source in ("droid", "droid_subset"):
        labelled_episodes = source == "droid_subset"
        return DROID_REPO, None, (lambda episode: (episode % DROID_LABELED_EVERY == 0) == labelled_episodes)
    if source in ALIASES:
        return ALIASES[source][0], None, None
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "meta", "info.json")):
            raise DatasetError(f"{source!r} is a folder but not a LeRobot dataset (no meta/info.json)")
        return f"local/{os.path.basename(os.path.normpath(source))}", source, None
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DatasetError(f"{source!r} is neither a LeRobot dataset folder nor a hub id (owner/name)")
    return source, None, None


def load_metadata(source):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    repo_id, root, episode_filter = resolve_source(source)
    try:
        metadata = LeRobotDatasetMetadata(repo_id, root=root)
    except Exception as error:  # offline, unknown repo, gated repo, ...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise DatasetError(f"cannot reach dataset {repo_id!r} on the hub ({'offline' if offline else type(error).__name__}); "
                           f"download it (huggingface-cli download --repo-type dataset {repo_id} --local-dir DIR) "
                           f"and pass the local folder DIR instead") from None
    return repo_id, root, episode_filter, metadata


def video_backend():
    """lerobot's default decoder, torchcodec, needs the system FFmpeg libraries; pyav does not."""
    try:
        import torchcodec.decoders  # noqa: F401  (loads libavcodec: fails without FFmpeg)
        return "torchcodec"
    except Exception:
        return "pyav"


def square_resize(frames, size):
    """(T, 3, h, w) -> (T, 3, size, size): scale the short side to `size`, crop the centre."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_height, new_width) != (height, width):
        frames = F.interpolate(frames, size=(new_height, new_width), mode="bilinear", antialias=True,
                               align_corners=False)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return frames[..., top:top + size, left:left + size].clamp(0, 1)


def listed_keys(features):
    """A dataset's observation and action keys, for error messages."""
    return ", ".join(key for key in features if key.startswith(("observation", "action")))


def check_camera(source, features, camera_key):
    """One clear line when a dataset (its metadata's `features`) has no camera `camera_key`."""
    if camera_key not in features or features[camera_key]["dtype"] not in ("video", "image"):
        raise DatasetError(f"{source!r} has no camera {camera_key!r}; its keys: {listed_keys(features)}")


# ----------------------------------------------------------------------------------------------
# Clips.


class ClipDataset(torch.utils.data.Dataset):
    """Clips of `clip_length` frames, `frame_stride` dataset frames apart, inside one episode.

    role "labeled": items carry delta-EE actions derived from the state keys (which must exist);
    role "unlabeled": actions are zeros and the state is never read. With `feature_cache` (a
    folder written by `python encoder.py`), items carry cached DINOv2 `tokens` (T, N, D) instead of
    `frames` and no video is decoded."""

    def __init__(self, source, role="labeled", camera_key=CAMERA_KEY, state_keys=STATE_KEYS, clip_length=8,
                 frame_stride=1, image_size=224, episodes=None, feature_cache=None, streaming=False):
        if role not in ("labeled", "unlabeled"):
            raise ValueError(f"role must be 'labeled' or 'unlabeled', got {role!r}")
        self.source, self.role, self.camera_key = source, role, camera_key
        self.state_keys, self.clip_length, self.frame_stride = tuple(state_keys), clip_length, frame_stride
        self.image_size, self.streaming = image_size, streaming
        repo_id, root, episode_filter, self.metadata = load_metadata(source)
        self.check_keys()
        lengths = np.asarray(self.metadata.episodes["length"])
        candidates = range(len(lengths)) if episodes is None else episodes
        candidates = [int(e) for e in candidates if episode_filter is None or episode_filter(int(e))]
        span = (clip_length - 1) * frame_stride + 1  # dataset frames one clip covers
        self.episodes = [e for e in candidates if lengths[e] >= span]
        if not self.episodes:
            raise DatasetError(f"no episode of {source!r} has the {span} frames one clip needs "
                               f"(clip length {clip_length}, stride {frame_stride}); longest has {lengths.max()}")
        self.offsets = [i * frame_stride / self.metadata.fps for i in range(clip_length)]  # seconds
        keys = [camera_key] if feature_cache is None else []
        keys += list(self.state_keys) if role == "labeled" else []
        if streaming:
            self.open_stream(repo_id, root, keys)
            return
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        self.lerobot = LeRobotDataset(repo_id, root=root, episodes=self.episodes,
                                      delta_timestamps={camera_key: self.offsets} if feature_cache is None else None,
                                      download_videos=feature_cache is None, video_backend=video_backend())
        columns = self.lerobot.hf_dataset.with_format("numpy")
        episode_of_row, frame_of_row = (np.asarray(columns[key]) for key in ("episode_index", "frame_index"))
        self.absolute_index, self.episode_of_row = np.asarray(columns["index"]), episode_of_row
        valid = frame_of_row + span <= lengths[episode_of_row]
        self.starts = np.flatnonzero(valid)  # rows where a clip can start
        if role == "labeled":
            self.states = np.concatenate([np.stack(columns[key]).astype(np.float64).reshape(len(valid), -1)
                                          for key in self.state_keys], axis=1)  # (rows, 7)
            bad = ~np.isfinite(self.states).all(axis=1)
            if bad.any():
                raise DatasetError(f"{source!r}: NaN or inf in {'/'.join(self.state_keys)} "
                                   f"(episode {episode_of_row[bad][0]}, frame {frame_of_row[bad][0]})")
        self.cache = None
        if feature_cache is not None:
            self.cache = open_feature_cache(feature_cache, camera_key, self.metadata.total_frames)

    def check_keys(self):
        features = self.metadata.features
        check_camera(self.source, features, self.camera_key)
        if self.role == "labeled":
            missing = [key for key in self.state_keys if key not in features]
            if missing and self.source in ALIASES:
                raise DatasetError(f"{self.source!r} cannot be the labelled set: {ALIASES[self.source][1]}; use it as "
                                   f"action-free video (--unlabeled), or pass --state-keys naming x y z roll pitch yaw "
                                   f"gripper")
            if missing:
                raise DatasetError(f"labelled dataset {self.source!r} lacks state {missing[0]!r} needed for "
                                   f"delta-EE actions; its keys: {listed_keys(features)} (pass --state-keys)")
            width = sum(int(np.prod(features[key]["shape"])) for key in self.state_keys)
            if width != 7:
                raise DatasetError(f"state keys {self.state_keys} give {width} numbers, delta EE needs 7 "
                                   f"(x, y, z, roll, pitch, yaw, gripper)")

    def __len__(self):
        return len(self.starts)

    def clip_actions(self, states):
        """(T, 7) states -> (T, 7) actions, actions[t] = delta_ee(state[t-1], state[t]), actions[0] = 0."""
        actions = np.zeros((len(states), 7))
        actions[1:] = delta_ee(states[:-1], states[1:])
        return torch.from_numpy(actions).float()

    def __getitem__(self, k):
        if self.streaming:  # a stream has no random access: item k is simply its next clip
            if self.stream_iterator is None:
                self.stream_iterator = self.stream(seed=k)
            return next(self.stream_iterator)
        start = int(self.starts[k])
        rows = start + self.frame_stride * np.arange(self.clip_length)
        item = {"episode_index": int(self.episode_of_row[start]), "action_mask": torch.tensor(self.role == "labeled")}
        if self.cache is not None:
            item["tokens"] = torch.from_numpy(np.asarray(self.cache[self.absolute_index[rows]], np.float32))
        else:
            frames = self.lerobot[start][self.camera_key]  # (T, 3, h, w) in [0, 1]; (3, h, w) when T = 1
            item["frames"] = square_resize(frames.float().reshape(self.clip_length, *frames.shape[-3:]),
                                           self.image_size)
        if self.role == "labeled":
            item["actions"] = self.clip_actions(self.states[rows])
        else:
            item["actions"] = torch.zeros(self.clip_length, 7)
        return item

    # Streaming. lerobot 0.4.4's StreamingLeRobotDataset cannot serve clips itself: it seeks video
    # frames by the dataset-global index, which crashes or returns another episode's frames once a
    # dataset spans several video files, as DROID does (lerobot issues #3080, #4524); it ignores
    # `episodes`; and delta_timestamps fail on 1-number features such as the gripper. So it serves
    # only the parquet rows here (its `hf_dataset`, read in file order: episodes arrive whole), and
    # each clip's frames are decoded at the episode's file-relative timestamps, as LeRobotDataset does.
    def open_stream(self, repo_id, root, keys):
        self.stream_source = dict(repo_id=repo_id, root=root, decode=self.camera_key in keys)
        self.starts = np.arange(sum(int(self.metadata.episodes["length"][e]) for e in self.episodes))
        self.stream_iterator = None

    def stream(self, seed):
        """Endless clips: each pass visits the parquet shards in a seeded order and, per episode,
        about one clip per `span` frames at random starts; a pass that yields nothing is an error."""
        from lerobot.datasets.streaming_dataset import StreamingLeRobotDataset
        from lerobot.datasets.video_utils import decode_video_frames
        repo_id, root = self.stream_source["repo_id"], self.stream_source["root"]
        rows = StreamingLeRobotDataset(repo_id, root=root).hf_dataset
        columns = ["episode_index", "frame_index"] + (list(self.state_keys) if self.role == "labeled" else [])
        video_root = root if root is not None else self.metadata.url_root
        span, wanted = (self.clip_length - 1) * self.frame_stride + 1, set(self.episodes)
        rng = np.random.default_rng(seed)

        def clips(episode, states):  # all rows of one episode have arrived
            states = np.stack(states)  # (length, 7), or (length, 0) for action-free video
            if not np.isfinite(states).all():
                raise DatasetError(f"{self.source!r}: NaN or inf in {'/'.join(self.state_keys)} (episode {episode})")
            for start in rng.choice(len(states) - span + 1, size=max(1, len(states) // span), replace=False):
                offsets = start + self.frame_stride * np.arange(self.clip_length)
                item = {"episode_index": episode, "action_mask": torch.tensor(self.role == "labeled")}
                if self.stream_source["decode"]:
                    start_time = self.metadata.episodes[episode][f"videos/{self.camera_key}/from_timestamp"]
                    times = [float(start_time + offset / self.metadata.fps) for offset in offsets]
                    path = f"{video_root}/{self.metadata.get_video_file_path(episode, self.camera_key)}"
                    frames = decode_video_frames(path, times, 1e-4, video_backend())  # (T, 3, h, w)
                    item["frames"] = square_resize(frames.float(), self.image_size)
                if self.role == "labeled":
                    item["actions"] = self.clip_actions(states[offsets])
                else:
                    item["actions"] = torch.zeros(self.clip_length, 7)
                yield item

        for epoch in range(2 ** 62):
            produced, episode, states = False, None, []
            for row in rows.select_columns(columns).shuffle(seed=seed + epoch, buffer_size=1):  # shard order only
                if row["episode_index"] != episode:
                    if episode in wanted and len(states) >= span:
                        produced = True
                        yield from clips(episode, states)
                    episode, states = row["episode_index"], []
                states.append(np.concatenate([np.ravel(row[key]) for key in columns[2:]] or [[]]).astype(np.float64))
            if episode in wanted and len(states) >= span:
                produced = True
                yield from clips(episode, states)
            if not produced:
                raise DatasetError(f"streaming {self.source!r} yielded no clip (torchcodec needs FFmpeg: "
                                   f"apt-get install ffmpeg; or drop --streaming)")


def open_feature_cache(folder, camera_key, total_frames):
    """The token array (total_frames, N, D) float16 that `python encoder.py` wrote, memory-mapped,
    row i = absolute frame index i of the dataset."""
    meta_path, tokens_path = os.path.join(folder, "meta.json"), os.path.join(folder, "tokens.npy")
    if not (os.path.isfile(meta_path) and os.path.isfile(tokens_path)):
        raise DatasetError(f"{folder!r} is not a feature cache (write one with: python encoder.py --dataset ...)")
    try:
        with open(meta_path) as file:
            meta = json.load(file)
        cached_key, cached_frames = meta["camera_key"], meta["num_frames"]
    except (ValueError, KeyError, TypeError):
        raise DatasetError(f"{meta_path!r} is damaged (not the meta.json python encoder.py writes): encode the "
                           f"dataset again") from None
    if cached_key != camera_key or cached_frames != total_frames:
        raise DatasetError(f"feature cache {folder!r} holds {meta['num_frames']} frames of {meta['camera_key']!r}; "
                           f"this dataset has {total_frames} frames of {camera_key!r}")
    return np.load(tokens_path, mmap_mode="r")


# ----------------------------------------------------------------------------------------------
# Action statistics and episode splits.


class ActionStats(Stats):
    """Per-dimension mean and std of the labelled delta-EE actions. The model, the planner and the
    evaluation all work on (action − mean)/std, so the same numbers travel in every checkpoint."""

    @classmethod
    def from_dataset(cls, dataset):
        """Over every pair of frames `frame_stride` apart inside an episode of a labelled ClipDataset."""
        if dataset.role != "labeled" or dataset.streaming:
            raise ValueError("action statistics need a labelled, non-streaming ClipDataset")
        stride = dataset.frame_stride
        same_episode = dataset.episode_of_row[stride:] == dataset.episode_of_row[:-stride]
        actions = delta_ee(dataset.states[:-stride][same_episode], dataset.states[stride:][same_episode])
        return cls(actions.mean(0), np.maximum(actions.std(0), 1e-6))


class Streams(torch.utils.data.ConcatDataset):
    """Several cameras of one dataset as one set of clips: each camera is a video stream of its own
    (DROID's two exterior cameras and its wrist camera triple its action-free video)."""

    def __init__(self, parts):
        super().__init__(parts)
        self.role = parts[0].role

    @classmethod
    def of(cls, parts):
        return parts[0] if len(parts) == 1 else cls(parts)


def split_episodes(episodes, val_fraction, seed):
    """Disjoint (train, validation) episode lists, shuffled by `seed`; at least one validation episode
    when val_fraction > 0 and there are two or more episodes."""
    episodes = list(episodes)
    order = np.random.default_rng(seed).permutation(len(episodes))
    count = min(len(episodes) - 1, max(1, round(val_fraction * len(episodes)))) if val_fraction > 0 else 0
    validation = sorted(episodes[i] for i in order[:count])
    return sorted(episodes[i] for i in order[count:]), validation


# ----------------------------------------------------------------------------------------------
# The 95/5 mixer.


class StepBatches(torch.utils.data.Dataset):
    """Batch number k (k >= start_step) as a map-style item, so DataLoader workers can assemble
    batches in parallel while the order stays a pure function of (seed, rank, k)."""

    def __init__(self, labeled, unlabeled, labeled_fraction, batch_size, seed, rank, start_step):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.labeled_fraction, self.batch_size = labeled_fraction, batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step

    def __len__(self):
        return 2 ** 62  # endless: training stops by step count

    def __getitem__(self, position):
        rng = np.random.default_rng([self.seed, self.rank, self.start_step + position])
        samples = []
        for _ in range(self.batch_size):
            dataset = self.labeled if rng.random() < self.labeled_fraction else self.unlabeled
            samples.append(dataset[int(rng.integers(len(dataset)))])
        return {key: torch.stack([sample[key] if torch.is_tensor(sample[key]) else torch.tensor(sample[key])
                                  for sample in samples]) for key in samples[0]}


class MixedLoader:
    """Endless batches: frames (B, T, 3, H, W) or tokens (B, T, N, D), actions (B, T, 7), action_mask
    (B,), episode_index (B,). Each sample is labelled with probability labeled_fraction; the others
    come from the action-free set with all-zero actions and action_mask False."""

    def __init__(self, labeled, unlabeled, labeled_fraction=0.05, batch_size=32, seed=0, num_workers=0,
                 rank=0, start_step=0):
        if labeled.role != "labeled" or unlabeled.role != "unlabeled":
            raise ValueError("MixedLoader(labeled, unlabeled) takes a labelled and an unlabelled ClipDataset")
        self.batches = StepBatches(labeled, unlabeled, labeled_fraction, batch_size, seed, rank, start_step)
        self.num_workers = num_workers

    def __iter__(self):
        return iter(torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=self.num_workers,
                                                persistent_workers=False))
