"""Every test of the project. `python test_all.py` runs them all (through pytest) and exits non-zero
on any failure. Tests run offline: they build a tiny DINOv2 from a config and write tiny toy datasets
with lerobot itself (sim.py), then load both through the same code paths a hub id would take."""
import os
import sys

# Offline and reproducible before anything imports huggingface or torch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
HERE = os.path.dirname(os.path.abspath(__file__))

# ==== fixtures ====
# Written once per test session with lerobot itself, loaded through the same code path as a hub id.


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    import encoder
    return encoder.make_tiny_dinov2(str(tmp_path_factory.mktemp("dinov2") / "tiny"))


@pytest.fixture(scope="session")
def toy_labeled_root(tmp_path_factory):
    import sim
    return sim.write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "labeled"), episodes=5, steps_per_episode=20,
                                 seed=1)


@pytest.fixture(scope="session")
def toy_unlabeled_root(tmp_path_factory):
    import sim
    return sim.write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "unlabeled"), episodes=6,
                                 steps_per_episode=20, seed=2)


# ==== sim ====

# ==== data ====

# ==== encoder ====

# ==== dynamics ====

import dynamics
from dynamics import DynamicsConfig, DynamicsModel

# Eager flex_attention computes the same maths as the compiled kernel (from the same score_mod),
# without the compile wait: tests swap `dynamics.compiled` for the identity to use it.
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def small_dynamics_config(**overrides):
    """Two space and two time layers, GQA, soft cap small enough to bite: built in milliseconds."""
    base = dict(token_dim=8, num_tokens=4, width=32, depth=4, heads=4, kv_heads=2, num_registers=2,
                time_every=2, max_frames=12, k_max=8, soft_cap=2.0, dh_width=64)
    return DynamicsConfig(**{**base, **overrides})


