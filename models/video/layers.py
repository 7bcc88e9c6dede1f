"""Pieces the video Transformers share: spacetime patches, 3D RoPE, windowed spacetime attention, adaLN.

Shapes: B batch, T/H/W latent frames/rows/columns, C latent channels, S = T'·H'·W' tokens (t-major),
D model width, N heads, K head dim (H is taken by height here), L text tokens, F MLP width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import attention
from models.glu import glu_linear
from models.linear import flat_rows, linear
from models.params import param
from models.rope import apply_rope, inv_frequencies
from models.sliding_window import sliding_window_attention
from models.transformer import rms_norm
from parallel.rules import constrain


def patchify(x_BTHWC, patch):
    """[B, T, H, W, C] → [B, S, pt·ph·pw·C] with S = (T/pt)(H/ph)(W/pw), tokens in (t, h, w) order."""
    B, T, H, W, C = x_BTHWC.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:  # reshape's own error named an 8-D shape, not the patch or the axis
        raise ValueError(f"patchify: patch {tuple(patch)} does not divide the latents' (T, H, W)=({T}, {H}, {W}); "
                         "crop or pad them to multiples of the patch (DiTConfig.latent_shape)")
    x = x_BTHWC.reshape(B, T // pt, pt, H // ph, ph, W // pw, pw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # b t h w | pt ph pw c
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify(x_BSP, patch, grid, channels):
    """Inverse of `patchify`: [B, S, pt·ph·pw·C] → [B, T, H, W, C]."""
    B = x_BSP.shape[0]
    (pt, ph, pw), (t, h, w) = patch, grid
    if tuple(x_BSP.shape[1:]) != (t * h * w, pt * ph * pw * channels):
        raise ValueError(f"unpatchify: tokens {list(x_BSP.shape)} do not match grid {tuple(grid)}, patch "
                         f"{tuple(patch)} and {channels} channels: need [B, {t * h * w}, {pt * ph * pw * channels}]")
    x = x_BSP.reshape(B, t, h, w, pt, ph, pw, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, t * pt, h * ph, w * pw, channels)


def grid_positions(grid) -> np.ndarray:
    """int32 [S, 3]: the (t, h, w) index of every token, t-major like `patchify`."""
    t, h, w = grid
    return np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3).astype(
        np.int32)


def apply_rope_3d(x_BSNK, pos_S3, split, theta: float):
    """3D rotary embedding: the head dim is cut into (t, h, w) parts of sizes `split`, each rotated by its
    own coordinate with `models.rope.apply_rope`. Inside one frame the t-rotation is common to every key,
    so it cancels in q·k: spatial and full attention see the same relative geometry."""
    out, start = [], 0
    for axis, size in enumerate(split):
        if size:
            part = x_BSNK[..., start:start + size]
            out.append(apply_rope(part, jnp.asarray(pos_S3[None, :, axis]), inv_frequencies(size, theta)))
        start += size
    return jnp.concatenate(out, axis=-1)


def window_mask(grid, spatial_window: int | None, temporal_window: int | None):
    """Boolean [1, 1, S, S] over the tokens of `grid`: |Δh|, |Δw| <= spatial_window // 2 and
    0 <= Δt < temporal_window (a frame sees itself and earlier ones). None: unrestricted."""
    pos = grid_positions(grid)
    d = pos[:, None, :] - pos[None, :, :]  # query - key
    mask = np.ones(d.shape[:2], bool)
    if spatial_window is not None:
        r = spatial_window // 2
        mask &= (np.abs(d[..., 1]) <= r) & (np.abs(d[..., 2]) <= r)
    if temporal_window is not None:
        mask &= (d[..., 0] >= 0) & (d[..., 0] < temporal_window)
    return jnp.asarray(mask[None, None])


def _vmap(attend, axis: int, impl: str):
    """jax.vmap(attend) over `axis` of its q, k, v, the output's same axis. cuDNN's batching rule takes a leading
    batch axis only (jax's NotImplementedError 'Currently only support batch_dim in [0, None]' at trace time on a
    GPU), so for impl 'cudnn' the axis is moved to the front first; the other kernels keep the vmap over it."""
    if impl != "cudnn":
        return jax.vmap(attend, in_axes=axis, out_axes=axis)
    return lambda *qkv: jax.vmap(attend, out_axes=axis)(*(jnp.moveaxis(x, axis, 0) for x in qkv))


def spacetime_attention(q_BSNK, k_BSNK, v_BSNK, grid, layout: str, *, spatial_window=None, temporal_window=None,
                        impl: str = "xla"):
    """Self-attention of tokens on `grid` with `layout`: 'full' (all S tokens), 'spatial' (within each
    frame) or 'temporal' (across frames at each position). A temporal window with the temporal layout
    runs the blocked sliding-window kernel; other windows are dense masks. Returns [B, S, N, K]."""
    B, S, N, K = q_BSNK.shape
    T, H, W = grid
    if layout == "full":
        mask = window_mask(grid, spatial_window, temporal_window)
        return attention(q_BSNK, k_BSNK, v_BSNK, mask, impl=impl)
    # Each frame (spatial) or each position (temporal) is an attention problem of its own, vmapped over its axis of
    # a [B, T, H·W, N, K] view rather than merged into the batch: XLA did not carry a sequence split of T or H·W
    # through such a merge, and gathered q, k and v whole on every sequence device.
    view = lambda x: x.reshape(B, T, H * W, N, K)  # noqa: E731
    if layout == "spatial":
        mask = window_mask((1, H, W), spatial_window, None)
        o = _vmap(lambda q, k, v: attention(q, k, v, mask, impl=impl), 1, impl)(view(q_BSNK), view(k_BSNK),
                                                                                 view(v_BSNK))
        return o.reshape(B, S, N, K)
    if layout != "temporal":
        raise ValueError(f"layout={layout!r}: use 'full', 'spatial' or 'temporal'")

    # Under sequence parallelism the tokens arrive split by frame and a position needs all T of them: the split
    # moves to the H·W positions (an all-to-all each way, Ulysses-style).
    columns = ("batch", None, "act_frame_pos", "act_heads", None)
    if temporal_window is not None:
        attend = lambda q, k, v: sliding_window_attention(q, k, v, temporal_window, block=T)  # noqa: E731
    else:
        attend = lambda q, k, v: attention(q, k, v, jnp.ones((1, 1, T, T), bool), impl=impl)  # noqa: E731
    o = _vmap(attend, 2, impl)(*(constrain(view(x), columns) for x in (q_BSNK, k_BSNK, v_BSNK)))
    return constrain(o, columns).reshape(B, S, N, K)


def matmul(x, w, cd, contract: int = 1):
    """x [..., C...] @ a weight [C..., O...] → [..., O...]: x's last `contract` dims meet w's first (e.g.
    q = h [B, S, D] @ wq [D, N, K] → [B, S, N, K]; o [B, S, N, K] @ wo [N, K, D] with contract=2 → [B, S, D]).

    Projections run through `models.linear` as 2-D matmuls over M = B·S rows: their weight gradients are then plain
    dots, whereas 3-D einsums make XLA:CPU transpose inside slow loop fusions (as in models.transformer). Not when
    the mesh shards the sequence: [B, S] rows with S split are not a per-device block, and XLA would gather them.
    The weight keeps its own shape: a reshaped copy would be a new array, which the DiT's layer scan saves per layer.
    On CPU (matmul_impl 'auto') their weight gradients come from a materialised transpose of the narrower of x and
    the cotangent, also inside the layer scan; bf16 compute runs bf16 dots with float32 accumulation."""
    return linear(x.astype(cd), w[...].astype(cd), "auto", flatten=flat_rows(), contract=contract)


def _in_float32(fn):
    """`fn` computed in float32 and returned in its first argument's dtype. Below float32 it runs under
    jax.checkpoint, so autodiff keeps its (bf16) inputs for the backward and recomputes the float32 copies: kept,
    they made a bf16 DiTBlock's saved residuals 1.32x the count (1.14x before) under remat 'none'."""
    def f32_fn(*args):
        return fn(*(a.astype(jnp.float32) for a in args)).astype(args[0].dtype)

    saving_inputs = jax.checkpoint(f32_fn, policy=jax.checkpoint_policies.nothing_saveable)

    @functools.wraps(fn)
    def wrapped(*args):
        return f32_fn(*args) if args[0].dtype == jnp.float32 else saving_inputs(*args)

    return wrapped


