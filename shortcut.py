"""Shortcut forcing: how the dynamics model is trained, and how it samples in a few steps.

Read this top to bottom once; every formula below is used by a line of code further down.

1. The flow path
----------------
Take a clean frame x1 (its normalised DINOv2 tokens) and pure noise x0 ~ N(0, I). Dreamer 4 mixes
them with a signal level τ ∈ [0, 1]:

    x_τ = (1 − τ)·x0 + τ·x1                τ = 0: pure noise,  τ = 1: clean data.

As τ goes from 0 to 1, x_τ moves on a straight line from x0 to x1. Its velocity is

    v = d x_τ / dτ = x1 − x0               (the same at every τ: the line is straight)

so one Euler step of size d is exact on this line: x_{τ+d} = x_τ + d·v. A generator starts at
noise and follows a predicted velocity v̂ to τ = 1, one step at a time.

2. x-prediction and the velocity it implies
-------------------------------------------
Subtract x_τ from x1, using x_τ = (1 − τ)·x0 + τ·x1:

    x1 − x_τ = (1 − τ)·x1 − (1 − τ)·x0 = (1 − τ)·(x1 − x0) = (1 − τ)·v

so the velocity is the remaining distance to the data divided by the remaining time:

    v = (x1 − x_τ) / (1 − τ)        and back:     x1 = x_τ + (1 − τ)·v.

A network may therefore output either thing. If it outputs a clean-frame estimate x̂1
("x-prediction", what Dreamer 4 and this project do) its velocity is

    v̂ = (x̂1 − x_τ) / (1 − τ),

and if it outputs v̂ ("v-prediction", the usual flow matching) its clean estimate is
x̂1 = x_τ + (1 − τ)·v̂. Same information, two parameterisations: `velocity` and
`clean_estimate` below convert one into the other, so the loss and the sampler serve both.

3. Why ‖x̂1 − x1‖² = (1 − τ)²·‖v̂ − v‖²
---------------------------------------
Write both clean frames through their velocities at the same x_τ and subtract:

    x̂1 − x1 = (x_τ + (1 − τ)·v̂) − (x_τ + (1 − τ)·v) = (1 − τ)·(v̂ − v).

Square it. The factor (1 − τ)² is the square of the time left to travel: an error in the
velocity moves the endpoint by (time left)·(velocity error). So a loss in x-space is a loss in
v-space weighted by (1 − τ)²: full weight on noisy inputs (τ ≈ 0), vanishing weight on nearly
clean ones (τ ≈ 1); conversely a v-space loss is an x-space loss weighted by 1/(1 − τ)², which
explodes near τ = 1 where the task (copy the almost-clean input) is easiest.

4. Why Dreamer 4 predicts x, not v
----------------------------------
Two separate choices hide here: what the network emits, and where the loss is measured.
- Emitting v = x1 − x0 means emitting the noise x0 itself: white, full of high frequencies.
  x1 is a structured, smooth token map on a low-dimensional data manifold; a network reproduces
  that far more easily. Small high-frequency errors are harmless in one image but not in a world
  model: every generated frame becomes the context of the next, and over hundreds of frames the
  errors accumulate. Dreamer 4 reports exactly this for long rollouts.
- Measuring the loss in x-space removes the 1/(1 − τ)² blow-up of point 3, so the gradient is
  not dominated by nearly clean inputs. The ramp weight w(τ) = 0.9·τ + 0.1 then turns down the
  weight of very noisy inputs (τ ≈ 0), whose targets are mostly irreducible guesswork.
Dreamer 4's ablation (arXiv 2509.24527, Table 2: FVD of 384-frame Minecraft rollouts, lower is
better, as we read the paper's table): shortcut with v-prediction 329,
x-prediction (loss still in v-space) 326, x-space loss 151, + ramp weight 102. The output
parameterisation alone barely matters; the x-space loss halves the error; the ramp helps again.
`pred="v"` (v-output, v-space loss) is kept for that ablation.

5. Shortcut models: a step size input and a bootstrap target
------------------------------------------------------------
A flow model trained as above learns the *average* velocity through x_τ over all (x0, x1) pairs
that pass there. Near noise that average points at the mean of all possible futures, so one big
step lands on a blur, and sampling needs many small steps. Shortcut models (Frans et al., 2024)
also give the network the step size d it will be used with, and teach big steps to agree with
two small ones. With d = 1/k, k ∈ {1, 2, 4, ..., K_max}, d_min = 1/K_max, τ on the grid
{0, d, ..., 1 − d} (so every step ends on the grid too):

  d = d_min (flow rows):  plain flow matching, L = ‖x̂1 − x1‖².
  d > d_min (bootstrap rows): two half steps of the model itself, under stop-gradient,
      b′ = v̂(x_τ, τ, d/2)                  x′ = x_τ + (d/2)·b′
      b″ = v̂(x′, τ + d/2, d/2)
      one step of size d should move x_τ by d·(b′ + b″)/2, i.e. with velocity v_target = (b′ + b″)/2.
  Velocities compose along a path (two steps add up); endpoint estimates x̂1 do not. That is why
  the target is built in v-space. Back in x-space with point 2, the target clean frame is
  x̃1 = x_τ + (1 − τ)·v_target, and by point 3
      L = ‖x̂1 − x̃1‖² = (1 − τ)²·‖v̂ − v_target‖²           (Dreamer 4, eq. 7)
  which is what the code computes (in v-space, without the factor, when pred="v").
Big steps are thus distilled from smaller ones, down to d_min where real data anchor everything.
The targets may come from an EMA copy of the weights (steadier), or from the model itself.

6. Diffusion forcing, and sampling
----------------------------------
Every frame of a training clip draws its own d and τ: the model learns to predict any frame
from a past at any noise level. A rollout then makes one frame at a time: start from noise and
take K steps of d = 1/K (K = 4 in the paper),

    x ← x + d·v̂ = x + d·(x̂1 − x)/(1 − τ)        τ = 0, d, 2d, ..., 1 − d,

where the last step (1 − τ = d) lands exactly on x̂1, and K = 1 is x̂1 straight from noise.
Past frames are given to the model slightly re-noised, signal level 0.9 (10 % noise) by default,
so the model, trained on noisy pasts, is not thrown off by its own imperfect predictions.
`mode="diffusion"` is plain diffusion forcing for the ablation: every row trains at d_min, and
at sampling the model is told d_min while the sampler takes steps of 1/K (it knows nothing else).
Dreamer 4 (same table) reports shortcut sampling at K = 4 close to diffusion at K = 64 (FVD 329
vs 306), and diffusion forcing at K = 4 far behind (875): 16x fewer network passes per frame.

Which step size each sampling step tells the model is a choice (`step_input`). Told the step it
takes (d = 1/K, "step", the shortcut as the paper samples), a big step aims at where the flow
would carry this noise: a sample of the next frame, sharp, one of many. Told d_min whatever step
it takes ("d_min", what diffusion forcing must do), the model answers as the rows trained on real
data do (section 5); from pure noise, τ = 0, its x-prediction is then its estimate of the *mean*
next frame given the past and the action, E[x1 | past, a], the very target the labelled clips
train (sections 7 and 8). A planner that scores futures by a squared distance wants that mean: a
sample per candidate adds the sample's own scatter to every cost. The planner and eval.py
therefore default to "d_min" (K = 1: one pass, x̂1 = E[x1 | past, a]); `rollout` keeps the
shortcut's "step". Measured (README): the K = 1 open-loop error 14-17 % lower at the demo's
budget, 35-56 % lower for models trained longer; closed-loop pose success of a 95/5 model on 16x
the demo's corpus, 6000 steps, 44 % -> 72 % on the same 50 pairs; at the demo's budget within
run-to-run noise (8 -> 14 % and 12 -> 12 % for two training seeds).

7. Where the actions are learned: labelled clips at the planner's noise levels
------------------------------------------------------------------------------
Only the labelled clips (5 % of the data) say what an action does, and an action decides a frame
most when the past is clean and the new frame is pure noise: then nothing but the action tells
where the arm went. That is exactly a planner's query (K = 1 from a lightly noised context). Under
diffusion forcing, where every frame draws its own τ, few frames of a labelled clip are in that
situation: the past is mostly noisy, and a frame with τ > 0 already shows part of the answer.
With `labeled_queries`, the labelled d_min rows get the planner's levels instead: every other
frame at the context level τ_ctx, the frames in between at τ = 0 (x-prediction from pure noise,
whose target is the conditional mean of the next frame given a clean past and the action). The
other rows keep diffusion forcing's random levels: they teach the model to denoise at every τ,
which sampling with K > 1 needs. So queries take at most half of the d_min rows: with 5 % of the
samples labelled that is every labelled row, with fully labelled data every other row. (Measured
without that limit, every sample labelled, 1000 steps: K = 1 was as accurate as the demo's, mean
MSE 0.138 vs 0.139, but K = 2, 4, 8 lost their accuracy, 0.229, 0.214, 0.202 vs 0.131, 0.141, 0.158:
no d_min row was left at the levels in between.) Measured in the README's ablations (toy, 5 %
labelled, 1000 steps): with labelled queries the action gap at step 8 is 2.09 against 1.96
without, the cosine of the response to a translation 0.74 against 0.71, and the planner's final
rotation error 0.36 against 0.52 rad. (Weighting the labelled rows' loss by 2 or 5 instead was
measured too: no change beyond run-to-run noise.)

Dreamer 4's ramp weight (section 4) down-weights exactly those τ ≈ 0 frames; for an action-
conditioned world model whose future is decided by the action, they are not guesswork, and the
demo trains without the ramp (`ramp=False`; measured: with it the action gap fell from 2.09 to 1.43).

8. Where the history hides the action: labelled transitions on their own
------------------------------------------------------------------------
Smooth motion is predictable from the past. A teleoperator's motions persist for a few steps, and
so do the toy's (sim.py: AR(1) actions with smoothing 0.8, so the last action explains 64 % of the
next one's variance); a model whose context holds two or more frames sees the arm's velocity
there, predicts most of the next motion from it, and is left to learn the action from what the
history does not say, a third of its variance. Every labelled clip teaches the action that way,
the unlabelled video teaches the model to lean on the history, and the action's effect is learned
slowly. With `labeled_pairs`, every transition (frame t-1, frame t) of the batch's labelled clips
is trained once more as a clip of two frames: frame t-1 as context at τ_ctx, frame t queried from
pure noise (`labeled_transitions`, `transition_loss`). One frame shows where the arm is, not
where it is going, so here the action alone says where it went, all of its variance. The pairs
come on top of the batch, at most B of them (a quarter more frames at T = 8; with 5 % of the
samples labelled, about 6 per batch), each query frame weighing as one frame of the batch, so the
labelled clips' share of the samples does not change. Rollouts still see their whole history: the
labelled clips keep training as before too (section 7), and the model learns both situations.
Measured (README; toy, 5 % labelled, 1000 steps, two training seeds): the action gap at step 8
1.83 → 2.17 and 1.86 → 2.39, the response cosine higher in all seven dimensions, the planner's
final errors smaller (4.6 against 5.0 cm, 27.7° against 32.0°); pose success within run-to-run
noise of before (9 against 11 of 100 pairs).
"""
import math