def dynamics_inputs(config, batch=2, frames=5, seed=0):
    """Random noisy tokens, grid levels, actions and a mixed action mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, config.num_tokens, config.token_dim, generator=generator)
    k = 2 ** torch.randint(0, 4, (batch, frames), generator=generator)
    tau = torch.floor(torch.rand(batch, frames, generator=generator) * k) / k
    actions = torch.randn(batch, frames, config.action_dim, generator=generator)
    mask = torch.arange(batch) % 2 == 0
    return x, tau, 1.0 / k, actions, mask


def seeded_model(config, seed=0):
    torch.manual_seed(seed)
    return DynamicsModel(config).eval()


@EAGER_FLEX
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dynamics_attention_kernels_match_reference(kv_heads, monkeypatch):
    monkeypatch.setattr(dynamics, "compiled", lambda function: function)
    generator = torch.Generator().manual_seed(0)
    for causal in (False, True):
        for queries, keys in ((6, 6), (2, 6), (1, 6)):  # training, cache + 2 new frames, one new frame
            q = 4 * torch.randn(3, 4, queries, 16, generator=generator)  # large logits: the cap matters
            k, v = torch.randn(2, 3, kv_heads, keys, 16, generator=generator)
            reference = dynamics.plain_attention(q, k, v, causal and queries > 1, 0.0)
            torch.testing.assert_close(dynamics.attend(q, k, v, causal, 0.0, "sdpa"), reference, atol=1e-5, rtol=1e-5)
            capped = dynamics.plain_attention(q, k, v, causal and queries > 1, 2.0)
            assert (capped - reference).abs().max() > 1e-2  # the cap changes the result ...
            torch.testing.assert_close(dynamics.attend(q, k, v, causal, 2.0, "flex"), capped, atol=1e-5, rtol=1e-5)
    # bottom-right causal mask: the last query sees every key, the first sees keys 0..Tk-Tq
    mask = dynamics.causal_mask(2, 6, "cpu")
    assert mask[1].all() and mask[0].tolist() == [True] * 5 + [False]


@EAGER_FLEX
@pytest.mark.parametrize("kv_heads,head", [(4, "linear"), (2, "linear"), (2, "dh")])
def test_dynamics_model_backends_match_reference(kv_heads, head, monkeypatch):
    """Space and time layers (and the DH head) give the plain result with every fused path."""
    monkeypatch.setattr(dynamics, "compiled", lambda function: function)
    for soft_cap, backend in ((0.0, "sdpa"), (2.0, "flex"), (0.0, "auto"), (2.0, "auto")):
        reference = seeded_model(small_dynamics_config(kv_heads=kv_heads, head=head, soft_cap=soft_cap, attention="plain"))
        fused = seeded_model(small_dynamics_config(kv_heads=kv_heads, head=head, soft_cap=soft_cap, attention=backend))
        inputs = dynamics_inputs(reference.config)
        with torch.no_grad():
            torch.testing.assert_close(fused(*inputs), reference(*inputs), atol=1e-5, rtol=1e-5)


def test_dynamics_compiled_paths_match_reference():
    """The CPU fused paths for real: compiled plain attention (forward and backward) and compiled
    flex_attention (forward; its backward does not compile on CPU, see dynamics.py)."""
    generator = torch.Generator().manual_seed(0)
    q = (4 * torch.randn(2, 4, 8, 16, generator=generator)).requires_grad_()
    k, v = torch.randn(2, 2, 2, 8, 16, generator=generator)
    reference = dynamics.plain_attention(q, k, v, True, 2.0)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), q)
    compiled = dynamics.attend(q, k, v, True, 2.0, "compiled")
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), q)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, reference_grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(dynamics.attend(q, k, v, True, 2.0, "flex"), reference, atol=1e-5, rtol=1e-5)


def test_dynamics_block_causal():
    """Changing frame t+1 (tokens, levels or action) never changes an output at frames <= t."""
    model = seeded_model(small_dynamics_config())
    x, tau, d, actions, mask = dynamics_inputs(model.config, frames=5)
    mask[:] = True
    with torch.no_grad():
        base = model(x, tau, d, actions, mask)
        for t in range(4):
            changed = [tensor.clone() for tensor in (x, tau, d, actions)]
            changed[0][:, t + 1] += 1.0
            changed[1][:, t + 1] = 1 - changed[1][:, t + 1]
            changed[2][:, t + 1] = 1.0
            changed[3][:, t + 1] += 1.0
            out = model(*changed, mask)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3


def test_dynamics_kv_cache_matches_recompute():
    model = seeded_model(small_dynamics_config())
    x, tau, d, actions, mask = dynamics_inputs(model.config, frames=6)
    frames = lambda start, end: (x[:, start:end], tau[:, start:end], d[:, start:end], actions[:, start:end], mask)
    with torch.no_grad():
        full = model(x, tau, d, actions, mask)
        cache = model.new_cache(batch_size=2)
        torch.testing.assert_close(model(*frames(0, 2), cache=cache), full[:, :2], atol=1e-5, rtol=1e-5)
        for t in (2, 3):  # a denoising pass on other tokens must leave the cache untouched
            model(torch.randn_like(x[:, t:t + 1]), *frames(t, t + 1)[1:], cache=cache, append=False)
            assert cache.length == t
            torch.testing.assert_close(model(*frames(t, t + 1), cache=cache), full[:, t:t + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(*frames(4, 6), cache=cache), full[:, 4:6], atol=1e-5, rtol=1e-5)  # 2 at once
        assert cache.length == 6
        with pytest.raises(ValueError, match="KV cache"):
            for _ in range(7):
                model(*frames(0, 1), cache=cache)


def test_dynamics_actions_and_mask():
    model = seeded_model(small_dynamics_config())
    x, tau, d, actions, mask = dynamics_inputs(model.config, batch=2)  # row 0 labelled, row 1 not
    with torch.no_grad():
        base = model(x, tau, d, actions, mask)
        moved = model(x, tau, d, actions + 1.0, mask)
        assert (moved[0] - base[0]).abs().max() > 1e-3  # labelled: the action matters
        torch.testing.assert_close(moved[1], base[1])  # unlabelled: the "no action" embedding alone
        per_frame = mask[:, None].expand(2, x.shape[1]).clone()
        torch.testing.assert_close(model(x, tau, d, actions, per_frame), base)  # (B,) == (B, T) mask
        per_frame[0, 2:] = False  # frames 2.. of row 0 unlabelled: frames 0, 1 unchanged
        mixed = model(x, tau, d, actions, per_frame)
        torch.testing.assert_close(mixed[0, :2], base[0, :2])
        assert (mixed[0, 2:] - base[0, 2:]).abs().max() > 1e-3
        zero = torch.zeros_like(actions)  # a labelled zero action ("did not move") is not "unknown"
        labelled, unlabelled = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
        assert (model(x, tau, d, zero, labelled) - model(x, tau, d, zero, unlabelled)).abs().max() > 1e-3


def test_dynamics_presets_shapes_and_config_errors(capsys, monkeypatch):
    config = DynamicsConfig.preset("tiny")
    assert (config.num_tokens, config.token_dim, config.tokens_per_frame) == (16, 64, 22)
    for head in ("linear", "dh"):
        model = seeded_model(DynamicsConfig.preset("tiny", head=head))
        x, tau, d, actions, mask = dynamics_inputs(model.config, batch=2, frames=3)
        with torch.no_grad():
            assert model(x, tau, d, actions, mask).shape == (2, 3, 16, 64)
    assert DynamicsModel(config).num_parameters() < 2_000_000  # trains in minutes on 2 CPU cores
    assert DynamicsConfig.preset("droid").num_tokens == 256 and DynamicsConfig.preset("droid").token_dim == 384
    with pytest.raises(ValueError, match="unknown preset"):
        DynamicsConfig.preset("huge")
    for bad in (dict(k_max=12), dict(kv_heads=3), dict(head="mlp"), dict(attention="sdpa", soft_cap=50.0)):
        with pytest.raises(ValueError):
            small_dynamics_config(**bad)
    monkeypatch.setattr(sys, "argv", ["dynamics.py", "--preset", "tiny"])
    dynamics.main()
    assert "M parameters" in capsys.readouterr().out

# ==== shortcut ====

import shortcut


class ConstantDataModel(torch.nn.Module):
    """The exact model for data that is one fixed clip `clean` (T, N, D): x̂1 = clean + offset
    (offset 0: perfect), as an x-output, or as the velocity that leads there for pred="v".
    Records the levels it is called with."""

    def __init__(self, clean, k_max, pred="x", offset=0.0):
        super().__init__()
        self.config = small_dynamics_config(k_max=k_max)
        self.clean, self.pred, self.offset, self.calls = clean, pred, offset, []

    def forward(self, x_tau, tau, d, actions, action_mask, cache=None, append=True):
        self.calls.append((tau.clone(), d.clone()))
        target = (self.clean[-x_tau.shape[1]:] + self.offset).expand_as(x_tau)
        tau = shortcut.per_token(tau)
        return target if self.pred == "x" else (target - x_tau) / (1 - tau)


def test_shortcut_x_and_v_identities():
    generator = torch.Generator().manual_seed(0)
    x1, x0, guess = torch.randn(3, 4, 5, 6, 8, generator=generator)
    tau = shortcut.per_token(torch.rand(4, 5, generator=generator) * 0.95)
    x_tau = (1 - tau) * x0 + tau * x1
    v = x1 - x0
    torch.testing.assert_close(shortcut.velocity(x1, x_tau, tau, "x"), v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shortcut.clean_estimate(v, x_tau, tau, "v"), x1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shortcut.velocity(v, x_tau, tau, "v"), v)
    v_guess = shortcut.velocity(guess, x_tau, tau, "x")  # the velocity an x-prediction implies
    torch.testing.assert_close((guess - x1).square(), (1 - tau) ** 2 * (v_guess - v).square(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pred,mode", [("x", "shortcut"), ("v", "shortcut"), ("x", "diffusion")])
def test_shortcut_exact_model_has_zero_loss(pred, mode):
    """On data that is a single clip, the exact model's flow loss is zero, and so is its bootstrap
    loss: all paths are straight lines, where two half steps equal one full step."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 8, generator=generator)
    model = ConstantDataModel(clean, k_max=8, pred=pred)
    z = clean.expand(8, 3, 4, 8)
    loss, parts = shortcut.shortcut_forcing_loss(model, z, torch.zeros(8, 3, 7), torch.ones(8, dtype=torch.bool),
                                                 bootstrap_fraction=0.5, pred=pred, mode=mode, generator=generator)
    assert loss.item() < 1e-10 and parts["flow"].item() < 1e-10 and parts["bootstrap"].item() < 1e-10
    assert len(model.calls) == (3 if mode == "shortcut" else 1)  # student + two half steps of the teacher


