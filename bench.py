"""Speed and memory, measured: `python bench.py` writes BENCHMARKS.md (and BENCHMARKS.json).

    python bench.py                   # tiny and small presets (and droid on a GPU), 21-26 min on 2 CPU cores
    python bench.py --quick           # tiny preset, small sizes: under 1.5 minutes on 2 CPU cores (the test runs it)
    python bench.py --device cuda     # on a GPU, to BENCHMARKS_CUDA.md: bf16 autocast, flex attention, droid preset
    python bench.py --device cuda --only cem --presets droid   # one figure, one preset: BENCHMARKS_CUDA_PARTIAL.md

Every figure is the median of `repeats` timed runs after warm-up runs, and every fast path is timed
against its slow alternative in the same run, so the ratio holds even on a busy machine where the
absolute numbers drift. What is measured, and the slow alternative each is compared with:

1. Training step (forward + backward + AdamW) of the dynamics model on random tokens, for each
   preset (fp32 on CPU, bf16 autocast on GPU; the tiny preset also under torch.compile, as
   `train.py --compile` trains, except with --quick; on CPU the tiny preset in bf16 autocast too):
   frames/s, tokens/s and model FLOP utilisation (MFU):

       MFU = (FLOPs of one step / seconds per step) / (this machine's matrix-multiply rate)

   The step's FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records
   every matmul and attention call of one real step (forward and backward; attention on its plain
   path, whose matrix products are flex_attention's, which cannot run under the counter). The
   matmul rate is measured with a large square matmul in the step's precision: 2n³ FLOPs over its
   fastest run, at the start and again right after each training figure; MFU divides by the best
   rate seen. On a shared machine a busy spell slows the matmul too, and a rate measured in one
   would overstate the MFU (a first version read 158 %); against the best rate, a busy spell can
   only lower it.
2. Attention kernels, forward and forward + backward, at the shapes of a space layer (B·T rows of
   S tokens) and of a time layer (B·S rows of T causal frames), in the training step's precision
   (inputs made once, outside the timed calls): the plain reference against
   PyTorch's fused scaled_dot_product_attention (without the soft cap, which SDPA cannot apply) and
   against flex_attention with the soft cap in its score_mod (compiled; on a GPU, or --compile).
3. Autoregressive rollout, time per generated frame at horizons 4, 8, 16, 32: with the KV cache
   (each past frame is computed once) against recomputing the whole past at every denoising step,
   the two timed in turn (timing.measure_interleaved). With the cache the cost per frame should
   stay nearly flat; without, it grows with the horizon. fp32 on CPU, bf16 autocast on a GPU. The
   tiny preset at batch 4 is bound by the fixed cost of each model call, not by its arithmetic, so
   it runs at horizon 16 also at batch 64, a planner's batch.
4. Sampling: time per frame with K = 4 shortcut steps against K = 64 (what plain diffusion needs),
   timed in turn, in the rollout's precision.
5. One CEM MPC step at DINO-WM's size (300 samples × horizon 5, 10 iterations): all candidates of
   an iteration in one batched rollout, against one rollout per candidate (timed on a few candidates
   and scaled to 300: the loop's cost is linear in the candidates); at K = 4 and K = 1 in the
   precision plan.py plans in on the device (fp32 on CPU, bf16 autocast on a GPU), on CPU also at
   K = 1 in bf16, timed in turn. Each plan against its FLOP bound: its FLOPs, counted like the
   training step's, over the measured matmul rate of its precision, and on CPU that ratio split in
   two: the part of the plan's time inside matrix products (the work the bound counts) and the rest
   (elementwise work and Python, which it does not), from one more plan of at most 2 iterations
   under torch.profiler (timing.matmul_share). On CPU the larger presets plan
   64 samples × 1 iteration (the full size would take tens of minutes there): enough for their
   time / bound ratio. Measured last, after 6: it is the costliest figure, and a run cut short
   keeps every figure before it and each preset of it already planned (the report is written after
   every preset of every figure; --only picks figures).
6. Data: clips/s from a LeRobot dataset (the toy's PNG frames) + DINOv2 on the fly, against reading the feature
   cache that `python encoder.py` writes; for the toy tiny DINOv2 and for a DINOv2-S-sized encoder
   (random weights: same FLOPs as the real one, no download) at 224 px. And writing that cache from
   AV1 video, frames/s of one process, opening the dataset included: each episode decoded front to
   back in chunks (encoder.py; also with 2 decoding workers) against one seek per frame (reading
   the dataset item by item), and the decoding alone both ways; and of 2 shard processes
   (--shard 0/2 and 1/2) sharing the machine, timed from when both have loaded their model.
7. Peak memory of each (timing.py: on CPU the peak resident memory above the start, in one extra
   untimed run with malloc set up so that resident memory follows the tensors).
"""
import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bench never downloads: every model is built from a config
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (matmul_share) would log an error for a missing GPU

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import encoder as encoder_module
import peer as peer_module
import sim
from dynamics import PRESETS, Attention, DynamicsConfig, DynamicsModel, attend
from cem import CEMPlanner, LearnedModel
from shortcut import rollout, shortcut_forcing_loss
from timing import matmul_rate, matmul_share, measure, measure_interleaved


DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16)


def device_precision(device):
    """The precision a user runs on this device: bf16 (autocast) on a GPU, fp32 on CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device, precision):
    """bf16 autocast for precision "bf16" (on CPU too), nothing for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------------------------
# 1. Training step.


def bench_config(preset, **overrides):
    """A preset with room for the longest rollout and K = 64 (the toy preset trains with k_max 8)."""
    return DynamicsConfig.preset(preset, k_max=64, max_frames=64, **overrides)


def random_batch(config, batch_size, frames, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, frames, config.num_tokens, config.token_dim, generator=generator)  # (B, T, N, D)
    actions = torch.randn(batch_size, frames, config.action_dim, generator=generator)  # (B, T, 7)
    mask = torch.rand(batch_size, generator=generator) < 0.5  # half labelled, half action-free
    return z.to(device), actions.to(device), mask.to(device)


def count_flops(model, run):
    """FLOPs of run(), counted by FlopCounterMode with the model's attention on the plain path:
    compiled flex_attention (the GPU's path) cannot run under the counter, and the plain path does
    the same matrix products (q·kᵀ and weights·v over every key), which are what the counter counts."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    backends = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = "plain"
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            run()
    finally:
        for layer, backend in zip(layers, backends):
            layer.backend = backend
    return counter.get_total_flops()


def bench_training(preset, batch_size, frames, device, repeats, measure_matmul_rate, precision, compiled=False):
    """One training step; compiled: the loss calls torch.compile(model), as `train.py --compile` does
    (its first steps compile, in the warm-up runs; its FLOPs are counted on the eager model: the same)."""
    torch.manual_seed(0)
    config = bench_config(preset)
    model = DynamicsModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    z, actions, mask = random_batch(config, batch_size, frames, device)
    generator = torch.Generator(device).manual_seed(0)

    def step(network):
        with autocast(device, precision):
            loss, _ = shortcut_forcing_loss(network, z, actions, mask, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(model)  # allocate optimizer state before counting
    flops = count_flops(model, functools.partial(step, model))
    timed = torch.compile(model) if compiled else model
    timing = measure(functools.partial(step, timed), device, repeats)
    measure_matmul_rate()  # again, right after the step: MFU is computed at the end (module docstring, 1)
    seconds = timing["seconds"]
    tokens = batch_size * frames * config.tokens_per_frame
    return dict(preset=preset, parameters=model.num_parameters(), batch_size=batch_size, frames=frames,
                precision=precision, compiled=compiled, seconds=seconds, frames_per_s=batch_size * frames / seconds,
                tokens_per_s=tokens / seconds, flops_per_step=flops, flops_per_s=flops / seconds,
                peak_bytes=timing["peak_bytes"])


# ----------------------------------------------------------------------------------------------
# 2. Attention kernels.


def attention_inputs(config, rows, length, device, dtype):
    """q (rows, heads, L, hd) and k, v (rows, kv_heads, L, hd), made once: never inside a timed call."""
    head_dim = config.width // config.heads
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(rows, config.heads, length, head_dim, generator=generator)
    k, v = (torch.randn(rows, config.kv_heads, length, head_dim, generator=generator) for _ in range(2))
    return [x.to(device, dtype) for x in (q, k, v)]


def bench_attention(preset, batch_size, frames, device, repeats, backends):
    """For each layer kind, seconds of forward and of forward + backward per backend, in the
    training step's precision (bf16 on a GPU, fp32 on CPU)."""
    config = bench_config(preset)
    S = config.tokens_per_frame
    precision = device_precision(device)
    kinds = dict(space=(batch_size * frames, S, False), time=(batch_size * S, frames, True))
    results = []
    for kind, (rows, length, causal) in kinds.items():
        q, k, v = attention_inputs(config, rows, length, device, DTYPES[precision])
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]  # their gradients accumulate: a small add
        for backend, soft_cap in backends:
            timing_forward = measure(lambda: attend(q, k, v, causal, soft_cap, backend), device, repeats)
            timing_both = measure(lambda: attend(*leaves, causal, soft_cap, backend).sum().backward(), device, repeats)
            results.append(dict(preset=preset, kind=kind, rows=rows, length=length, backend=backend,
                                soft_cap=soft_cap, precision=precision, forward=timing_forward["seconds"],
                                forward_backward=timing_both["seconds"], peak_bytes=timing_both["peak_bytes"]))
    return results


# ----------------------------------------------------------------------------------------------
# 3-4. Rollout: KV cache vs recomputation, K = 4 vs K = 64.


