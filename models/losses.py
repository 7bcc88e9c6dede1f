"""Language-modelling losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
    """Mean next-token cross-entropy over weighted positions (float32). Returns (loss, n_tokens)."""
    logz_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
    nll_BT = logz_BT - tgt_BT
    w_BT = jnp.ones_like(nll_BT) if weights_BT is None else weights_BT.astype(jnp.float32)
    n = jnp.maximum(w_BT.sum(), 1.0)
    return (nll_BT * w_BT).sum() / n, n