def test_shortcut_bootstrap_target_on_analytic_fields():
    """Two half steps of known velocity fields, worked out by hand."""
    generator = torch.Generator().manual_seed(0)
    x_tau = torch.randn(2, 3, 4, 8, generator=generator)
    tau = torch.tensor([[0.0, 0.25, 0.5], [0.5, 0.0, 0.75]])
    d = torch.tensor([[0.5, 0.25, 0.5], [0.25, 1.0, 0.25]])
    a, b = torch.randn(2, 4, 8, generator=generator)
    # v(x, τ) = a + b·τ, given as an x-prediction: b′ = a + bτ, b″ = a + b(τ + d/2): mean a + b(τ + d/4)
    teacher = lambda x, t, step, *rest: x + (1 - shortcut.per_token(t)) * (a + b * shortcut.per_token(t))
    target = shortcut.bootstrap_velocity(teacher, x_tau, tau, d, None, None, "x")
    torch.testing.assert_close(target, a + b * shortcut.per_token(tau + d / 4), atol=1e-5, rtol=1e-5)
    # v(x) = −x, given as a v-prediction: b′ = −x, x′ = x(1 − d/2), b″ = −x(1 − d/2): mean −x(1 − d/4)
    target = shortcut.bootstrap_velocity(lambda x, *rest: -x, x_tau, tau, d, None, None, "v")
    torch.testing.assert_close(target, -x_tau * (1 - shortcut.per_token(d) / 4), atol=1e-6, rtol=1e-6)


