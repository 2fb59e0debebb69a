"""Plan with the world model: CEM model-predictive control toward a goal image, in DINOv2 token space.

    python plan.py --goal goals/goal_0.png                                   # toy world: closed-loop MPC
    python plan.py --goal goal.png --obs now.png --checkpoint ckpt.pt --out plan.json   # one plan

1. The problem
--------------
A goal is a picture. Encode it once with the frozen DINOv2 and the training token statistics:
g (N, D). The present is the last C observed frames, encoded the same way: z (C, N, D). Look for H
delta-EE actions a = (a_1 .. a_H), each 7 numbers in *normalised* action units (the training
ActionStats: a = (robot - mean) / std), whose imagined future ends at the goal:

    minimise  J(a) = dist(ẑ_H(a), g),      ẑ_1..H(a) = shortcut.rollout(model, z, a)   (H, N, D)

dist is the mean of |·| (L1) or of (·)² (MSE) over the N·D numbers of a frame; with --all-frames,
J averages dist over the H imagined frames, which also rewards getting close early.

Why sampling and not gradients: ẑ_H comes out of H autoregressive frames of K noisy denoising steps
each, so ∂J/∂a is costly and noisy, while a is small (H·7 = 35 numbers for H = 5) and a sampler only
needs forward passes, which batch perfectly: hundreds of candidate futures are one rollout call.

2. The cross-entropy method (CEM)
---------------------------------
Keep a diagonal Gaussian over action sequences, mean μ (H, 7) and std σ (H, 7), starting at μ = 0
(the average training action) and σ = σ₀ = 1 (the training spread). Then, I times:

    1. sample S sequences  a^s = μ + σ ⊙ ε^s,  ε^s ~ N(0, I)            (S, H, 7); a^0 = μ itself
    2. clip every a^s into the action bounds (section 3)
    3. imagine all S futures in ONE batched rollout from the one context  (C, N, D) -> (S, H, N, D)
    4. score them                                                        J (S,)
    5. refit the Gaussian to the k lowest-cost sequences, the elites:
           μ ← m·μ + (1 − m)·mean(elites)      σ ← m·σ + (1 − m)·std(elites)      (m: momentum)

Each refit moves μ toward what worked and shrinks σ around it, so later iterations search finer
near better plans; a^0 = μ keeps the current best guess in the race. The plan is the final μ; one
more rollout of μ alone gives its predicted cost and imagined frames (for pictures).
One iteration costs H·K + H − 1 model passes over S rows of one frame each (K denoising steps per
frame, and for every frame but the last one more pass that writes it into the KV cache), plus one
pass over the C context frames as a single row, whose keys and values are copied to the S rows.

All S candidates share the same noise (common random numbers: WorldModel.shared_noise). The model
samples a future, so with independent noise part of each cost difference would be sampling luck
and the elites partly the lucky; with shared noise, candidates differ by their actions only.

3. Action bounds
----------------
The model has only seen actions like the training ones, so normalised components are clipped to
±max_sigma (3 training standard deviations). On top, bounds in robot units that a real arm needs:
|Δxyz| ≤ max_translation (0.05 m, V-JEPA 2-AC's), |rotation vector| ≤ max_rotation,
|Δgripper| ≤ max_gripper. Norm bounds shrink the vector and keep its direction. Candidates are
clipped before they are imagined, so elites, μ and the returned plan all satisfy the bounds.

4. Model-predictive control (MPC)
---------------------------------
The model is imperfect, so execute only the first `replan_every` actions, observe, plan again.
Warm start: the next search starts from the rest of the last plan, shifted by what was executed
and padded with μ = 0; σ restarts at σ₀ so the planner can still change its mind.

Planner sizes (PLANNER_SIZES, --planner): "dino-wm", the default for real checkpoints, as DINO-WM:
H = 5, S = 300, k = 30, σ₀ = 1, no momentum, I = 10 (the low end of its 10-30; V-JEPA 2-AC: H = 2,
S = 400, k = 10, I = 10, momentum 0.15), K = 4 shortcut steps per frame. Seconds per MPC step at
these settings, measured: BENCHMARKS.md (`python bench.py`). "toy", the default for toy
checkpoints: H = 3, S = 64, k = 8, I = 3 at K = 1 (the toy's 8-step goals need no longer horizon,
and 50 closed-loop episodes must fit in 10 minutes on 2 CPU cores). "fast": H = 2, S = 32, k = 6,
I = 3 at K = 1, for tests.

5. The toy-world benchmark (sim.py)
-----------------------------------
Pairs: start = a random pose; goal = start after PATH_STEPS smooth random actions, so every goal
is reachable in PATH_STEPS moves. Episode: act, step the simulator, stop when the pose is within
TOLERANCE of the goal (position, rotation angle, gripper, all at once) or after max_steps
(2·PATH_STEPS); success = within tolerance at the end. Two tasks (TASKS):
  pose:  the goal differs in all 7 numbers; the planner may move all of them.
  reach: the classic reaching task: the goal differs in position only, and the planner (and the
         random baseline) move the position only (rotation and gripper bounds 0).
The same pairs are run with random actions (normalised N(0, σ₀²), clipped by the same bounds) as
the baseline. The oracle replaces the learned dynamics by the simulator itself (step, render,
encode the true future), with everything else unchanged: if CEM fails with the oracle the planner
or the token cost is at fault, not the model.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import data
import encoder as encoder_module
import sim
from shortcut import rollout
from train import TOY_RUN_DIR, CheckpointError, load_world_model

DEFAULT_CHECKPOINT = os.path.join(TOY_RUN_DIR, "checkpoint.pt")
PATH_STEPS = 8  # benchmark goals lie PATH_STEPS smooth random actions away from the start
MAX_STEPS = 2 * PATH_STEPS  # the closed-loop step budget: twice the length of the path to the goal
TOLERANCE = dict(position=0.02, rotation=0.15, gripper=0.15)  # metres, radians, opening in [0, 1]


class PlanningError(Exception):
    """A plan that cannot be trusted (non-finite costs); the CLI prints it on one line."""


# ----------------------------------------------------------------------------------------------
# The models a planner can use: anything with action_stats and a batched imagine().


def read_image(path, size):
    """An image file as (size, size, 3) uint8 RGB. RGBA, grayscale and palette images are converted to
    RGB (alpha dropped); other sizes are resized as training frames are (data.square_resize: short
    side to `size`, centre crop). One clear line (SystemExit) for a missing file or a non-image."""
    try:
        with Image.open(path) as image:
            original = f"{image.width}x{image.height} {image.mode}"
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise SystemExit(f"error: cannot read image {path!r} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]})") from None
    if original != f"{size}x{size} RGB":
        print(f"note: {path} is {original}: converted to RGB, resized to {size}x{size} (the encoder's input)",
              file=sys.stderr)
        frame = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        pixels = (data.square_resize(frame, size)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    return pixels


@torch.no_grad()
def encode_images(frozen_encoder, token_stats, images):
    """list of (H, W, 3) uint8 images -> normalised tokens (len, N, D), on the encoder's device."""
    frames = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)  # (len, 3, H, W)
    return token_stats.normalize(frozen_encoder(frames.to(next(frozen_encoder.parameters()).device)))


