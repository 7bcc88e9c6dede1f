"""Attention kernels behind one signature, plus the mask they share.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
Masks are built from *slot indices* (the absolute position of a token in its row or KV cache),
so the same code serves training (slots = arange(T)) and cached decoding (slots of the cache).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from parallel.autodiff import custom_vjp, plain


def make_mask(q_idx_BT, k_idx_BS, q_seg_BT=None, k_seg_BS=None, k_valid_BS=None):
    """Boolean [B, 1, T, S]: causal by slot, same segment, key valid (not padding / filled)."""
    if (q_seg_BT is None) != (k_seg_BS is None):
        raise ValueError("make_mask: pass segment ids for both queries and keys (q_seg_BT and k_seg_BS; the same "
                         "array in self-attention), or neither")
    mask = k_idx_BS[:, None, :] <= q_idx_BT[:, :, None]
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if k_valid_BS is not None:  # (an int one's bitwise & made an int mask, read 2s as padding, failed for NumPy)
        mask &= valid_mask(k_valid_BS, "make_mask: k_valid_BS")[:, None, :]
    return mask[:, None]


def valid_mask(valid, name: str = "valid_BT"):
    """A padding mask as bool (None stays None): an integer one (a tokenizer's 0/1 attention_mask) reads != 0, as
    Transformer's padding_mask_BT does; any other dtype is refused by `name`: a float one failed inside jnp's `&`
    naming neither the mask nor the fix."""
    if valid is None:
        return None
    dtype = valid.dtype if hasattr(valid, "dtype") else np.asarray(valid).dtype  # (no device transfer)
    if dtype == jnp.bool_:
        return valid
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(valid) != 0
    raise ValueError(f"{name} must be a bool mask (True = a real token) or 0/1 ints, got dtype {dtype}; turn a "
                     "float 0/1 mask into one with `mask > 0`")


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale: float, logit_softcap: float | None = None):
    """Plain einsum attention in the input dtype; scores and softmax in float32 (float64 for float64 inputs). Used
    as the test oracle.

    logit_softcap: Gemma-2 style cap·tanh(s / cap) on the scaled scores, before masking.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    acc = jnp.promote_types(q_BTKGH.dtype, jnp.float32)  # bf16 operands: float32 scores; float64 stays float64
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=acc) * scale
    if logit_softcap is not None:
        s_BKGTS = logit_softcap * jnp.tanh(s_BKGTS / logit_softcap)
    s_BKGTS = jnp.where(mask_B1TS[:, :, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    # A fully masked row (a padding query) gets uniform weights over nothing useful; zero it.
    p_BKGTS = jnp.where(mask_B1TS[:, :, None].any(-1, keepdims=True), p_BKGTS, 0.0)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked score (as jax.nn.dot_product_attention)


def _acc(x):
    """Scores', softmax's and accumulations' dtype: float32 for 16/32-bit inputs, float64 for float64 (tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


MAX_CAUSAL_BLOCKS = 16  # each query block is unrolled in the program (compile time and dispatch grow with them)


def check_block(block, name: str, optional: bool = False):
    """Refuses a query block that is not an int >= 1 (numpy ints pass; None too where `optional`): 0, a negative one
    or True ran silently as blocks of 1 (or T / 16) rows, and a fraction failed in a bare jnp.pad or range naming no
    argument."""
    if optional and block is None:
        return
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"{name} must be an int >= 1 (query rows per block){' or None' if optional else ''}, "
                         f"got {block!r}")


def causal_block_rows(T: int, causal_block: int) -> int:
    """Query rows per block of the block-causal kernel: `causal_block`, or T / 16 when that is larger. At long T the
    blocks would otherwise multiply: 128 blocks of 64 at T = 8192 compiled in 60 s (16 blocks of 512: 13 s) and ran
    1.12x slower (a 4-layer model's value and gradient on CPU; docs/benchmarks.md, twenty-first session).
    scaling.flops.executed_keys counts the same blocks."""
    return max(causal_block, -(-T // MAX_CAUSAL_BLOCKS))


def check_softcap(softcap, who: str) -> None:
    """Refuses a soft-cap that is not > 0 (None is no cap): 0, flash-attn's "off", made every score 0·tanh(s / 0) =
    0, uniform attention, silently (a negative one is the same cap as its absolute value, TransformerConfig refuses
    both). A traced one passes here: the kernels that cannot take it say so (`static_scale`)."""
    if softcap is not None and not isinstance(softcap, jax.core.Tracer) and not softcap > 0:
        raise ValueError(f"{who}: logit_softcap must be > 0 or None (None: no soft-cap), got {softcap!r}")


def static_scale(q, scale, softcap=None):
    """(q, scale) for the custom-VJP kernels, whose scale and soft-cap are static (nondiff) arguments: a traced scale
    (jit argument, learned temperature) is folded into q [..., H] (multiplied in float32, back in q's dtype: one more
    bf16 rounding), so autodiff differentiates it, and the kernel gets 1.0. Without this jax raised
    UnexpectedTracerError about custom_vjp's nondiff_argnums. A traced soft-cap cannot be folded: a ValueError names it.
    """
    if isinstance(softcap, jax.core.Tracer):
        raise ValueError("logit_softcap must be a Python number (a static config value), got a traced value; pass it "
                         "as a constant, or use impl='reference' to differentiate it")
    if isinstance(scale, jax.core.Tracer):
        return (q.astype(_acc(q)) * scale).astype(q.dtype), 1.0
    return q, scale


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale: float, causal_block: int | None = None,
                  softcap: float | None = None):
    """`jax.nn.dot_product_attention(implementation='xla')` semantics, laid out and differentiated for speed.

    Heads move in front of time once ([B, K, G, T, H]), so every einsum is a plain batched matmul
    over (B, K) with G·T rows. Scores and softmax are float32; a fully masked row gets uniform
    weights (as in jax) over the keys its block scores, and, its scores being constants, sends no gradient to
    q or k. The backward pass is written by hand (`_core`).

    causal_block: C, only for a mask that is causal by position (T == S, query t never sees key s > t;
    padding and segments may mask more). Queries then go in blocks of C (at least T / 16: `causal_block_rows`)
    and block i scores keys [0, (i + 1)·C) only, skipping the all-masked blocks above the diagonal: (Q + 1) / 2Q
    of the dense work for Q = T / C blocks.
    softcap: Gemma-2 style cap·tanh(s / cap) on the scaled scores, before masking.
    """
    q_BTNH, scale = static_scale(q_BTNH, scale, softcap)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    mask_B11TS = mask_B1TS[:, :, None]
    # a symbolic T (jax.export's shape polymorphism) has no static block count: one dense block, the same output
    C = None if causal_block is None or not isinstance(T, int) else causal_block_rows(T, causal_block)
    if C is None or T != S or T <= C:
        o_BKGTH = _core(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, softcap)
    else:
        # a mask broadcast over T or S (size 1) is causal for no T = S > 1: block i's slice [lo:hi] of a size-1 T was
        # empty (a bare broadcasting error), and a size-1 S let each block see its whole key prefix, silently
        if tuple(mask_B1TS.shape[2:]) != (T, S):
            raise ValueError(f"attention: causal_block={causal_block} promises a mask causal by position, but "
                             f"mask_B1TS has shape {tuple(mask_B1TS.shape)}, broadcast over T or S, which no causal "
                             f"mask is at T = S = {T}; pass the whole [B, 1, T, S] mask (models.attention.make_mask) "
                             "or causal_block=None")
        o_BKGTH = _blocked(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, C, softcap)
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _bounds(T: int, C: int):
    return [(lo, min(lo + C, T)) for lo in range(0, T, C)]


@functools.partial(custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, C, softcap=None):
    """Query blocks of C, block i against keys [0, (i + 1)·C). One VJP for all blocks, so that the backward keeps
    q, k, v once: per-block VJPs would each keep their key prefix k[:, :, :(i + 1)·C], (T / C + 1) / 2 copies of
    K and V in all (16.5 at T = 2048, C = 64)."""
    return _blocked_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, C, softcap)[0]


def _blocked_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, C, softcap=None):
    outs, stats = [], []
    for lo, hi in _bounds(q_BKGTH.shape[3], C):
        o, res = _core_fwd(q_BKGTH[:, :, :, lo:hi], k_BKSH[:, :, :hi], v_BKSH[:, :, :hi],
                           mask_B11TS[..., lo:hi, :hi], scale, softcap)
        outs.append(o)
        stats.append(res[4:7])  # E, l, and the row max under softcap
    o_BKGTH = jnp.concatenate(outs, axis=3)
    return o_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, tuple(stats), _kept_output(o_BKGTH))


def _blocked_bwd(scale, C, softcap, res, do_BKGTH):
    q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, stats, o_BKGTH = res
    dqs, dk_BKSH, dv_BKSH = [], jnp.zeros(k_BKSH.shape, _acc(k_BKSH)), jnp.zeros(v_BKSH.shape, _acc(v_BKSH))
    for (lo, hi), (e, l1, m1) in zip(_bounds(q_BKGTH.shape[3], C), stats):
        dq, dk, dv, _ = _core_bwd(scale, softcap, (q_BKGTH[:, :, :, lo:hi], k_BKSH[:, :, :hi], v_BKSH[:, :, :hi],
                                                   mask_B11TS[..., lo:hi, :hi], e, l1, m1,
                                                   None if o_BKGTH is None else o_BKGTH[:, :, :, lo:hi]),
                                  do_BKGTH[:, :, :, lo:hi], out_dtype=_acc(q_BKGTH))
        dqs.append(dq.astype(q_BKGTH.dtype))
        dk_BKSH, dv_BKSH = dk_BKSH.at[:, :, :hi].add(dk), dv_BKSH.at[:, :, :hi].add(dv)
    return jnp.concatenate(dqs, axis=3), dk_BKSH.astype(k_BKSH.dtype), dv_BKSH.astype(v_BKSH.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _core_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, softcap=None):
    """Softmax attention keeping the unnormalised weights E = exp(s - max) and their row sums l (and, with a
    soft-cap, the row maxima, from which the backward recovers the capped scores: no tanh kept per score)."""
    acc = _acc(q_BKGTH)
    s_BKGTS = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH, preferred_element_type=acc) * scale
    if softcap is not None:
        s_BKGTS = softcap * jnp.tanh(s_BKGTS / softcap)
    s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, _NEG)
    m_BKGT1 = s_BKGTS.max(-1, keepdims=True)
    e_BKGTS = jnp.exp(s_BKGTS - m_BKGT1)
    l_BKGT1 = e_BKGTS.sum(-1, keepdims=True)
    # normalise the [T, H] output rather than the [T, S] weights
    o_BKGTH = jnp.einsum("bkgts,bksh->bkgth", e_BKGTS.astype(v_BKSH.dtype), v_BKSH,
                         preferred_element_type=acc) / l_BKGT1
    o_BKGTH = o_BKGTH.astype(q_BKGTH.dtype)
    m_BKGT1 = m_BKGT1 if softcap is not None else None
    return o_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, e_BKGTS, l_BKGT1, m_BKGT1, _kept_output(o_BKGTH))


def _kept_output(o_BKGTH):
    """The output, kept for the backward's row statistic only when stored at the accumulation precision (float32 /
    float64); a narrower one's rounding makes the [T, H] shortcut wrong at peaked rows (`_core_bwd`)."""
    return o_BKGTH if jnp.dtype(o_BKGTH.dtype).itemsize >= 4 else None


def _core_bwd(scale, softcap, res, do_BKGTH, out_dtype=None):
    """With P = E / l: dV = Pᵀ dO, dS = P ∘ (dP - rowsum(P ∘ dP)), dP = dO Vᵀ, dQ = scale·dS K, dK = scale·dSᵀ Q.

    1/l is folded into dO. The row statistic rowsum(P ∘ dP) equals rowsum(dO ∘ O) (FlashAttention's shortcut: a
    [T, H] product instead of a second pass over the [T, S] dP), used for a float32 / float64 output. A bf16 output
    is rounded before it is kept, and at a peaked row (scores ~1e3) dS is the small difference of dP and that
    statistic: the shortcut left dq / dk 74% / 88% off the float64 gradient (1.4% at scores of std ~25), so there it
    is summed from dP itself (~2% over draws at scores ~900, as jax's autodiff) and O is not kept. In float32 the
    shortcut is ~1% off at scores ~1e3 (the two sums' order; autodiff 0.01%), growing with the scores (at ~3600, a
    saturated tensor whose true |dq| <= 5e-5, 300-450% relative, 7e-3 absolute), and saves 1.6-1.9% of the reference
    CPU train step.
    Soft-cap s = c·tanh(r / c): dS is multiplied by 1 - (s / c)², with s = log E + max where E > 0 (where E
    underflowed to 0, dS is 0 whatever the factor; a fully masked row's factor is 1, its dS dropped).
    """
    q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, e_BKGTS, l_BKGT1, m_BKGT1, o_BKGTH = res
    acc = _acc(q_BKGTH)
    g_BKGTH = do_BKGTH.astype(acc) / l_BKGT1  # dO / l
    dv_BKSH = jnp.einsum("bkgts,bkgth->bksh", e_BKGTS.astype(v_BKSH.dtype), g_BKGTH.astype(v_BKSH.dtype),
                         preferred_element_type=acc)
    dp_BKGTS = jnp.einsum("bkgth,bksh->bkgts", g_BKGTH.astype(v_BKSH.dtype), v_BKSH,
                          preferred_element_type=acc)
    if o_BKGTH is not None:  # rowsum(dO ∘ O) / l
        d_BKGT1 = jnp.sum(g_BKGTH * o_BKGTH.astype(acc), -1, keepdims=True)
    else:  # rowsum(P ∘ dP), from the dP it is subtracted from
        d_BKGT1 = jnp.sum(e_BKGTS * dp_BKGTS, -1, keepdims=True) / l_BKGT1
    ds_BKGTS = e_BKGTS * (dp_BKGTS - d_BKGT1) * scale
    # E = 1 on a fully masked row (uniform weights), but the scores there are constants: no dS
    live_B11T1 = mask_B11TS.any(-1, keepdims=True)
    if softcap is not None:
        # such a row's max is the masked score: its factor (_NEG / c)² overflowed to -inf, and the zero cotangent
        # the select below sends into it made reverse-over-reverse NaN (0 · inf); its dS is dropped anyway
        t_BKGTS = (jnp.log(jnp.where(e_BKGTS > 0, e_BKGTS, 1.0)) + jnp.where(live_B11T1, m_BKGT1, 0.0)) / softcap
        ds_BKGTS = ds_BKGTS * (1.0 - t_BKGTS * t_BKGTS)
    ds_BKGTS = jnp.where(live_B11T1, ds_BKGTS, 0.0).astype(q_BKGTH.dtype)
    dq_BKGTH = jnp.einsum("bkgts,bksh->bkgth", ds_BKGTS, k_BKSH, preferred_element_type=acc)
    dk_BKSH = jnp.einsum("bkgts,bkgth->bksh", ds_BKGTS, q_BKGTH, preferred_element_type=acc)
    cast = lambda x, like: x.astype(out_dtype or like.dtype)  # noqa: E731  (out_dtype: blocks summed in f32)
    return cast(dq_BKGTH, q_BKGTH), cast(dk_BKSH, k_BKSH), cast(dv_BKSH, v_BKSH), None


@functools.partial(custom_vjp, nondiff_argnums=(4, 5))
def _core(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, softcap=None):
    return _core_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, softcap)[0]


_core.defvjp(_core_fwd, _core_bwd)


def softmax_attention(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale: float, softcap: float | None = None):
    """The kernel under `xla_attention` and the blocked sliding-window one, in its own layout: q [B, K, G, T, H],
    k / v [B, K, S, H], a bool mask broadcastable to [B, 1, 1, T, S] → [B, K, G, T, H] in q's dtype. Float32 scores
    and softmax (float64 for float64 inputs); its VJP keeps E = exp(s - max) and the row sums, not probabilities."""
    return _core(q_BKGTH, k_BKSH, v_BKSH, mask_B11TS, scale, softcap)


def attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, *, impl: str = "xla", scale: float | None = None,
              logit_softcap: float | None = None, causal_block: int | None = None, is_causal: bool = False):
    """Multi-head attention with GQA/MQA (K divides N). Returns [B, T, N, H] in q's dtype.

    mask_B1TS: bool, True where query t may attend key s ('xla' and 'reference' also read 0/1 ints); a float mask
    (an additive bias) is refused.

    impl: 'xla' is `xla_attention` above (any backend); 'cudnn' is cuDNN's fused kernel through
    `jax.nn.dot_product_attention` (needs a GPU and bf16/fp16; soft-capped scores run 'xla'; a head dim cuDNN refuses
    is a ValueError naming attn_impl; odd lengths train through `cudnn_attention`'s padding); 'reference' is the
    einsum oracle.
    causal_block: promise that the mask is causal by position, so 'xla' may skip the key blocks
    above the diagonal (see `xla_attention`; where it does, a mask broadcast over T or S is a ValueError); the other
    implementations ignore it.
    is_causal: promise that the mask is *exactly* the causal one (T == S, no padding, no segments).
    'cudnn' then runs its causal mask type, which skips the blocks above the diagonal; given a mask
    tensor instead, jax turns it into an additive [B, 1, T, S] bias that the kernel reads in full.
    """
    (B, T, N, H), (S, K, Hk) = q_BTNH.shape, k_BSKH.shape[1:]  # (a bare reshape error deep in the kernel otherwise)
    check_block(causal_block, "attention: causal_block", optional=True)
    if N % K or H != Hk or v_BSKH.shape[1:] != (S, K, H):
        raise ValueError(f"attention: q [B, T, N={N}, H={H}], k {tuple(k_BSKH.shape)}, v {tuple(v_BSKH.shape)}: the "
                         "query heads N must be a multiple of the kv heads K, and k / v share [B, S, K] and q's H")
    # (another batch failed in a bare einsum error; a batch of 1 ran forward but its gradient failed in custom_vjp)
    if k_BSKH.shape[0] != B or v_BSKH.shape[0] != B:
        raise ValueError(f"attention: k {tuple(k_BSKH.shape)} and v {tuple(v_BSKH.shape)} must have q's batch B={B} "
                         "(keys shared by every row: jnp.broadcast_to them to [B, S, K, H])")
    check_softcap(logit_softcap, "attention")
    if jnp.issubdtype(mask_B1TS.dtype, jnp.floating):  # the kernels read a mask by its truthiness
        raise ValueError(f"attention: mask_B1TS must be bool (True = attend), got "
                         f"{mask_B1TS.dtype}: an additive bias (0 attended, -inf masked) would be read inverted; "
                         "pass `bias == 0`")
    # a [B, T, S] mask (no head axis) broadcast against the kernels' [B, K, G, T, S] scores: at T = 1 with B == K
    # it masked kv head b with row b's keys, silently; size-1 axes broadcast as documented
    m = jnp.shape(mask_B1TS)
    if len(m) != 4 or m[1] != 1 or any(d not in (1, n) for d, n in zip((m[0], m[2], m[3]), (B, T, S))):
        raise ValueError(f"attention: mask_B1TS: shape {m}, for q [B={B}, T={T}, ...] and keys S={S}; pass a bool "
                         "[B, 1, T, S] (B, T or S may be 1 to broadcast), e.g. models.attention.make_mask's, or "
                         "mask[:, None] for a [B, T, S] one")
    scale = H ** -0.5 if scale is None else scale
    if impl == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale, logit_softcap)
    if impl == "xla" or (impl == "cudnn" and logit_softcap is not None):  # cuDNN's fused kernel has no soft-cap
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale, causal_block, logit_softcap)
    if impl != "cudnn":
        raise ValueError(f"attn_impl={impl!r}: use 'xla', 'cudnn' or 'reference'")
    if plain():  # at trace time: JAX's TypeError came at jvp time and named no field
        raise ValueError("attn_impl='cudnn' is cuDNN's fused kernel, whose own custom VJP refuses forward mode (jvp) "
                         "under models.plain_autodiff; use attn_impl='xla'")
    if is_causal and q_BTNH.shape[1] != k_BSKH.shape[1]:
        T, S = q_BTNH.shape[1], k_BSKH.shape[1]
        raise ValueError(f"is_causal needs T == S (got {T} quer{'ies' if T != 1 else 'y'}, {S} key{'s' * (S != 1)})")
    check_cudnn_head_dim(H, "attn_impl='cudnn'", "use attn_impl='xla'")
    try:
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, None if is_causal else mask_B1TS, scale)
    except RuntimeError as e:  # jax's bare 'cuDNN is not detected.' off NVIDIA GPUs (as swa_impl='cudnn' says)
        if "cudnn" not in str(e).lower():
            raise
        raise ValueError(f"attn_impl='cudnn' is cuDNN's fused kernel for NVIDIA GPUs (bf16 / fp16), and this is a "
                         f"{jax.default_backend()} backend ({e}); use attn_impl='xla'") from None