def test_shortcut_loss_weights_and_teacher():
    """Frame loss = w(τ)·error with w(τ) = 0.9τ + 0.1; bootstrap targets come from the EMA teacher."""
    clean = torch.zeros(4, 4, 8)
    z, actions, mask = clean.expand(16, 4, 4, 8), torch.zeros(16, 4, 7), torch.ones(16, dtype=torch.bool)
    for ramp in (True, False):
        student = ConstantDataModel(clean, k_max=8, offset=1.0)  # every x̂1 off by 1: squared error 1
        loss, parts = shortcut.shortcut_forcing_loss(student, z, actions, mask, ema_model=ConstantDataModel(clean, 8),
                                                     ramp=ramp, generator=torch.Generator().manual_seed(0))
        tau = student.calls[0][0]
        expected = 0.9 * tau + 0.1 if ramp else torch.ones_like(tau)
        torch.testing.assert_close(loss, expected.mean())
        torch.testing.assert_close(parts["bootstrap"], expected[:4].mean())  # 16 rows x 0.25 = 4 bootstrap rows
        torch.testing.assert_close(parts["flow"], expected[4:].mean())
        assert len(student.calls) == 1  # the student ran once; the teacher made the targets


def test_shortcut_grid_sampling():
    tau, d = shortcut.sample_levels(64, 8, k_max=16, bootstrap_rows=16, generator=torch.Generator().manual_seed(0))
    assert (d[16:] == 1 / 16).all()  # flow rows: d_min
    assert set((1 / d[:16]).round().int().unique().tolist()) == {1, 2, 4, 8}  # bootstrap rows: every d > d_min
    steps = tau / d
    assert torch.allclose(steps, steps.round()) and (tau >= 0).all() and (tau <= 1 - d).all()  # τ on its d-grid
    assert set((tau[16:] * 16).round().int().unique().tolist()) == set(range(16))  # the whole grid is used
    # plain diffusion forcing: no bootstrap rows at all
    model = ConstantDataModel(torch.zeros(2, 4, 8), k_max=16)
    _, parts = shortcut.shortcut_forcing_loss(model, torch.zeros(8, 2, 4, 8), torch.zeros(8, 2, 7),
                                              torch.ones(8, dtype=torch.bool), mode="diffusion")
    assert (model.calls[0][1] == 1 / 16).all() and parts["bootstrap"].item() == 0.0
    with pytest.raises(ValueError, match="pred"):
        shortcut.shortcut_forcing_loss(model, torch.zeros(8, 2, 4, 8), torch.zeros(8, 2, 7), None, pred="eps")