class WorldModel:
    """A trained world model seen from the planner: images -> normalised tokens, and imagine() that
    rolls out S candidate action sequences from one context in a single batched call."""

    def __init__(self, model, frozen_encoder, token_stats, action_stats, K=4, pred="x", mode="shortcut",
                 context_noise=0.9, toy=False, shared_noise=True):
        self.model, self.encoder, self.token_stats, self.action_stats = model, frozen_encoder, token_stats, action_stats
        self.K, self.pred, self.mode, self.context_noise, self.toy = K, pred, mode, context_noise, toy
        self.shared_noise = shared_noise  # one noise draw for all candidates: costs differ by the actions only

    @classmethod
    def load(cls, path, device="cpu", K=1):
        model, checkpoint = load_world_model(path, device)
        frozen_encoder = encoder_module.Encoder(checkpoint["encoder"]["name_or_path"],
                                                pool=checkpoint["encoder"]["pool"]).to(device)
        world_model = cls(model, frozen_encoder, encoder_module.TokenStats(**checkpoint["token_stats"]),
                          data.ActionStats(**checkpoint["action_stats"]), K, checkpoint["train_args"]["pred"],
                          checkpoint["train_args"]["mode"], checkpoint["train_args"].get("context_noise", 0.9),
                          toy=checkpoint["toy"])
        world_model.checkpoint = checkpoint
        return world_model

    def encode(self, images):
        return encode_images(self.encoder, self.token_stats, images)

    def context(self, images, poses=None, actions=None):
        """The last C observed frames (and the actions that led to them, when known) as imagine() takes
        them. As in training clips, whose first action is always 0, the first context frame gets 0."""
        tokens = self.encode(images)  # (C, N, D)
        if actions is None:
            return tokens, None  # an action-free context, like the unlabelled training video
        leading = np.stack([np.zeros(7), *actions[len(actions) - len(images) + 1:]])  # (C, 7) robot units
        return tokens, self.action_stats.normalize(torch.as_tensor(leading, dtype=torch.float32)).to(tokens.device)

    def goal(self, image, pose=None):
        return self.encode([image])[0]  # (N, D)

    @torch.no_grad()
    def imagine(self, context, actions, generator=None):
        """context from context(); actions (S, H, 7) normalised -> imagined tokens (S, H, N, D): all S
        candidates in one rollout (KV cache, K shortcut steps). `generator` (CPU) seeds the noise."""
        tokens, context_actions = context
        device = tokens.device
        noise = None if generator is None else torch.Generator(device).manual_seed(
            int(torch.randint(2 ** 62, (1,), generator=generator)))  # same stream on any device
        return rollout(self.model, tokens[None], actions.to(device), K=self.K,  # one context for all S rows
                       context_actions=None if context_actions is None else context_actions[None],
                       context_noise=self.context_noise, pred=self.pred, mode=self.mode, generator=noise,
                       shared_noise=self.shared_noise)