def cudnn_max_head_dim() -> int | None:
    """The largest head dim cuDNN's fused attention takes on this GPU, as jax's `check_is_flash_attention` decides it:
    256 from Hopper (compute capability 9.0) on, 128 before (A100: 8.0); None off a GPU or where this jax keeps the
    check elsewhere (jax's own error then stands)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_compute_capability  # private: jax's own test
        return 256 if check_compute_capability("9.0") else 128
    except (ImportError, AttributeError, RuntimeError):
        return None


def check_cudnn_head_dim(H: int, who: str, fix: str):
    """cuDNN refuses head dims that are not a multiple of 8 or past `cudnn_max_head_dim` with jax's
    NotImplementedError at trace time, naming no setting: refused here naming `who` (the field) and `fix`."""
    h_max = cudnn_max_head_dim()
    if h_max is not None and (H % 8 or H > h_max):
        raise ValueError(f"{who}: cuDNN's fused attention takes a head dim that is a multiple of 8 and at most {h_max} "
                         f"on this GPU (256 from Hopper on, 128 before), got head_dim={H}; {fix}")


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, scale: float, local_window_size=None):
    """`jax.nn.dot_product_attention(implementation='cudnn')`: causal (cuDNN's own mask type, T == S) when mask_B1TS
    is None, else that bool mask; local_window_size (left, 0) with the causal one. → [B, T, N, H].

    jax's wrapper refuses to differentiate a call whose T or S is odd ("Unsupported sequence length Q 255, KV 255":
    its check counts a bias even when none is passed) but runs the forward: an LM at T = 255 (tokens[:, :-1] of a
    256-token batch), 3 latent frames or an odd caption could not train on a GPU. The forward runs as given; the
    differentiated call pads T and S to even with one query row (row T - 1's mask; its output is dropped, so its
    cotangent is 0 and it adds nothing to dq, dk, dv) and one key that no query sees (masked, or in every real
    query's future under the causal mask): the same values and gradients, one row and column more of work. (Not at
    a row with no visible key, a padding query whose output is garbage by design: cuDNN spreads its weights over all
    keys, the extra one included, so its value there differs; with a zero cotangent there, as every caller's loss
    gives it, the gradients are still exact.)
    A mask that broadcasts over T or S (size 1) is broadcast here: jax's wrapper refuses a bias of another length."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if mask_B1TS is not None:
        mask_B1TS = jnp.broadcast_to(mask_B1TS, mask_B1TS.shape[:2] + (T, S))

    def run(q, k, v, mask):
        kw = dict(is_causal=True, local_window_size=local_window_size) if mask is None else dict(mask=mask)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **kw)

    if T % 2 == 0 and S % 2 == 0:
        return run(q_BTNH, k_BSKH, v_BSKH, mask_B1TS)

    def padded(q, k, v, mask):
        pt, ps = T % 2, S % 2
        q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, ps), (0, 0), (0, 0))) for x in (k, v))
        if mask is not None:  # the extra key masked for every query, the extra query row a copy of the last one's
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, ps)))
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pt), (0, 0)), mode="edge")
        return run(q, k, v, mask)[:, :T]

    @custom_vjp
    def attend(q, k, v, mask):
        return run(q, k, v, mask)

    def fwd(q, k, v, mask):
        out, pullback = jax.vjp(lambda q, k, v: padded(q, k, v, mask), q, k, v)
        return out, pullback

    def bwd(pullback, do):
        return (*pullback(do), None)

    attend.defvjp(fwd, bwd)
    return attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS)
