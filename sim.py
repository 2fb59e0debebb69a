"""A tiny rendered 6-DoF end-effector world: the embedded default dataset and the closed-loop benchmark.

The world is one floating gripper seen by a fixed camera. Its state is DROID's end-effector pose

    pose = (x, y, z, roll, pitch, yaw, gripper)   metres, radians (extrinsic xyz Euler), opening in [0, 1]

and an action is a 7-D delta end-effector pose exactly as data.py derives it from recorded
states: translation added in the base frame, rotation composed on the left (R_new = ΔR · R),
gripper added, then the pose is clipped to the workspace. So `data.delta_ee(pose, step(pose, a))`
gives back `a` (unless the clip bit), and a model trained on toy data learns the same action
convention it would on DROID.

Rendering (numpy, deterministic, 64 × 64 RGB). The gripper is five capsules in its own frame: a
red palm bar, a green and a blue finger (their spacing is the gripper opening), a yellow wrist
and a white marker that breaks the left/right symmetry. Each capsule's end points go through the
pose (rotation, translation) and a pinhole camera in front of and above the workspace; the
capsules are drawn far to near with soft, ~1 px edges and a shading gradient along their length.
Every one of the 7 numbers visibly changes the image: x, y move it (y also away from the camera),
z moves it up and makes it bigger, the three rotations change its silhouette, the opening moves
the fingers. The background is a fixed, smooth colour texture with a faint grid, so an image is
never trivially blank. The gripper is drawn large on purpose: the planner compares coarse 4×4
token grids, and overlapping, smoothly changing pictures make that distance informative.

Datasets. `write_toy_dataset` drives the gripper with random actions, smooth (an AR(1) process
per dimension, like a teleoperator's persistent motions) or, in exploratory segments, drawn afresh
every step, and writes a real LeRobot v3.0 dataset through lerobot's own `LeRobotDataset.create /
add_frame / save_episode / finalize`, with DROID's key names; frames losslessly as PNG by default,
or as AV1 video like DROID's. `ensure_toy_datasets` writes the demo's labelled and unlabelled sets
once (different seeds, so different episodes).

The closed-loop benchmark. Pairs (`make_pairs`): start = a random pose; goal = start after
PATH_STEPS smooth random actions, so every goal is reachable in PATH_STEPS moves. Episode
(`run_episode`): a policy sees the rendered frame and acts, the simulator steps, until the pose is
within TOLERANCE of the goal (position, rotation angle, gripper, all at once) or after MAX_STEPS
(2·PATH_STEPS) actions; success = within tolerance at the end. Two tasks (TASKS):
  pose:  the goal differs in all 7 numbers; the policy may move all of them.
  reach: the classic reaching task: the goal differs in position only, and the policy moves the
         position only (cem.py's planner and its random baseline get rotation and gripper bounds 0).
`write_goal_images` renders goals for `python plan.py --goal`, with their start poses in goals.json.
cem.py supplies the policies (CEM MPC, random actions) and the simulator as an oracle world model.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import CAMERA_KEY, apply_delta_ee, delta_ee, euler_to_matrix, matrix_to_rotvec

IMAGE_SIZE = 64
FPS = 15
WORKSPACE_LOW = np.array([-0.15, -0.15, 0.00, -0.6, -0.6, -1.2, 0.0])
WORKSPACE_HIGH = np.array([0.15, 0.15, 0.15, 0.6, 0.6, 1.2, 1.0])
POSITION_KEY = "observation.state.cartesian_position"
GRIPPER_KEY = "observation.state.gripper_position"
TOY_LABELED_DIR = os.path.join("toy_data", "labeled")
TOY_UNLABELED_DIR = os.path.join("toy_data", "unlabeled")
# The demo's data: 5 % of the frames labelled, as in the real regime (episodes x frames).
TOY_LABELED_SIZE = dict(episodes=8, steps_per_episode=40, seed=1)
TOY_UNLABELED_SIZE = dict(episodes=152, steps_per_episode=40, seed=2)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _look_at(position, target):
    """Rows of the world-to-camera rotation: camera x (right), y (down), z (forward)."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right = right / np.linalg.norm(right)
    return np.stack([right, np.cross(forward, right), forward])