def rollout_inputs(config, batch_size, horizon, device, context_frames=1):
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(batch_size, context_frames, config.num_tokens, config.token_dim, generator=generator)
    actions = torch.randn(batch_size, horizon, config.action_dim, generator=generator)
    return context.to(device), actions.to(device)


def bench_rollout(preset, batch_size, horizons, device, repeats, recompute_up_to):
    torch.manual_seed(0)
    model = DynamicsModel(bench_config(preset)).to(device).eval()
    precision = device_precision(device)
    results = []
    for horizon in horizons:
        context, actions = rollout_inputs(model.config, batch_size, horizon, device)
        entry = dict(preset=preset, batch_size=batch_size, horizon=horizon, precision=precision)
        # recomputation is quadratic: only up to the horizon the caller can afford; timed in turn with the cache
        names = ["cached", "recomputed"] if horizon <= recompute_up_to else ["cached"]
        with autocast(device, precision):
            timings = measure_interleaved([functools.partial(rollout, model, context, actions, K=4,
                                                             use_cache=name == "cached") for name in names],
                                          device, repeats)
        for name, timing in zip(names, timings):
            entry[f"{name}_per_frame"] = timing["seconds"] / horizon
            entry[f"{name}_peak_bytes"] = timing["peak_bytes"]
        results.append(entry)
    return results


def bench_sampling_steps(preset, batch_size, horizon, device, repeats):
    torch.manual_seed(0)
    model = DynamicsModel(bench_config(preset)).to(device).eval()
    context, actions = rollout_inputs(model.config, batch_size, horizon, device)
    precision = device_precision(device)
    with autocast(device, precision):
        timings = measure_interleaved([functools.partial(rollout, model, context, actions, K=K) for K in (4, 64)],
                                      device, repeats)
    return [dict(preset=preset, batch_size=batch_size, K=K, precision=precision, per_frame=timing["seconds"] / horizon,
                 peak_bytes=timing["peak_bytes"]) for K, timing in zip((4, 64), timings)]


# ----------------------------------------------------------------------------------------------
# 5. One CEM MPC step.