class SimOracle:
    """The simulator as the world model, for telling planner failures from model failures. Its context
    is the true current pose; the future comes from the true next poses (sim.step_batch), seen as
    space="tokens": rendered and encoded like real frames (same encoder, statistics, cost: only the
        dynamics differ from a learned model), or
    space="pose": the poses themselves, as pose_features (no picture at all: only the planner is tested)."""

    def __init__(self, frozen_encoder, token_stats, action_stats, space="tokens"):
        self.encoder, self.token_stats, self.action_stats, self.space = frozen_encoder, token_stats, action_stats, space

    def context(self, images, poses, actions=None):
        return np.asarray(poses[-1], dtype=np.float64)

    def goal(self, image, pose=None):
        return pose_features(pose) if self.space == "pose" else encode_images(self.encoder, self.token_stats, [image])[0]

    @torch.no_grad()
    def imagine(self, pose, actions, generator=None):
        S, H = actions.shape[:2]
        deltas = self.action_stats.denormalize(actions.cpu()).double().numpy()  # (S, H, 7) robot units
        poses = [np.repeat(pose[None], S, axis=0)]
        for step in range(H):
            poses.append(sim.step_batch(poses[-1], deltas[:, step]))
        poses = np.stack(poses[1:], axis=1)  # (S, H, 7)
        if self.space == "pose":
            return pose_features(poses)
        images = sim.render_batch(poses.reshape(S * H, 7))  # (S·H, h, w, 3)
        return encode_images(self.encoder, self.token_stats, list(images)).unflatten(0, (S, H))  # (S, H, N, D)