CAMERA_POSITION = np.array([0.0, -0.55, 0.55])
CAMERA_ROTATION = _look_at(CAMERA_POSITION, np.array([0.0, 0.0, 0.05]))
FOCAL_PIXELS = 95.0


def _gripper_capsules(opening):
    """opening (S,) -> starts (S, M, 3), ends (S, M, 3), radii (M,), colours (M, 3)."""
    half_width = 0.035 + 0.065 * opening  # finger distance from the centre
    S = opening.shape[0]
    zeros = np.zeros(S)
    starts = np.stack([
        np.stack([np.full(S, -0.11), zeros, zeros], -1),  # palm bar
        np.stack([-half_width, zeros, zeros], -1),  # left finger
        np.stack([half_width, zeros, zeros], -1),  # right finger
        np.stack([zeros, zeros, zeros], -1),  # wrist, pointing up
        np.stack([zeros, zeros, np.full(S, 0.02)], -1),  # marker along +y, breaks the symmetry
    ], 1)
    ends = np.stack([
        np.stack([np.full(S, 0.11), zeros, zeros], -1),
        np.stack([-half_width, zeros, np.full(S, -0.13)], -1),
        np.stack([half_width, zeros, np.full(S, -0.13)], -1),
        np.stack([zeros, zeros, np.full(S, 0.10)], -1),
        np.stack([zeros, np.full(S, 0.09), np.full(S, 0.02)], -1),
    ], 1)
    radii = np.array([0.026, 0.02, 0.02, 0.022, 0.018])
    colours = np.array([[0.85, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1], [0.95, 0.95, 0.95]])
    return starts, ends, radii, colours