def test_shortcut_sampler_steps():
    noise = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def predict(x, tau, d):
        calls.append((tau, d))
        return target + x  # depends on x, so the steps matter

    torch.testing.assert_close(shortcut.sample_frame(predict, noise, 1), target + noise)  # K = 1: x̂1 from noise
    calls.clear()
    shortcut.sample_frame(predict, noise, 4)
    assert calls == [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25)]
    exact = shortcut.sample_frame(lambda x, tau, d: target, noise, 8)  # the straight path lands on the data
    torch.testing.assert_close(exact, target, atol=1e-5, rtol=1e-5)
    # sample_next with a real model: K = 1 is the model's x̂1 at τ = 0, d = 1; diffusion mode is told d_min
    model = seeded_model(small_dynamics_config())
    action = torch.randn(2, 1, 7)
    sample = shortcut.sample_next(model, None, action, K=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = model(torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 1),
                       torch.ones(2, 1), action, torch.ones(2, dtype=torch.bool))[:, 0]
    torch.testing.assert_close(sample, direct)
    recorder = ConstantDataModel(torch.zeros(1, 4, 8), k_max=8)
    shortcut.sample_next(recorder, None, action, K=2, mode="diffusion")
    assert all((d == 1 / 8).all() for _, d in recorder.calls)
    with pytest.raises(ValueError, match="power of two"):
        shortcut.sample_next(model, None, action, K=3)


@pytest.mark.parametrize("pred,mode", [("x", "shortcut"), ("v", "diffusion")])
def test_shortcut_rollout_cache_matches_recompute(pred, mode):
    model = seeded_model(small_dynamics_config())
    x, _, _, actions, _ = dynamics_inputs(model.config, batch=3, frames=6)
    context, future, context_actions = x[:, :2], actions[:, 2:], actions[:, :2]
    run = lambda **options: shortcut.rollout(model, context, future, K=4, pred=pred, mode=mode,
                                             generator=torch.Generator().manual_seed(0), **options)
    cached = run(context_actions=context_actions)
    assert cached.shape == (3, 4, 4, 8)
    torch.testing.assert_close(cached, run(context_actions=context_actions, use_cache=False), atol=1e-5, rtol=1e-5)
    unlabelled = run()  # context without actions: the "no action" embedding
    torch.testing.assert_close(unlabelled, run(use_cache=False), atol=1e-5, rtol=1e-5)
    assert (unlabelled - cached).abs().max() > 1e-4
    moved = shortcut.rollout(model, context, future + 1, K=4, pred=pred, mode=mode, generator=torch.Generator().manual_seed(0))
    assert (moved - unlabelled).abs().max() > 1e-4  # the planned actions steer the rollout
    unknown = torch.zeros(3, dtype=torch.bool)  # action_mask False: imagined without the actions
    torch.testing.assert_close(run(action_mask=unknown), shortcut.rollout(
        model, context, future + 1, K=4, pred=pred, mode=mode, generator=torch.Generator().manual_seed(0),
        action_mask=unknown))


def two_mode_sequences(batch, frames, generator, direction, pattern):
    """Frame t = position_t·direction ± pattern: the position follows the actions (a sequence task),
    the sign is a fair coin per frame (two modes, so a one-step sample falls between them)."""
    moves = torch.rand(batch, frames, generator=generator) - 0.5
    moves[:, 0] = 0
    position = torch.rand(batch, 1, generator=generator) * 2 - 1 + moves.cumsum(1)
    sign = torch.randint(0, 2, (batch, frames), generator=generator) * 2.0 - 1
    mean = position[..., None, None] * direction
    actions = torch.zeros(batch, frames, 7)
    actions[..., 0] = 2 * moves
    return mean + sign[..., None, None] * pattern, actions, mean


