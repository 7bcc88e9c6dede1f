"""Attention kernels behind one signature, plus the mask they share.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
Masks are built from *slot indices* (the absolute position of a token in its row or KV cache),
so the same code serves training (slots = arange(T)) and cached decoding (slots of the cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_mask(q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None, k_valid_BS=None):
    """Boolean [B, 1, T, S]: causal by slot, same segment, key valid (not padding / filled)."""
    mask = k_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if k_valid_BS is not None:
        mask &= k_valid_BS[:, None, :]
    return mask[:, None]


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale: float):
    """Plain einsum attention in the input dtype; softmax in float32. Used as the test oracle."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH).astype(jnp.float32) * scale
    s_BKGTS = jnp.where(mask_B1TS[:, :, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    # A fully masked row (a padding query) gets uniform weights over nothing useful; zero it.
    p_BKGTS = jnp.where(mask_B1TS[:, :, None].any(-1, keepdims=True), p_BKGTS, 0.0)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


def attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, *, impl: str = "xla", scale: float | None = None):
    """Multi-head attention with GQA/MQA (K divides N). Returns [B, T, N, H] in q's dtype.

    impl: 'xla' and 'cudnn' go through `jax.nn.dot_product_attention` (cuDNN's fused kernel needs
    a GPU and bf16/fp16); 'reference' is the einsum oracle above.
    """
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    if impl == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attn_impl={impl!r}: use 'xla', 'cudnn' or 'reference'")
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=scale, implementation=impl)