@_in_float32
def modulate(x_BSD, shift_BD, scale_BD):
    """adaLN modulation x·(1 + scale) + shift, the per-example [B, D] vectors broadcast over the S tokens; computed in
    float32, returned in x's dtype. In bf16, 1 + scale has a step of 2^-7 (adaLN-Zero's small scales, |scale| < 2^-8,
    vanished), and the gradients of shift and scale, sums over the S tokens, were summed in bf16."""
    return x_BSD * (1 + scale_BD[:, None]) + shift_BD[:, None]


@_in_float32
def gated_add(x_BSD, gate_BD, h_BSD):
    """The adaLN-Zero residual x + gate·h (gate [B, D] broadcast over the S tokens) in float32, returned in x's
    dtype: the gate's gradient, a sum over the S tokens, then sums in float32 (bf16 operands summed it in bf16)."""
    return x_BSD + gate_BD[:, None] * h_BSD


def plain_norm(x, eps):
    """RMSNorm without a learned scale (adaLN supplies scale and shift)."""
    return rms_norm(x, jnp.ones((), jnp.float32), eps)


def timestep_embedding(t_B, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features of 1000·t (t in [0, 1]): [B, dim] float32, cos half then sin half."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with optional QK-norm and 3D RoPE, over a token grid in any layout."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, qk_norm: bool, std: float, dtype, rngs):
        d, n, k = d_model, n_heads, head_dim
        self.wq = param(rngs, (d, n, k), ("embed", "heads", "head_dim"), dtype, std)
        self.wk = param(rngs, (d, n, k), ("embed", "heads", "head_dim"), dtype, std)
        self.wv = param(rngs, (d, n, k), ("embed", "heads", "head_dim"), dtype, std)
        self.wo = param(rngs, (n, k, d), ("heads", "head_dim", "embed"), dtype, std)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = param(rngs, (k,), ("norm",), dtype)
            self.k_norm = param(rngs, (k,), ("norm",), dtype)

    def __call__(self, h_BSD, grid, layout: str, *, rope_split, rope_theta, cd, eps=1e-6, spatial_window=None,
                 temporal_window=None, impl="xla"):
        B, S, D = h_BSD.shape
        N, K = self.wq.shape[1:]
        q = matmul(h_BSD, self.wq, cd).reshape(B, S, N, K)
        k = matmul(h_BSD, self.wk, cd).reshape(B, S, N, K)
        v = matmul(h_BSD, self.wv, cd).reshape(B, S, N, K)
        if self.qk_norm:  # keeps logits bounded however the residual stream grows
            q, k = rms_norm(q, self.q_norm[...], eps), rms_norm(k, self.k_norm[...], eps)
        pos = grid_positions(grid)
        q = apply_rope_3d(q, pos, rope_split, rope_theta)
        k = apply_rope_3d(k, pos, rope_split, rope_theta)
        q = constrain(q, ("batch", "act_seq", "act_heads", None))
        o = spacetime_attention(q, k, v, grid, layout, spatial_window=spatial_window,
                                temporal_window=temporal_window, impl=impl)
        return matmul(o, self.wo, cd, contract=2)