def test_shortcut_learns_tiny_sequence_task():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    direction, pattern = torch.randn(2, 4, 8, generator=generator)
    pattern -= (pattern * direction).sum() / direction.square().sum() * direction
    direction, pattern = direction / direction.square().mean().sqrt(), pattern / pattern.square().mean().sqrt()
    model = DynamicsModel(small_dynamics_config(soft_cap=50.0, max_frames=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        z, actions, _ = two_mode_sequences(32, 4, generator, direction, pattern)
        loss, _ = shortcut.shortcut_forcing_loss(model, z, actions, torch.ones(32, dtype=torch.bool), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:10])

    z, actions, mean = two_mode_sequences(256, 4, generator, direction, pattern)
    def error_to_nearest_mode(K):
        sample = shortcut.rollout(model.eval(), z[:, :3], actions[:, 3:], K=K, context_actions=actions[:, :3],
                                  generator=torch.Generator().manual_seed(1))[:, 0]
        errors = [(sample - mean[:, 3] - sign * pattern).square().mean(dim=(1, 2)) for sign in (1, -1)]
        return torch.minimum(*errors).mean().item()
    assert error_to_nearest_mode(4) < 0.75 * error_to_nearest_mode(1)

# ==== train ====
import signal
import subprocess

import train as train_module


def _train_argv(labeled, unlabeled, encoder_dir, out, steps=6, *extra):
    return ["--labeled", str(labeled), "--unlabeled", str(unlabeled), "--encoder", str(encoder_dir),
            "--pool", "2", "--preset", "tiny", "--steps", str(steps), "--batch-size", "4",
            "--clip-length", "4", "--warmup", "2", "--save-every", "2", "--log-every", "1",
            "--val-every", "3", "--val-batches", "1", "--stats-batches", "2", "--labeled-fraction", "0.5",
            "--toy", "--out", str(out), *extra]


def _weights(checkpoint_path):
    return train_module.load_safely(str(checkpoint_path))["model"]


def _same_weights(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.fixture(scope="session")
def toy_train_run(tmp_path_factory, toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir):
    """One uninterrupted short run that the other train tests compare against."""
    out = tmp_path_factory.mktemp("train_reference")
    argv = _train_argv(toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir, out)
    assert train_module.main(argv) == 0
    return argv, out


def test_train_short_run_writes_checkpoint_log_and_loads(toy_train_run):
    import json
    argv, out = toy_train_run
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(record["loss"]) and record["frames_per_s"] > 0 for record in records)
    assert "val_loss" in records[2] and "val_loss" in records[5]
    model, checkpoint = train_module.load_world_model(str(out / "checkpoint.pt"))
    assert checkpoint["step"] == 6 and checkpoint["encoder"]["pool"] == 2
    assert checkpoint["action_stats"]["std"].shape == (7,)
    assert not model.training
    for key in ("model", "ema", "optimizer", "scheduler", "model_config", "train_args", "token_stats"):
        assert key in checkpoint


def test_train_sigint_then_resume_matches_uninterrupted(toy_train_run, tmp_path, monkeypatch):
    argv, reference = toy_train_run
    out = tmp_path / "interrupted"
    original_loss = train_module.shortcut_forcing_loss
    calls = []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during step 3: as if the user pressed Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "shortcut_forcing_loss", loss_then_ctrl_c)
    interrupted_argv = [value if value != str(reference) else str(out) for value in argv]
    assert train_module.main(interrupted_argv) == 130
    assert train_module.load_safely(str(out / "checkpoint.pt"))["step"] == 3
    monkeypatch.setattr(train_module, "shortcut_forcing_loss", original_loss)
    assert train_module.main(interrupted_argv + ["--resume", str(out / "checkpoint.pt")]) == 0
    assert _same_weights(_weights(out / "checkpoint.pt"), _weights(reference / "checkpoint.pt"))


def test_train_hard_kill_then_resume_matches_uninterrupted(toy_train_run, tmp_path):
    import time
    argv, reference = toy_train_run
    out = tmp_path / "killed"
    killed_argv = [value if value != str(reference) else str(out) for value in argv]
    command = [sys.executable, os.path.join(HERE, "train.py"), *killed_argv]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs, whatever step it was in
    process.wait()
    step = train_module.load_safely(str(out / "checkpoint.pt"))["step"]
    assert 2 <= step <= 6
    result = subprocess.run(command + ["--resume", str(out / "checkpoint.pt")], cwd=HERE,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _same_weights(_weights(out / "checkpoint.pt"), _weights(reference / "checkpoint.pt"))


def test_train_nan_loss_stops_with_step_and_keeps_last_checkpoint(toy_train_run, tmp_path, monkeypatch):
    argv, reference = toy_train_run
    out = tmp_path / "nan"
    original_loss = train_module.shortcut_forcing_loss
    calls = []

    def loss_that_explodes(*args, **kwargs):
        calls.append(1)
        loss, parts = original_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 5 else loss), parts

    monkeypatch.setattr(train_module, "shortcut_forcing_loss", loss_that_explodes)
    nan_argv = [value if value != str(reference) else str(out) for value in argv]
    with pytest.raises(SystemExit, match="at step 4"):
        train_module.main(nan_argv + ["--val-every", "0"])
    assert train_module.load_safely(str(out / "checkpoint.pt"))["step"] == 4