import torch


def per_token(levels):
    """(B, T) signal levels or step sizes -> (B, T, 1, 1), to broadcast over (B, T, N, D) tokens."""
    return levels[..., None, None]


def noised(z, tau, generator=None):
    """Clean frames z (B, T, N, D) at signal levels tau (B, T) on the flow path (section 1):
    returns the noise x0 and x_τ = (1 − τ)·x0 + τ·z."""
    x0 = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return x0, (1 - per_token(tau)) * x0 + per_token(tau) * z


def velocity(output, x_tau, tau, pred):
    """The velocity v̂ a model output stands for: (x̂1 − x_τ)/(1 − τ) for x-prediction, itself for v."""
    return (output - x_tau) / (1 - tau) if pred == "x" else output


def clean_estimate(output, x_tau, tau, pred):
    """The clean frame x̂1 a model output stands for: itself for x-prediction, x_τ + (1 − τ)·v̂ for v."""
    return output if pred == "x" else x_tau + (1 - tau) * output


def check_options(model, steps, pred, mode):
    if pred not in ("x", "v"):
        raise ValueError(f"pred must be 'x' or 'v', got {pred!r}")
    if mode not in ("shortcut", "diffusion"):
        raise ValueError(f"mode must be 'shortcut' or 'diffusion', got {mode!r}")
    if steps < 1 or steps & (steps - 1) or steps > model.config.k_max:  # d = 1/steps must have an embedding
        raise ValueError(f"steps must be a power of two <= the model's k_max {model.config.k_max}, got {steps}")


