"""Evaluate a trained world model.

    python eval.py --checkpoint runs/toy/checkpoint.pt [--dataset PATH] [--decoder runs/toy/decoder/checkpoint.pt]

A world model is good for planning when (1) its imagined futures stay close to the real ones for
many steps, (2) those futures depend on the action it is given, (3) it needs few sampling steps,
and (4) a planner using it reaches goals. Each metric below checks one of these:

Open-loop prediction (held-out episodes). From C real context frames and the true next H
actions, roll out H frames and measure, per horizon step h, the error between predicted and real
tokens normalised per channel (a model trained on whitened tokens is scored without its whitening,
like every other): MSE (mean over tokens and channels) and cosine similarity (mean over tokens).
The baseline is "copy the last context frame": a model that does not beat it has learned nothing
about motion.

Action sensitivity (labelled data). The same rollouts with (a) the true actions, (b) the previous
clip's actions (real-looking actions of another clip), (c) the learned "no action" embedding. If
(a) is not clearly better than (b) and (c), the model ignores its actions and a planner cannot use
it, however good its video prediction is. Two numbers sum it up at the last step h = H:

    action gap       = MSE(shuffled actions) / MSE(true actions)     1: the actions are ignored
    open-loop ratio  = MSE(true actions) / MSE(copy last frame)      1: no better than standing still

Action response, per dimension (toy world, action_response): does a ±2σ action on one of the 7
dimensions move the imagined frame the way it moves the real one? Cosine and size ratio between
the imagined and the true token change, and the size of the true change (how much each dimension
shows in the tokens at all). The action gap can be high while the model has learned only the
translations; this shows which dimensions it has learned.

Sampling steps. Error and wall time per frame for K ∈ {1, 2, 4, ..., K_max} shortcut steps.
Shortcut forcing's promise is that K = 4 is about as good as K = K_max.

Every rollout here tells the model the step size of `--step-input` (shortcut.py section 6):
d_min by default, as the planner does (K = 1 then imagines the mean next frame); "step" tells
it 1/K, the shortcut's own sampling, as every result before 2026-11-27 was measured.

Closed loop. CEM MPC in the toy world (sim.py) on random start/goal pairs (default 50, the pose
task, the toy planner at K = 1), against random actions on the same pairs: success rate, final
pose error, steps (closed_loop_report: cem.py's planner in sim.py's benchmark).

Outputs: `<out>/report.json`, PNG plots (error vs horizon, error and time vs K), decoded rollout
strips beside ground truth when a decoder is given, and a short table on stdout. ablations.py
scores its variants with `evaluate`, all on one token scale (score_stats).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import data
import encoder as encoder_module
import sim
from cem import PLANNER_SIZES, PLANNING_STEP_INPUT, CEMPlanner, LearnedModel, MPCPolicy, RandomPolicy, SimOracle
from checkpoint import TOY_RUN_DIR, CheckpointError, load_world_model, writable_folder
from decode import load_decoder, save_gif, save_image_strip
from shortcut import STEP_INPUTS, rollout

# ----------------------------------------------------------------------------------------------
# Held-out clips, as normalised tokens and actions.


def held_out_clips(checkpoint, frozen_encoder, dataset_source, clip_length, max_clips, seed):
    """Raw tokens (M, C+H, N, D) and normalised actions (M, C+H, 7) of up to `max_clips` clips no
    training run saw. A toy checkpoint (and no --dataset): fresh smooth random trajectories of the
    simulator, rendered and encoded, drawn with `seed` (the same clips for every model). Otherwise:
    clips of the episodes training held out of the labelled set (the split train.py made), or of
    `dataset_source`."""
    action_stats = data.ActionStats(**checkpoint["action_stats"])
    if checkpoint["toy"] and dataset_source is None:
        rng = np.random.default_rng([seed, 404])  # no training set is drawn from this stream
        poses = np.stack([sim.random_trajectory(rng, clip_length) for _ in range(max_clips)])  # (M, T, 7)
        frames = torch.from_numpy(sim.render_batch(poses.reshape(-1, 7))).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            tokens = frozen_encoder(frames).unflatten(0, poses.shape[:2])  # (M, T, N, D)
        actions = np.concatenate([np.zeros((max_clips, 1, 7)), data.delta_ee(poses[:, :-1], poses[:, 1:])], axis=1)
        return tokens, action_stats.normalize(torch.as_tensor(actions, dtype=torch.float32))
    args = checkpoint["train_args"]
    source = dataset_source or args["labeled"]
    common = dict(role="labeled", camera_key=args.get("labeled_camera_key") or args["camera_key"],
                  state_keys=tuple(args["state_keys"]),
                  clip_length=clip_length, frame_stride=args.get("strides", {}).get("labeled", args["frame_stride"]),
                  image_size=frozen_encoder.image_size)
    full = data.ClipDataset(source, **common)
    if dataset_source is None:  # the checkpoint's own labelled data: only its validation episodes
        _, episodes = data.split_episodes(full.episodes, args["val_fraction"], args["seed"])
        full = data.ClipDataset(source, episodes=episodes, **common)
    if len(full) == 0:
        raise data.DatasetError(f"no clip of {clip_length} frames in the held-out episodes of {source}")
    picks = np.random.default_rng(seed).permutation(len(full))[:max_clips]
    tokens, actions = [], []
    with torch.no_grad():
        for index in picks:
            item = full[int(index)]
            tokens.append(frozen_encoder(item["frames"]))  # (T, N, D)
            actions.append(action_stats.normalize(item["actions"]))
    return torch.stack(tokens), torch.stack(actions)


def per_step_errors(predicted, truth):
    """(M, H, N, D) each -> per-step MSE and cosine similarity, lists of H floats."""
    mse = (predicted - truth).pow(2).mean(dim=(0, 2, 3))
    cosine = torch.nn.functional.cosine_similarity(predicted, truth, dim=-1).mean(dim=(0, 2))
    return mse.tolist(), cosine.tolist()


def open_loop_rollout(model, tokens, actions, context, K, action_source="true", settings=None, seed=0):
    """Roll out frames context.. of every clip from its first `context` frames. action_source:
    "true", "shuffled" (each clip gets the previous clip's actions) or "none" (the no-action embedding).
    settings: the checkpoint's pred, mode and context_noise (training arguments), and the sampler's
    step_input (shortcut.sample_next)."""
    settings = settings or {}
    horizon_actions = actions[:, context:]
    mask = torch.ones(len(tokens), dtype=torch.bool)
    if action_source == "shuffled":
        horizon_actions = horizon_actions.roll(1, dims=0)
    elif action_source == "none":
        mask = torch.zeros_like(mask)
        horizon_actions = torch.zeros_like(horizon_actions)
    generator = torch.Generator().manual_seed(seed)
    return rollout(model, tokens[:, :context], horizon_actions, K=K, context_actions=actions[:, :context],
                   context_mask=torch.ones(len(tokens), dtype=torch.bool), action_mask=mask,
                   pred=settings.get("pred", "x"), mode=settings.get("mode", "shortcut"),
                   context_noise=settings.get("context_noise", 0.9), generator=generator,
                   step_input=settings.get("step_input", PLANNING_STEP_INPUT))


ACTION_NAMES = ("dx", "dy", "dz", "rx", "ry", "rz", "dgripper")


def action_response(learned, contexts=32, magnitude=2.0, context_frames=2, seed=0):
    """Does each action dimension move the imagined frame the way it moves the real one? (toy world)

    For `contexts` situations of the simulator (the last `context_frames` frames of a smooth random
    trajectory) and each action dimension i: step the simulator from the last pose with the
    normalised actions +magnitude·e_i and −magnitude·e_i (a ±2σ action by default), encode both
    true next frames, and let the model imagine both (one step, one shared noise draw). Compare the
    true token change Δ = z(+) − z(−) with the imagined one Δ̂ (tokens normalised per channel); the
    difference cancels what both share (the context, the noise, the drift the model expects anyway):

        cosine[i]     = mean over contexts of cos(Δ̂, Δ)     1: the right direction, 0: unrelated
        norm_ratio[i] = mean over contexts of |Δ̂| / |Δ|      1: the right size
        true_norm[i]  = mean over contexts of |Δ|            how much dimension i shows in the tokens

    Situations where either step would leave the workspace (and be clipped) are drawn again."""
    rng = np.random.default_rng(seed)
    signs = torch.tensor([1.0, -1.0]).repeat(7)  # rows 2i, 2i + 1: +e_i, -e_i
    normalised = torch.zeros(14, 1, 7)
    normalised[torch.arange(14), 0, torch.arange(14) // 2] = magnitude * signs
    robot = learned.action_stats.denormalize(normalised[:, 0]).double().numpy()  # (14, 7)
    stats, per_channel = learned.token_stats, learned.token_stats.channelwise()
    cosines, ratios, true_norms = [], [], []
    while len(cosines) < contexts:
        poses = sim.random_trajectory(rng, context_frames)  # (C, 7)
        start = np.repeat(poses[-1:], 14, axis=0)
        following = data.apply_delta_ee(start, robot)
        if not np.allclose(sim.step_batch(start, robot), following):
            continue  # clipped at the workspace edge: the true change would not be the action's
        context = learned.context(list(sim.render_batch(poses)), poses,
                                      list(data.delta_ee(poses[:-1], poses[1:])))
        truth = learned.encode(list(sim.render_batch(following)))  # (14, N, D)
        imagined = learned.imagine(context, normalised, torch.Generator().manual_seed(seed))[:, 0]
        truth, imagined = (stats.renormalize(tokens, per_channel) for tokens in (truth, imagined))  # per channel
        true_change = (truth[0::2] - truth[1::2]).flatten(1).cpu()  # (7, N·D)
        imagined_change = (imagined[0::2] - imagined[1::2]).flatten(1).cpu()
        cosines.append(torch.nn.functional.cosine_similarity(imagined_change, true_change, dim=1))
        ratios.append(imagined_change.norm(dim=1) / true_change.norm(dim=1))
        true_norms.append(true_change.norm(dim=1))
    return dict(cosine=torch.stack(cosines).mean(0).tolist(), norm_ratio=torch.stack(ratios).mean(0).tolist(),
                true_norm=torch.stack(true_norms).mean(0).tolist(), contexts=contexts, magnitude=magnitude,
                dimensions=list(ACTION_NAMES))


# ----------------------------------------------------------------------------------------------
# Closed loop in the toy world.


def closed_loop_report(learned, pairs=50, seed=0, max_steps=sim.MAX_STEPS, size="toy", K=None, oracle=False,
                       task="pose", progress=False, **planner_options):
    """CEM MPC with a LearnedModel (or, oracle=True, the simulator seen through its encoder) vs random
    actions on the same `pairs` random start/goal pairs of the toy world's `task`, with a planner of
    the given `size` (PLANNER_SIZES; K and planner_options override it)."""
    size_options, size_K = PLANNER_SIZES[size]
    learned = learned.with_K(K or size_K)
    options = {**size_options, **sim.TASKS[task]["bounds"], **planner_options, "seed": seed}
    model = SimOracle(learned.encoder, learned.token_stats, learned.action_stats) if oracle else learned
    planner = CEMPlanner(model, **options)
    pair_list = sim.make_pairs(pairs, seed, task=task)
    start = time.perf_counter()
    report = dict(task=task, size=size, pairs=pairs, max_steps=max_steps, tolerance=sim.TOLERANCE,
                  path_steps=sim.PATH_STEPS, oracle=oracle, K=learned.K, precision=learned.precision,
                  step_input=learned.step_input, planner_options=options,
                  planner=sim.evaluate_closed_loop(MPCPolicy(planner), pair_list, max_steps, progress=progress))
    report["seconds"] = time.perf_counter() - start
    report["random"] = sim.evaluate_closed_loop(RandomPolicy(planner), pair_list, max_steps)
    return report


# ----------------------------------------------------------------------------------------------
# The report of one checkpoint.


def evaluate(checkpoint_path, out, dataset=None, decoder_path=None, context=2, horizon=8, clips=32, pairs=50,
             K=4, closed_loop=True, planner_options=None, seed=0, quiet=False, task="pose", planner_size="toy",
             score_stats=None, response_contexts=32, precision="fp32", step_input=PLANNING_STEP_INPUT):
    """Every metric of one checkpoint, written to <out>/report.json (and plots). score_stats: the token
    statistics errors are measured in, per channel (default the checkpoint's own; a whitening is
    dropped, so whitened and plain models are scored alike); give several checkpoints the same ones
    to compare them on one scale. precision: of the planner's and the response's rollouts. step_input:
    the step size every rollout tells the model (shortcut.sample_next)."""
    model, checkpoint = load_world_model(checkpoint_path)
    settings = {key: checkpoint["train_args"].get(key, default)
                for key, default in (("pred", "x"), ("mode", "shortcut"), ("context_noise", 0.9))}
    settings["step_input"] = step_input
    token_stats = encoder_module.TokenStats(**checkpoint["token_stats"])
    score_stats = (score_stats or token_stats).channelwise()
    frozen_encoder = encoder_module.Encoder(checkpoint["encoder"]["name_or_path"], pool=checkpoint["encoder"]["pool"])
    raw, actions = held_out_clips(checkpoint, frozen_encoder, dataset, context + horizon, clips, seed)
    tokens = token_stats.normalize(raw)  # what the model reads and writes

    def scored(normalised):  # the model's normalisation -> the scoring one
        return token_stats.renormalize(normalised, score_stats)

    truth = scored(tokens[:, context:])
    report = dict(checkpoint=checkpoint_path, step=checkpoint["step"], clips=len(tokens), context=context,
                  horizon=horizon, K=K, **settings)

    # Open loop, and action sensitivity.
    copy_last = scored(tokens[:, context - 1:context]).expand_as(truth)
    report["copy_last"] = dict(zip(("mse", "cosine"), per_step_errors(copy_last, truth)))
    rollouts = {}
    for source in ("true", "shuffled", "none"):
        rollouts[source] = open_loop_rollout(model, tokens, actions, context, K, source, settings, seed)
        report[f"actions_{source}"] = dict(zip(("mse", "cosine"), per_step_errors(scored(rollouts[source]), truth)))
    # the two headline numbers, at the last horizon step (module docstring)
    report["action_gap"] = report["actions_shuffled"]["mse"][-1] / report["actions_true"]["mse"][-1]
    report["open_loop_ratio"] = report["actions_true"]["mse"][-1] / report["copy_last"]["mse"][-1]

    # Sampling steps: error and time per generated frame.
    report["sampling_steps"] = []
    K_values = [2 ** i for i in range(int(np.log2(model.config.k_max)) + 1)]
    for steps in K_values:
        start = time.perf_counter()
        predicted = open_loop_rollout(model, tokens, actions, context, steps, "true", settings, seed)
        seconds = (time.perf_counter() - start) / (len(tokens) * horizon)
        mse, cosine = per_step_errors(scored(predicted), truth)
        report["sampling_steps"].append(dict(K=steps, mse=float(np.mean(mse)), cosine=float(np.mean(cosine)),
                                             ms_per_frame=1000 * seconds))

    if checkpoint["toy"]:
        learned = LearnedModel.from_checkpoint(model, checkpoint, frozen_encoder, K, precision, step_input)
        report["action_response"] = action_response(learned, response_contexts, seed=seed)
        if closed_loop:
            report["closed_loop"] = closed_loop_report(learned, pairs=pairs, seed=seed, task=task, size=planner_size,
                                                       progress=not quiet, **(planner_options or {}))

    os.makedirs(out, exist_ok=True)
    report["plots"] = plot_report(report, out)
    if decoder_path:
        report["pictures"] = decoded_strips(decoder_path, checkpoint, tokens, rollouts["true"], context, out)
    with open(os.path.join(out, "report.json"), "w") as file:
        json.dump(report, file, indent=1)
    if not quiet:
        print(summary_table(report))
        print(f"report: {os.path.join(out, 'report.json')}")
    return report


def summary_table(report):
    horizon = report["horizon"]
    rows = [f"open loop, {report['clips']} held-out clips, {report['context']} context frames, K = {report['K']}, "
            f"step input {report['step_input']}",
            f"{'':22s}" + "".join(f"h={h + 1:<7d}" for h in range(horizon))]
    for name in ("copy_last", "actions_true", "actions_shuffled", "actions_none"):
        rows.append(f"{name + ' MSE':22s}" + "".join(f"{value:<9.4f}" for value in report[name]["mse"]))
    rows.append("sampling steps: " + ", ".join(f"K={entry['K']}: MSE {entry['mse']:.4f} "
                                               f"({entry['ms_per_frame']:.1f} ms/frame)"
                                               for entry in report["sampling_steps"]))
    rows.append(f"at h={horizon}: action gap (shuffled / true MSE) {report['action_gap']:.2f}, "
                f"open-loop error / copy-last {report['open_loop_ratio']:.2f}")
    if "action_response" in report:
        response = report["action_response"]
        rows.append(f"action response (±{response['magnitude']:g}σ, {response['contexts']} situations), cosine / "
                    "size ratio / true change: " + ", ".join(
                        f"{name} {cosine:.2f}/{ratio:.2f}/{norm:.1f}" for name, cosine, ratio, norm in
                        zip(response["dimensions"], response["cosine"], response["norm_ratio"], response["true_norm"])))
    if "closed_loop" in report:
        loop = report["closed_loop"]
        rows.append(f"closed loop, task {loop['task']}, {loop['size']} planner at K = {loop['K']}, {loop['pairs']} "
                    f"start/goal pairs, {loop['max_steps']} steps at most:")
        for name in ("planner", "random"):
            result = loop[name]
            rows.append(f"  {'CEM' if name == 'planner' else 'random':7s} success {result['success_rate']:4.0%}, final "
                        f"error {100 * result['final_position_error']:.1f} cm, "
                        f"{np.degrees(result['final_rotation_error']):.1f} deg, gripper "
                        f"{result['final_gripper_error']:.2f}; {result['steps']:.1f} steps")
    return "\n".join(rows)


def two_panels():
    """A figure of two plots side by side, drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, 2, figsize=(10, 3.6))