class CrossAttention(nnx.Module):
    """Video tokens (queries) attend to text tokens (keys/values, `text_dim` wide); padding keys masked."""

    def __init__(self, d_model: int, text_dim: int, n_heads: int, head_dim: int, *, qk_norm: bool, std: float,
                 dtype, rngs):
        d, e, n, k = d_model, text_dim, n_heads, head_dim
        self.wq = param(rngs, (d, n, k), ("embed", "heads", "head_dim"), dtype, std)
        # the text width is an embedding dim too: FSDP shards it (None replicated both on every fsdp device)
        self.wk = param(rngs, (e, n, k), ("embed", "heads", "head_dim"), dtype, std)
        self.wv = param(rngs, (e, n, k), ("embed", "heads", "head_dim"), dtype, std)
        self.wo = param(rngs, (n, k, d), ("heads", "head_dim", "embed"), dtype, std)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = param(rngs, (k,), ("norm",), dtype)
            self.k_norm = param(rngs, (k,), ("norm",), dtype)

    def __call__(self, h_BSD, text_BLE, text_valid_BL, *, cd, eps=1e-6, impl="xla"):
        B, S, D = h_BSD.shape
        L, E = text_BLE.shape[1:]
        N, K = self.wq.shape[1:]
        q = matmul(h_BSD, self.wq, cd).reshape(B, S, N, K)
        k = matmul(text_BLE, self.wk, cd).reshape(B, L, N, K)
        v = matmul(text_BLE, self.wv, cd).reshape(B, L, N, K)
        if self.qk_norm:
            q, k = rms_norm(q, self.q_norm[...], eps), rms_norm(k, self.k_norm[...], eps)
        if jnp.issubdtype(text_valid_BL.dtype, jnp.integer):  # 0/1 ints are accepted; cuDNN's kernel refuses them
            text_valid_BL = text_valid_BL.astype(bool)  # (a float mask goes on to `attention`, which names it)
        mask = jnp.broadcast_to(text_valid_BL[:, None, None, :], (B, 1, S, L))
        o = attention(q, k, v, mask, impl=impl)
        # a caption with no real token (an all-padding null caption) adds nothing, whatever attn_impl: 'xla'
        # and cuDNN would average the padding values over a fully masked row, 'reference' gives zeros
        o = jnp.where(text_valid_BL.any(-1)[:, None, None, None], o, 0)
        return matmul(o, self.wo, cd, contract=2)


class SwiGLU(nnx.Module):
    """The DiT blocks' MLP: [B, S, D] → [B, S, D] through a SiLU-gated hidden width, weights with logical axes."""

    def __init__(self, d_model: int, hidden: int, *, std: float, dtype, rngs):
        self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), dtype, std)
        self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), dtype, std)
        self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), dtype, std)

    def __call__(self, h_BSD, cd):
        mlp = lambda w: constrain(matmul(h_BSD, w, cd), ("batch", "act_seq", "act_mlp"))  # noqa: E731
        return glu_linear(mlp(self.w_gate), mlp(self.w_up), self.w_down[...].astype(cd), "silu", flatten=flat_rows())