def context_level(context_noise, k_max):
    """The signal level of a past frame in a rollout: context_noise snapped to the τ grid of k_max."""
    return round(context_noise * k_max) / k_max


def sample_levels(batch, frames, k_max, bootstrap_rows, generator=None, device=None):
    """Per-frame step sizes d and signal levels τ, both (B, T).

    The first `bootstrap_rows` rows get d = 1/k with k uniform over {1, 2, ..., K_max/2} (every d
    above d_min), the other rows d = d_min. Then τ is uniform on that frame's grid {0, d, ..., 1 − d}.
    (The batch is already random, so which rows bootstrap does not need to be.)"""
    exponent = torch.randint(0, max(1, int(math.log2(k_max))), (batch, frames), generator=generator, device=device)
    # (max(1, .): with k_max = 1 there are no bootstrap rows, the draw is unused)
    bootstrap = torch.arange(batch, device=device)[:, None] < bootstrap_rows
    k = torch.where(bootstrap, 2 ** exponent, k_max)
    steps = torch.floor(torch.rand(batch, frames, generator=generator, device=device) * k)
    return steps / k, 1.0 / k  # tau, d


@torch.no_grad()
def bootstrap_velocity(teacher, x_tau, tau, d, actions, action_mask, pred):
    """v_target = (b′ + b″)/2 from two half steps of the teacher (section 5), (B, T, N, D).

    Every frame of the clip takes its half step in the same pass, so in the second pass a frame's
    past is half a step cleaner than the student saw it: the usual simplification, one extra pass
    per half step instead of one per frame."""
    half = d / 2
    first = velocity(teacher(x_tau, tau, half, actions, action_mask), x_tau, per_token(tau), pred)
    x_mid = x_tau + per_token(half) * first
    tau_mid = tau + half
    second = velocity(teacher(x_mid, tau_mid, half, actions, action_mask), x_mid, per_token(tau_mid), pred)
    return (first + second) / 2