def save_figure(figure, path):
    import matplotlib.pyplot as plt
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_report(report, out):
    figure, (left, right) = two_panels()
    steps = np.arange(1, report["horizon"] + 1)
    for name, label in (("actions_true", "model, true actions"), ("actions_shuffled", "model, shuffled actions"),
                        ("actions_none", "model, no action"), ("copy_last", "copy last frame")):
        left.plot(steps, report[name]["mse"], marker="o", label=label)
    left.set(xlabel="horizon step", ylabel="token MSE (normalised)", title="open-loop error vs horizon")
    left.legend(fontsize=8)
    sweep = report["sampling_steps"]
    right.plot([entry["K"] for entry in sweep], [entry["mse"] for entry in sweep], marker="o")
    right.set(xscale="log", xlabel="sampling steps K", ylabel="mean token MSE", title="error vs sampling steps")
    right.set_xticks([entry["K"] for entry in sweep], [str(entry["K"]) for entry in sweep])
    return [save_figure(figure, os.path.join(out, "open_loop.png"))]


def decoded_strips(decoder_path, checkpoint, tokens, predicted, context, out, clips=3):
    """Decoded ground truth beside decoded imagination for a few clips: PNG strips and a GIF."""
    decoder, _ = load_decoder(decoder_path, encoder=checkpoint["encoder"])
    token_stats = encoder_module.TokenStats(**checkpoint["token_stats"])
    paths = []
    with torch.no_grad():
        for clip in range(min(clips, len(tokens))):
            truth = decoder.decode(tokens[clip, context:], token_stats=token_stats)  # (H, 3, height, width)
            imagined = decoder.decode(predicted[clip], token_stats=token_stats)
            paths.append(save_image_strip(os.path.join(out, f"rollout_{clip}.png"), [truth, imagined],
                                          labels=["real", "imagined"], scale=2))
            paths.append(save_gif(os.path.join(out, f"rollout_{clip}.gif"), [truth, imagined], scale=2))
    return paths


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a world-model checkpoint: open loop, action sensitivity "
                                     "and response, sampling steps, closed-loop MPC (toy world). The toy ablations: "
                                     "ablations.py.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(TOY_RUN_DIR, "checkpoint.pt"))
    parser.add_argument("--dataset", help="labelled dataset to evaluate on; if not given, the checkpoint's "
                                          "held-out labelled episodes")
    parser.add_argument("--decoder", help="decoder checkpoint (decode.py) for pictures of rollouts")
    parser.add_argument("--out", help="output folder; if not given, <checkpoint folder>/eval")
    parser.add_argument("--context", type=int, default=2, help="real frames before the imagined ones")
    parser.add_argument("--horizon", type=int, default=8, help="imagined frames per clip")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips")
    parser.add_argument("--pairs", type=int, default=50, help="closed-loop start/goal pairs (toy world)")
    parser.add_argument("--K", type=int, default=4, help="sampling steps for the open-loop metrics")
    parser.add_argument("--no-closed-loop", action="store_true", help="skip MPC in the toy world")
    parser.add_argument("--task", choices=sorted(sim.TASKS), default="pose",
                        help="closed-loop task: reach the whole goal pose, or only a goal position (sim.py)")
    parser.add_argument("--planner", choices=sorted(PLANNER_SIZES), default="toy",
                        help="closed-loop planner size (cem.PLANNER_SIZES)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="precision of the closed-loop planner's and the action response's rollouts")
    parser.add_argument("--step-input", choices=STEP_INPUTS, default=PLANNING_STEP_INPUT,
                        help="step size every rollout tells the model: 1/K (step) or the finest (d_min; shortcut.py "
                             "section 6)")
    parser.add_argument("--seed", type=int, default=1,
                        help="clips, response situations and start/goal pairs (the tests use seed 0)")
    args = parser.parse_args(argv)
    if min(args.context, args.horizon, args.clips, args.pairs, args.K) < 1:
        parser.error("--context, --horizon, --clips, --pairs and --K must be at least 1")
    out = writable_folder(args.out or os.path.join(os.path.dirname(args.checkpoint), "eval"))  # before the work
    try:
        evaluate(args.checkpoint, out,
                 args.dataset, args.decoder, args.context, args.horizon, args.clips, args.pairs, args.K,
                 closed_loop=not args.no_closed_loop, seed=args.seed, task=args.task, planner_size=args.planner,
                 precision=args.precision, step_input=args.step_input)
    except (CheckpointError, data.DatasetError) as error:
        raise SystemExit(f"error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
