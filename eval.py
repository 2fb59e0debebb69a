"""Evaluate a trained world model, and reproduce the paper's ablations on the toy world.

    python eval.py --checkpoint runs/toy/checkpoint.pt [--dataset PATH] [--decoder runs/toy/decoder/checkpoint.pt]
    python eval.py --ablations                       # trains tiny variants on the toy world, then compares them

A world model is good for planning when (1) its imagined futures stay close to the real ones for
many steps, (2) those futures depend on the action it is given, (3) it needs few sampling steps,
and (4) a planner using it reaches goals. Each metric below checks one of these:

Open-loop prediction (held-out episodes). From C real context frames and the true next H
actions, roll out H frames and measure, per horizon step h, the error between predicted and real
normalised tokens: MSE (mean over tokens and channels) and cosine similarity (mean over tokens).
The baseline is "copy the last context frame": a model that does not beat it has learned nothing
about motion.

Action sensitivity (labelled data). The same rollouts with (a) the true actions, (b) actions
shuffled across the batch (real-looking actions of another clip), (c) the learned "no action"
embedding. If (a) is not clearly better than (b) and (c), the model ignores its actions and a
planner cannot use it, however good its video prediction is.

Sampling steps. Error and wall time per frame for K ∈ {1, 2, 4, ..., K_max} shortcut steps.
Shortcut forcing's promise is that K = 4 is about as good as K = K_max.

Closed loop. CEM MPC in the toy world (sim.py) on >= 20 random start/goal pairs, against random
actions on the same pairs: success rate, final pose error, steps (plan.py does the work).

Outputs: `<out>/report.json`, PNG plots (error vs horizon, error and time vs K), decoded rollout
strips beside ground truth when a decoder is given, and a short table on stdout.

Ablations (`--ablations`): tiny models that differ in one thing each, trained with the same
budget and seeds on the same toy data, evaluated as above; a markdown table is written to
`<out>/ablations.md` (the README carries it). Their closed loop is the reach task with the fast
planner (plan.py): a tiny model trained for minutes reaches goal positions, not yet full poses,
so the pose task would score every variant 0 % and tell them apart by nothing.
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
import train as train_module
from shortcut import rollout

# ----------------------------------------------------------------------------------------------
# Held-out clips, as normalised tokens and actions.


def held_out_clips(checkpoint, frozen_encoder, dataset_source, clip_length, max_clips, seed):
    """Tokens (M, C+H, N, D) and actions (M, C+H, 7), both normalised as in training, of up to
    `max_clips` clips from the episodes training held out (the same split train.py made)."""
    args = checkpoint["train_args"]
    source = dataset_source or args["labeled"]
    common = dict(role="labeled", camera_key=args["camera_key"], state_keys=tuple(args["state_keys"]),
                  clip_length=clip_length, frame_stride=args["frame_stride"],
                  image_size=frozen_encoder.image_size)
    full = data.ClipDataset(source, **common)
    if dataset_source is None:  # the checkpoint's own labelled data: only its validation episodes
        _, episodes = data.split_episodes(full.episodes, args["val_fraction"], args["seed"])
        full = data.ClipDataset(source, episodes=episodes, **common)
    if len(full) == 0:
        raise data.DatasetError(f"no clip of {clip_length} frames in the held-out episodes of {source}")
    picks = np.random.default_rng(seed).permutation(len(full))[:max_clips]
    token_stats = encoder_module.TokenStats(**checkpoint["token_stats"])
    action_stats = data.ActionStats(**checkpoint["action_stats"])
    tokens, actions = [], []
    with torch.no_grad():
        for index in picks:
            item = full[int(index)]
            tokens.append(token_stats.normalize(frozen_encoder(item["frames"])))  # (T, N, D)
            actions.append(action_stats.normalize(item["actions"]))
    return torch.stack(tokens), torch.stack(actions)


def per_step_errors(predicted, truth):
    """(M, H, N, D) each -> per-step MSE and cosine similarity, lists of H floats."""
    mse = (predicted - truth).pow(2).mean(dim=(0, 2, 3))
    cosine = torch.nn.functional.cosine_similarity(predicted, truth, dim=-1).mean(dim=(0, 2))
    return mse.tolist(), cosine.tolist()


def imagine(model, tokens, actions, context, K, action_source="true", pred="x", mode="shortcut", seed=0):
    """Roll out frames context.. of every clip from its first `context` frames. action_source:
    "true", "shuffled" (each clip gets the next clip's actions) or "none" (the no-action embedding)."""
    horizon_actions = actions[:, context:]
    mask = torch.ones(len(tokens), dtype=torch.bool)
    if action_source == "shuffled":
        horizon_actions = horizon_actions.roll(1, dims=0)
    elif action_source == "none":
        mask = torch.zeros_like(mask)
        horizon_actions = torch.zeros_like(horizon_actions)
    generator = torch.Generator().manual_seed(seed)
    return rollout(model, tokens[:, :context], horizon_actions, K=K, context_actions=actions[:, :context],
                   context_mask=torch.ones(len(tokens), dtype=torch.bool), action_mask=mask, pred=pred,
                   mode=mode, generator=generator)


# ----------------------------------------------------------------------------------------------
# The report of one checkpoint.


def evaluate(checkpoint_path, out, dataset=None, decoder_path=None, context=2, horizon=8, clips=32, pairs=20,
             K=4, closed_loop=True, planner_options=None, seed=0, quiet=False, task="pose", planner_size="benchmark"):
    model, checkpoint = train_module.load_world_model(checkpoint_path)
    args = checkpoint["train_args"]
    pred, mode = args["pred"], args["mode"]
    frozen_encoder = encoder_module.Encoder(checkpoint["encoder"]["name_or_path"], pool=checkpoint["encoder"]["pool"])
    tokens, actions = held_out_clips(checkpoint, frozen_encoder, dataset, context + horizon, clips, seed)
    truth = tokens[:, context:]
    report = dict(checkpoint=checkpoint_path, step=checkpoint["step"], clips=len(tokens), context=context,
                  horizon=horizon, K=K, pred=pred, mode=mode)

    # Open loop, and action sensitivity.
    copy_last = tokens[:, context - 1:context].expand_as(truth)
    report["copy_last"] = dict(zip(("mse", "cosine"), per_step_errors(copy_last, truth)))
    rollouts = {}
    for source in ("true", "shuffled", "none"):
        rollouts[source] = imagine(model, tokens, actions, context, K, source, pred, mode, seed)
        report[f"actions_{source}"] = dict(zip(("mse", "cosine"), per_step_errors(rollouts[source], truth)))

    # Sampling steps: error and time per generated frame.
    report["sampling_steps"] = []
    K_values = [2 ** i for i in range(int(np.log2(model.config.k_max)) + 1)]
    for steps in K_values:
        start = time.perf_counter()
        predicted = imagine(model, tokens, actions, context, steps, "true", pred, mode, seed)
        seconds = (time.perf_counter() - start) / (len(tokens) * horizon)
        mse, cosine = per_step_errors(predicted, truth)
        report["sampling_steps"].append(dict(K=steps, mse=float(np.mean(mse)), cosine=float(np.mean(cosine)),
                                             ms_per_frame=1000 * seconds))

    # Closed loop in the toy world.
    if closed_loop and checkpoint["toy"]:
        import plan
        report["closed_loop"] = plan.closed_loop_report(checkpoint_path, pairs=pairs, seed=seed, task=task,
                                                        size=planner_size, progress=not quiet,
                                                        **(planner_options or {}))

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
    rows = [f"open loop, {report['clips']} held-out clips, {report['context']} context frames, K = {report['K']}",
            f"{'':22s}" + "".join(f"h={h + 1:<7d}" for h in range(horizon))]
    for name in ("copy_last", "actions_true", "actions_shuffled", "actions_none"):
        rows.append(f"{name + ' MSE':22s}" + "".join(f"{value:<9.4f}" for value in report[name]["mse"]))
    rows.append("sampling steps: " + ", ".join(f"K={entry['K']}: MSE {entry['mse']:.4f} "
                                               f"({entry['ms_per_frame']:.1f} ms/frame)"
                                               for entry in report["sampling_steps"]))
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


def plot_report(report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    figure.tight_layout()
    path = os.path.join(out, "open_loop.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def decoded_strips(decoder_path, checkpoint, tokens, predicted, context, out, clips=3):
    """Decoded ground truth beside decoded imagination for a few clips: PNG strips and a GIF."""
    from decode import load_decoder, save_gif, save_image_strip
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
# Ablations on the toy world: one change each, same data, budget and seeds.

ABLATIONS = {
    "baseline": [],  # shortcut forcing, x-prediction, ramp, 5 % labelled + 95 % unlabelled
    "diffusion_forcing": ["--mode", "diffusion"],
    "v_prediction": ["--pred", "v"],
    "no_ramp": ["--no-ramp"],
    "time_every_2nd_layer": ["--time-every", "2"],  # tiny preset: every 3rd (every layer: no space layer left)
    "labeled_100": "all labelled",  # the unlabelled video with its actions, every sample labelled
    "labeled_5_alone": "labelled only",  # the 5 % labelled episodes alone, no action-free video
}


def ablation_arguments(name, labeled, unlabeled, steps, seed, out, k_max, extra=()):
    common = ["--toy", "--steps", str(steps), "--seed", str(seed), "--out", out, "--overwrite",
              "--k-max", str(k_max), "--val-every", "0", "--save-every", str(steps), *extra]
    change = ABLATIONS[name]
    if change == "all labelled":
        return ["--labeled", unlabeled, "--unlabeled", unlabeled, "--labeled-fraction", "1.0", *common]
    if change == "labelled only":
        return ["--labeled", labeled, "--unlabeled", labeled, "--labeled-fraction", "1.0", *common]
    return ["--labeled", labeled, "--unlabeled", unlabeled, *change, *common]


def run_ablations(out, steps, pairs, clips, seed=0, k_max=64, planner_options=None, names=None,
                  toy_datasets=None, train_arguments=(), context=2, horizon=8, closed_loop=True, task="reach",
                  planner_size="fast"):
    """Train every variant (or `names`), evaluate each, write ablations.json/.md and a plot.
    toy_datasets: (labelled, unlabelled) roots, default the demo's; train_arguments: extra train.py flags.
    The closed loop defaults to the reach task and the fast planner: tiny models trained for minutes
    do not reach full poses (README), so on the pose task every variant would score 0 %."""
    labeled, unlabeled = toy_datasets or sim.ensure_toy_datasets()
    results = {}
    for name in names or ABLATIONS:
        run_dir = os.path.join(out, name)
        print(f"== ablation {name}: training {steps} steps")
        code = train_module.main(ablation_arguments(name, labeled, unlabeled, steps, seed, run_dir, k_max,
                                                    train_arguments))
        if code != 0:
            raise SystemExit(f"error: training the {name} variant stopped early (exit {code})")
        results[name] = evaluate(os.path.join(run_dir, "checkpoint.pt"), run_dir, context=context, horizon=horizon,
                                 clips=clips, pairs=pairs, K=4, closed_loop=closed_loop,
                                 planner_options=planner_options, seed=seed, quiet=True, task=task,
                                 planner_size=planner_size)
    results = {**earlier_results(out, results), **results}
    results = {name: results[name] for name in ABLATIONS if name in results}  # the table's order
    with open(os.path.join(out, "ablations.json"), "w") as file:
        json.dump(results, file, indent=1)
    table = ablation_table(results, steps, k_max, horizon)
    with open(os.path.join(out, "ablations.md"), "w") as file:
        file.write(table + "\n")
    plot_ablations(results, out)
    print(table)
    return results


def earlier_results(out, results):
    """The other variants' results from an earlier ablations.json in `out`, where they were made
    with the same settings as `results` (steps, horizon, K, closed loop): rerunning some variants
    (--only) then updates the table instead of replacing it."""
    def settings(report):
        loop = report.get("closed_loop") or {}
        return (report["step"], report["context"], report["horizon"], report["K"],
                loop.get("task"), loop.get("size"), loop.get("pairs"))

    path = os.path.join(out, "ablations.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        earlier = json.load(file)
    reference = settings(next(iter(results.values())))
    kept = {name: report for name, report in earlier.items()
            if name in ABLATIONS and name not in results and settings(report) == reference}
    if kept:
        print(f"keeping the earlier results of {', '.join(kept)} from {path} (same settings)")
    return kept


def ablation_table(results, steps, k_max, horizon):
    def mean_mse(report, K):
        return next(entry["mse"] for entry in report["sampling_steps"] if entry["K"] == K)

    loops = [report["closed_loop"] for report in results.values() if "closed_loop" in report]
    closed_loop_note = (f" Closed loop: task {loops[0]['task']}, {loops[0]['pairs']} start/goal pairs, CEM "
                        f"{loops[0]['size']} planner at K = {loops[0]['K']}, random actions on the same pairs in "
                        f"brackets." if loops else "")
    lines = [f"Tiny models, {steps} training steps each, same seed and data; held-out token MSE (normalised "
             f"tokens, mean over {horizon} open-loop steps) at K sampling steps; action gap = MSE with shuffled "
             f"actions / MSE with true actions (at K = 4).{closed_loop_note}", "",
             f"| variant | MSE K=1 | MSE K=4 | MSE K={k_max} | MSE h=1 | MSE h={horizon} | copy-last h={horizon} "
             "| action gap | MPC success | MPC final position error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, report in results.items():
        loop = report.get("closed_loop")
        success = (f"{loop['planner']['success_rate']:.0%} ({loop['random']['success_rate']:.0%})"
                   if loop else "-")
        error = (f"{100 * loop['planner']['final_position_error']:.1f} cm "
                 f"({100 * loop['random']['final_position_error']:.1f} cm)" if loop else "-")
        true_mse, shuffled_mse = report["actions_true"]["mse"], report["actions_shuffled"]["mse"]
        lines.append(f"| {name} | {mean_mse(report, 1):.4f} | {mean_mse(report, 4):.4f} | "
                     f"{mean_mse(report, k_max):.4f} | {true_mse[0]:.4f} | {true_mse[-1]:.4f} | "
                     f"{report['copy_last']['mse'][-1]:.4f} | {np.mean(shuffled_mse) / np.mean(true_mse):.2f} | "
                     f"{success} | {error} |")
    return "\n".join(lines)


def plot_ablations(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, report in results.items():
        left.plot(np.arange(1, report["horizon"] + 1), report["actions_true"]["mse"], marker=".", label=name)
        sweep = report["sampling_steps"]
        right.plot([entry["K"] for entry in sweep], [entry["mse"] for entry in sweep], marker=".", label=name)
    left.set(xlabel="horizon step", ylabel="token MSE", title="open-loop error (K = 4)")
    right.set(xscale="log", xlabel="sampling steps K", ylabel="mean token MSE", title="error vs K")
    right.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(out, "ablations.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a world-model checkpoint (open loop, action "
                                     "sensitivity, sampling steps, closed-loop MPC), or run the toy ablations.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(train_module.TOY_RUN_DIR, "checkpoint.pt"))
    parser.add_argument("--dataset", help="labelled dataset to evaluate on (default: the checkpoint's held-out "
                                          "labelled episodes)")
    parser.add_argument("--decoder", help="decoder checkpoint (decode.py) for pictures of rollouts")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/eval, or runs/ablations)")
    parser.add_argument("--context", type=int, default=2, help="real frames before the imagined ones")
    parser.add_argument("--horizon", type=int, default=8, help="imagined frames per clip")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips")
    parser.add_argument("--pairs", type=int, default=20, help="closed-loop start/goal pairs (toy world)")
    parser.add_argument("--K", type=int, default=4, help="sampling steps for the open-loop metrics")
    parser.add_argument("--no-closed-loop", action="store_true", help="skip MPC in the toy world")
    parser.add_argument("--task", choices=["pose", "reach"],
                        help="closed-loop task: reach the whole goal pose, or only a goal position (plan.py); "
                             "default: reach with --ablations, pose otherwise")
    parser.add_argument("--planner", choices=["benchmark", "fast"],
                        help="closed-loop planner size (plan.PLANNER_SIZES: CEM 64 x 3 x 4 at K = 4, or 32 x 2 x 3 "
                             "at K = 1); default: fast with --ablations, benchmark otherwise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablations", action="store_true", help="train and compare the toy ablations")
    parser.add_argument("--ablation-steps", type=int, default=750,
                        help="training steps per ablation variant (the demo's budget)")
    parser.add_argument("--only", nargs="+", choices=sorted(ABLATIONS),
                        help="run only these ablation variants (the others' results in --out, made with the same "
                             "settings, stay in the table)")
    args = parser.parse_args(argv)
    if args.context < 1 or args.horizon < 1:
        parser.error("--context and --horizon must be at least 1")
    try:
        if args.ablations:
            run_ablations(args.out or os.path.join("runs", "ablations"), args.ablation_steps, args.pairs,
                          args.clips, args.seed, names=args.only, closed_loop=not args.no_closed_loop,
                          task=args.task or "reach", planner_size=args.planner or "fast")
        else:
            evaluate(args.checkpoint, args.out or os.path.join(os.path.dirname(args.checkpoint), "eval"),
                     args.dataset, args.decoder, args.context, args.horizon, args.clips, args.pairs, args.K,
                     closed_loop=not args.no_closed_loop, seed=args.seed, task=args.task or "pose",
                     planner_size=args.planner or "benchmark")
    except (train_module.CheckpointError, data.DatasetError) as error:
        raise SystemExit(f"error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
