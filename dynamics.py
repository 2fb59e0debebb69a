"""The Dreamer 4 dynamics transformer: a block-causal transformer over frames of DINOv2 tokens.

What it computes
----------------
Given a clip of T frames whose DINOv2 tokens have been partly noised, x_τ (B, T, N, D), each
frame's signal level τ and step size d (B, T), and the actions (B, T, 7), the model predicts the
clean tokens x̂1 (B, T, N, D) of every frame at once ("x-prediction"; shortcut.py explains why x
and not the velocity). Frame t may only look at frames ≤ t, so the same network is a
next-frame predictor: feed the past clean-ish, the new frame as noise, and read its x̂1.

One block of tokens per time step
---------------------------------
Every frame becomes a block of S = R + N + 1 + A tokens of width E:

    [ registers (R) | latent tokens (N) | shortcut token (1) | action tokens (A) ]

- registers: learned tokens with no input, scratch space for attention (as in DINOv2).
- latent tokens: linear(D -> E) of the frame's noisy DINOv2 tokens.
- shortcut token: [τ embedding ⊕ d embedding]. Both live on a discrete grid: τ ∈ {0, 1/K_max,
  ..., 1} and d ∈ {1, 1/2, 1/4, ..., 1/K_max}, so each is a row of a learned table.
- action tokens: linear(action) + a learned "action" embedding for labelled clips; the learned
  "no action" embedding alone for unlabelled video (95 % of the data). Block t carries the
  action that moved the arm from frame t-1 to frame t.
A learned per-slot embedding (S, E) is added to every block: it tells space attention which
slot is which (patch position, register number, ...). Time order comes from RoPE (below).

Space-only and time-only attention by reshaping, never by masking
-----------------------------------------------------------------
Full attention over all T·S tokens would cost (T·S)² and need a block-causal mask. Dreamer 4
factorises it instead, and a reshape is all it takes:

    space layer:  (B, T, S, E) -> (B·T, S, E)   every token sees the tokens of its own frame
    time layer:   (B, T, S, E) -> (B·S, T, E)   every slot sees the same slot in frames ≤ t

Every `time_every`-th layer is a time layer (Dreamer 4 uses 4); the rest are space layers. Both
kinds must exist (2 <= time_every <= depth): space layers are the only way the action tokens of a
frame reach its patch tokens, time layers the only way frames see each other.
Information flows from frame t to t+1 only through time layers, and only forwards (causal
mask), so the model is block causal by construction. Time layers rotate queries and keys by
their frame index (RoPE): attention then depends only on the distance in time, which is what
a rollout longer than the training clips needs.

Inside each layer (pre-norm residual): x += attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), the
SwiGLU's hidden width 8/3 of the width rounded up to a multiple of 32 (mlp_hidden: matmul kernels
run odd widths slowly).
Attention uses QK-norm (RMSNorm on each head's queries and keys, so logits cannot blow up),
a soft cap on the logits s -> c·tanh(s/c) (c = 50: identity for normal logits, bounded for
outliers), and grouped-query attention (GQA: `kv_heads` < `heads`, several query heads share
one key/value head, which shrinks the KV cache by heads/kv_heads).

Which attention kernel runs where (config.attention)
----------------------------------------------------
- "plain": the reference written out in torch (scores, soft cap, mask, softmax). Any device,
  any option; tests prove every other path equal to it.
- "sdpa": F.scaled_dot_product_attention with enable_gqa, a fused kernel on CPU and CUDA. It
  cannot apply a soft cap, so it serves soft_cap = 0 only.
- "flex": flex_attention, compiled, with the soft cap (and causal mask) as a `score_mod`: the
  fused soft-capped kernel on CUDA. On CPU (torch 2.10) its forward compiles but its backward
  raises an InductorError, so it can serve CPU inference only.
- "compiled": the plain function under torch.compile, the realistic fused soft-cap path for
  CPU training: 6.5 ms -> 2.8 ms per causal, capped forward+backward of q/k/v 64x8x16x32 (GQA,
  1 thread), after ~15 s of compiling. At the tiny preset's 22 tokens attention is a small part
  of the time (MLPs dominate), so "auto" does not make you wait for it.
- "auto" (default): sdpa if soft_cap = 0; else flex on CUDA; else plain (no compile wait).

KV cache
--------
During a rollout the past never changes, so each time layer stores the keys and values of the
frames already generated (KVCache, preallocated for the rollout's frames, at most max_frames). A
new frame's K denoising passes then attend to the cache instead of re-running the whole history,
and its keys are appended only once it is final (`append=True`): a denoising pass writes its keys
into the next free slot, which the cache does not count as filled, so the next pass overwrites
them and nothing of the past is copied. A frame that is final only needs storing (the context,
and each generated frame fed back): fill_cache runs the blocks before the last time layer and of
that layer only its keys and values, since nothing reads the rest of what forward would compute
(the tiny preset's last layer is a time layer: a sixth of a pass saved; a K = 1 plan stores as
many frames as it denoises, 7 % fewer FLOPs). Grouped-query attention reads the cache as it is
(the query heads that share a key/value head attend to it together; no per-head copy of the keys).
Space layers need no cache: they never look outside the current frame.

Output head: linear to D (x-prediction), or RAE's "DH" head (a shallow, wide transformer over the
latent tokens) behind config.head = "dh", for token dims that are large next to the trunk width.

Locally linear action response (config.action_jacobian)
-------------------------------------------------------
One step of a delta-EE action is small, so the next frame's tokens are, to first order, linear in
it: x1 ≈ f(past) + J(past)·a, with J (N, D, 7) the change of every token per unit of every action
dimension, which depends on the scene (where the gripper is, how it is turned). With
action_jacobian the model adds exactly that term to its output, J computed from the same features
by one linear map: x̂1 = head(h) + Σ_i a_i·J_i(h), with a = 0 for action-free clips. This is the
locally linear latent dynamics of Embed to Control (Watter et al., 2015), inside the transformer:
the action still enters as a token as well, and J is read from features that saw the whole past.
Why: through the action token alone, the 5 %-labelled toy demo learned almost nothing of its
actions (README, ablations: action gap 1.07, translation response cosine 0.35, no better than
copying the last frame); with the J term the gap is 2.09, the cosine 0.74 and the imagined
response about the right size. (Conditioning every layer's norms on the action as well, AdaLN as
in DiT and JEPA-WMs, was measured too in screening runs and changed nothing beyond run-to-run
noise: action gap 2.01 vs 1.82, translation response 0.50-0.59 vs 0.48-0.56.)
"""
import argparse
import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention


@dataclass
class DynamicsConfig:
    token_dim: int = 384          # D, DINOv2 token width
    num_tokens: int = 64          # N, latent tokens per frame
    width: int = 384              # E, transformer width
    depth: int = 12               # number of layers (space + time)
    heads: int = 6                # query heads
    kv_heads: int = 2             # key/value heads (GQA); must divide heads
    num_registers: int = 4        # R
    action_tokens: int = 1        # A
    time_every: int = 4           # every time_every-th layer attends over time
    max_frames: int = 32          # longest KV cache (frames per rollout, context included)
    k_max: int = 64               # finest step d_min = 1/k_max; a power of two
    action_dim: int = 7           # delta EE: dx, dy, dz, rotation vector (3), dgripper
    soft_cap: float = 50.0        # attention logit cap c; 0 turns it off
    mlp_ratio: float = 8 / 3      # SwiGLU hidden ≈ mlp_ratio * width (8/3: same params as a 4x GELU MLP) ...
    mlp_multiple: int = 32        # ... rounded up to a multiple of this (matmul kernels want it: tiny 341 -> 352)
    head: str = "linear"          # "linear" or "dh"
    dh_width: int = 1024          # DH head width (wide) ...
    dh_depth: int = 2             # ... and depth (shallow)
    attention: str = "auto"       # "auto", "plain", "sdpa", "flex", "compiled" (see module docstring)
    action_jacobian: bool = False # add a locally linear action response J(features)·a to the output

    def __post_init__(self):
        if self.width % self.heads or self.heads % self.kv_heads:
            raise ValueError("width must be divisible by heads, and heads by kv_heads")
        if (self.width // self.heads) % 2:
            raise ValueError("head dim (width / heads) must be even for RoPE")
        if self.k_max < 1 or self.k_max & (self.k_max - 1):
            raise ValueError(f"k_max must be a power of two, got {self.k_max}")
        if self.head not in ("linear", "dh"):
            raise ValueError(f"head must be 'linear' or 'dh', got {self.head!r}")
        if self.attention not in ("auto", "plain", "sdpa", "flex", "compiled"):
            raise ValueError(f"unknown attention backend {self.attention!r}")
        if self.attention == "sdpa" and self.soft_cap > 0:
            raise ValueError("attention='sdpa' cannot apply a soft cap: use soft_cap=0 or another backend")
        if not 2 <= self.time_every <= self.depth:
            # time_every = 1 leaves no space layer: every slot sees only itself over time, so the
            # action tokens never reach the patch tokens. time_every > depth leaves no time layer.
            raise ValueError(f"time_every must be between 2 and depth ({self.depth}), so that both space and "
                             f"time layers exist; got {self.time_every}")

    @property
    def tokens_per_frame(self):
        return self.num_registers + self.num_tokens + 1 + self.action_tokens

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # toy world: 4x4 pooled tokens of a tiny DINOv2, 22 tokens per frame, minutes on 2 CPU cores
    "tiny": dict(token_dim=128, num_tokens=16, width=128, depth=6, heads=4, kv_heads=2,
                 num_registers=4, time_every=3, max_frames=32, k_max=8, dh_width=256),
    # DINOv2-S tokens pooled 2x2 (8x8 = 64 tokens x 384), a single-GPU model
    "small": dict(token_dim=384, num_tokens=64, width=384, depth=12, heads=6, kv_heads=2,
                  num_registers=4, time_every=4, max_frames=32, k_max=64, dh_width=768),
    # DINOv2-S at 224 px: 16x16 = 256 tokens x 384 per frame, as DINO-WM and V-JEPA 2-AC
    "droid": dict(token_dim=384, num_tokens=256, width=768, depth=16, heads=12, kv_heads=4,
                  num_registers=8, time_every=4, max_frames=64, k_max=64, dh_width=1536),
}