def pose_features(poses):
    """(..., 7) poses -> (..., 13): position, rotation matrix, gripper, each divided by its success
    tolerance, so that squared distances count tolerances and no Euler angle wraps around."""
    poses = np.asarray(poses, dtype=np.float64)
    rotation = data.euler_to_matrix(poses[..., 3:6]).reshape(*poses.shape[:-1], 9)
    features = np.concatenate([poses[..., :3] / TOLERANCE["position"], rotation / TOLERANCE["rotation"],
                               poses[..., 6:] / TOLERANCE["gripper"]], axis=-1)
    return torch.as_tensor(features, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The planner.


class CEMPlanner:
    """CEM over H-step sequences of normalised delta-EE actions (module docstring, sections 2-4).

    model: anything with `action_stats` and `imagine(context, actions (S, H, 7), generator) -> (S, H, ...)`
    (WorldModel, SimOracle). plan() searches once; act() is the MPC step with warm start."""

    def __init__(self, model, horizon=5, samples=300, top_k=30, iterations=10, sigma=1.0, momentum=0.0,
                 cost="mse", all_frames=False, max_sigma=3.0, max_translation=0.05, max_rotation=None,
                 max_gripper=None, replan_every=1, warm_start=True, seed=0):
        if not 1 <= top_k <= samples or cost not in ("mse", "l1") or not 1 <= replan_every <= horizon:
            raise ValueError("need 1 <= top_k <= samples, cost 'mse' or 'l1', 1 <= replan_every <= horizon")
        self.model, self.action_stats = model, model.action_stats
        self.horizon, self.samples, self.top_k, self.iterations = horizon, samples, top_k, iterations
        self.sigma, self.momentum, self.cost_name, self.all_frames = sigma, momentum, cost, all_frames
        self.max_sigma, self.max_translation = max_sigma, max_translation
        self.max_rotation, self.max_gripper = max_rotation, max_gripper
        self.replan_every, self.warm_start, self.seed = replan_every, warm_start, seed
        self.reset()

    def reset(self):
        """Forget the warm start and restart the random stream: a new episode or goal."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self.previous = None  # the last plan's normalised actions, still to come

    def clip(self, actions):
        """(..., 7) normalised actions -> the same inside the normalised and the robot-unit bounds."""
        actions = actions.clamp(-self.max_sigma, self.max_sigma)
        robot = self.action_stats.denormalize(actions)
        parts = [robot[..., :3], robot[..., 3:6], robot[..., 6:]]
        for index, limit in ((0, self.max_translation), (1, self.max_rotation)):
            if limit is not None:  # shrink the vector to the limit, keep its direction
                norm = parts[index].norm(dim=-1, keepdim=True)
                parts[index] = parts[index] * (limit / norm.clamp_min(1e-12)).clamp(max=1.0)
        if self.max_gripper is not None:
            parts[2] = parts[2].clamp(-self.max_gripper, self.max_gripper)
        return self.action_stats.normalize(torch.cat(parts, dim=-1))

    def cost(self, imagined, goal):
        """imagined (S, H, ...) against goal (...) -> (S,): L1 or MSE, last frame or mean over frames."""
        frames = imagined if self.all_frames else imagined[:, -1:]
        difference = frames - goal
        distance = difference.abs() if self.cost_name == "l1" else difference.pow(2)
        return distance.flatten(2).mean(2).mean(1)

    def evaluate(self, context, goal, candidates):
        """One batched imagination of all candidates and their costs; refuses non-finite costs."""
        imagined = self.model.imagine(context, candidates, self.generator)
        costs = self.cost(imagined, goal)
        if not torch.isfinite(costs).all():
            raise PlanningError(f"{int((~torch.isfinite(costs)).sum())} of {len(costs)} candidate costs are "
                                f"NaN or infinite: the model or its inputs are broken, no plan made")
        return imagined, costs

    @torch.no_grad()
    def plan(self, context, goal):
        """One CEM search. Returns a dict: actions (H, 7) robot units, normalised (H, 7), cost (of the
        returned plan), imagined (H, ...) its imagined future, iteration_costs (best cost per iteration)."""
        H, S = self.horizon, self.samples
        mean = torch.zeros(H, 7) if self.previous is None or not self.warm_start else self.previous
        std = torch.full((H, 7), float(self.sigma))
        iteration_costs = []
        for _ in range(self.iterations):
            candidates = mean + std * torch.randn(S, H, 7, generator=self.generator)  # (S, H, 7)
            candidates[0] = mean
            candidates = self.clip(candidates)
            _, costs = self.evaluate(context, goal, candidates)
            elites = candidates[costs.cpu().topk(self.top_k, largest=False).indices]  # (k, H, 7)
            mean = self.momentum * mean + (1 - self.momentum) * elites.mean(0)
            std = self.momentum * std + (1 - self.momentum) * elites.std(0, unbiased=False)
            iteration_costs.append(costs.min().item())
        mean = self.clip(mean)
        imagined, cost = self.evaluate(context, goal, mean[None])
        return dict(actions=self.action_stats.denormalize(mean).numpy(), normalised=mean, cost=cost.item(),
                    imagined=imagined[0], iteration_costs=iteration_costs)

    def act(self, context, goal):
        """One MPC step: plan (warm-started from the last plan) and return (the first replan_every
        actions in robot units (n, 7), the plan). The rest of the plan warm-starts the next call."""
        result = self.plan(context, goal)
        n = self.replan_every
        self.previous = torch.cat([result["normalised"][n:], torch.zeros(n, 7)])
        return result["actions"][:n], result


# ----------------------------------------------------------------------------------------------
# Closed loop in the toy world: policies, episodes, the benchmark.


class MPCPolicy:
    """Images in, actions out: keeps the recent frames and its own actions as context, re-plans every
    planner.replan_every actions. imagined[t] are the tokens it predicted for frame t + 1."""

    def __init__(self, planner, context_frames=2):
        self.planner, self.model, self.context_frames = planner, planner.model, context_frames

    def reset(self, goal_image, goal_pose):
        self.planner.reset()
        self.goal = self.model.goal(goal_image, goal_pose)
        self.images, self.poses, self.actions, self.queue, self.imagined, self.plans = [], [], [], [], [], []

    def __call__(self, image, pose):
        self.images.append(image)
        self.poses.append(pose)
        if not self.queue:
            recent = self.images[-self.context_frames:]
            actions, plan = self.planner.act(self.model.context(recent, self.poses, self.actions), self.goal)
            self.queue = [(action, plan["imagined"][i]) for i, action in enumerate(actions)]
            self.plans.append(plan)
        action, imagined = self.queue.pop(0)
        self.actions.append(action)
        self.imagined.append(imagined)
        return action


class RandomPolicy:
    """The baseline: normalised N(0, σ₀²) actions clipped by the planner's bounds, so the random walk
    moves like training actions and is allowed exactly what the planner is allowed."""

    def __init__(self, planner):
        self.planner = planner

    def reset(self, goal_image, goal_pose):
        self.planner.reset()

    def __call__(self, image, pose):
        action = self.planner.sigma * torch.randn(7, generator=self.planner.generator)
        return self.planner.action_stats.denormalize(self.planner.clip(action)).numpy()


# What moves between start and goal in each task, and the planner bounds that go with it (docstring, 5).
TASKS = {"pose": dict(moving=np.ones(7), bounds={}),
         "reach": dict(moving=np.array([1, 1, 1, 0, 0, 0, 0]), bounds=dict(max_rotation=0.0, max_gripper=0.0))}


def make_pairs(n, seed=0, path_steps=PATH_STEPS, margin=0.1, task="pose"):
    """n (start, goal) poses; goal = start after `path_steps` smooth random actions, so it is reachable
    (for task "reach" the actions move the position only).
    Goals closer than `margin` of a range to the workspace edge are drawn again: there the clip may
    have bitten, and at extreme poses a part of the gripper can leave the picture or hide behind the
    rest (e.g. the fingers, seen end-on), so no image-based planner could tell it was reached."""
    rng = np.random.default_rng(seed)
    span = sim.WORKSPACE_HIGH - sim.WORKSPACE_LOW
    low, high = sim.WORKSPACE_LOW + margin * span, sim.WORKSPACE_HIGH - margin * span
    pairs = []
    while len(pairs) < n:
        start = goal = sim.random_pose(rng)
        for action in sim.smooth_actions(rng, path_steps) * TASKS[task]["moving"]:
            goal = sim.step(goal, action)
        if np.all((goal > low) & (goal < high)):
            pairs.append((start, goal))
    return pairs


def reached(pose, goal, tolerance=TOLERANCE):
    position, rotation, gripper = sim.pose_error(pose, goal)
    return position <= tolerance["position"] and rotation <= tolerance["rotation"] and gripper <= tolerance["gripper"]


def run_episode(policy, start, goal, max_steps=MAX_STEPS, tolerance=TOLERANCE):
    """Act until the pose is within tolerance of the goal or max_steps actions were taken. The
    simulator, not the policy, checks the goal. Returns a dict of the outcome and the frames seen."""
    pose, frames = np.asarray(start, dtype=np.float64), [sim.render(start)]
    policy.reset(sim.render(goal), goal)
    steps = 0
    while steps < max_steps and not reached(pose, goal, tolerance):
        pose = sim.step(pose, policy(frames[-1], pose))
        frames.append(sim.render(pose))
        steps += 1
    position, rotation, gripper = sim.pose_error(pose, goal)
    return dict(success=bool(reached(pose, goal, tolerance)), steps=steps, position_error=float(position),
                rotation_error=float(rotation), gripper_error=float(gripper), frames=frames, final_pose=pose)


def evaluate_closed_loop(policy, pairs, max_steps=MAX_STEPS, tolerance=TOLERANCE, progress=False):
    """Run `policy` (MPCPolicy, RandomPolicy, a CEMPlanner: wrapped in MPCPolicy) from every start to
    its goal. Returns success_rate, mean final errors and steps, and per-episode outcomes."""
    if isinstance(policy, CEMPlanner):
        policy = MPCPolicy(policy)
    episodes = []
    for start, goal in tqdm(pairs, desc=f"closed loop, {type(policy).__name__}", unit="episode", disable=not progress):
        outcome = run_episode(policy, start, goal, max_steps, tolerance)
        episodes.append({key: value for key, value in outcome.items() if key in
                         ("success", "steps", "position_error", "rotation_error", "gripper_error")})
    mean = lambda key: float(np.mean([episode[key] for episode in episodes]))  # noqa: E731
    return dict(success_rate=mean("success"), final_position_error=mean("position_error"),
                final_rotation_error=mean("rotation_error"), final_gripper_error=mean("gripper_error"),
                steps=mean("steps"), episodes=episodes)


# Planner sizes, each with its sampling steps K (plan.py --planner, eval.py --planner).
# "dino-wm": DINO-WM's defaults, 300 samples x horizon 5, top 30, 10 iterations, at K = 4: for a GPU
#   (on 2 CPU cores one MPC step of the tiny model takes over a minute: BENCHMARKS.md).
# "toy": the toy world's default, 64 x 3, top 8, 3 iterations at K = 1: small enough that the 50-pair
#   closed-loop evaluation runs in under 8 minutes on 2 CPU cores, large enough for the simulator
#   oracle to reach full poses. K = 1: one step predicts the conditional mean, which is what the MSE
#   cost compares (eval.py: K = 1 is within a few % of the lowest token MSE, at the lowest cost).
# "fast": 32 x 2, top 6, 3 iterations at K = 1: the tests.
PLANNER_SIZES = {"dino-wm": (dict(horizon=5, samples=300, top_k=30, iterations=10), 4),
                 "toy": (dict(horizon=3, samples=64, top_k=8, iterations=3), 1),
                 "fast": (dict(horizon=2, samples=32, top_k=6, iterations=3), 1)}


def closed_loop_report(checkpoint_path, pairs=50, seed=0, max_steps=MAX_STEPS, size="toy", K=None,
                       oracle=False, task="pose", device="cpu", progress=False, **planner_options):
    """CEM MPC with a checkpoint (or the simulator oracle) vs random actions on the same `pairs`
    random start/goal pairs of the toy world's `task`, with a planner of the given `size`
    (PLANNER_SIZES; K and planner_options override it). Used by eval.py and the tests."""
    size_options, size_K = PLANNER_SIZES[size]
    world_model = WorldModel.load(checkpoint_path, device, K=K or size_K)
    options = {**size_options, **TASKS[task]["bounds"], **planner_options, "seed": seed}
    model = SimOracle(world_model.encoder, world_model.token_stats, world_model.action_stats) if oracle else world_model
    planner = CEMPlanner(model, **options)
    pair_list = make_pairs(pairs, seed, task=task)
    start = time.perf_counter()
    report = dict(task=task, size=size, pairs=pairs, max_steps=max_steps, tolerance=TOLERANCE, path_steps=PATH_STEPS,
                  oracle=oracle, K=world_model.K, planner_options=options,
                  planner=evaluate_closed_loop(planner, pair_list, max_steps, progress=progress))
    report["seconds"] = time.perf_counter() - start
    report["random"] = evaluate_closed_loop(RandomPolicy(planner), pair_list, max_steps)
    return report


def write_goal_images(directory="goals", n=4, seed=0):
    """goal_<i>.png rendered by sim.py for n benchmark pairs, and goals.json with each goal's pose and
    the start pose `python plan.py --goal <dir>/goal_<i>.png` begins from. Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    poses = {}
    for index, (start, goal) in enumerate(make_pairs(n, seed)):
        name = f"goal_{index}.png"
        Image.fromarray(sim.render(goal)).save(os.path.join(directory, name))
        poses[name] = dict(goal=np.asarray(goal).tolist(), start=np.asarray(start).tolist())
    with open(os.path.join(directory, "goals.json"), "w") as file:
        json.dump(poses, file, indent=1)
    return directory


# ----------------------------------------------------------------------------------------------
# Command line.


def build_argument_parser():
    parser = argparse.ArgumentParser(
        description="CEM planning toward a goal image with a trained world model. With --obs: one plan from "
                    "those frames (first action printed in robot units, whole plan to --out). Without --obs "
                    "and with a toy-world checkpoint: closed-loop MPC in sim.py until the goal is reached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--goal", required=True, help="goal image (any size/mode: converted to the encoder's RGB input)")
    parser.add_argument("--obs", nargs="+", help="current frame(s), oldest first; omit for the toy-world loop")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="world-model checkpoint (train.py)")
    parser.add_argument("--out", help="write the plan (or the toy episode) as JSON here")
    parser.add_argument("--save", help="write a picture strip (PNG): observations, imagined frames, goal")
    parser.add_argument("--decoder", help="decoder checkpoint (decode.py) to picture imagined frames; default: "
                                          "the toy decoder when it exists")
    group = parser.add_argument_group("planner (sizes: PLANNER_SIZES; --horizon, --samples, --top-k, --iterations "
                                      "and --K override the size's)")
    group.add_argument("--planner", choices=sorted(PLANNER_SIZES),
                       help="planner size; default: toy for a toy-world checkpoint, dino-wm otherwise")
    group.add_argument("--horizon", type=int, help="H actions per plan")
    group.add_argument("--samples", type=int, help="S candidate sequences per CEM iteration")
    group.add_argument("--top-k", type=int, help="elites refitted per iteration")
    group.add_argument("--iterations", type=int, help="CEM iterations per plan")
    group.add_argument("--sigma", type=float, default=1.0, help="initial std, normalised action units")
    group.add_argument("--momentum", type=float, default=0.0, help="weight of the old mean/std in each refit")
    group.add_argument("--cost", choices=["mse", "l1"], default="mse", help="token distance to the goal")
    group.add_argument("--all-frames", action="store_true", help="cost over all imagined frames, not the last")
    group.add_argument("--max-sigma", type=float, default=3.0, help="bound on normalised action components")
    group.add_argument("--max-translation", type=float, default=0.05, help="bound on |dxyz| per action, metres")
    group.add_argument("--max-rotation", type=float, help="bound on the rotation-vector norm, radians")
    group.add_argument("--max-gripper", type=float, help="bound on |dgripper| per action")
    group.add_argument("--K", type=int, help="shortcut denoising steps per imagined frame")
    group.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("toy-world loop (no --obs)")
    group.add_argument("--replan-every", type=int, default=1, help="actions executed before re-planning")
    group.add_argument("--no-warm-start", action="store_true", help="start every plan from mean 0")
    group.add_argument("--context-frames", type=int, default=2, help="recent frames given to the model")
    group.add_argument("--max-steps", type=int, default=MAX_STEPS, help="step budget of the episode")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def planner_from_arguments(model, args):
    return CEMPlanner(model, horizon=args.horizon, samples=args.samples, top_k=args.top_k, iterations=args.iterations,
                      sigma=args.sigma, momentum=args.momentum, cost=args.cost, all_frames=args.all_frames,
                      max_sigma=args.max_sigma, max_translation=args.max_translation,
                      max_rotation=args.max_rotation, max_gripper=args.max_gripper,
                      replan_every=args.replan_every, warm_start=not args.no_warm_start, seed=args.seed)