def test_train_bad_input_fails_with_one_clear_line(toy_train_run, tmp_path):
    argv, reference = toy_train_run
    checkpoint = reference / "checkpoint.pt"
    before = checkpoint.read_bytes()

    def run(arguments):
        result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *arguments], cwd=HERE,
                                capture_output=True, text=True, timeout=600)
        return result.returncode, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""

    def with_out(out, *extra):
        return [value if value != str(reference) else str(out) for value in argv] + list(extra)

    code, line = run(with_out(reference))  # would overwrite an existing run
    assert code != 0 and "already exists" in line
    code, line = run(with_out(tmp_path / "a", "--resume", str(tmp_path / "missing.pt")))
    assert code != 0 and "does not exist" in line
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(before[: len(before) // 2])
    code, line = run(with_out(tmp_path / "b", "--resume", str(corrupt)))
    assert code != 0 and "cannot read checkpoint" in line
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, line = run(with_out(tmp_path / "c", "--resume", str(foreign)))
    assert code != 0 and "not a checkpoint of this project" in line
    other_config = with_out(tmp_path / "d", "--resume", str(checkpoint), "--time-every", "1")
    code, line = run(other_config)
    assert code != 0 and "another configuration" in line
    code, line = run(["--labeled", str(argv[1])])
    assert code != 0 and "--unlabeled" in line
    code, line = run(with_out(tmp_path / "e", "--resume", str(checkpoint), "--overwrite"))
    assert code != 0 and "contradict" in line
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, line = run(with_out(blocker / "run"))
    assert code != 0 and "cannot write to output folder" in line
    code, line = run(with_out(tmp_path / "f")[:0] + ["--labeled", "nobody/not-a-dataset", "--unlabeled",
                                                     "nobody/not-a-dataset-either", "--encoder", argv[5], "--out", str(tmp_path / "f")])
    assert code != 0 and line.startswith("error:") and "nobody/not-a-dataset" in line
    assert checkpoint.read_bytes() == before  # nothing overwritten


def test_train_torchrun_two_cpu_processes(toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "train.py"),
               *_train_argv(toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir, out, 3, "--device", "cpu",
                            "--val-every", "0")]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_module.load_safely(str(out / "checkpoint.pt"))["step"] == 3
    assert sum(1 for _ in open(out / "log.jsonl")) == 3  # only rank 0 writes


# ==== plan ====

# ==== decode ====
import decode as decode_module


def _decode_argv(toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir, out, steps, *extra):
    return ["--train", "--dataset", str(toy_labeled_root), str(toy_unlabeled_root), "--encoder", str(tiny_dinov2_dir),
            "--pool", "2", "--steps", str(steps), "--batch-size", "16", "--warmup", "5", "--val-every", "10",
            "--save-every", "10", "--val-frames", "32", "--stats-batches", "2", "--val-fraction", "0.25",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def toy_decoder_run(tmp_path_factory, toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir):
    """One short decoder training run on the toy world that the other decode tests read."""
    out = tmp_path_factory.mktemp("decoder")
    argv = _decode_argv(toy_labeled_root, toy_unlabeled_root, tiny_dinov2_dir, out, 60)
    assert decode_module.main(argv) == 0
    return argv, out


def test_decode_shapes_and_renormalisation():
    from encoder import TokenStats
    torch.manual_seed(0)
    stats = TokenStats(torch.randn(64), torch.rand(64) + 0.5)
    decoder = decode_module.Decoder(decode_module.DecoderConfig.preset("tiny"), stats).eval()
    tokens = torch.randn(2, 3, 16, 64)  # (B, T, N, D): a rollout
    images = decoder.decode(tokens)
    assert images.shape == (2, 3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(images[1, 2], decoder(tokens[1, 2][None])[0], atol=1e-5)
    # Tokens normalised with other (a world model's) statistics decode to the same pictures.
    other = TokenStats(torch.randn(64), torch.rand(64) + 0.5)
    as_other = other.normalize(stats.denormalize(tokens))
    assert torch.allclose(decoder.decode(as_other, token_stats=other), images, atol=1e-4)
    # DROID size: DINOv2-S at 224 px, 16 x 16 tokens of 384, 14 px per token.
    config = decode_module.DecoderConfig.preset("base", token_dim=384, grid=(16, 16), image_size=224)
    base = decode_module.Decoder(config, TokenStats(torch.zeros(384), torch.ones(384)))
    assert base(torch.randn(1, 256, 384)).shape == (1, 3, 224, 224)


def test_decode_image_strip_and_gif(tmp_path):
    from PIL import Image
    truth, decoded = torch.rand(5, 3, 16, 16), torch.rand(3, 3, 16, 16)
    path = decode_module.save_image_strip(str(tmp_path / "strip.png"), [truth, decoded], labels=["truth", "decoded"],
                                          scale=2)
    strip = np.asarray(Image.open(path))
    assert strip.shape[0] == 2 + 2 * (32 + 2)  # two rows of 32 px tiles with 2 px gaps
    gif = Image.open(decode_module.save_gif(str(tmp_path / "roll.gif"), [truth, truth.flip(0)]))
    assert gif.n_frames == 5 and gif.size == (2 + 2 * (16 + 2), 2 + 16 + 2)


def test_decode_training_beats_start_and_mean_image(toy_decoder_run):
    import json
    argv, out = toy_decoder_run
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    start, end = records[0], records[-1]
    assert start["step"] == 0 and end["step"] == 60
    assert end["val_l1"] < 0.5 * start["val_l1"]
    assert end["val_l1"] < 0.75 * end["baseline_l1"] and end["val_psnr"] > end["baseline_psnr"] + 1.0
    encoder = {"name_or_path": argv[argv.index("--encoder") + 1], "pool": 2}  # the tokens' encoder: accepted
    decoder, checkpoint = decode_module.load_decoder(str(out / "checkpoint.pt"), encoder=encoder)
    assert not decoder.training and checkpoint["metrics"] == end and (out / "recon.png").exists()


def test_decode_ctrl_c_then_resume_matches_uninterrupted(toy_decoder_run, tmp_path, monkeypatch):
    import signal
    argv, reference = toy_decoder_run
    short = [value if value != "60" else "20" for value in argv]
    first = tmp_path / "uninterrupted"
    assert decode_module.main([value if value != str(reference) else str(first) for value in short]) == 0
    out = tmp_path / "interrupted"
    interrupted = [value if value != str(reference) else str(out) for value in short]
    original, calls = decode_module.reconstruction_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # during step 7, as if the user pressed Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_module, "reconstruction_loss", loss_then_ctrl_c)
    assert decode_module.main(interrupted) == 130
    monkeypatch.setattr(decode_module, "reconstruction_loss", original)
    assert decode_module.main(interrupted + ["--resume", str(out / "checkpoint.pt")]) == 0
    weights = [torch.load(path / "checkpoint.pt", weights_only=True)["model"] for path in (first, out)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_decode_bad_input_fails_with_one_clear_line(toy_decoder_run, tmp_path):
    argv, reference = toy_decoder_run
    checkpoint = str(reference / "checkpoint.pt")

    def fails(arguments, message):
        with pytest.raises(SystemExit) as raised:
            decode_module.main(arguments)
        assert raised.value.code != 0
        if message:  # argparse errors print usage and exit 2; ours carry the message
            assert message in str(raised.value.code) and "\n" not in str(raised.value.code)

    def with_out(out, *extra):
        return [value if value != str(reference) else str(out) for value in argv] + list(extra)

    fails(["--dataset", "x"], None)  # no --train
    fails(with_out(reference), "already exists")
    fails(with_out(tmp_path / "a", "--resume", str(tmp_path / "missing.pt")), "does not exist")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "dreamer-dino-wm/1"}, foreign)  # a world-model checkpoint is no decoder
    fails(with_out(tmp_path / "b", "--resume", str(foreign)), "not a checkpoint of this project")
    fails(with_out(tmp_path / "c", "--resume", checkpoint, "--preset", "base"), "another configuration")
    encoder_dir = argv[argv.index("--encoder") + 1]
    fails(["--train", "--dataset", "nobody/not-a-dataset", "--encoder", encoder_dir, "--out", str(tmp_path / "d")],
          "nobody/not-a-dataset")
    with pytest.raises(decode_module.CheckpointError, match="trained on tokens of"):
        decode_module.load_decoder(checkpoint, encoder={"name_or_path": "facebook/dinov2-small", "pool": 2})

# ==== eval ====

# ==== bench ====

# ==== end ====

if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                          "--durations=15", *sys.argv[1:]]))