def labeled_transitions(z, actions, action_mask, max_pairs):
    """Every transition of the batch's labelled clips as a clip of its own (section 8): the frames
    (t-1, t) of each labelled row, at most max_pairs of them. (B, T, N, D), (B, T, 7) ->
    (P, 2, N, D), (P, 2, 7)."""
    rows = action_mask.view(len(z), -1).all(dim=1)  # clips labelled in every frame
    tokens = torch.stack([z[rows, :-1], z[rows, 1:]], dim=2).flatten(0, 1)[:max_pairs]
    pair_actions = torch.stack([actions[rows, :-1], actions[rows, 1:]], dim=2).flatten(0, 1)[:max_pairs]
    return tokens, pair_actions


def transition_loss(model, tokens, actions, level, pred, generator=None):
    """Summed loss of the second frame of each 2-frame labelled clip (P, 2, N, D), queried from pure
    noise after one context frame at signal level `level`: the planner's one-step query with no
    history beyond the frame it starts from (section 8)."""
    P = tokens.shape[0]
    tau = torch.zeros(P, 2, device=tokens.device)
    tau[:, 0] = level
    d = torch.full_like(tau, 1 / model.config.k_max)
    x0, x_tau = noised(tokens, tau, generator)
    output = model(x_tau, tau, d, actions, torch.ones(P, dtype=torch.bool, device=tokens.device))
    target = tokens if pred == "x" else tokens - x0
    return (output[:, 1] - target[:, 1]).pow(2).mean(dim=(1, 2)).sum()