def decoded(decoder, world_model, tokens):
    """Normalised tokens (T, N, D) -> pictures (T, 3, H, W), or [] without a decoder."""
    if decoder is None or len(tokens) == 0:
        return []
    return list(decoder.decode(torch.stack(list(tokens)).cpu(), token_stats=world_model.token_stats))


def as_picture(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]


def load_decoder_for(args, world_model):
    from decode import TOY_DECODER_DIR, load_decoder  # pictures only: not needed to plan
    path = args.decoder or (os.path.join(TOY_DECODER_DIR, "checkpoint.pt") if world_model.toy else None)
    if path is None or (args.decoder is None and not os.path.isfile(path)):
        return None
    try:
        return load_decoder(path, encoder=world_model.checkpoint["encoder"])[0]
    except CheckpointError as error:
        if args.decoder is None:  # the toy default belongs to another encoder: pictures without imagination
            print(f"note: no decoded frames: {error}", file=sys.stderr)
            return None
        raise SystemExit(f"error: {error}")


def plan_from_files(args, world_model, goal_image):
    """--obs mode: one plan from the given frames (no actions known: an action-free context)."""
    size = world_model.encoder.image_size
    observations = [read_image(path, size) for path in args.obs]
    planner = planner_from_arguments(world_model, args)
    start = time.perf_counter()
    result = planner.plan(world_model.context(observations, None, None), world_model.goal(goal_image))
    seconds = time.perf_counter() - start
    dx, dy, dz, rx, ry, rz, dg = result["actions"][0]
    print(f"first action: dxyz = ({dx:+.4f}, {dy:+.4f}, {dz:+.4f}) m, rotation vector = ({rx:+.4f}, {ry:+.4f}, "
          f"{rz:+.4f}) rad, dgripper = {dg:+.4f}   (predicted cost {result['cost']:.4f}, {seconds:.1f} s)")
    report = dict(goal=args.goal, obs=args.obs, checkpoint=args.checkpoint, actions=result["actions"].tolist(),
                  actions_normalised=result["normalised"].tolist(), predicted_cost=result["cost"],
                  iteration_costs=result["iteration_costs"], seconds=seconds,
                  units="dx dy dz [m], rotation vector [rad] (R_new = dR R, base frame), dgripper")
    if args.save:
        decoder = load_decoder_for(args, world_model)
        rows = [[as_picture(image) for image in observations], decoded(decoder, world_model, result["imagined"]),
                [as_picture(goal_image)]]
        labels = ["observed", "imagined", "goal"]
        keep = [index for index, row in enumerate(rows) if row]
        report["picture"] = save_strip(args.save, [rows[i] for i in keep], [labels[i] for i in keep])
    return report


