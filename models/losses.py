"""Language-modelling losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
    """Mean next-token cross-entropy over weighted positions (float32). Returns (loss, Σ weights); no weight: (0, 0).

    logits [B, T, V], targets [B, T] int, weights [B, T] (None: all 1); other shapes raise (a [B] of per-row weights
    would broadcast over T). A negative target (Hugging Face's ignore index -100) is ignored: weight 0. Positions of
    weight 0 are selected out, not multiplied by 0, so whatever their target or loss (NaN included) they change
    neither the value nor its gradient (for finite logits). A target ≥ V at a weighted position makes the loss NaN,
    whatever its integer type (uint32 2**32 - 1 too): a vocabulary mismatch must not train silently. Weights must be
    finite and >= 0 (at positions not ignored): a negative or infinite one is a ValueError for concrete weights and
    makes the loss NaN under jit (a negative one ascended that position's loss, and weights summing to 0 returned a
    negative "mean"). The loss is exact to float32 rounding at any logit scale (taken relative to the row max).
    Targets and weights may be any array-like (a list, numpy).
    """
    if not isinstance(targets_BT, jax.Array):  # a list or numpy array too: `.astype` / `.shape` below
        t_BT = np.asarray(targets_BT)
        if t_BT.dtype.kind in "iu" and t_BT.dtype.itemsize > 4:  # int64 ids wrap to int32 (2**32 + 2: class 2)
            i32 = np.iinfo(np.int32)  # clamped, an id out of range stays out of range (negative, or >= V)
            t_BT = np.minimum(t_BT, i32.max) if t_BT.dtype.kind == "u" else np.clip(t_BT, i32.min, i32.max)
        targets_BT = t_BT
    targets_BT = jnp.asarray(targets_BT)
    weights_BT = None if weights_BT is None else jnp.asarray(weights_BT)
    if jnp.shape(targets_BT) != jnp.shape(logits_BTV)[:-1]:
        raise ValueError(f"cross_entropy: targets {jnp.shape(targets_BT)} must be the logits' [B, T] "
                         f"{jnp.shape(logits_BTV)[:-1]} (inputs and targets of one length, targets shifted by one)")
    if weights_BT is not None and jnp.shape(weights_BT) != jnp.shape(targets_BT):  # [B] broadcast over T silently
        raise ValueError(f"cross_entropy: weights {jnp.shape(weights_BT)} must be [B, T] like the targets "
                         f"{jnp.shape(targets_BT)}; per-row weights w [B]: np.repeat(w[:, None], T, axis=1)")
    if not jnp.issubdtype(jnp.result_type(targets_BT), jnp.integer):  # (take_along_axis: 'indices must be ...')
        raise ValueError(f"cross_entropy: targets_BT must be integer token ids, got {jnp.result_type(targets_BT)}")
    w_BT = jnp.ones(targets_BT.shape, jnp.float32) if weights_BT is None else weights_BT.astype(jnp.float32)
    w_BT = jnp.where(targets_BT < 0, 0.0, w_BT)
    # NaN and inf included: an inf weight made the loss inf / inf = NaN without a word
    if not isinstance(w_BT, jax.core.Tracer) and not bool(((w_BT >= 0) & jnp.isfinite(w_BT)).all()):
        bad = np.argwhere(~np.asarray((w_BT >= 0) & jnp.isfinite(w_BT)))[0].tolist()
        raise ValueError(f"cross_entropy: weights_BT must be >= 0 and finite (0 drops a position), got "
                         f"{float(w_BT[tuple(bad)])} at [b, t] = {bad}; a loss to push up is a separate term, not a "
                         "negative weight")
    used_BT = w_BT != 0
    # compared, not left to take_along_axis's NaN fill: it wraps unsigned ids (uint32 2**32 - 1 read class V - 1)
    # (V itself as the ids' type: uint8 ids < 256 compared with 256 wrapped to 0, so none was in the vocabulary)
    V = logits_BTV.shape[-1]
    in_vocab_BT = targets_BT < V if V <= jnp.iinfo(targets_BT.dtype).max else jnp.full(targets_BT.shape, True)
    safe_BT = jnp.where(used_BT & in_vocab_BT, targets_BT, 0)  # an ignored position's index stays in range
    # log Σ exp and the target both relative to the row max: as two absolute float32 numbers their difference kept
    # only ulp(max) (logits ~1e4: 4e-4 off; a tie at 3e38 gave 0, not log 2). A row without a finite max (all -inf,
    # an inf) is shifted by 0, as jax.nn.logsumexp does
    x_BTV = logits_BTV.astype(jnp.float32)
    max_BT = jax.lax.stop_gradient(x_BTV.max(axis=-1))
    max_BT = jnp.where(jnp.isfinite(max_BT), max_BT, 0.0)
    logz_BT = jnp.log(jnp.exp(x_BTV - max_BT[..., None]).sum(axis=-1))
    tgt_BT = jnp.take_along_axis(logits_BTV, safe_BT[..., None], axis=-1)[..., 0].astype(jnp.float32) - max_BT
    nll_BT = jnp.where(used_BT, jnp.where(in_vocab_BT, logz_BT - tgt_BT, jnp.nan) * w_BT, 0.0)
    n = w_BT.sum()
    loss = nll_BT.sum() / jnp.where(n > 0, n, 1.0)
    return jnp.where((w_BT < 0).any(), jnp.nan, loss), n  # (traced weights: no error possible, so NaN)