def bench_cem(preset, device, repeats, samples=300, horizon=5, iterations=10, loop_candidates=4):
    """One plan at K = 4 and at K = 1 in the precision plan.py uses on this device (fp32 on CPU, bf16
    on a GPU), on CPU also at K = 1 in bf16; each plan's FLOPs are counted (its FLOP bound is computed
    in write_full_report, from the best matmul rate of its precision). The slow alternative of the
    first: one rollout per candidate. On CPU, where each plan's time goes: the share of it inside
    matrix products, profiled in one more plan of at most 2 iterations (every iteration does the same
    work)."""
    torch.manual_seed(0)
    model = DynamicsModel(bench_config(preset)).to(device).eval()
    config = model.config
    stats = data.ActionStats(torch.zeros(7), torch.ones(7))
    context = (torch.randn(2, config.num_tokens, config.token_dim, device=device), None)  # 2 action-free frames
    goal = torch.randn(config.num_tokens, config.token_dim, device=device)
    default = device_precision(device)  # plan.py's precision on this device
    variants = ((4, default), (1, default)) + (((1, "bf16"),) if default != "bf16" else ())
    world_models = [LearnedModel(model, None, None, stats, K=K, precision=precision) for K, precision in variants]

    def planner(world_model, iterations):
        return CEMPlanner(world_model, horizon=horizon, samples=samples, top_k=samples // 10, iterations=iterations)

    plans = [functools.partial(planner(world_model, iterations).plan, context, goal) for world_model in world_models]
    flops = [count_flops(model, plan) for plan in plans]
    timings = measure_interleaved(plans, device, repeats)  # the plans in turn
    results = [dict(preset=preset, samples=samples, horizon=horizon, iterations=iterations, K=K,
                    precision=precision, seconds=timing["seconds"], flops=count, peak_bytes=timing["peak_bytes"])
               for (K, precision), count, timing in zip(variants, flops, timings)]
    if device.type == "cpu":  # on a GPU the calls return before their kernels run: the profile would not tell
        for entry, world_model in zip(results, world_models):
            entry["matmul_share"] = matmul_share(functools.partial(planner(world_model, min(iterations, 2)).plan,
                                                                   context, goal))
    # the slow alternative of the first: one rollout per candidate; timed on a few, scaled to samples x iterations
    one_by_one = CEMPlanner(LearnedModel(model, None, None, stats, K=4, precision=default), horizon=horizon,
                            samples=1, top_k=1, iterations=1)
    single = measure(lambda: [one_by_one.score(context, goal, torch.zeros(1, horizon, 7))
                              for _ in range(loop_candidates)], device, repeats)
    results[0]["looped_seconds"] = single["seconds"] / loop_candidates * samples * iterations
    return results


# ----------------------------------------------------------------------------------------------
# 6. Data: decoding + DINOv2 on the fly vs the feature cache.


def bench_encoders(work, quick):
    """(label, folder, pool): the toy's tiny DINOv2 and, unless quick, a DINOv2-S-sized one (random weights)."""
    encoders = [("tiny DINOv2 (toy, 64 px)", encoder_module.make_tiny_dinov2(os.path.join(work, "dinov2_tiny")),
                 encoder_module.TOY_POOL)]
    if not quick:
        encoders.append(("DINOv2-S size (224 px)", encoder_module.make_tiny_dinov2(
            os.path.join(work, "dinov2_small"), image_size=224, patch_size=14, hidden_size=384, layers=12, heads=6,
            registers=4), 2))
    return encoders


def bench_data(work, device, batches, quick):
    """Clips/s (8 frames each, batch 8) of the toy dataset through both paths."""
    root = sim.write_toy_dataset(os.path.join(work, "toy"), episodes=4, steps_per_episode=40, seed=3)
    results = []
    for label, path, pool in bench_encoders(work, quick):
        frozen = encoder_module.Encoder(path, pool=pool).to(device)
        cache = os.path.join(work, f"cache_{len(results)}")
        encoder_module.write_feature_cache(root, cache, frozen, data.CAMERA_KEY, batch_size=32, device=device)
        on_the_fly = data.ClipDataset(root, role="unlabeled", image_size=frozen.image_size)
        cached = data.ClipDataset(root, role="unlabeled", image_size=frozen.image_size, feature_cache=cache)

        def read(dataset, encode):
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0))
            for index, batch in enumerate(loader):
                if index == batches:
                    break
                if encode:
                    frames = batch["frames"].to(device)  # (B, T, 3, H, W)
                    frozen(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # (B, T, N, D)
                else:
                    batch["tokens"].to(device)

        entry = dict(encoder=label, clips=batches * 8, clip_length=on_the_fly.clip_length)
        for name, dataset, encode in (("on_the_fly", on_the_fly, True), ("cached", cached, False)):
            timing = measure(lambda: read(dataset, encode), device, repeats=1, warmup=0)  # reading is slow: once
            entry[f"{name}_clips_per_s"] = batches * 8 / timing["seconds"]
            entry[f"{name}_peak_bytes"] = timing["peak_bytes"]
        results.append(entry)
    return results


def bench_encoding(work, device, quick):
    """Frames/s of one process encoding AV1 video into a feature cache: episodes decoded front to
    back (encoder.py), also with 2 decoding workers, against one seek per frame (LeRobotDataset item
    by item); and of 2 shard processes sharing this machine's threads. Shards are independent
    processes: n of them encode n times as fast where there are n times the devices. Every path is
    timed from the dataset's folder, opening the dataset included (~0.1-0.3 s here, a large share
    of the few frames measured); decoding alone, without DINOv2, is timed both ways too."""
    root = sim.write_toy_dataset(os.path.join(work, "toy_av1"), episodes=4, steps_per_episode=40, seed=4, video=True)
    total = data.load_metadata(root)[3].total_frames
    results = []
    for label, path, pool in bench_encoders(work, quick):
        frozen = encoder_module.Encoder(path, pool=pool).to(device)

        def per_frame(encode=True):
            frames = data.ClipDataset(root, role="unlabeled", clip_length=1, image_size=frozen.image_size)
            for batch in torch.utils.data.DataLoader(frames, batch_size=32):
                if encode:
                    frozen(batch["frames"][:, 0].to(device))

        def decode_in_order():
            repo_id, local_root, _, metadata = data.load_metadata(root)
            chunks = encoder_module.EpisodeFrames(repo_id, local_root, metadata, data.CAMERA_KEY, frozen.image_size,
                                                  range(metadata.total_episodes), chunk=32)
            for k in range(len(chunks)):
                chunks[k]

        def in_order(workers):
            return lambda: encoder_module.write_feature_cache(root, os.path.join(work, "encoded"), frozen,
                                                              data.CAMERA_KEY, batch_size=32, num_workers=workers,
                                                              device=device, overwrite=True)

        entry = dict(encoder=label, frames=total)
        for name, run in (("in_order", in_order(0)), ("workers", in_order(2)), ("per_frame", per_frame),
                          ("decode_in_order", decode_in_order), ("decode_per_frame", lambda: per_frame(encode=False))):
            timing = measure(run, device, repeats=1, warmup=0)  # decoding is slow: once
            entry[f"{name}_frames_per_s"], entry[f"{name}_peak_bytes"] = total / timing["seconds"], timing["peak_bytes"]
        entry["shards_frames_per_s"] = total / encode_in_shards(root, os.path.join(work, "sharded"), path, pool, device)
        results.append(entry)
    return results


def encode_in_shards(root, out, encoder_path, pool, device, shards=2):
    """Seconds for `shards` processes (--shard i/n), each with 1/n of the CPU threads, to write one
    cache together: timed from when every process has loaded its model to when the last one ends
    (the one that finds every episode done finishes the cache)."""
    context = torch.multiprocessing.get_context("spawn")
    ready = context.Barrier(shards + 1)
    threads = max(1, torch.get_num_threads() // shards)
    processes = [context.Process(target=encode_shard, args=(root, out, encoder_path, pool, str(device), (i, shards),
                                                            threads, ready)) for i in range(shards)]
    for process in processes:
        process.start()
    ready.wait()
    start = time.perf_counter()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - start
    if any(process.exitcode != 0 for process in processes) or not os.path.isdir(out):
        raise RuntimeError(f"a shard process failed (exit codes {[process.exitcode for process in processes]})")
    return seconds


def encode_shard(root, out, encoder_path, pool, device, shard, threads, ready):
    """One shard process of encode_in_shards."""
    torch.set_num_threads(threads)
    frozen = encoder_module.Encoder(encoder_path, pool=pool).to(device)
    ready.wait()
    encoder_module.write_feature_cache(root, out, frozen, data.CAMERA_KEY, batch_size=32, device=device,
                                       overwrite=True, shard=shard)


# ----------------------------------------------------------------------------------------------
# The report.


def megabytes(value):
    return "n/a" if value is None else f"{value / 2 ** 20:.0f} MB"


def milliseconds(value):
    return f"{value * 1e3:.1f} ms" if value < 10 else f"{value:.1f} s"


def markdown_table(title, columns, rows):
    """A '## title' section with a Markdown table: columns (names), rows (lists of cell strings);
    nothing when there are no rows (a figure a run cut short did not reach)."""
    if not rows:
        return []
    return ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def attention_reference(report, entry):
    """The plain-attention row an attention row's speed-up is measured against."""
    return next(e for e in report["attention"] if e["preset"] == entry["preset"] and e["kind"] == entry["kind"]
                and e["backend"] == "plain" and e["soft_cap"] == entry["soft_cap"])


def write_report(path, lines, report, echo=True):
    """The Markdown `lines` to `path`, the `report` as JSON beside it; printed and named if `echo`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as file:
        json.dump(report, file, indent=1)
    if echo:
        print("\n".join(lines))
        print(f"wrote {path}")


def markdown_intro(report):
    machine = report["machine"]
    return (
        f"Written by `python bench.py{' --quick' if report['quick'] else ''}` on {report['date']}. "
        f"Machine: {machine['device_name']}, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"Python {machine['python']}. Measured matmul rate: **{machine['matmul_gflops']:.1f} GFLOP/s** "
        f"({machine['matmul_dtype']}, n = {machine['matmul_n']}; the best run, at the start and after each training "
        f"figure; MFU is against the rate of its precision: bf16 {machine['matmul_gflops_by_precision']['bf16']:.1f}, "
        f"fp32 {machine['matmul_gflops_by_precision']['fp32']:.1f}, each also measured after the planning figures, "
        f"which are compared with them too). Each figure: median of {report['repeats']} "
        "runs after warm-up. Peak memory on CPU: resident memory above the start, in one extra run after malloc "
        "handed back the memory it kept (n/a: under 1 MB, or not Linux)."
        + (f" Only the figures asked for (`--only`): {', '.join(report['only'])}." if report.get("only") else "")
        + cut_short_note(report))


def cut_short_note(report):
    """What the report of a run stopped early says: the figure it stopped in, or the last it finished."""
    if report["complete"]:
        return ""
    if report.get("running"):  # stopped inside a figure: its rows shown are the presets it finished
        return f" **Cut short**: this run stopped in its {report['running']} figure (its rows shown are complete)."
    return f" **Cut short**: this run stopped after its {report['measured'][-1]} figure."


def model_tables(report):
    lines = []
    lines += markdown_table(
        "Training step (forward + backward + AdamW)",
        ["preset", "params", "batch × frames", "precision", "torch.compile", "s/step", "frames/s", "tokens/s",
         "GFLOP/step", "MFU", "peak mem"],
        [[e["preset"], f"{e['parameters'] / 1e6:.2f} M", f"{e['batch_size']} × {e['frames']}", e["precision"],
          "yes" if e["compiled"] else "no", f"{e['seconds']:.3f}", f"{e['frames_per_s']:.0f}",
          f"{e['tokens_per_s']:.0f}", f"{e['flops_per_step'] / 1e9:.1f}", f"{e['mfu'] * 100:.0f} %",
          megabytes(e["peak_bytes"])]
         for e in report.get("training", [])])
    lines += markdown_table(
        "Attention kernels (fused vs the plain reference)",
        ["preset", "layer", "rows × length", "precision", "backend", "soft cap", "forward", "fwd + bwd",
         "fwd speed-up", "fwd+bwd speed-up"],
        [[e["preset"], e["kind"], f"{e['rows']} × {e['length']}", e["precision"], e["backend"], f"{e['soft_cap']:g}",
          milliseconds(e["forward"]), milliseconds(e["forward_backward"]),
          f"{attention_reference(report, e)['forward'] / e['forward']:.2f}×",
          f"{attention_reference(report, e)['forward_backward'] / e['forward_backward']:.2f}×"]
         for e in report.get("attention", [])])
    lines += markdown_table(
        "Rollout: time per generated frame, KV cache vs recomputing the past (K = 4)",
        ["preset", "batch", "horizon", "precision", "cached", "recomputed", "speed-up", "peak mem cached",
         "peak mem recomputed"],
        [[e["preset"], str(e["batch_size"]), str(e["horizon"]), e["precision"],
          milliseconds(e["cached_per_frame"]),
          milliseconds(e["recomputed_per_frame"]) if e.get("recomputed_per_frame") else "not run",
          f"{e['recomputed_per_frame'] / e['cached_per_frame']:.1f}×" if e.get("recomputed_per_frame") else "",
          megabytes(e["cached_peak_bytes"]),
          megabytes(e.get("recomputed_peak_bytes")) if e.get("recomputed_per_frame") else ""]
         for e in report.get("rollout", [])])
    lines += markdown_table(
        "Sampling steps per frame (KV cache)", ["preset", "batch", "K", "precision", "per frame", "peak mem"],
        [[e["preset"], str(e["batch_size"]), str(e["K"]), e["precision"], milliseconds(e["per_frame"]),
          megabytes(e["peak_bytes"])]
         for e in report.get("sampling", [])])
    reference = {e["preset"]: e for e in report.get("cem", []) if "looped_seconds" in e}
    lines += markdown_table(
        "One CEM MPC step (one plan): batched, and against its FLOP bound (its FLOPs at the measured matmul rate of "
        "its precision)",
        ["preset", "samples × horizon × iterations", "K", "precision", "one plan", "GFLOP", "FLOP bound",
         "time / bound", "of which in matmuls / the rest", "speed-up vs K = 4", "one rollout per candidate",
         "peak mem"],
        [[e["preset"], f"{e['samples']} × {e['horizon']} × {e['iterations']}", str(e["K"]), e["precision"],
          f"{e['seconds']:.2f} s", f"{e['flops'] / 1e9:.0f}", f"{e['bound_seconds']:.2f} s",
          f"{e['seconds'] / e['bound_seconds']:.1f}×",
          f"{e['matmul_share'] * e['seconds'] / e['bound_seconds']:.1f}× / "
          f"{(1 - e['matmul_share']) * e['seconds'] / e['bound_seconds']:.1f}×" if "matmul_share" in e else "",
          f"{reference[e['preset']]['seconds'] / e['seconds']:.1f}×",
          f"{e['looped_seconds']:.1f} s (scaled from a few; {e['looped_seconds'] / e['seconds']:.0f}× slower)"
          if "looped_seconds" in e else "", megabytes(e["peak_bytes"])] for e in report.get("cem", [])])
    return lines


def data_tables(report):
    lines = []
    lines += markdown_table(
        "Data: clips of 8 frames per second (toy dataset, PNG frames)",
        ["encoder", "LeRobot frames + DINOv2 on the fly", "feature cache", "speed-up", "peak mem on the fly",
         "peak mem cached"],
        [[e["encoder"], f"{e['on_the_fly_clips_per_s']:.1f}", f"{e['cached_clips_per_s']:.0f}",
          f"{e['cached_clips_per_s'] / e['on_the_fly_clips_per_s']:.0f}×", megabytes(e["on_the_fly_peak_bytes"]),
          megabytes(e["cached_peak_bytes"])] for e in report.get("data", [])])
    lines += markdown_table(
        "Encoding video into the feature cache: frames/s (AV1, 4 episodes x 40 frames)",
        ["encoder", "episodes in order (encoder.py)", "in order, 2 decoding workers", "one seek per frame",
         "speed-up (in order)", "2 shards, 2 processes (half the threads each)",
         "decoding alone: in order / one seek per frame", "peak mem in order"],
        [[e["encoder"], f"{e['in_order_frames_per_s']:.0f}", f"{e['workers_frames_per_s']:.0f}",
          f"{e['per_frame_frames_per_s']:.0f}", f"{e['in_order_frames_per_s'] / e['per_frame_frames_per_s']:.1f}×",
          f"{e['shards_frames_per_s']:.0f}",
          f"{e['decode_in_order_frames_per_s']:.0f} / {e['decode_per_frame_frames_per_s']:.0f}",
          megabytes(e["in_order_peak_bytes"])] for e in report.get("encoding", [])])
    return lines


def write_full_report(path, report, rates, echo):
    """The figures measured so far, with MFU and FLOP bounds against the best matmul rate seen so far."""
    best = {precision: max(measured) for precision, measured in rates.items()}  # the best of every measurement
    report["machine"].update(matmul_gflops=best[report["machine"]["matmul_dtype"]] / 1e9,
                             matmul_gflops_by_precision={p: rate / 1e9 for p, rate in best.items()})
    for entry in report.get("training", []):
        entry["mfu"] = entry["flops_per_s"] / best[entry["precision"]]
    for entry in report.get("cem", []):
        entry["bound_seconds"] = entry["flops"] / best[entry["precision"]]
    write_report(path, ["# Benchmarks", "", markdown_intro(report)] + model_tables(report) + data_tables(report),
                 report, echo)


def peer_report(args, device):
    """bench.py --peer: peer.py's side-by-side training step at the tiny and small presets, written to
    BENCHMARKS_PEER.md/.json (on a GPU BENCHMARKS_PEER_CUDA.md/.json)."""
    version = peer_module.peer_available()
    if version is None:
        raise SystemExit(f"error: the peer implementation is not installed: pip install {peer_module.PEER}=="
                         f"{peer_module.PEER_VERSION} in a separate environment (peer.py says how); nothing measured")
    precision = device_precision(device)
    sizes = dict(tiny=(16, 20), small=(8 if device.type == "cuda" else 2, 8))  # batch, timed steps per model
    results = []
    for preset in ["tiny"] if args.quick else ["tiny", "small"]:
        batch_size, steps = sizes[preset]
        print(f"[bench] peer, {preset} ...", file=sys.stderr, flush=True)
        results.append(dict(preset=preset, **peer_module.bench_peer(
            bench_config(preset), batch_size, 8, device, args.repeats or (3 if args.quick else steps), precision)))
    report = dict(date=time.strftime("%Y-%m-%d"), peer=f"{peer_module.PEER} {version}",
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                  threads=torch.get_num_threads(), results=results)
    rows = [[e["preset"], f"{e['batch_size']} × {e['frames']}", e["precision"],
             *(f"{e[name]['seconds']:.3f} s ({e[name]['trained_parameters'] / 1e6:.2f} M)"
               for name in ("ours", "peer", "peer lean")),
             f"{e['peer']['seconds'] / e['ours']['seconds']:.2f}×", f"{e['peer lean']['seconds'] / e['ours']['seconds']:.2f}×"]
            for e in results]
    lines = ["# Benchmarks: our training step beside the peer's", "",
             f"Written by `python bench.py --peer` on {report['date']} ({device}, {report['threads']} torch threads), "
             f"peer: {report['peer']} (peer.py: what is compared, what differs). Mean seconds per training step "
             f"(forward + backward + AdamW) over {', '.join(str(e['steps']) for e in results)} steps of each, "
             "interleaved; parameters that get a gradient in brackets; throughput ratio = peer time / our time."]
    lines += markdown_table("Training step", ["preset", "batch × frames", "precision", "ours", "peer (default)",
                                              "peer (lean)", "throughput, ours / peer", "ours / peer lean"], rows)
    write_report(args.out or ("BENCHMARKS_PEER_CUDA.md" if device.type == "cuda" else "BENCHMARKS_PEER.md"), lines,
                 report)
    return 0


FIGURES = ["training", "attention", "rollout", "sampling", "data", "encoding", "cem"]  # the order they run in


def build_argument_parser():
    parser = argparse.ArgumentParser(description="Measure training, attention, rollout, planning and data speed and "
                                                 "memory; write BENCHMARKS.md and BENCHMARKS.json.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset and small sizes only (under 1.5 minutes on 2 CPU cores)")
    parser.add_argument("--out", help="Markdown report, the JSON beside it (written after each preset of each figure, "
                                      "so a run cut short keeps what it measured); if not given, BENCHMARKS.md "
                                      "(--peer: BENCHMARKS_PEER.md; --device cuda: BENCHMARKS_CUDA.md, "
                                      "BENCHMARKS_PEER_CUDA.md; with --only or --presets: BENCHMARKS_PARTIAL.md, "
                                      "BENCHMARKS_CUDA_PARTIAL.md)")
    parser.add_argument("--peer", action="store_true", help="only our training step side by side with the peer "
                                                             "implementation's (peer.py; needs dreamer4 installed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (bf16 autocast, flex_attention, the droid preset too)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure; if not given, 5 (--quick: 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads; if not given, torch's choice")
    parser.add_argument("--only", nargs="+", choices=FIGURES, metavar="FIGURE",
                        help=f"measure only these figures (in this order: {' '.join(FIGURES)}); if not given, all")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), metavar="PRESET",
                        help="model presets of the model figures (tiny, small, droid); if not given, tiny and small "
                             "(and droid on a GPU; --quick: tiny)")
    parser.add_argument("--compile", action="store_true", help="also time flex_attention / compiled attention on CPU "
                                                               "(needs a C++ compiler; compiles for minutes)")
    return parser


def figure_runs(args, device, repeats, rates, matmul_n):
    """What each figure measures on this device, at sizes it can afford: (name, run) in FIGURES' order,
    run(work) yielding the figure's rows one preset at a time (work: a scratch folder for datasets)."""
    presets = args.presets or (["tiny"] if args.quick else ["tiny", "small"] + (["droid"] if device.type == "cuda" else []))
    # batch sizes: tiny as the demo trains it (--quick: 4, as bf16 steps are slow on CPUs without bf16 matmul
    # units); larger presets smaller on CPU so the bench ends in minutes
    training_batch = dict(tiny=4 if args.quick else 16, small=8 if device.type == "cuda" else 2, droid=8)
    frames = 8
    backends = [("plain", 50.0), ("plain", 0.0), ("sdpa", 0.0)]
    if device.type == "cuda" or args.compile:
        backends += [("flex", 50.0)]
    # On CPU the larger presets are timed once (after one warm-up): a figure of theirs takes minutes.
    # A CEM step at DINO-WM's size imagines 300 x 5 frames 10 times: on CPU the tiny preset once, and the
    # larger presets (their time / bound ratio) at 64 samples x 1 iteration; --quick: 30 x 1 for every preset.
    runs = {p: repeats if p == "tiny" or device.type == "cuda" else 1 for p in presets}
    plan_sizes = {p: dict(samples=30, iterations=1) if args.quick
                  else dict(samples=64, iterations=1) if device.type != "cuda" and p != "tiny"
                  else dict(samples=300, iterations=10) for p in presets}
    # rollouts: (preset, batch, horizons, recompute up to); the tiny preset also at a planner's batch
    rollout_sizes = [(p, 4 if p != "droid" else 16, [4, 8] if args.quick else [4, 8, 16, 32],
                      8 if args.quick else dict(tiny=32, small=16).get(p, 8)) for p in presets] + (
        [("tiny", 64, [16], 16)] if "tiny" in presets and not args.quick else [])
    # training: each preset in the device's precision; the tiny preset compiled too (train.py --compile; not
    # --quick: compiling takes minutes on 2 CPU cores); on CPU the tiny preset in bf16 autocast too
    training_precision = device_precision(device)
    trained = [(p, training_precision, False) for p in presets] + (
        [("tiny", training_precision, True)] if "tiny" in presets and not args.quick else []) + (
        [("tiny", "bf16", False)] if device.type != "cuda" and "tiny" in presets else [])
    steps = [("training", lambda work: ([bench_training(p, training_batch[p], frames, device, runs[p],
                                                        lambda: rates[precision].append(
                                                            matmul_rate(device, matmul_n, repeats, DTYPES[precision])),
                                                        precision, compiled)] for p, precision, compiled in trained)),
             ("attention", lambda work: (bench_attention(p, training_batch[p], frames, device, runs[p], backends)
                                         for p in presets)),
             ("rollout", lambda work: (bench_rollout(p, batch, horizons, device, runs[p], recompute_up_to)
                                       for p, batch, horizons, recompute_up_to in rollout_sizes)),
             ("sampling", lambda work: (bench_sampling_steps(p, 4, 2, device, runs[p]) for p in presets)),
             ("data", lambda work: [bench_data(work, device, batches=2 if args.quick else 4, quick=args.quick)]),
             ("encoding", lambda work: [bench_encoding(work, device, quick=args.quick)]),
             ("cem", lambda work: (bench_cem(p, device, runs[p] if args.quick or device.type == "cuda" else 1,
                                             **plan_sizes[p]) for p in presets))]
    assert [name for name, _ in steps] == FIGURES  # the costliest figure (CEM) last: a run cut short keeps the others
    return [(name, run) for name, run in steps if not args.only or name in args.only]


def main(argv=None):
    args = build_argument_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.peer:
        return peer_report(args, device)
    partial = "_PARTIAL" if args.only or args.presets else ""  # a subset never replaces the full report
    args.out = args.out or f"BENCHMARKS{'_CUDA' if device.type == 'cuda' else ''}{partial}.md"
    repeats = args.repeats or (2 if args.quick else 5)
    matmul_n = 4096 if device.type == "cuda" else (512 if args.quick else 1024)
    rates = {name: [matmul_rate(device, matmul_n, repeats, dtype)] for name, dtype in DTYPES.items()}
    machine = dict(device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                   threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                   matmul_n=matmul_n, matmul_dtype=device_precision(device))
    report = dict(date=time.strftime("%Y-%m-%d"), quick=args.quick, repeats=repeats, machine=machine, measured=[],
                  only=[name for name in FIGURES if name in args.only] if args.only else None)
    steps = figure_runs(args, device, repeats, rates, matmul_n)
    with tempfile.TemporaryDirectory(prefix="bench_") as work:
        for name, run in steps:
            start = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            report[name], report["running"], report["complete"] = [], name, False
            for rows in run(work):  # a run cut short keeps every preset measured so far
                report[name] += rows
                write_full_report(args.out, report, rates, echo=False)
            print(f"[bench] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            if name == "cem":  # the rates again, right after the planning figures
                for precision, dtype in DTYPES.items():
                    rates[precision].append(matmul_rate(device, matmul_n, repeats, dtype))
            report["measured"].append(name)
            report["running"], report["complete"] = None, name == steps[-1][0]
            write_full_report(args.out, report, rates, echo=report["complete"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
