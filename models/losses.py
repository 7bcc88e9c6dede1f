"""Language-modelling losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
    """Mean next-token cross-entropy over weighted positions (float32). Returns (loss, n_tokens)."""
    nll_BT = token_nll(logits_BTV.astype(jnp.float32), targets_BT)
    w_BT = jnp.ones_like(nll_BT) if weights_BT is None else weights_BT.astype(jnp.float32)
    n = jnp.maximum(w_BT.sum(), 1.0)
    return (nll_BT * w_BT).sum() / n, n


@jax.custom_vjp
def token_nll(logits_BTV, targets_BT):
    """logsumexp(logits) - logits[target] per position; float32 logits [B, T, V], int targets [B, T]."""
    return _nll_fwd(logits_BTV, targets_BT)[0]


def _nll_fwd(logits_BTV, targets_BT):
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - tgt_BT, (logits_BTV, targets_BT, logz_BT)


def _nll_bwd(res, g_BT):
    # d/dlogits = softmax - onehot(target), written in one pass over [B, T, V] (autodiff would
    # materialise exp(logits - max) in the forward pass and scatter the target term separately).
    logits_BTV, targets_BT, logz_BT = res
    onehot_BTV = targets_BT[..., None] == jax.lax.broadcasted_iota(targets_BT.dtype, logits_BTV.shape, 2)
    d_BTV = (jnp.exp(logits_BTV - logz_BT[..., None]) - onehot_BTV) * g_BT[..., None]
    return d_BTV, None


token_nll.defvjp(_nll_fwd, _nll_bwd)