def shortcut_forcing_loss(model, z, actions, action_mask, k_max=None, bootstrap_fraction=0.25, ema_model=None,
                          pred="x", ramp=True, mode="shortcut", generator=None, context_noise=0.9,
                          labeled_queries=False, labeled_pairs=False):
    """Dreamer 4's shortcut forcing loss on a batch of clips.

    z (B, T, N, D) normalised clean tokens; actions (B, T, 7) normalised; action_mask (B,) or (B, T).
    k_max: the finest step is 1/k_max; it sizes the model's τ and d embeddings, so it is the
    model's config.k_max (default) and any other value is refused. bootstrap_fraction: share of
    rows with bootstrap targets. ema_model: teacher for those targets (default: the model itself).
    ramp: weight frames by w(τ) (section 4). labeled_queries: labelled rows at the planner's levels,
    with context frames at context_noise snapped to the grid (section 7). labeled_pairs: every
    transition of the labelled clips once more as a 2-frame clip, at most B of them (section 8).
    Returns (loss, {"flow": ..., "bootstrap": ..., "pairs": ...}), the parts detached, for logging
    (each part a mean per frame it scores)."""
    if k_max not in (None, model.config.k_max):
        raise ValueError(f"k_max {k_max} differs from the model's config.k_max {model.config.k_max}")
    k_max = model.config.k_max
    check_options(model, k_max, pred, mode)
    B, T = z.shape[:2]
    bootstrap_rows = 0 if mode == "diffusion" or k_max == 1 else round(B * bootstrap_fraction)
    tau, d = sample_levels(B, T, k_max, bootstrap_rows, generator, z.device)  # (B, T) each
    if labeled_queries:  # labelled d_min rows: every other frame context, the others pure noise
        candidates = action_mask.view(B, -1)[:, :1] & (torch.arange(B, device=z.device)[:, None] >= bootstrap_rows)
        labelled = candidates & (candidates.cumsum(0) <= (B - bootstrap_rows) // 2)  # at most half the flow rows
        phase = torch.randint(0, 2, (B, 1), generator=generator, device=z.device)
        query = (torch.arange(T, device=z.device)[None] + phase) % 2 == 1  # (B, T)
        planned = torch.where(query, torch.zeros_like(tau), torch.full_like(tau, context_level(context_noise, k_max)))
        tau = torch.where(labelled, planned, tau)
    x0, x_tau = noised(z, tau, generator)
    output = model(x_tau, tau, d, actions, action_mask)  # x̂1 (or v̂), (B, T, N, D)

    # Targets in the space the loss is measured in: x-space for pred="x", v-space for pred="v".
    target = z if pred == "x" else z - x0  # flow rows: the data itself (section 5, d = d_min)
    if bootstrap_rows:
        rows = slice(0, bootstrap_rows)
        mask = action_mask.view(B, -1)[rows]
        v_target = bootstrap_velocity(ema_model or model, x_tau[rows], tau[rows], d[rows], actions[rows], mask, pred)
        # x-space: x̃1 = x_τ + (1 − τ)·v_target, so that ‖x̂1 − x̃1‖² = (1 − τ)²‖v̂ − v_target‖²
        x_target = x_tau[rows] + (1 - per_token(tau[rows])) * v_target
        target = torch.cat([x_target if pred == "x" else v_target, target[bootstrap_rows:]])

    weight = 0.9 * tau + 0.1 if ramp else torch.ones_like(tau)  # w(τ), the ramp
    frame_loss = weight * (output - target).pow(2).mean(dim=(2, 3))  # (B, T)
    parts = {"flow": frame_loss[bootstrap_rows:].detach(), "bootstrap": frame_loss[:bootstrap_rows].detach()}
    parts = {name: part.mean() if part.numel() else torch.zeros((), device=z.device) for name, part in parts.items()}
    loss, parts["pairs"] = frame_loss.mean(), torch.zeros((), device=z.device)
    if labeled_pairs:
        tokens, pair_actions = labeled_transitions(z, actions, action_mask, max_pairs=B)
        if len(tokens):  # each query frame weighs as much as one frame of the batch
            pair_sum = transition_loss(model, tokens, pair_actions, context_level(context_noise, k_max), pred, generator)
            loss = loss + pair_sum / (B * T)
            parts["pairs"] = pair_sum.detach() / len(tokens)
    return loss, parts


STEP_INPUTS = ("step", "d_min")  # the step size a sampling step tells the model (section 6)


def sample_frame(predict_clean, noise, K):
    """K Euler steps of d = 1/K from noise (τ = 0) to data (τ = 1), section 6.

    predict_clean(x, τ, d) -> x̂1 with the shape of x. The last step lands exactly on x̂1."""
    x, d = noise, 1.0 / K
    for step in range(K):
        tau = step * d
        x = x + d * (predict_clean(x, tau, d) - x) / (1 - tau)  # x + d·v̂
    return x


def sample_next(model, cache, action, K=4, action_mask=None, pred="x", mode="shortcut", generator=None, history=None,
                shared_noise=False, step_input="step"):
    """Generate the next frame, (B, N, D), in K steps from noise.

    action (B, 1, 7) normalised: the action leading to the new frame; action_mask (B,), default all
    True (False: generate without the action, as for unlabelled video). The past is in `cache`
    (a KV cache, as rollout fills it) and/or in `history`: frames after the cached ones (all of the
    past when cache is None), re-run at every step, as a tuple (tokens (B, F, N, D) at their signal
    levels, tau (B, F), d (B, F), actions (B, F, 7), action_mask (B, F)). shared_noise: one noise
    draw for all B rows (rollout explains why a planner wants that). step_input: the step size the
    model is told, "step" (1/K, the shortcut) or "d_min" (the finest, whatever step is taken; section 6)."""
    if step_input not in STEP_INPUTS:
        raise ValueError(f"step_input must be one of {STEP_INPUTS}, got {step_input!r}")
    config = model.config
    check_options(model, K, pred, mode)
    B, device = action.shape[0], action.device
    noise = torch.randn((1 if shared_noise else B, 1, config.num_tokens, config.token_dim), generator=generator,
                        device=device).expand(B, -1, -1, -1)
    mask = torch.ones(B, 1, dtype=torch.bool, device=device) if action_mask is None else action_mask.view(B, 1)

    def predict_clean(x, tau, d):  # x (B, 1, N, D)
        if mode == "diffusion" or step_input == "d_min":  # diffusion forcing knows no other d (section 6)
            d = 1.0 / config.k_max
        frame = (x, torch.full((B, 1), tau, device=device), torch.full((B, 1), d, device=device), action, mask)
        if history is not None:
            frame = tuple(torch.cat([past, new], dim=1) for past, new in zip(history, frame))
        output = model(*frame, cache=cache, append=False)[:, -1:]
        return clean_estimate(output, x, tau, pred)

    return sample_frame(predict_clean, noise, K)[:, 0]


@torch.no_grad()
def rollout(model, context, actions, K=4, context_actions=None, context_mask=None, context_noise=0.9, pred="x",
            mode="shortcut", generator=None, action_mask=None, use_cache=True, shared_noise=False, step_input="step"):
    """Imagine H frames after `context`, autoregressively: (B, C, N, D), (B, H, 7) -> (B, H, N, D).

    B is any batch of candidate action sequences (the planner passes hundreds). context (B, C, N, D),
    or (1, C, N, D): one history shared by all B rows, computed once (with the KV cache: its keys and
    values are then copied to the B rows) instead of B times.
    actions (B, H, 7) normalised, action h leading to generated frame h; action_mask (B,) for them,
    default all True. context_actions (B or 1, C, 7) normalised, or None for an unlabelled context;
    context_mask (B or 1,) or (B or 1, C), default all True when context_actions is given. Context and
    generated frames are fed back re-noised to signal level context_noise (snapped to the model's
    τ grid). use_cache=False re-runs the whole past at every denoising step: the reference the
    KV cache must equal (tests), and the baseline of its speed-up.

    shared_noise=True draws every noise once and uses it for all B rows (common random numbers): rows
    that differ only in their actions then differ only because of the actions. A planner comparing
    candidates wants this; with independent noise, part of each cost difference is sampling luck.
    step_input: the step size each denoising step tells the model (sample_next)."""
    config = model.config
    context_rows, C = context.shape[:2]
    B, H = actions.shape[:2]
    k_max, device = config.k_max, context.device
    if context_rows not in (1, B):
        raise ValueError(f"context has {context_rows} rows; give 1 (shared) or one per action sequence ({B})")
    if context_actions is None:
        context_actions = torch.zeros(context_rows, C, config.action_dim, device=device)
        context_mask = torch.zeros(context_rows, dtype=torch.bool, device=device)
    elif context_mask is None:
        context_mask = torch.ones(context_rows, dtype=torch.bool, device=device)
    if action_mask is None:
        action_mask = torch.ones(B, dtype=torch.bool, device=device)
    tau_context = context_level(context_noise, k_max)

    def as_context(tokens, frame_actions, mask):  # (rows, F, N, D) clean -> a history tuple at τ_context
        rows, length = tokens.shape[:2]
        noise = torch.randn((1 if shared_noise else rows, *tokens.shape[1:]), generator=generator,
                            device=device).expand(tokens.shape)
        return ((1 - tau_context) * noise + tau_context * tokens, torch.full((rows, length), tau_context, device=device),
                torch.full((rows, length), 1.0 / k_max, device=device), frame_actions,
                mask.view(rows, -1).expand(rows, length))

    history, cache = as_context(context, context_actions, context_mask), None
    if use_cache:
        cache = model.new_cache(context_rows, frames=C + H)  # room for this rollout, no more
        model.fill_cache(*history, cache)
        cache = cache.repeat(B // context_rows)  # a shared context: computed once, copied to the B rows
        history = None
    else:
        history = tuple(part.expand(B, *part.shape[1:]) for part in history)
    frames = []
    for step in range(H):
        if step:  # the frame just generated joins the past, re-noised like the context
            new = as_context(frames[-1][:, None], actions[:, step - 1:step], action_mask)
            if use_cache:
                model.fill_cache(*new, cache)  # computed once, attended by every later pass
            else:
                history = tuple(torch.cat([past, frame], dim=1) for past, frame in zip(history, new))
        action = actions[:, step:step + 1]  # (B, 1, 7): from the last frame to the new one
        frames.append(sample_next(model, cache, action, K, action_mask, pred, mode, generator, history, shared_noise,
                                  step_input))
    return torch.stack(frames, dim=1)
