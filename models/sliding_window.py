"""Causal sliding-window attention that costs O(T·W), not O(T²).

Mistral semantics: query i attends keys j with i - W < j <= i. The sequence is cut into blocks of C
queries; query block i needs only key blocks i - R .. i with R = ceil((W - 1) / C), so scores are
[T, (R + 1)·C] instead of [T, T]. The blocks run through `models.attention.softmax_attention`, whose
hand-written VJP keeps the backward pass O(T·W) as well (it stores the blocked exp-scores and their row sums).

Shapes: B batch, T tokens, N query heads, K kv heads, G = N // K, H head dim, Q blocks of C
queries, S = (R + 1)·C keys per block.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers

import jax
import jax.numpy as jnp

from models.attention import (
    check_block,
    check_cudnn_head_dim,
    check_softcap,
    cudnn_attention,
    cudnn_max_head_dim,
    softmax_attention,
    static_scale,
    valid_mask,
)
from parallel.autodiff import custom_vjp, plain
from parallel.rules import constrain_leading, logical_to_spec


def num_key_blocks(window: int, block: int, n_blocks: int) -> int:
    """Key blocks a query block touches: itself plus ceil((W - 1) / C) before it (capped)."""
    return min(n_blocks, math.ceil(max(window - 1, 0) / block) + 1)


def _windows(x_BQC, nk: int, fill):
    """[B, Q, C, ...] → [B, Q, nk·C, ...]: for block i, blocks i - nk + 1 .. i (front-filled)."""
    B, Q, C = x_BQC.shape[:3]
    pad = jnp.full((B, nk - 1, C) + x_BQC.shape[3:], fill, x_BQC.dtype)
    xp = jnp.concatenate([pad, x_BQC], axis=1)
    win = jnp.stack([xp[:, j:j + Q] for j in range(nk)], axis=2)  # [B, Q, nk, C, ...]
    return win.reshape((B, Q, nk * C) + x_BQC.shape[3:])


@functools.partial(custom_vjp, nondiff_argnums=(1,))
def _key_windows(x_BQC, nk: int):
    """`_windows(x, nk, 0)` for keys / values, whose backward sums each key's nk window cotangents in float32 (at
    least) and rounds once, as the global kernel sums its blocks' dk / dv (`models.attention._blocked_bwd`). Autodiff
    of the stacked slices summed them in the keys' dtype: in bf16, dk / dv were 1.6x / 1.9x further from float64
    than the global kernel's at W = 257 in blocks of 16 (T = 512: 7.4e-3 / 7.3e-3 against 4.7e-3 / 3.8e-3), 2.1x /
    2.3x at 32 blocks per window, growing with W / C."""
    return _windows(x_BQC, nk, 0)


def _key_windows_fwd(x_BQC, nk):
    return _windows(x_BQC, nk, 0), None


def _key_windows_bwd(nk, _, g_BQS):
    acc = jnp.promote_types(g_BQS.dtype, jnp.float32)
    B, Q, S = g_BQS.shape[:3]
    # zeros_like of g's first C slots, not jnp.zeros: the primal must vary over the manual mesh axes g varies over
    # (inside gpipe's shard_map over `stage`, jax.vjp refused a g typed float32[...]{V:stage} for an unvarying primal)
    _, vjp = jax.vjp(lambda x: _windows(x, nk, 0), jnp.zeros_like(g_BQS[:, :, :S // nk], acc))
    return (vjp(g_BQS.astype(acc))[0].astype(g_BQS.dtype),)


_key_windows.defvjp(_key_windows_fwd, _key_windows_bwd)


def _check_window(window):
    """Refuses what is not an int >= 1 (numpy ints pass; bools and fractions, which would run as a rounded window,
    do not)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"sliding window must be an int >= 1, got {window!r}")  # 'dense' gave zeros at 0