def save_strip(path, rows, labels):
    from decode import save_image_strip
    return save_image_strip(path, rows, labels=labels, scale=max(1, 128 // rows[0][0].shape[-1]))


def toy_loop(args, world_model, goal_image):
    """No --obs, toy checkpoint: closed-loop MPC in sim.py toward a goal listed in goals.json."""
    poses_file = os.path.join(os.path.dirname(args.goal) or ".", "goals.json")
    name = os.path.basename(args.goal)
    try:
        with open(poses_file) as file:
            entry = json.load(file)[name]
        start, goal_pose = np.array(entry["start"], dtype=np.float64), np.array(entry["goal"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"error: the toy loop needs the goal's pose: {poses_file} has no entry for {name!r} "
                         f"(goal images from write_goal_images / train.py have one); or pass --obs") from None
    if not np.array_equal(read_image(args.goal, sim.IMAGE_SIZE), sim.render(goal_pose)):
        print(f"note: {args.goal} differs from the rendering of its pose in {poses_file}", file=sys.stderr)
    policy = MPCPolicy(planner_from_arguments(world_model, args), args.context_frames)
    start_time = time.perf_counter()
    outcome = run_episode(policy, start, goal_pose, args.max_steps)
    plans = len(policy.plans)
    seconds_per_plan = (time.perf_counter() - start_time) / max(1, plans)
    print(f"{'reached' if outcome['success'] else 'did not reach'} the goal in {outcome['steps']} steps "
          f"(budget {args.max_steps}): final error {outcome['position_error'] * 100:.1f} cm, "
          f"{np.degrees(outcome['rotation_error']):.1f} deg, gripper {outcome['gripper_error']:.2f}; "
          f"{plans} plans, {seconds_per_plan:.1f} s per MPC step")
    report = {key: value for key, value in outcome.items() if key != "frames"}
    report.update(final_pose=outcome["final_pose"].tolist(), start=start.tolist(), goal=goal_pose.tolist(),
                  tolerance=TOLERANCE, seconds_per_mpc_step=seconds_per_plan,
                  actions=np.asarray(policy.actions).tolist(), predicted_costs=[p["cost"] for p in policy.plans])
    if args.save:
        decoder = load_decoder_for(args, world_model)
        observed = [as_picture(frame) for frame in outcome["frames"]]
        # imagined row, column t: the frame the model predicted for observation t (column 0: what it saw)
        imagined = decoded(decoder, world_model, [world_model.goal(outcome["frames"][0])] + policy.imagined)
        rows, labels = [observed, [as_picture(goal_image)]], ["observed", "goal"]
        if imagined:
            rows, labels = [observed, imagined, rows[1]], ["observed", "imagined", "goal"]
        report["picture"] = save_strip(args.save, rows, labels)
    return report


def main(argv=None):
    args = build_argument_parser().parse_args(argv)
    if args.obs is None and not os.path.isfile(args.checkpoint) and args.checkpoint == DEFAULT_CHECKPOINT:
        raise SystemExit(f"error: --obs is required (current camera frame(s)) unless a toy-world checkpoint "
                         f"exists: {DEFAULT_CHECKPOINT} is missing (python train.py makes it)")
    try:
        world_model = WorldModel.load(args.checkpoint, args.device)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    size_options, size_K = PLANNER_SIZES[args.planner or ("toy" if world_model.toy else "dino-wm")]
    for name, value in size_options.items():  # flags given explicitly win over the size's values
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    world_model.K = args.K = size_K if args.K is None else args.K
    if args.obs is None and not world_model.toy:
        raise SystemExit(f"error: --obs is required: {args.checkpoint} was not trained on the toy world, so "
                         f"there is no simulator to run the loop in")
    goal_image = read_image(args.goal, world_model.encoder.image_size)
    try:
        report = plan_from_files(args, world_model, goal_image) if args.obs else toy_loop(args, world_model, goal_image)
    except (PlanningError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
        print(f"wrote {args.out}")
    if args.save:
        print(f"picture: {report['picture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
