"""The planner: CEM model-predictive control toward a goal image, in DINOv2 token space.
(plan.py is its command line.)

1. The problem
--------------
A goal is a picture. Encode it once with the frozen DINOv2 and the training token statistics:
g (N, D). The present is the last C observed frames, encoded the same way: z (C, N, D). Look for H
delta-EE actions a = (a_1 .. a_H), each 7 numbers in *normalised* action units (the training
ActionStats: a = (robot - mean) / std), whose imagined future ends at the goal:

    minimise  J(a) = dist(ẑ_H(a), g),      ẑ_1..H(a) = shortcut.rollout(model, z, a)   (H, N, D)

dist is the mean of |·| (L1) or of (·)² (MSE) over the N·D numbers of a frame, in the model's token
space: whitened when it was trained on whitened tokens (encoder.py), so that the directions in which
rotation and gripper show count as much as the large ones of translation. With --all-frames, J
averages dist over the H imagined frames, which also rewards getting close early.

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

All S candidates share the same noise (common random numbers: LearnedModel.shared_noise). The model
samples a future, so with independent noise part of each cost difference would be sampling luck
and the elites partly the lucky; with shared noise, candidates differ by their actions only.
Better still, the model can be asked for no sample at all: told the finest step size d_min
(LearnedModel.step_input, default PLANNING_STEP_INPUT = "d_min"; shortcut.py section 6), one pass
from pure noise gives its estimate of the mean next frame given the past and the action, which is
what a squared distance to the goal should be measured from.

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

Precision (LearnedModel's precision, plan.py --precision): "bf16" runs the rollouts under bfloat16
autocast, the KV cache in bf16 too, on a GPU or on a CPU with bf16 matrix units; the costs equal
fp32's within bf16 rounding (tests), and the speed of each, next to its FLOP bound, is in
BENCHMARKS.md.

5. Closed loop in the toy world
-------------------------------
MPCPolicy turns the planner into a policy (frames in, actions out) for sim.py's closed-loop
benchmark (start/goal pairs, episodes, tolerances, tasks); RandomPolicy is its baseline: normalised
N(0, σ₀²) actions clipped by the same bounds. SimOracle replaces the learned dynamics by the
simulator itself (step, render, encode the true future), with everything else unchanged: if CEM
fails with the oracle the planner or the token cost is at fault, not the model.
"""
import copy

import numpy as np
import torch

import data
import encoder as encoder_module
import sim
from checkpoint import load_world_model
from shortcut import STEP_INPUTS, rollout

# The step size the planner tells the model: d_min, so that it imagines the mean next frame (section 2).
PLANNING_STEP_INPUT = "d_min"


class PlanningError(Exception):
    """A plan that cannot be trusted (non-finite costs); the CLI prints it on one line."""


# ----------------------------------------------------------------------------------------------
# The models a planner can use: anything with action_stats and a batched imagine().


@torch.no_grad()
def encode_images(frozen_encoder, token_stats, images):
    """list of (H, W, 3) uint8 images -> normalised tokens (len, N, D), on the encoder's device."""
    frames = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)  # (len, 3, H, W)
    return token_stats.normalize(frozen_encoder(frames.to(next(frozen_encoder.parameters()).device)))