def _background(size=IMAGE_SIZE, seed=1234):
    """A fixed, smooth colour texture with a floor grid: the planner cannot match on a blank image."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.25, 0.6, size=(6, 6, 3))
    coordinates = np.linspace(0, 5, size)
    i0 = np.clip(np.floor(coordinates).astype(int), 0, 4)
    frac = coordinates - i0
    rows = coarse[i0] * (1 - frac)[:, None, None] + coarse[i0 + 1] * frac[:, None, None]  # (size, 6, 3)
    image = rows[:, i0] * (1 - frac)[None, :, None] + rows[:, i0 + 1] * frac[None, :, None]  # (size, size, 3)
    grid = ((np.arange(size) % 8) == 0)
    image[grid, :, :] *= 0.9
    image[:, grid, :] *= 0.9
    return image


BACKGROUND = _background()


RENDER_CHUNK = 32


def render_batch(poses):
    """poses (S, 7) -> images (S, 64, 64, 3) uint8, all S at once (the planner's oracle renders hundreds)."""
    poses = np.asarray(poses, dtype=np.float64)
    if len(poses) > RENDER_CHUNK:  # the (S, capsules, pixels) temporaries stay cache-sized: ~2x faster
        return np.concatenate([render_batch(poses[i:i + RENDER_CHUNK]) for i in range(0, len(poses), RENDER_CHUNK)])
    S = poses.shape[0]
    starts, ends, radii, colours = _gripper_capsules(poses[:, 6])
    rotation = euler_to_matrix(poses[:, 3:6])  # (S, 3, 3)
    position = poses[:, None, :3]  # (S, 1, 3)

    def to_camera(points):  # (S, M, 3) gripper frame -> camera frame
        world = np.einsum("sij,smj->smi", rotation, points) + position
        return (world - CAMERA_POSITION) @ CAMERA_ROTATION.T

    a, b = to_camera(starts), to_camera(ends)  # (S, M, 3)
    centre = IMAGE_SIZE / 2 - 0.5

    def project(points):
        return FOCAL_PIXELS * points[..., :2] / points[..., 2:3] + centre  # (S, M, 2) pixel (u, v)

    pa, pb = project(a), project(b)
    depth = (a[..., 2] + b[..., 2]) / 2  # (S, M)
    radius = radii * FOCAL_PIXELS / depth  # (S, M) pixels
    v, u = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    pixels = np.stack([u, v], -1).reshape(1, 1, -1, 2).astype(np.float64)  # (1, 1, P, 2)
    segment = (pb - pa)[:, :, None]  # (S, M, 1, 2)
    t = np.clip(((pixels - pa[:, :, None]) * segment).sum(-1) / np.maximum((segment ** 2).sum(-1), 1e-9), 0, 1)
    distance = np.linalg.norm(pixels - (pa[:, :, None] + t[..., None] * segment), axis=-1)  # (S, M, P)
    coverage = 1 / (1 + np.exp((distance - radius[..., None]) / 0.6))  # soft edge, ~1 px wide
    shade = 0.75 + 0.25 * (1 - t)  # a gradient along each capsule shows which end is which
    images = np.broadcast_to(BACKGROUND.reshape(1, -1, 3), (S, IMAGE_SIZE * IMAGE_SIZE, 3)).copy()
    order = np.argsort(-depth, axis=1)  # far first
    rows = np.arange(S)
    for m in range(order.shape[1]):
        index = order[:, m]
        alpha = coverage[rows, index][..., None]  # (S, P, 1)
        colour = colours[index][:, None, :] * shade[rows, index][..., None]  # (S, P, 3)
        images = images * (1 - alpha) + colour * alpha
    return (images.reshape(S, IMAGE_SIZE, IMAGE_SIZE, 3) * 255).round().clip(0, 255).astype(np.uint8)


def render(pose):
    return render_batch(np.asarray(pose)[None])[0]



# ----------------------------------------------------------------------------------------------
# Motion.


def step_batch(poses, actions):
    """(S, 7) poses, (S, 7) delta-EE actions -> next poses, clipped to the workspace."""
    return np.clip(apply_delta_ee(poses, actions), WORKSPACE_LOW, WORKSPACE_HIGH)


def step(pose, action):
    return step_batch(np.asarray(pose)[None], np.asarray(action)[None])[0]


def random_pose(rng, margin=0.15):
    """A pose drawn uniformly inside the workspace, `margin` of each range away from its edges."""
    span = WORKSPACE_HIGH - WORKSPACE_LOW
    return rng.uniform(WORKSPACE_LOW + margin * span, WORKSPACE_HIGH - margin * span)


ACTION_SCALE = np.array([0.012, 0.012, 0.008, 0.05, 0.05, 0.08, 0.08])  # per-step std of a random action


def smooth_actions(rng, steps, smoothing=0.8):
    """(steps, 7) random delta-EE actions, low-pass filtered (AR(1)) so motions persist a few steps
    like a teleoperator's, with the per-step spread ACTION_SCALE. smoothing: a number, or one per step
    (0: that step's action is drawn afresh, independent of the last)."""
    noise = rng.normal(size=(steps, 7))
    smoothing = np.broadcast_to(np.asarray(smoothing, dtype=np.float64), (steps,))
    actions = np.empty_like(noise)
    previous = noise[0]
    for t in range(steps):
        previous = smoothing[t] * previous + np.sqrt(1 - smoothing[t] ** 2) * noise[t]
        actions[t] = previous
    return actions * ACTION_SCALE


def random_trajectory(rng, steps, pull=0.1, switch=1 / 15, explore=0.0, segment=1 / 10):
    """(steps, 7) poses of one episode: random actions plus `pull` times the delta EE towards a
    waypoint inside the workspace, re-drawn about every 1/switch steps. Without the pull the motion is
    a random walk that spends most steps pressed against a workspace wall in some dimension.
    The actions come in segments of about 1/segment steps; each segment is smooth (AR(1), a
    teleoperator's persistent motion) or, with probability `explore`, exploratory (every action
    drawn afresh, like play data or a scripted exploration policy)."""
    exploring = np.zeros(steps - 1, dtype=bool)
    state = rng.random() < explore
    for t in range(steps - 1):
        if t and rng.random() < segment:
            state = rng.random() < explore
        exploring[t] = state
    poses, target = [random_pose(rng)], random_pose(rng)
    for action in smooth_actions(rng, steps - 1, np.where(exploring, 0.0, 0.8)):
        if rng.random() < switch:
            target = random_pose(rng)
        poses.append(step(poses[-1], action + pull * delta_ee(poses[-1], target)))
    return np.stack(poses)


def pose_error(pose, goal):
    """(position error in metres, rotation error in radians (angle of R_goal·R_poseᵀ), |gripper error|)."""
    pose, goal = np.asarray(pose, np.float64), np.asarray(goal, np.float64)
    rotation = euler_to_matrix(goal[3:6]) @ euler_to_matrix(pose[3:6]).T
    return (float(np.linalg.norm(goal[:3] - pose[:3])), float(np.linalg.norm(matrix_to_rotvec(rotation))),
            float(abs(goal[6] - pose[6])))


# ----------------------------------------------------------------------------------------------
# The closed-loop benchmark.

PATH_STEPS = 8  # benchmark goals lie PATH_STEPS smooth random actions away from the start
MAX_STEPS = 2 * PATH_STEPS  # the closed-loop step budget: twice the length of the path to the goal
TOLERANCE = dict(position=0.02, rotation=0.15, gripper=0.15)  # metres, radians, opening in [0, 1]
# What moves between start and goal in each task, and the planner bounds that go with it (docstring).
TASKS = {"pose": dict(moving=np.ones(7), bounds={}),
         "reach": dict(moving=np.array([1, 1, 1, 0, 0, 0, 0]), bounds=dict(max_rotation=0.0, max_gripper=0.0))}


def make_pairs(n, seed=0, path_steps=PATH_STEPS, margin=0.1, task="pose"):
    """n (start, goal) poses; goal = start after `path_steps` smooth random actions, so it is reachable
    (for task "reach" the actions move the position only).
    Goals closer than `margin` of a range to the workspace edge are drawn again: there the clip may
    have bitten, and at extreme poses a part of the gripper can leave the picture or hide behind the
    rest (e.g. the fingers, seen end-on), so no image-based planner could tell it was reached."""
    rng = np.random.default_rng(seed)
    span = WORKSPACE_HIGH - WORKSPACE_LOW
    low, high = WORKSPACE_LOW + margin * span, WORKSPACE_HIGH - margin * span
    pairs = []
    while len(pairs) < n:
        start = goal = random_pose(rng)
        for action in smooth_actions(rng, path_steps) * TASKS[task]["moving"]:
            goal = step(goal, action)
        if np.all((goal > low) & (goal < high)):
            pairs.append((start, goal))
    return pairs


def reached(pose, goal, tolerance=TOLERANCE):
    position, rotation, gripper = pose_error(pose, goal)
    return position <= tolerance["position"] and rotation <= tolerance["rotation"] and gripper <= tolerance["gripper"]


def run_episode(policy, start, goal, max_steps=MAX_STEPS, tolerance=TOLERANCE):
    """Act until the pose is within tolerance of the goal or max_steps actions were taken. `policy`:
    reset(goal_image, goal_pose), then policy(frame, pose) -> action (7,). The simulator, not the
    policy, checks the goal. Returns a dict of the outcome and the frames seen."""
    pose, frames = np.asarray(start, dtype=np.float64), [render(start)]
    policy.reset(render(goal), goal)
    steps = 0
    while steps < max_steps and not reached(pose, goal, tolerance):
        pose = step(pose, policy(frames[-1], pose))
        frames.append(render(pose))
        steps += 1
    position, rotation, gripper = pose_error(pose, goal)
    return dict(success=bool(reached(pose, goal, tolerance)), steps=steps, position_error=float(position),
                rotation_error=float(rotation), gripper_error=float(gripper), frames=frames, final_pose=pose)


def evaluate_closed_loop(policy, pairs, max_steps=MAX_STEPS, tolerance=TOLERANCE, progress=False):
    """Run `policy` from every start to its goal. Returns success_rate, mean final errors and steps,
    and per-episode outcomes."""
    episodes = []
    for start, goal in tqdm(pairs, desc=f"closed loop, {type(policy).__name__}", unit="episode", disable=not progress):
        outcome = run_episode(policy, start, goal, max_steps, tolerance)
        episodes.append({key: value for key, value in outcome.items() if key in
                         ("success", "steps", "position_error", "rotation_error", "gripper_error")})
    mean = lambda key: float(np.mean([episode[key] for episode in episodes]))  # noqa: E731
    return dict(success_rate=mean("success"), final_position_error=mean("position_error"),
                final_rotation_error=mean("rotation_error"), final_gripper_error=mean("gripper_error"),
                steps=mean("steps"), episodes=episodes)


def write_goal_images(directory="goals", n=4, seed=0):
    """goal_<i>.png rendered for n benchmark pairs, and goals.json with each goal's pose and the start
    pose `python plan.py --goal <dir>/goal_<i>.png` begins from. Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    poses = {}
    for index, (start, goal) in enumerate(make_pairs(n, seed)):
        name = f"goal_{index}.png"
        Image.fromarray(render(goal)).save(os.path.join(directory, name))
        poses[name] = dict(goal=np.asarray(goal).tolist(), start=np.asarray(start).tolist())
    with open(os.path.join(directory, "goals.json"), "w") as file:
        json.dump(poses, file, indent=1)
    return directory


# ----------------------------------------------------------------------------------------------
# Datasets.


def write_toy_dataset(root, episodes, steps_per_episode=40, seed=0, explore=0.0, video=False, repo_id="toy/ee_world",
                      fps=FPS, cameras=(CAMERA_KEY,), vcodec="libsvtav1", image_shape=(IMAGE_SIZE, IMAGE_SIZE)):
    """A LeRobot v3.0 dataset of `episodes` random trajectories (random_trajectory with `explore`).
    `action[t]` is the delta EE from frame t to t+1 (zero on the last frame). Written into
    `<root>.partial`, renamed when done; toy_spec.json in the root records the arguments. `fps`: the
    rate the dataset declares (the motion per frame is the same at any rate; tests of mixed rates).
    `cameras`: the image keys, each holding the same rendering (tests of other and several cameras);
    `vcodec` (lerobot's: libsvtav1, h264, ...) and `image_shape` (h, w: the rendering resized) stand
    in for other robots' recordings.

    Frames are stored losslessly (PNG, LeRobot "image" features) unless video=True (AV1 mp4, as
    DROID stores them). The demo stores them losslessly because the toy's stand-in encoder, a tiny
    random DINOv2, is not robust to codec artefacts the way the real one is: measured, the tokens of
    an AV1 frame differ from those of its exact rendering by a token MSE of 0.05-0.07, more than one
    step of motion changes them (0.04), so a model trained on AV1 frames learned the codec's noise
    and planned on exact renderings it had never seen."""
    import av  # PyAV, lerobot's video writer: only needed here
    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder prints its whole configuration otherwise
    av.logging.set_libav_level(av.logging.ERROR)  # and its muxer one line per video file
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    features = {
        **{camera: {"dtype": "video" if video else "image", "shape": (*image_shape, 3),
                    "names": ["height", "width", "channels"]} for camera in cameras},
        POSITION_KEY: {"dtype": "float32", "shape": (6,), "names": ["x", "y", "z", "roll", "pitch", "yaw"]},
        GRIPPER_KEY: {"dtype": "float32", "shape": (1,), "names": ["gripper"]},
        "action": {"dtype": "float32", "shape": (7,), "names": ["dx", "dy", "dz", "rx", "ry", "rz", "dgripper"]},
    }
    temporary = f"{root}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    dataset = LeRobotDataset.create(repo_id, fps, features, root=temporary, robot_type="toy_ee", use_videos=video,
                                    vcodec=vcodec)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(episodes), desc=f"writing {os.path.basename(root)}", unit="episode", leave=False):
        poses = random_trajectory(rng, steps_per_episode, explore=explore)
        images = render_batch(poses)  # (steps, 64, 64, 3)
        if tuple(image_shape) != (IMAGE_SIZE, IMAGE_SIZE):
            images = np.stack([np.asarray(Image.fromarray(image).resize(image_shape[::-1], Image.BILINEAR))
                               for image in images])
        applied = np.concatenate([delta_ee(poses[:-1], poses[1:]), np.zeros((1, 7))])
        for t in range(steps_per_episode):
            dataset.add_frame({**{camera: images[t] for camera in cameras}, POSITION_KEY: poses[t, :6].astype(np.float32),
                               GRIPPER_KEY: poses[t, 6:].astype(np.float32),
                               "action": applied[t].astype(np.float32), "task": "move the gripper"})
        dataset.save_episode()
    dataset.finalize()
    with open(os.path.join(temporary, "toy_spec.json"), "w") as file:
        json.dump(dict(episodes=episodes, steps_per_episode=steps_per_episode, seed=seed, explore=explore,
                       video=video, **({} if fps == FPS else dict(fps=fps)),
                       **({} if cameras == (CAMERA_KEY,) else dict(cameras=list(cameras))),
                       **({} if (vcodec, tuple(image_shape)) == ("libsvtav1", (IMAGE_SIZE, IMAGE_SIZE)) else
                          dict(vcodec=vcodec, image_shape=list(image_shape)))), file)
    os.replace(temporary, root)
    return root


def ensure_toy_datasets(video=False, scale=1):
    """(labelled root, unlabelled root) of the demo, written on first use, and again when an existing
    one was written with other settings (toy_spec.json differs: an older version of the demo).
    video=True: the same episodes stored as AV1 video (toy_data/av1/), for the codec ablation.
    scale > 1: both sets `scale` times as many episodes (the first ones the demo's), so the same 5 %
    share of labelled frames holds more distinct labelled motions (toy_data/x<scale>/): the
    labelled-coverage ablation."""
    folders = (["av1"] if video else []) + ([f"x{scale}"] if scale != 1 else [])
    roots = [os.path.join(os.path.dirname(root), *folders, os.path.basename(root))
             for root in (TOY_LABELED_DIR, TOY_UNLABELED_DIR)]
    for root, size in zip(roots, (TOY_LABELED_SIZE, TOY_UNLABELED_SIZE)):
        spec_path = os.path.join(root, "toy_spec.json")
        spec = dict(explore=0.0, video=video, **{**size, "episodes": size["episodes"] * scale})
        if os.path.isfile(spec_path):
            with open(spec_path) as file:
                if json.load(file) == spec:
                    continue
        if os.path.exists(root):
            print(f"{root} was written with other settings than the demo's: writing it again")
            shutil.rmtree(root)
        print(f"writing the toy dataset {root} ({spec['episodes']} episodes) with lerobot ...")
        write_toy_dataset(root, **spec)
    return tuple(roots)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The toy end-effector world: write a LeRobot dataset of "
                                     "random smooth motions, or render poses to a PNG strip.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", help="dataset folder to write")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="frames per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explore", type=float, default=0.0, help="share of exploratory action segments")
    parser.add_argument("--video", action="store_true", help="store frames as AV1 video (as DROID) instead of PNG")
    parser.add_argument("--strip", help="PNG: render a start pose and each of the 7 dimensions changed")
    args = parser.parse_args(argv)
    if not args.out and not args.strip:
        parser.error("give --out (write a dataset) and/or --strip (render a picture)")
    if args.out:
        if os.path.exists(args.out):
            raise SystemExit(f"error: {args.out} already exists; choose another --out")
        if not 0 <= args.explore <= 1:
            parser.error("--explore must be in [0, 1]")
        write_toy_dataset(args.out, args.episodes, args.steps, args.seed, args.explore, args.video)
        print(f"wrote {args.out}")
    if args.strip:
        centre = (WORKSPACE_LOW + WORKSPACE_HIGH) / 2
        poses = [centre]
        for dimension in range(7):  # push each dimension towards its upper limit in turn
            pose = centre.copy()
            pose[dimension] = WORKSPACE_HIGH[dimension]
            poses.append(pose)
        Image.fromarray(np.concatenate(list(render_batch(np.stack(poses))), axis=1)).save(args.strip)
        print(f"wrote {args.strip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
