"""Our training step side by side with the best-known peer implementation of Dreamer 4's dynamics
model: lucidrains' `dreamer4` (PyPI), called, never copied. `python bench.py --peer` runs this.

The peer is not a requirement of this project: install it in a separate environment that also
sees this project's packages, e.g.

    python -m venv --system-site-packages peerenv
    peerenv/bin/pip install dreamer4==0.20.2 torch==<your torch> torchaudio==<your torch>
    peerenv/bin/python bench.py --peer

(torchaudio pinned so that pip does not pull a torch of another version with it). Without the
peer, `bench.py --peer` says so in one line.

What is compared: one training step (forward + backward + AdamW) of each dynamics model on the
same random latents (B, T, N, D) and 7-D continuous actions, at the same sizes: width, depth,
heads and key/value heads (GQA), head dim, registers, time layer every k-th layer, tokens per
frame, frames, batch, K_max. The peer's extra heads are off where its constructor allows
(terminal prediction, the policy's action loss, multi-token prediction: 1 step); its policy,
value and reward heads are built anyway but get no gradient and AdamW skips them, so the
parameter counts printed are those with a gradient. Two peer variants:

    default   the peer's attention as it ships: value gates, "belief" attention, value residual
              mixing, attention pooling over earlier layers, key-only RMSNorm
    lean      those extras off and QK-norm on: the closest to our block, about our parameter count

On a GPU the peer's own flex_attention path fails in its time layers (dreamer4 0.20.2, torch 2.11:
"flex_attention() got an unexpected keyword argument 'causal'"), so there it runs with its module's
`flex_attention` set to None, its switch for "flex not available": its plain attention, as on CPU,
while ours uses flex_attention for the soft-capped layers.

Known differences left: the peer adds an agent token per frame (23 tokens against our 22 at the
tiny preset) and a final block for it, has biases in its MLP, gives every row actions (ours:
half the rows labelled, the rest the "no action" embedding), and per step chooses shortcut
training for the whole batch with probability 1 - 1/log2(K_max) (two extra no-grad passes over
every row) where ours bootstraps a quarter of the rows every step. So the steps are timed
interleaved (ours, peer default, peer lean, ours, ...) and compared by their mean over many steps.
"""
import contextlib
from importlib.metadata import PackageNotFoundError, version

import torch

from dynamics import DynamicsModel
from shortcut import shortcut_forcing_loss
from timing import measure_interleaved

PEER = "dreamer4"
PEER_VERSION = "0.20.2"


def peer_available():
    """The peer's installed version string, or None when it is not installed."""
    try:
        return version(PEER)
    except PackageNotFoundError:
        return None


def peer_model(config, lean, device):
    """The peer's DynamicsWorldModel at our DynamicsConfig's sizes, on `device`."""
    import dreamer4.dreamer4
    from dreamer4 import DynamicsWorldModel
    if device.type == "cuda":  # its flex path fails on a GPU (module docstring): its own "no flex" switch
        dreamer4.dreamer4.flex_attention = None
    attention, transformer = dict(query_heads=config.heads), {}  # GQA: attn_heads are the key/value heads
    if lean:
        attention.update(gate_values=False, belief_attn=False, rmsnorm_query=True)
        transformer.update(value_residual=False, use_attn_pool=False)
    return DynamicsWorldModel(
        dim=config.width, dim_latent=config.token_dim, num_latent_tokens=config.num_tokens,
        num_spatial_tokens=config.num_tokens,  # as many as the latents: a linear map in, no attention pooling
        depth=config.depth, attn_heads=config.kv_heads, attn_dim_head=config.width // config.heads,
        attn_kwargs=attention, transformer_kwargs=transformer, time_block_every=config.time_every,
        num_register_tokens=config.num_registers, max_steps=config.k_max, num_continuous_actions=config.action_dim,
        multi_token_pred_len=1, predict_terminals=False, continuous_action_loss_weight=0.0,
        discrete_action_loss_weight=0.0).to(device)


def training_step(model, loss_function, precision, device):
    """() -> one forward + backward + AdamW step of `model`; and the number of parameters that get
    a gradient (counted on one untimed step)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_function()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    trained = sum(p.numel() for p in parameters if p.grad is not None and bool(p.grad.any()))
    return step, trained


def bench_peer(config, batch_size, frames, device, steps, precision="fp32", seed=0):
    """Mean seconds per training step of ours and of the peer (default and lean), interleaved."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, frames, config.num_tokens, config.token_dim, generator=generator).to(device)
    actions = torch.randn(batch_size, frames, config.action_dim, generator=generator).to(device)
    mask = (torch.arange(batch_size) % 2 == 0).to(device)  # half the rows labelled (the peer labels all)
    torch.manual_seed(seed)
    ours = DynamicsModel(config).to(device).train()
    step_generator = torch.Generator(device).manual_seed(seed)
    models = {"ours": (ours, lambda: shortcut_forcing_loss(ours, z, actions, mask, generator=step_generator)[0])}
    for name, lean in (("peer", False), ("peer lean", True)):
        peer = peer_model(config, lean, device).train()
        models[name] = (peer, lambda peer=peer: peer(latents=z, continuous_actions=actions,
                                                      add_autoregressive_action_loss=False))
    runs = {name: training_step(model, loss, precision, device) for name, (model, loss) in models.items()}
    timings = measure_interleaved([step for step, _ in runs.values()], device, steps, warmup=0)  # warm already
    return dict(batch_size=batch_size, frames=frames, precision=precision, steps=steps,
                **{name: dict(seconds=timing["mean_seconds"], median=timing["seconds"], trained_parameters=trained)
                   for (name, (_, trained)), timing in zip(runs.items(), timings)})