class LearnedModel:
    """A trained world model seen from the planner: images -> normalised tokens, and imagine() that
    rolls out S candidate action sequences from one context in a single batched call."""

    def __init__(self, model, frozen_encoder, token_stats, action_stats, K=4, pred="x", mode="shortcut",
                 context_noise=0.9, toy=False, shared_noise=True, precision="fp32", step_input=PLANNING_STEP_INPUT):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if step_input not in STEP_INPUTS:
            raise ValueError(f"step_input must be one of {STEP_INPUTS}, got {step_input!r}")
        self.model, self.encoder, self.token_stats, self.action_stats = model, frozen_encoder, token_stats, action_stats
        self.K, self.pred, self.mode, self.context_noise, self.toy = K, pred, mode, context_noise, toy
        self.shared_noise = shared_noise  # one noise draw for all candidates: costs differ by the actions only
        self.precision = precision  # bf16: the rollout's matmuls and KV cache in bfloat16 (autocast), on CPU or GPU
        self.step_input = step_input  # the step size told to the model: 1/K, or d_min (shortcut.sample_next)

    @classmethod
    def from_checkpoint(cls, model, checkpoint, frozen_encoder, K=1, precision="fp32", step_input=PLANNING_STEP_INPUT):
        """From a loaded dynamics model, its checkpoint dict and its frozen encoder."""
        args = checkpoint["train_args"]
        learned = cls(model, frozen_encoder, encoder_module.TokenStats(**checkpoint["token_stats"]),
                      data.ActionStats(**checkpoint["action_stats"]), K, args["pred"], args["mode"],
                      args.get("context_noise", 0.9), toy=checkpoint["toy"], precision=precision,
                      step_input=step_input)
        learned.checkpoint = checkpoint
        return learned

    @classmethod
    def load(cls, path, device="cpu", K=1, precision="fp32", step_input=PLANNING_STEP_INPUT):
        model, checkpoint = load_world_model(path, device)
        frozen_encoder = encoder_module.Encoder(checkpoint["encoder"]["name_or_path"],
                                                pool=checkpoint["encoder"]["pool"]).to(device)
        return cls.from_checkpoint(model, checkpoint, frozen_encoder, K, precision, step_input)

    def with_K(self, K):
        """The same model imagining with K shortcut steps per frame."""
        learned = copy.copy(self)
        learned.K = K
        return learned

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
        """context from context(); actions (S, H, 7) normalised -> imagined tokens (S, H, N, D) float32: all
        S candidates in one rollout (KV cache, K shortcut steps, in self.precision). `generator` (CPU)
        seeds the noise."""
        tokens, context_actions = context
        device = tokens.device
        noise = None if generator is None else torch.Generator(device).manual_seed(
            int(torch.randint(2 ** 62, (1,), generator=generator)))  # same stream on any device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            imagined = rollout(self.model, tokens[None], actions.to(device), K=self.K,  # one context for all S rows
                               context_actions=None if context_actions is None else context_actions[None],
                               context_noise=self.context_noise, pred=self.pred, mode=self.mode, generator=noise,
                               shared_noise=self.shared_noise, step_input=self.step_input)
        return imagined.float()


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
    features = np.concatenate([poses[..., :3] / sim.TOLERANCE["position"], rotation / sim.TOLERANCE["rotation"],
                               poses[..., 6:] / sim.TOLERANCE["gripper"]], axis=-1)
    return torch.as_tensor(features, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The planner.


class CEMPlanner:
    """CEM over H-step sequences of normalised delta-EE actions (module docstring, sections 2-4).

    model: anything with `action_stats` and `imagine(context, actions (S, H, 7), generator) -> (S, H, ...)`
    (LearnedModel, SimOracle). plan() searches once; act() is the MPC step with warm start."""

    def __init__(self, model, horizon=5, samples=300, top_k=30, iterations=10, sigma=1.0, momentum=0.0,
                 cost="mse", all_frames=False, max_sigma=3.0, max_translation=0.05, max_rotation=None,
                 max_gripper=None, replan_every=1, warm_start=True, seed=0):
        if not 1 <= top_k <= samples or cost not in ("mse", "l1") or not 1 <= replan_every <= horizon or iterations < 1:
            raise ValueError("need 1 <= top_k <= samples, cost 'mse' or 'l1', 1 <= replan_every <= horizon, "
                             "iterations >= 1")
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

    def score(self, context, goal, candidates):
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
            _, costs = self.score(context, goal, candidates)
            elites = candidates[costs.cpu().topk(self.top_k, largest=False).indices]  # (k, H, 7)
            mean = self.momentum * mean + (1 - self.momentum) * elites.mean(0)
            std = self.momentum * std + (1 - self.momentum) * elites.std(0, unbiased=False)
            iteration_costs.append(costs.min().item())
        mean = self.clip(mean)
        imagined, cost = self.score(context, goal, mean[None])
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
# Policies for the closed loop (sim.run_episode).


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


# Planner sizes, each with its sampling steps K (plan.py --planner, eval.py --planner).
# "dino-wm": DINO-WM's defaults, 300 samples x horizon 5, top 30, 10 iterations, at K = 4: for a GPU
#   (on 2 CPU cores one MPC step of the tiny model takes ~36-41 s at K = 4 in fp32, ~9-10 s at K = 1 in bf16:
#   BENCHMARKS.md).
# "toy": the toy world's default, 64 x 3, top 8, 3 iterations at K = 1: small enough that the 50-pair
#   closed-loop evaluation runs in under 8 minutes on 2 CPU cores, large enough for the simulator
#   oracle to reach full poses. K = 1 told d_min (LearnedModel.step_input): one pass predicts the mean
#   next frame, which is what the MSE cost compares (eval.py: the lowest token MSE of all K, or within
#   10 % of it, at the lowest cost).
# "fast": 32 x 2, top 6, 3 iterations at K = 1: the tests.
PLANNER_SIZES = {"dino-wm": (dict(horizon=5, samples=300, top_k=30, iterations=10), 4),
                 "toy": (dict(horizon=3, samples=64, top_k=8, iterations=3), 1),
                 "fast": (dict(horizon=2, samples=32, top_k=6, iterations=3), 1)}