# ---------------------------------------------------------------------------------------------
# Attention kernels. q: (rows, heads, Tq, head_dim); k, v: (rows, kv_heads, Tk, head_dim).
# Causal masks are bottom-right aligned: the Tq queries are the last Tq of the Tk positions,
# which is exactly the situation of new frames attending to [cached frames, new frames].

def causal_mask(num_queries, num_keys, device):
    """(Tq, Tk) bool, True where query i may attend key j, i.e. j <= i + (Tk - Tq)."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


def plain_attention(q, k, v, causal, soft_cap):
    """Reference attention: softmax(cap(q·kᵀ/√h) + mask)·v. GQA: query head h reads key/value head
    h // groups, so the `groups` query heads of one key/value head are stacked along the query axis
    and attend to it together (no copy of the keys and values, which in a rollout are the cache)."""
    rows, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(rows, kv_heads, groups * num_queries, head_dim)  # (rows, kv_heads, groups·Tq, hd)
    scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5  # (rows, kv_heads, groups·Tq, Tk)
    if soft_cap > 0:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    if causal:
        mask = causal_mask(num_queries, num_keys, q.device).repeat(groups, 1)  # the same mask for each group
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).view(rows, heads, num_queries, head_dim)


@functools.cache
def compiled(function):
    """torch.compile(function), built once on first use (importing this file stays cheap).
    flex_attention compiles anew per layer kind (space; causal time), grad mode (the bootstrap's
    no-grad passes), dtype and first new shape (then dynamic): more than dynamo's default of 8
    entries in one process, past which every call would run unfused and eager (seen on a GPU: the
    bench's rollout figure did not end in ~230 s; with the limit at 64 it took 128 s)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(function)


# flex_attention's GPU kernel puts the batch (here: rows) on a grid dimension that CUDA caps at
# 65 535; a time layer has B·S rows (a droid-sized CEM iteration: 300 candidates x 266 tokens per
# frame = 79 800, which failed to launch on an H200).
FLEX_MAX_ROWS = 65535


def flex_soft_cap_attention(q, k, v, causal, soft_cap):
    """flex_attention with the soft cap and the causal mask applied to each score by `score_mod`,
    over at most FLEX_MAX_ROWS rows per call. `offset` is a constant of the compiled kernel; it is 0
    in training and when the cache is filled, so a new value (several frames appended to a non-empty
    cache) rarely compiles anew."""
    if q.shape[0] > FLEX_MAX_ROWS:  # rows are independent: attend in chunks
        return torch.cat([flex_soft_cap_attention(q[i:i + FLEX_MAX_ROWS], k[i:i + FLEX_MAX_ROWS],
                                                  v[i:i + FLEX_MAX_ROWS], causal, soft_cap)
                          for i in range(0, q.shape[0], FLEX_MAX_ROWS)])
    offset = k.shape[2] - q.shape[2]

    def score_mod(score, batch, head, query_index, key_index):
        if soft_cap > 0:
            score = soft_cap * torch.tanh(score / soft_cap)
        if causal:
            score = torch.where(key_index <= query_index + offset, score, float("-inf"))
        return score

    return compiled(flex_attention)(q, k, v, score_mod=score_mod, enable_gqa=True)


def attend(q, k, v, causal, soft_cap, backend):
    causal = causal and q.shape[2] > 1  # one query (the newest frame) may see every key
    if backend == "auto":
        backend = "sdpa" if soft_cap == 0 else ("flex" if q.is_cuda else "plain")
    if backend == "sdpa":
        mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if backend == "flex":
        return flex_soft_cap_attention(q, k, v, causal, soft_cap)
    if backend == "compiled":
        return compiled(plain_attention)(q, k, v, causal, soft_cap)
    return plain_attention(q, k, v, causal, soft_cap)


# ---------------------------------------------------------------------------------------------
# RoPE over time: channel i of a head's first half and channel i of its second half form a pair,
# rotated by the angle position·frequency_i. q·k then depends on the two positions only through
# their difference.

def rope_angles(positions, head_dim):
    """positions (T,) -> cos, sin (T, head_dim / 2)."""
    frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions[:, None].float() * frequencies
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (rows, heads, T, head_dim): rotate channel pairs (first half, second half) by the angles."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class KVCache:
    """Keys and values of every time layer for the frames seen so far, preallocated for `frames`
    frames (a rollout asks for its context + horizon, at most config.max_frames).

    keys/values: (time_layers, B·S, kv_heads, frames, head_dim); `length` frames are filled.
    """

    def __init__(self, time_layers, rows, kv_heads, frames, head_dim, device, dtype):
        shape = (time_layers, rows, kv_heads, frames, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def repeat(self, times):
        """The cache with every batch row repeated `times` times: (L, B·S, ...) -> (L, times·B·S, ...),
        rows grouped batch-major as the model lays them out. A shared context is run once, then this;
        only the filled frames are copied."""
        if times == 1:
            return self
        layers, rows, kv_heads, frames, head_dim = self.keys.shape

        def tiled(cached):  # (L, B·S, kv_heads, frames, hd) -> (L, times·B·S, ...), filled frames copied
            tensor = cached.new_zeros(layers, times, rows, kv_heads, frames, head_dim)
            tensor[:, :, :, :, :self.length] = cached[:, None, :, :, :self.length]
            return tensor.view(layers, times * rows, kv_heads, frames, head_dim)

        repeated = copy.copy(self)
        repeated.keys, repeated.values = tiled(self.keys), tiled(self.values)
        return repeated

    def extend(self, layer, k, v):
        """Write the new keys and values of one layer after the stored ones; return [stored, new].
        Whether the new frames then count as stored is the model's to say (DynamicsModel.forward's
        `append`), once every layer has written them."""
        start, end = self.length, self.length + k.shape[2]
        if k.shape[0] != self.keys.shape[1]:
            raise ValueError(f"KV cache made for {self.keys.shape[1]} rows (batch x tokens per frame), got {k.shape[0]}")
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache holds {self.keys.shape[3]} frames (new_cache's frames, at most "
                             f"config.max_frames); {end} asked")
        # Write the new keys and values into their slots and attend to a view of the filled part: no
        # copy of the past. Frames not appended (a denoising pass's) are written too but `length` does
        # not count them, so the next pass overwrites their slots: the cache holds only final frames.
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm's x / sqrt(mean(x²) + eps) · weight (the same parameter, the same checkpoints),
    computed in fp32 and returned in x's dtype (under bf16 autocast the query/key rows are bf16, the
    residual stream fp32). On a GPU torch's fused kernel does it in one launch (the weight cast to
    x's dtype, the sums in fp32). On CPU that kernel is composite and squares x into a full-size
    copy; here the mean of squares is one fused reduction (vector_norm) instead, and without autograd
    the weight multiplies in place: the same numbers (eps None: fp32's epsilon, as F.rms_norm's), and
    a tiny-model CEM plan 1.09× (bf16) to 1.18× (fp32) faster (README)."""

    def forward(self, x):
        if x.device.type != "cpu":
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
        y = x * (mean_square + eps).rsqrt()  # (..., d) in fp32
        y = y * self.weight if torch.is_grad_enabled() else y.mul_(self.weight)
        return y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, width, heads, kv_heads, soft_cap, backend):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.soft_cap, self.backend = soft_cap, backend
        self.query = nn.Linear(width, heads * self.head_dim, bias=False)
        self.key_value = nn.Linear(width, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, width, bias=False)
        self.query_norm = RMSNorm(self.head_dim)  # QK-norm
        self.key_norm = RMSNorm(self.head_dim)

    def keys_values(self, x, rope=None):
        """x (rows, L, E) -> keys, values (rows, kv_heads, L, hd): normed and rotated, what a KV cache stores."""
        rows, length, _ = x.shape
        k, v = self.key_value(x).view(rows, length, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = self.key_norm(k)  # QK-norm
        return (k if rope is None else apply_rope(k, *rope)), v

    def forward(self, x, causal=False, rope=None, cache=None, cache_layer=None):
        rows, length, _ = x.shape  # (rows, L, E): rows = B·T for space layers, B·S for time layers
        q = self.query(x).view(rows, length, self.heads, self.head_dim).transpose(1, 2)  # (rows, heads, L, hd)
        q = self.query_norm(q)  # QK-norm
        k, v = self.keys_values(x, rope)  # (rows, kv_heads, L, hd) each
        if rope is not None:
            q = apply_rope(q, *rope)
        if cache is not None:
            k, v = cache.extend(cache_layer, k, v)  # (rows, kv_heads, cached + L, hd)
        y = attend(q, k, v, causal, self.soft_cap, self.backend)  # (rows, heads, L, hd)
        return self.out(y.transpose(1, 2).reshape(rows, length, -1))


def mlp_hidden(config, width):
    """The SwiGLU hidden width of a layer `width` wide: mlp_ratio·width rounded up to a multiple of
    config.mlp_multiple, as LLaMA does. Matmul kernels run odd widths slowly: on the 2-core CPU of
    the README's figures, the tiny preset's 341 (8/3 of 128) ran at 102 GFLOP/s, 352 at 168
    (6600 × 128 fp32 inputs, a CEM iteration's shape)."""
    multiple = config.mlp_multiple
    return -(-int(config.mlp_ratio * width) // multiple) * multiple


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """One pre-norm layer on (B, T, S, E): space-only (time_layer is None) or causal time-only,
    in which case time_layer is its index among the time layers (its slot in the KV cache)."""

    def __init__(self, width, heads, kv_heads, mlp_width, soft_cap, backend, time_layer=None):
        super().__init__()
        self.time_layer = time_layer
        self.attention_norm = RMSNorm(width)
        self.attention = Attention(width, heads, kv_heads, soft_cap, backend)
        self.mlp_norm = RMSNorm(width)
        self.mlp = SwiGLU(width, mlp_width)

    def forward(self, x, rope=None, cache=None):
        B, T, S, E = x.shape
        h = self.attention_norm(x)
        if self.time_layer is None:  # space: the S tokens of one frame attend to each other
            h = self.attention(h.reshape(B * T, S, E)).view(B, T, S, E)
        else:  # time: one slot attends to itself in frames <= t
            h = self.attention(time_rows(h), causal=True, rope=rope, cache=cache, cache_layer=self.time_layer)
            h = h.view(B, S, T, E).transpose(1, 2)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))

    def store_keys_values(self, x, rope, cache):
        """Of a time layer, only what the KV cache keeps: the keys and values of x's frames, written
        after the cached ones (no queries, no attention, no MLP)."""
        cache.extend(self.time_layer, *self.attention.keys_values(time_rows(self.attention_norm(x)), rope))


def time_rows(h):
    """(B, T, S, E) -> (B·S, T, E): each token slot's frames as one sequence, for a time layer."""
    B, T, S, E = h.shape
    return h.transpose(1, 2).reshape(B * S, T, E)


class DHHead(nn.Module):
    """RAE's "DH" head (DiT-DH): a shallow, wide transformer after the trunk. It reads the trunk's
    latent-token features and the noisy input tokens x_τ (RAE conditions by adaLN; adding the two
    projections is the simpler form used here), runs dh_depth space-only blocks at dh_width,
    and maps to D. Width where the output is high-dimensional, without widening the whole trunk."""

    def __init__(self, config):
        super().__init__()
        head_dim = config.width // config.heads  # same head size and GQA ratio as the trunk
        heads = config.dh_width // head_dim
        kv_heads = max(1, heads * config.kv_heads // config.heads)
        self.from_trunk = nn.Linear(config.width, config.dh_width)
        self.from_input = nn.Linear(config.token_dim, config.dh_width)
        self.blocks = nn.ModuleList(
            Block(config.dh_width, heads, kv_heads, mlp_hidden(config, config.dh_width), config.soft_cap,
                  config.attention)
            for _ in range(config.dh_depth))
        self.norm = RMSNorm(config.dh_width)
        self.out = nn.Linear(config.dh_width, config.token_dim)

    def forward(self, features, x_tau):  # (B, T, N, E), (B, T, N, D) -> (B, T, N, D)
        h = self.from_trunk(features) + self.from_input(x_tau)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


class DynamicsModel(nn.Module):
    """x_τ, τ, d, actions -> x̂1 for every frame, block causal (module docstring)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.token_in = nn.Linear(c.token_dim, c.width)
        self.registers = nn.Parameter(torch.randn(c.num_registers, c.width) * 0.02)
        self.tau_embedding = nn.Embedding(c.k_max + 1, c.width // 2)  # τ = i / k_max, i = 0..k_max
        self.step_embedding = nn.Embedding(int(math.log2(c.k_max)) + 1, c.width - c.width // 2)  # d = 2^-j
        self.action_in = nn.Linear(c.action_dim, c.action_tokens * c.width, bias=False)
        self.action_embedding = nn.Parameter(torch.randn(c.action_tokens, c.width) * 0.02)
        self.no_action_embedding = nn.Parameter(torch.randn(c.action_tokens, c.width) * 0.02)
        self.slot_embedding = nn.Parameter(torch.randn(c.tokens_per_frame, c.width) * 0.02)
        is_time = [(i + 1) % c.time_every == 0 for i in range(c.depth)]  # every time_every-th layer
        time_index = [sum(is_time[:i]) if is_time[i] else None for i in range(c.depth)]  # its KV cache slot
        self.time_layers = sum(is_time)
        self.last_time_block = max(i for i in range(c.depth) if is_time[i])  # where fill_cache stops
        self.blocks = nn.ModuleList(
            Block(c.width, c.heads, c.kv_heads, mlp_hidden(c, c.width), c.soft_cap, c.attention, time_index[i])
            for i in range(c.depth))
        self.norm = RMSNorm(c.width)
        self.head = nn.Linear(c.width, c.token_dim) if c.head == "linear" else DHHead(c)
        self.jacobian = nn.Linear(c.width, c.action_dim * c.token_dim) if c.action_jacobian else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size, frames=None):
        """An empty KV cache for batch_size rows and `frames` frames (default config.max_frames), in the
        dtype the keys are computed in (bf16 under autocast)."""
        c, parameter = self.config, self.token_in.weight
        frames = c.max_frames if frames is None else frames
        if frames > c.max_frames:
            raise ValueError(f"a KV cache for {frames} frames was asked; this model holds {c.max_frames} "
                             f"(config.max_frames)")
        device = parameter.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else parameter.dtype
        return KVCache(self.time_layers, batch_size * c.tokens_per_frame, c.kv_heads, frames,
                       c.width // c.heads, parameter.device, dtype)

    def embed(self, x_tau, tau, d, actions, action_mask, start):
        """The model's input, one frame of S tokens per (b, t), and the time layers' RoPE angles for
        frames start .. start + T - 1. Returns x (B, T, S, E), rope, labelled (B, T, 1, 1) bool."""
        c = self.config
        B, T, N, _ = x_tau.shape
        latents = self.token_in(x_tau)  # (B, T, N, E)
        registers = self.registers.expand(B, T, -1, -1)  # (B, T, R, E)
        tau_index = (tau * c.k_max).round().long()
        step_index = (-torch.log2(d)).round().long()
        shortcut = torch.cat([self.tau_embedding(tau_index), self.step_embedding(step_index)], dim=-1)
        action = self.action_in(actions).view(B, T, c.action_tokens, c.width) + self.action_embedding
        labelled = action_mask.view(B, -1).expand(B, T)[:, :, None, None]  # (B, T, 1, 1)
        action = torch.where(labelled, action, self.no_action_embedding)  # (B, T, A, E)
        x = torch.cat([registers, latents, shortcut[:, :, None], action], dim=2) + self.slot_embedding  # (B, T, S, E)
        rope = rope_angles(torch.arange(start, start + T, device=x.device), c.width // c.heads)
        return x, rope, labelled

    def forward(self, x_tau, tau, d, actions, action_mask, cache=None, append=True):
        """x_tau (B, T, N, D) noisy tokens; tau, d (B, T) on the grid; actions (B, T, action_dim)
        normalised; action_mask (B,) or (B, T) bool, False = unlabelled. With a cache, these T
        frames come right after the cached ones; append=True stores them in it (a denoising pass
        does not; fill_cache stores frames whose output is not wanted, for less). Returns x̂1 (B, T, N, D)."""
        c = self.config
        B, T, N, _ = x_tau.shape
        x, rope, labelled = self.embed(x_tau, tau, d, actions, action_mask, 0 if cache is None else cache.length)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None and append:
            cache.length += T

        features = self.norm(x[:, :, c.num_registers:c.num_registers + N])  # (B, T, N, E)
        output = self.head(features) if c.head == "linear" else self.head(features, x_tau)
        if self.jacobian is not None:  # + J·a: each token's change per unit of each action dimension
            jacobian = self.jacobian(features).view(B, T, N, c.action_dim, c.token_dim)
            output = output + torch.einsum("btnad,bta->btnd", jacobian, actions * labelled[:, :, 0, :1])
        return output

    @torch.no_grad()
    def fill_cache(self, x_tau, tau, d, actions, action_mask, cache):
        """Append these frames (forward's inputs) to the KV cache, computing only what it keeps: the
        blocks before the last time layer, and of that layer its keys and values. The rest of what
        forward computes (that layer's attention and MLP, any layer after it, the head) is not needed
        for frames whose output nobody reads, as for those a rollout feeds back. Returns nothing."""
        x, rope, _ = self.embed(x_tau, tau, d, actions, action_mask, cache.length)
        for block in self.blocks[:self.last_time_block]:
            x = block(x, rope, cache)
        self.blocks[self.last_time_block].store_keys_values(x, rope, cache)
        cache.length += x_tau.shape[1]


def main():
    parser = argparse.ArgumentParser(description="Print the size of the dynamics model presets.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="one preset (default: all)")
    parser.add_argument("--head", choices=["linear", "dh"], default=None, help="override the output head")
    args = parser.parse_args()
    for name in [args.preset] if args.preset else PRESETS:
        overrides = {"head": args.head} if args.head else {}
        config = DynamicsConfig.preset(name, **overrides)
        model = DynamicsModel(config)
        print(f"{name:6s} {model.num_parameters() / 1e6:8.2f} M parameters  "
              f"{config.tokens_per_frame} tokens/frame  width {config.width}  depth {config.depth} "
              f"({model.time_layers} time layers)  head {config.head}")


if __name__ == "__main__":
    main()