def _check_shapes(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, valid_BT=None):
    """Named errors for inputs the blocked kernel tripped over in a bare reshape (keys of another length or batch,
    another head dim, per-token arrays not [B, T]); the per-token arrays' batch may be 1 (broadcast), as before."""
    (B, T, N, H), K = q_BTNH.shape, k_BTKH.shape[2]
    if N % K or tuple(k_BTKH.shape) != (B, T, K, H) or tuple(v_BTKH.shape) != (B, T, K, H):
        raise ValueError(f"sliding-window attention: q [B, T, N, H] = {tuple(q_BTNH.shape)}, k {tuple(k_BTKH.shape)}, "
                         f"v {tuple(v_BTKH.shape)}: k and v must be [B, T, K, H] with q's B, T (self-attention) and H, "
                         "and the query heads N a multiple of the kv heads K")
    for name, a in (("segment_ids_BT", segment_ids_BT), ("valid_BT", valid_BT)):
        m = None if a is None else jnp.shape(a)  # (jnp.shape(None) is deprecated: a warning, an error in tests)
        if m is not None and (len(m) != 2 or m[0] not in (1, B) or m[1] != T):
            raise ValueError(f"sliding-window attention: {name} must be [B, T] = ({B}, {T}) like q (B may be 1), "
                             f"got shape {m}")


