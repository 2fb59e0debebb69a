"""Ablations on the toy world: tiny models that differ from the demo's recipe in one thing each.

    python ablations.py --pairs 20                      # every variant: ~9 min each on 2 CPU cores
                                                        # (the corpus_* ones more: their data is written first)
    python ablations.py --only recipe labeled_100 --steps 3000

Each variant is trained with the same budget, seed and toy data as the recipe (train.py's
TOY_DEFAULTS), then evaluated by eval.py: open-loop error, action gap, action response, sampling
steps, closed-loop MPC. Every variant is scored on the same held-out clips and start/goal pairs,
with token errors in the recipe's per-channel normalisation, so the rows of the table compare; a
variant with another encoder has a token space of its own, and its MSE columns are starred.

Outputs in --out (default runs/ablations): one run folder per variant (checkpoint, eval report),
ablations.json, ablations.md (the table the README carries) and ablations.png. Rerunning some
variants (--only) with the same settings updates the table instead of replacing it.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple

import numpy as np

import data
import encoder as encoder_module
import eval as eval_module
import sim
import train as train_module
from cem import PLANNER_SIZES, PLANNING_STEP_INPUT
from checkpoint import CheckpointError, load_safely, writable_folder
from shortcut import STEP_INPUTS


class Variant(NamedTuple):
    """One change to the recipe. flags: extra train.py flags. data: which toy datasets play the
    labelled and the action-free role (DATA). coarse_encoder: the earlier toy encoder (8 px patches,
    width 64, pool 2) instead of the demo's. corpus: both toy sets this many times the demo's
    episodes, the same 5 % labelled (sim.ensure_toy_datasets' scale)."""
    flags: tuple = ()
    data: str = "demo"
    coarse_encoder: bool = False
    corpus: int = 1


# data -> (labelled role, action-free role, labelled fraction or None for the demo's 5 %), where
# "labeled"/"unlabeled" are the demo's two sets (or their AV1 copies for "av1").
DATA = {"demo": ("labeled", "unlabeled", None),
        "av1": ("labeled", "unlabeled", None),  # the demo's sets stored as AV1 video
        "all_labeled": ("unlabeled", "unlabeled", 1.0),  # the action-free set with its actions: 100 % labelled
        "labeled_alone": ("labeled", "labeled", 1.0)}  # the 5 % labelled episodes alone

ABLATIONS = {
    "recipe": Variant(),
    "ramp": Variant(flags=("--ramp",)),  # Dreamer 4's loss weight w(τ) = 0.9τ + 0.1
    "no_action_jacobian": Variant(flags=("--no-action-jacobian",)),
    "no_labeled_queries": Variant(flags=("--no-labeled-queries",)),
    "no_labeled_pairs": Variant(flags=("--no-labeled-pairs",)),
    "no_whitening": Variant(flags=("--whiten-tokens", "0")),  # tokens normalised per channel only
    "diffusion_forcing": Variant(flags=("--mode", "diffusion")),
    "v_prediction": Variant(flags=("--pred", "v")),
    "labeled_100": Variant(data="all_labeled"),
    "labeled_5_alone": Variant(data="labeled_alone"),
    "av1_video": Variant(data="av1"),
    "coarse_encoder": Variant(coarse_encoder=True),
    "corpus_4x": Variant(corpus=4),  # 32 labelled + 608 action-free episodes: more distinct labelled motions
    "corpus_4x_labeled_100": Variant(data="all_labeled", corpus=4),  # its 608 episodes, every one labelled
    "corpus_4x_labeled_5_alone": Variant(data="labeled_alone", corpus=4),  # its 32 labelled episodes alone
    "corpus_16x": Variant(corpus=16),  # 128 labelled + 2432 action-free episodes
    "corpus_16x_labeled_100": Variant(data="all_labeled", corpus=16),  # its 2432 episodes, every one labelled
    "corpus_4x_action_noise": Variant(flags=("--action-noise", "0.5"), corpus=4),  # a ridge on the action response
}


def ablation_arguments(name, steps, seed, out, extra=(), toy_datasets=None):
    """train.py arguments of one variant. toy_datasets: {"demo": (labelled, unlabelled), "av1": ...,
    "x4": ...} roots, default the demo's (written on first use)."""
    variant = ABLATIONS[name]
    video = variant.data == "av1"
    key = "av1" if video else f"x{variant.corpus}" if variant.corpus != 1 else "demo"
    roots = (toy_datasets or {}).get(key) or sim.ensure_toy_datasets(video=video, scale=variant.corpus)
    sets = dict(zip(("labeled", "unlabeled"), roots))
    labeled_role, unlabeled_role, labeled_fraction = DATA[variant.data]
    argv = ["--toy", "--labeled", sets[labeled_role], "--unlabeled", sets[unlabeled_role], "--steps", str(steps),
            "--seed", str(seed), "--out", out, "--overwrite", "--val-every", "0", "--save-every", str(steps),
            *variant.flags]
    if labeled_fraction is not None:
        argv += ["--labeled-fraction", str(labeled_fraction)]
    if variant.coarse_encoder:
        argv += ["--encoder", encoder_module.ensure_tiny_dinov2(encoder_module.COARSE_ENCODER_DIR, patch_size=8,
                                                                 hidden_size=64), "--pool", "2"]
    return [*argv, *extra]


def run_ablations(out, steps, pairs, clips, seed=0, planner_options=None, names=None, toy_datasets=None,
                  train_arguments=(), context=2, horizon=8, closed_loop=True, task="pose", planner_size="toy",
                  step_input=PLANNING_STEP_INPUT):
    """Train every variant (or `names`), evaluate each on the same held-out clips and start/goal pairs,
    with errors measured in the recipe's per-channel token normalisation (variants with another
    encoder in their own: their MSE columns are starred), and write ablations.json/.md and a plot.
    toy_datasets, train_arguments: other datasets (see ablation_arguments) and extra train.py flags.
    step_input: the step size the evaluation's rollouts tell the model (eval.py)."""
    results = {}
    reference = None  # the recipe's token statistics: one scale for every variant
    for name in names or ABLATIONS:
        run_dir = os.path.join(out, name)
        print(f"== ablation {name}: training {steps} steps")
        code = train_module.main(ablation_arguments(name, steps, seed, run_dir, train_arguments, toy_datasets))
        if code != 0:
            raise SystemExit(f"error: training the {name} variant stopped early (exit {code})")
        recipe_checkpoint = os.path.join(out, "recipe", "checkpoint.pt")
        if reference is None and os.path.isfile(recipe_checkpoint):
            reference = encoder_module.TokenStats(**load_safely(recipe_checkpoint)["token_stats"])
        own_scale = ABLATIONS[name].coarse_encoder
        results[name] = eval_module.evaluate(os.path.join(run_dir, "checkpoint.pt"), run_dir, context=context, horizon=horizon,
                                             clips=clips, pairs=pairs, K=4, closed_loop=closed_loop,
                                             planner_options=planner_options, seed=seed, quiet=True, task=task,
                                             planner_size=planner_size, score_stats=None if own_scale else reference,
                                             step_input=step_input)
        results[name]["own_scale"] = own_scale or reference is None
    results = {**earlier_results(out, results), **results}
    results = {name: results[name] for name in ABLATIONS if name in results}  # the table's order
    with open(os.path.join(out, "ablations.json"), "w") as file:
        json.dump(results, file, indent=1)
    table = ablation_table(results, steps, horizon)
    with open(os.path.join(out, "ablations.md"), "w") as file:
        file.write(table + "\n")
    plot_ablations(results, out)
    print(table)
    return results


def earlier_results(out, results):
    """The other variants' results from an earlier ablations.json in `out`, where they were made
    with the same settings as `results` (steps, horizon, K, step input, closed loop): rerunning some
    variants (--only) then updates the table instead of replacing it. (Reports without a step input
    were made before it was recorded, with the model told the step it takes.)"""
    def settings(report):
        loop = report.get("closed_loop") or {}
        return (report["step"], report["context"], report["horizon"], report["K"], report.get("step_input", "step"),
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


def ablation_table(results, steps, horizon):
    def mean_mse(report, K):
        return next(entry["mse"] for entry in report["sampling_steps"] if entry["K"] == K)

    loops = [report["closed_loop"] for report in results.values() if "closed_loop" in report]
    closed_loop_note = (f" Closed loop: task {loops[0]['task']}, {loops[0]['pairs']} start/goal pairs, CEM "
                        f"{loops[0]['size']} planner at K = {loops[0]['K']}, random actions on the same pairs in "
                        f"brackets." if loops else "")
    lines = [f"Tiny models, {steps} training steps each, same seed; every variant scored on the same held-out clips, "
             f"token MSE in the recipe's per-channel normalisation (* another encoder: its own token space, "
             f"not comparable); "
             f"MSE K=1 / K=4: mean over {horizon} open-loop steps; at h={horizon}, K = 4: error / copy-last and "
             f"action gap (shuffled / true actions); response: cosine between imagined and true token change "
             f"for a ±2σ action, mean over translation / rotation / gripper.{closed_loop_note}", "",
             f"| variant | MSE K=1 | MSE K=4 | MSE h={horizon} | error / copy-last | action gap "
             "| response (xyz / rot / grip) | MPC success | final error (pos, rot, grip) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, report in results.items():
        star = "*" if report.get("own_scale") else ""
        loop = report.get("closed_loop")
        success = (f"{loop['planner']['success_rate']:.0%} ({loop['random']['success_rate']:.0%})" if loop else "-")
        error = (f"{100 * loop['planner']['final_position_error']:.1f} cm, "
                 f"{loop['planner']['final_rotation_error']:.2f} rad, {loop['planner']['final_gripper_error']:.2f}"
                 if loop else "-")
        cosine = report.get("action_response", {}).get("cosine")
        response = (f"{np.mean(cosine[:3]):.2f} / {np.mean(cosine[3:6]):.2f} / {cosine[6]:.2f}" if cosine else "-")
        lines.append(f"| {name} | {mean_mse(report, 1):.4f}{star} | {mean_mse(report, 4):.4f}{star} | "
                     f"{report['actions_true']['mse'][-1]:.4f}{star} | {report['open_loop_ratio']:.2f} | "
                     f"{report['action_gap']:.2f} | {response} | {success} | {error} |")
    return "\n".join(lines)


def plot_ablations(results, out):
    figure, (left, right) = eval_module.two_panels()
    for name, report in results.items():
        left.plot(np.arange(1, report["horizon"] + 1), report["actions_true"]["mse"], marker=".", label=name)
        sweep = report["sampling_steps"]
        right.plot([entry["K"] for entry in sweep], [entry["mse"] for entry in sweep], marker=".", label=name)
    left.set(xlabel="horizon step", ylabel="token MSE", title="open-loop error (K = 4)")
    right.set(xscale="log", xlabel="sampling steps K", ylabel="mean token MSE", title="error vs K")
    right.legend(fontsize=7)
    return eval_module.save_figure(figure, os.path.join(out, "ablations.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the toy ablations (one change each to the demo's recipe) "
                                     "and compare them on the same clips and start/goal pairs.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(ABLATIONS),
                        help="run only these variants (the others' results in --out, made with the same settings, "
                             "stay in the table)")
    parser.add_argument("--steps", type=int, default=train_module.TOY_DEFAULTS["steps"],
                        help="training steps per variant (the demo's budget)")
    parser.add_argument("--out", default=os.path.join("runs", "ablations"), help="output folder")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips")
    parser.add_argument("--pairs", type=int, default=50, help="closed-loop start/goal pairs")
    parser.add_argument("--no-closed-loop", action="store_true", help="skip MPC in the toy world")
    parser.add_argument("--task", choices=sorted(sim.TASKS), default="pose", help="closed-loop task (sim.py)")
    parser.add_argument("--planner", choices=sorted(PLANNER_SIZES), default="toy",
                        help="closed-loop planner size (cem.PLANNER_SIZES)")
    parser.add_argument("--step-input", choices=STEP_INPUTS, default=PLANNING_STEP_INPUT,
                        help="step size the evaluation's rollouts tell the model (eval.py; step: as before 2026-11-27)")
    parser.add_argument("--seed", type=int, default=1, help="training, clips and start/goal pairs")
    args = parser.parse_args(argv)
    if min(args.steps, args.clips, args.pairs) < 1:
        parser.error("--steps, --clips and --pairs must be at least 1")
    writable_folder(args.out)
    try:
        run_ablations(args.out, args.steps, args.pairs, args.clips, args.seed, names=args.only,
                      closed_loop=not args.no_closed_loop, task=args.task, planner_size=args.planner,
                      step_input=args.step_input)
    except (CheckpointError, data.DatasetError) as error:
        raise SystemExit(f"error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
