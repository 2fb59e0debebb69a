"""Plan with the world model from the command line: one plan from camera frames, or closed-loop MPC
in the toy world. The planner itself (CEM, its model adapters and policies) is cem.py.

    python plan.py --goal goals/goal_0.png                                   # toy world: closed-loop MPC
    python plan.py --goal goal.png --obs now.png --checkpoint ckpt.pt --out plan.json   # one plan

With --obs: the frames (oldest first) are encoded as an action-free context, one CEM search runs,
the first action is printed in robot units (dx, dy, dz in metres, a rotation vector in radians,
dgripper) and the whole plan goes to --out as JSON. Without --obs and with a toy-world checkpoint:
the goal's pose and start pose come from the goals.json next to the goal image
(sim.write_goal_images, which train.py calls), and MPC runs in the simulator until the goal is
reached or the step budget is spent. Planner sizes: cem.PLANNER_SIZES, "toy" by default for toy
checkpoints and "dino-wm" otherwise; explicit flags override the size's values. --save draws a
picture strip: observations, imagined frames (decoded with decode.py's decoder when one exists),
goal.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import data
import sim
from cem import PLANNER_SIZES, PLANNING_STEP_INPUT, CEMPlanner, LearnedModel, MPCPolicy, PlanningError
from checkpoint import TOY_RUN_DIR, CheckpointError, writable_folder
from decode import TOY_DECODER_DIR, load_decoder, save_image_strip
from shortcut import STEP_INPUTS

DEFAULT_CHECKPOINT = os.path.join(TOY_RUN_DIR, "checkpoint.pt")


def read_image(path, size):
    """An image file as (size, size, 3) uint8 RGB. RGBA, grayscale and palette images are converted to
    RGB (alpha dropped); other sizes are resized as training frames are (data.square_resize: short
    side to `size`, centre crop). One clear line (SystemExit) for a missing file or a non-image."""
    try:
        with Image.open(path) as image:
            original = f"{image.width}x{image.height} {image.mode}"
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        reason = (str(error).splitlines() or [""])[0][:120]  # DecompressionBombError: a huge image
        raise SystemExit(f"error: cannot read image {path!r} ({type(error).__name__}: {reason})") from None
    if original != f"{size}x{size} RGB":
        print(f"note: {path} is {original}: converted to RGB, resized to {size}x{size} (the encoder's input)",
              file=sys.stderr)
        frame = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        pixels = (data.square_resize(frame, size)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    return pixels


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
    parser.add_argument("--decoder", help="decoder checkpoint (decode.py) to picture imagined frames; if not "
                                          "given, the toy decoder when it exists")
    group = parser.add_argument_group("planner (sizes: PLANNER_SIZES; --horizon, --samples, --top-k, --iterations "
                                      "and --K override the size's)")
    group.add_argument("--planner", choices=sorted(PLANNER_SIZES),
                       help="planner size; if not given, toy for a toy-world checkpoint, dino-wm otherwise")
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
    group.add_argument("--step-input", choices=STEP_INPUTS, default=PLANNING_STEP_INPUT,
                       help="step size each denoising step tells the model: 1/K (step) or the finest (d_min; "
                            "shortcut.py section 6)")
    group.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("toy-world loop (no --obs)")
    group.add_argument("--replan-every", type=int, default=1, help="actions executed before re-planning")
    group.add_argument("--no-warm-start", action="store_true", help="start every plan from mean 0")
    group.add_argument("--context-frames", type=int, default=2, help="recent frames given to the model")
    group.add_argument("--max-steps", type=int, default=sim.MAX_STEPS, help="step budget of the episode")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="the imagined rollouts' precision; auto: bf16 on CUDA, fp32 on CPU (bf16 on CPU: "
                            "faster where the CPU has bf16 matmuls, BENCHMARKS.md)")
    return parser


def planner_from_arguments(model, args):
    return CEMPlanner(model, horizon=args.horizon, samples=args.samples, top_k=args.top_k, iterations=args.iterations,
                      sigma=args.sigma, momentum=args.momentum, cost=args.cost, all_frames=args.all_frames,
                      max_sigma=args.max_sigma, max_translation=args.max_translation,
                      max_rotation=args.max_rotation, max_gripper=args.max_gripper,
                      replan_every=args.replan_every, warm_start=not args.no_warm_start, seed=args.seed)


def decoded(decoder, learned, tokens):
    """Normalised tokens (T, N, D) -> pictures (T, 3, H, W), or [] without a decoder."""
    if decoder is None or len(tokens) == 0:
        return []
    return list(decoder.decode(torch.stack(list(tokens)).cpu(), token_stats=learned.token_stats))


def as_picture(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]


def load_decoder_for(args, learned):
    path = args.decoder or (os.path.join(TOY_DECODER_DIR, "checkpoint.pt") if learned.toy else None)
    if path is None or (args.decoder is None and not os.path.isfile(path)):
        return None
    try:
        return load_decoder(path, encoder=learned.checkpoint["encoder"])[0]
    except CheckpointError as error:
        if args.decoder is None:  # the toy default belongs to another encoder: pictures without imagination
            print(f"note: no decoded frames: {error}", file=sys.stderr)
            return None
        raise SystemExit(f"error: {error}")


def plan_from_files(args, learned, goal_image):
    """--obs mode: one plan from the given frames (no actions known: an action-free context)."""
    size = learned.encoder.image_size
    observations = [read_image(path, size) for path in args.obs]
    planner = planner_from_arguments(learned, args)
    start = time.perf_counter()
    result = planner.plan(learned.context(observations, None, None), learned.goal(goal_image))
    seconds = time.perf_counter() - start
    dx, dy, dz, rx, ry, rz, dg = result["actions"][0]
    print(f"first action: dxyz = ({dx:+.4f}, {dy:+.4f}, {dz:+.4f}) m, rotation vector = ({rx:+.4f}, {ry:+.4f}, "
          f"{rz:+.4f}) rad, dgripper = {dg:+.4f}   (predicted cost {result['cost']:.4f}, {seconds:.1f} s)")
    report = dict(goal=args.goal, obs=args.obs, checkpoint=args.checkpoint, actions=result["actions"].tolist(),
                  actions_normalised=result["normalised"].tolist(), predicted_cost=result["cost"],
                  iteration_costs=result["iteration_costs"], seconds=seconds, precision=learned.precision,
                  step_input=learned.step_input,
                  units="dx dy dz [m], rotation vector [rad] (R_new = dR R, base frame), dgripper")
    if args.save:
        decoder = load_decoder_for(args, learned)
        rows = [[as_picture(image) for image in observations], decoded(decoder, learned, result["imagined"]),
                [as_picture(goal_image)]]
        labels = ["observed", "imagined", "goal"]
        keep = [index for index, row in enumerate(rows) if row]
        report["picture"] = save_strip(args.save, [rows[i] for i in keep], [labels[i] for i in keep])
    return report


def save_strip(path, rows, labels):
    return save_image_strip(path, rows, labels=labels, scale=max(1, 128 // rows[0][0].shape[-1]))


def toy_loop(args, learned, goal_image):
    """No --obs, toy checkpoint: closed-loop MPC in sim.py toward a goal listed in goals.json."""
    poses_file = os.path.join(os.path.dirname(args.goal) or ".", "goals.json")
    name = os.path.basename(args.goal)
    try:
        with open(poses_file) as file:
            entry = json.load(file)[name]
        start, goal_pose = np.array(entry["start"], dtype=np.float64), np.array(entry["goal"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"error: the toy loop needs the goal's pose: {poses_file} has no entry for {name!r} "
                         f"(goal images from sim.write_goal_images / train.py have one); or pass --obs") from None
    if not np.array_equal(read_image(args.goal, sim.IMAGE_SIZE), sim.render(goal_pose)):
        print(f"note: {args.goal} differs from the rendering of its pose in {poses_file}", file=sys.stderr)
    policy = MPCPolicy(planner_from_arguments(learned, args), args.context_frames)
    start_time = time.perf_counter()
    outcome = sim.run_episode(policy, start, goal_pose, args.max_steps)
    plans = len(policy.plans)
    seconds_per_plan = (time.perf_counter() - start_time) / max(1, plans)
    print(f"{'reached' if outcome['success'] else 'did not reach'} the goal in {outcome['steps']} steps "
          f"(budget {args.max_steps}): final error {outcome['position_error'] * 100:.1f} cm, "
          f"{np.degrees(outcome['rotation_error']):.1f} deg, gripper {outcome['gripper_error']:.2f}; "
          f"{plans} plans, {seconds_per_plan:.1f} s per MPC step")
    report = {key: value for key, value in outcome.items() if key != "frames"}
    report.update(final_pose=outcome["final_pose"].tolist(), start=start.tolist(), goal=goal_pose.tolist(),
                  tolerance=sim.TOLERANCE, seconds_per_mpc_step=seconds_per_plan, precision=learned.precision,
                  step_input=learned.step_input,
                  actions=np.asarray(policy.actions).tolist(), predicted_costs=[p["cost"] for p in policy.plans])
    if args.save:
        decoder = load_decoder_for(args, learned)
        observed = [as_picture(frame) for frame in outcome["frames"]]
        # imagined row, column t: the frame the model predicted for observation t (column 0: what it saw)
        imagined = decoded(decoder, learned, [learned.goal(outcome["frames"][0])] + policy.imagined)
        rows, labels = [observed, [as_picture(goal_image)]], ["observed", "goal"]
        if imagined:
            rows, labels = [observed, imagined, rows[1]], ["observed", "imagined", "goal"]
        report["picture"] = save_strip(args.save, rows, labels)
    return report


def check_arguments(parser, args):
    """Bad values stop here, before the model loads or the search runs."""
    counts = dict(horizon=args.horizon, samples=args.samples, top_k=args.top_k, iterations=args.iterations, K=args.K)
    for name, value in counts.items():
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.max_steps, args.context_frames, args.replan_every) < 1 or args.sigma <= 0 or args.max_sigma <= 0:
        parser.error("--max-steps, --context-frames and --replan-every must be at least 1; --sigma and "
                     "--max-sigma positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    for path in (args.out, args.save):
        if path:
            writable_folder(os.path.dirname(path) or ".")


def main(argv=None):
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.obs is None and not os.path.isfile(args.checkpoint) and args.checkpoint == DEFAULT_CHECKPOINT:
        raise SystemExit(f"error: --obs is required (current camera frame(s)) unless a toy-world checkpoint "
                         f"exists: {DEFAULT_CHECKPOINT} is missing (python train.py makes it)")
    try:
        precision = args.precision if args.precision != "auto" else "bf16" if args.device.startswith("cuda") else "fp32"
        learned = LearnedModel.load(args.checkpoint, args.device, precision=precision, step_input=args.step_input)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    size_options, size_K = PLANNER_SIZES[args.planner or ("toy" if learned.toy else "dino-wm")]
    for name, value in size_options.items():  # flags given explicitly win over the size's values
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    learned.K = args.K = size_K if args.K is None else args.K
    if args.obs is None and not learned.toy:
        raise SystemExit(f"error: --obs is required: {args.checkpoint} was not trained on the toy world, so "
                         f"there is no simulator to run the loop in")
    goal_image = read_image(args.goal, learned.encoder.image_size)
    try:
        report = plan_from_files(args, learned, goal_image) if args.obs else toy_loop(args, learned, goal_image)
    except (PlanningError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
        print(f"wrote {args.out}")
    if args.save:
        print(f"picture: {report['picture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