def sliding_window_attention(q_BTNH, k_BTKH, v_BTKH, window: int, *, segment_ids_BT=None, valid_BT=None,
                             block: int = 256, scale: float | None = None, logit_softcap: float | None = None):
    """Blocked causal sliding-window attention; returns [B, T, N, H] in q's dtype.

    window: W >= 1 (W >= T is plain causal attention). segment_ids: packed documents attend only
    within their id. valid: False marks padding keys. block: queries per block (C); any T works,
    the tail is padded. logit_softcap: Gemma-2 style cap·tanh(s / cap) on the scores.
    """
    _check_window(window)
    check_block(block, "sliding-window attention: block (swa_block)")
    _check_shapes(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, valid_BT)
    check_softcap(logit_softcap, "sliding-window attention")
    valid_BT = valid_mask(valid_BT)
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    window = min(int(window), T)  # W >= T is causal; an int32 slot difference against W >= 2**31 wrapped or overflowed
    scale = H ** -0.5 if scale is None else scale
    q_BTNH, scale = static_scale(q_BTNH, scale, logit_softcap)
    C = max(1, min(block, T))
    Q = math.ceil(T / C)
    nk = num_key_blocks(window, C, Q)
    pad = Q * C - T

    def blocks(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape((x.shape[0], Q, C) + x.shape[2:])

    q_BQCKGH = blocks(q_BTNH).reshape(B, Q, C, K, N // K, H)
    k_BQSKH = _key_windows(blocks(k_BTKH), nk)
    v_BQSKH = _key_windows(blocks(v_BTKH), nk)

    slot_1T = jnp.arange(T, dtype=jnp.int32)[None]
    q_slot_1QC = blocks(slot_1T, -1)
    k_slot_1QS = _windows(blocks(slot_1T, -1), nk, -1)  # -1 marks padding slots
    diff_1QCS = q_slot_1QC[..., None] - k_slot_1QS[:, :, None, :]
    mask_BQCS = (diff_1QCS >= 0) & (diff_1QCS < window) & (k_slot_1QS[:, :, None, :] >= 0)
    if segment_ids_BT is not None:
        q_seg = blocks(segment_ids_BT, -2)
        k_seg = _windows(blocks(segment_ids_BT, -2), nk, -2)
        mask_BQCS = mask_BQCS & (q_seg[..., None] == k_seg[:, :, None, :])
    if valid_BT is not None:
        k_valid = _windows(blocks(valid_BT, False), nk, False)
        mask_BQCS = mask_BQCS & k_valid[:, :, None, :]

    mask_BQCS = jnp.broadcast_to(mask_BQCS, (B,) + mask_BQCS.shape[1:])
    return _blocks_core(q_BQCKGH, k_BQSKH, v_BQSKH, mask_BQCS, scale, logit_softcap).reshape(B, Q * C, N, H)[:, :T]


def _blocks_core(q_BQCKGH, k_BQSKH, v_BQSKH, mask_BQCS, scale, softcap=None):
    """Every query block against its key window through `models.attention.softmax_attention` (a hand-written VJP),
    vmapped over the Q blocks: its backward keeps float32 E per score (+ row statistics), where autodiff of the
    softmax kept scores, probabilities and masks (and tanh under a soft-cap). Float32 scores from bf16 operands
    (rounding them to bf16 made the output 5-6x less accurate). A fully masked row (a padding query) outputs 0.
    Returns [B, Q, C, K, G, H]."""
    # [B, Q] kept as two dims, split over batch and sequence devices as the sequence arrives (left to XLA, every
    # sequence device ran all its batch shard's blocks: 4.0x the kernel's FLOPs and temp bytes of {data: 8} on
    # {data: 2, sequence: 4}). Merged into one [B·Q] dim, the split matched the arriving [B / n_b, Q / n_s] tiles
    # only at one row per batch shard: XLA regathered the rows, on {sequence: 8} the whole of k and v
    rows = functools.partial(constrain_leading, names=("batch", "act_seq"))
    q_BQKGCH = rows(q_BQCKGH.transpose(0, 1, 3, 4, 2, 5))
    k_BQKSH, v_BQKSH = (rows(x.transpose(0, 1, 3, 2, 4)) for x in (k_BQSKH, v_BQSKH))
    mask_BQ11CS = rows(mask_BQCS[:, :, None, None])
    attend = jax.vmap(functools.partial(softmax_attention, scale=scale, softcap=softcap), in_axes=1, out_axes=1)
    o_BQKGCH = attend(q_BQKGCH, k_BQKSH, v_BQKSH, mask_BQ11CS)
    o_BQKGCH = jnp.where(mask_BQ11CS.any(-1, keepdims=True), o_BQKGCH, 0)
    return o_BQKGCH.transpose(0, 1, 4, 2, 3, 5)


def dense_window_mask(T: int, window: int | None, segment_ids_BT=None, valid_BT=None):
    """Boolean [B or 1, 1, T, T] mask with the same semantics, for dense reference paths (valid_BT: bool or 0/1
    ints, as the kernels read it)."""
    valid_BT = valid_mask(valid_BT)  # an int one's `&` made an int mask, and read 2s as padding
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    if window is not None:  # (W >= 2**31 overflowed int32; a symbolic T, from jax.export, has no min with W)
        window = min(int(window), T) if isinstance(T, int) else min(int(window), 2**31 - 1)
    mask = (j <= i) if window is None else (j <= i) & (i - j < window)
    mask = mask[None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    if valid_BT is not None:
        mask = mask & valid_BT[:, None, :]
    return mask[:, None]


_logged: set = set()


def _log_once(choice: str, why: str):
    if (choice, why) not in _logged:
        _logged.add((choice, why))
        logging.getLogger("jaxscale").info("sliding-window attention: %s (%s)", choice, why)


SPLASH_BLOCK = 128  # the splash kernel's default q / kv block: it must divide the sequence length


def choose_impl(impl: str, dtype, has_segments: bool, softcap: bool, has_padding: bool = False,
                backend: str | None = None, seq_len: int | None = None, head_dim: int | None = None) -> str:
    """Resolve `swa_impl='auto'` for this backend and call; logs the choice and the reason once. Under
    `models.plain_autodiff` (forward mode) 'auto' is 'blocked', and 'cudnn' / 'splash' are refused: JAX's fused
    kernels keep their own custom VJPs, which jvp refuses. head_dim: cuDNN takes multiples of 8 up to
    `cudnn_max_head_dim` (256 from Hopper on, 128 before); None skips that check."""
    backend = backend or jax.default_backend()
    if impl != "auto":
        if impl in ("cudnn", "splash") and plain():
            raise ValueError(f"swa_impl={impl!r} is JAX's fused kernel, whose own custom VJP refuses forward mode "
                             "(jvp) under models.plain_autodiff; use swa_impl='auto' or 'blocked'")
        _log_once(impl, "set in the config")
        return impl
    if plain():
        choice, why = "blocked", "models.plain_autodiff: forward mode, which the cuDNN / splash kernels refuse"
    elif backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and not (has_segments or has_padding or softcap):
        h_max = cudnn_max_head_dim() or 256
        if head_dim is None or (head_dim % 8 == 0 and head_dim <= h_max):
            choice, why = "cudnn", "GPU, 16-bit, no segment ids, padding or soft-cap"
        else:  # jax's NotImplementedError at trace time otherwise
            choice, why = "blocked", f"cuDNN takes head dims that are multiples of 8 up to {h_max}, not {head_dim}"
    elif (backend == "tpu" and not has_padding and (seq_len is None or seq_len % SPLASH_BLOCK == 0)
          and not _manual_axes() and _splash() is not None):
        # our splash call takes no padding mask, so a padded batch would attend to its padding keys; its blocks
        # must divide T (tokens[:, :-1] of a 256-token batch is 255 long: the blocked kernel takes those); inside a
        # shard_map (gpipe's over `stage`) it cannot run (`_splash_attention`)
        choice, why = "splash", "TPU Pallas splash attention with a local mask"
    else:
        choice, why = "blocked", f"backend {backend}: blocked O(T·W) kernel"
    _log_once(choice, why)
    return choice


def _manual_axes() -> tuple:
    """The mesh axes a `jax.shard_map` around this call is manual over (gpipe's `stage`), or ()."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in mesh.axis_names if a in mesh.manual_axes)


def _splash():
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel as sk,
            splash_attention_mask as sm,
        )
    except ImportError:
        return None
    return sk, sm


def local_attention(q_BTNH, k_BTKH, v_BTKH, window: int, *, segment_ids_BT=None, valid_BT=None, impl: str = "auto",
                    block: int = 256, scale: float | None = None, logit_softcap: float | None = None):
    """Causal sliding-window attention through the backend's best kernel (see `choose_impl`).

    impl: 'blocked' (this module, any backend), 'cudnn' (`jax.nn.dot_product_attention` with
    `local_window_size`, NVIDIA GPUs, 16-bit), 'splash' (TPU Pallas kernel with a LocalMask; no
    padding mask and T a multiple of 128, and not inside a shard_map such as a pipeline's, so 'auto' picks 'blocked'
    otherwise), 'dense' (a masked T×T reference:
    quadratic, for tests and benchmarks), or 'auto'.
    """
    _check_window(window)
    check_block(block, "sliding-window attention: block (swa_block)")  # for every impl: a typo fails before a GPU run
    _check_shapes(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, valid_BT)
    check_softcap(logit_softcap, "sliding-window attention")
    window = min(int(window), q_BTNH.shape[1])  # the same attention for W >= T; an int32 one for every kernel
    valid_BT = valid_mask(valid_BT)
    impl = choose_impl(impl, q_BTNH.dtype, segment_ids_BT is not None, logit_softcap is not None,
                       has_padding=valid_BT is not None, seq_len=q_BTNH.shape[1], head_dim=q_BTNH.shape[3])
    B, T, N, H = q_BTNH.shape
    scale = H ** -0.5 if scale is None else scale
    if impl == "blocked":
        return sliding_window_attention(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT=segment_ids_BT,
                                        valid_BT=valid_BT, block=block, scale=scale, logit_softcap=logit_softcap)
    if impl == "dense":
        from models.attention import reference_attention

        mask = dense_window_mask(T, window, segment_ids_BT, valid_BT)
        return reference_attention(q_BTNH, k_BTKH, v_BTKH, jnp.broadcast_to(mask, (B,) + mask.shape[1:]), scale,
                                   logit_softcap)
    if impl == "cudnn":
        if segment_ids_BT is not None or valid_BT is not None or logit_softcap is not None:
            raise ValueError("swa_impl='cudnn' supports neither segment ids, padding nor soft-capping; "
                             "use swa_impl='auto' or 'blocked'")
        check_cudnn_head_dim(H, "swa_impl='cudnn'", "use swa_impl='auto' or 'blocked'")
        try:  # (odd lengths train too: `cudnn_attention` pads them)
            return cudnn_attention(q_BTNH, k_BTKH, v_BTKH, None, scale, local_window_size=(window - 1, 0))
        except RuntimeError as e:  # jax's bare 'cuDNN is not detected.' off NVIDIA GPUs
            if "cudnn" not in str(e).lower():
                raise
            raise ValueError(f"swa_impl='cudnn' is cuDNN's fused kernel for NVIDIA GPUs (bf16 / fp16), and this is "
                             f"a {jax.default_backend()} backend ({e}); use swa_impl='auto' or 'blocked'") from None
    if impl == "splash":
        if valid_BT is not None:
            raise ValueError("swa_impl='splash' takes no padding mask (valid_BT); use swa_impl='auto' or "
                             "'blocked' for padded batches")
        if T % SPLASH_BLOCK:
            tpu = "" if jax.default_backend() == "tpu" else f", and a TPU (this is a {jax.default_backend()} backend)"
            raise ValueError(f"swa_impl='splash' needs a sequence length divisible by {SPLASH_BLOCK}, got {T}{tpu}; "
                             "use swa_impl='auto' (the blocked kernel takes other lengths) or pad the batch")
        return _splash_attention(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT, scale, logit_softcap)
    raise ValueError(f"swa_impl={impl!r}: use auto, blocked, cudnn, splash or dense")


def _splash_attention(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT, scale, logit_softcap):
    """TPU splash attention with a causal local mask. On a mesh of several devices it runs in a `jax.shard_map` over
    the mesh's axes: jax lowers a Pallas TPU (Mosaic) kernel only per device, and a sharded program failed to lower
    with its NotImplementedError 'Mosaic kernels cannot be automatically partitioned. Please wrap the call in a
    shard_map'. Rows split as 'batch' and heads as 'act_heads' where they divide (a KV head stays with its query
    heads); each device runs its shard over the whole sequence (a sequence split is gathered)."""
    if _splash() is None:
        raise ValueError("swa_impl='splash' needs jax's Pallas TPU splash-attention kernel, absent from this jax")
    if manual := _manual_axes():  # the kernel's outputs carry no varying-axes type: jax refused them under check_vma
        raise ValueError(f"swa_impl='splash' cannot run inside a shard_map manual over {manual} (a pipeline's "
                         "stages); use swa_impl='auto' (the blocked kernel there) or 'blocked'")
    B, T = q_BTNH.shape[:2]
    if segment_ids_BT is not None:  # a [1, T] one broadcasts (as for the other kernels); vmap refused it
        segment_ids_BT = jnp.broadcast_to(segment_ids_BT, (B, T))
    kernel = functools.partial(_splash_local, window=window, scale=scale, logit_softcap=logit_softcap)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    names = ("batch", None, "act_heads", None)
    q_spec, kv_spec = (logical_to_spec(names, mesh, x.shape, replicate_indivisible=True) for x in (q_BTNH, k_BTKH))
    if q_spec[2] != kv_spec[2]:  # N divides the head axes but K does not: heads whole
        q_spec = kv_spec = jax.P(q_spec[0], None, None, None)
    seg_spec = None if segment_ids_BT is None else jax.P(q_spec[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def _splash_local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, window, scale, logit_softcap):
    """The splash kernel on one device's q [B, T, N, H], k / v [B, T, K, H], segment ids [B, T] or None."""
    sk, sm = _splash()
    B, T, N, H = q_BTNH.shape
    G = N // k_BTKH.shape[2]
    mask = sm.MultiHeadMask([sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0)] * N)
    kernel = sk.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=logit_softcap)
    q = (q_BTNH * scale).transpose(0, 2, 1, 3)  # the kernel does not scale queries
    k = jnp.repeat(k_BTKH, G, axis=2).transpose(0, 2, 1, 3)
    v = jnp.repeat(v_BTKH, G, axis=2).transpose(0, 2, 1, 3)
    if segment_ids_BT is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = jax.vmap(lambda s: sk.SegmentIds(q=s, kv=s))(segment_ids_BT)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)
