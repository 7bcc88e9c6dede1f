"""Token-embedding lookup that gathers the table in the compute dtype but sums its gradient in float32.

Under FSDP the table is sharded along `embed` and all-gathered (the sharding constraint below) before the
lookup: casting first makes that all-gather move compute-dtype bytes (half of float32 for bf16), as every other
weight's does. Autodiff of `take(table.astype(bf16))` would then scatter-add the gradient in bf16, where a token
seen thousands of times in a batch loses most of its gradient to rounding; the backward here scatter-adds the
cotangent in float32 (the table's dtype when wider) and rounds the sum to the table's dtype once: for a float32
table exactly the gradient of `take(table).astype(bf16)`, for a bf16 table (param_dtype='bfloat16') that sum
rounded, where autodiff's bf16 scatter-add stalls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from parallel.rules import constrain


def embed_lookup(table_VD, tokens_BT, dtype):
    """table [V, D] (any dtype), int tokens [...] → rows [..., D] in `dtype`; the gradient to `table` is in
    the table's dtype. The table is constrained to (None, 'act_embed') first: replicated over `vocab` (a gather
    from a vocab-sharded table makes GSPMD replicate the whole activation instead)."""
    return _lookup(table_VD, tokens_BT, jnp.dtype(dtype), (table_VD.shape, table_VD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lookup(table_VD, tokens_BT, dtype, table_type):
    # cast where the table lies (its own sharding), then gather it: else propagation moves the all-gather
    # in front of the cast
    table_VD = constrain(table_VD.astype(dtype), ("vocab", "embed"))
    return jnp.take(constrain(table_VD, (None, "act_embed")), tokens_BT, axis=0)


def _lookup_fwd(table_VD, tokens_BT, dtype, table_type):
    return _lookup(table_VD, tokens_BT, dtype, table_type), tokens_BT  # the table's values are not needed


def _lookup_bwd(dtype, table_type, tokens_BT, g_BTD):
    shape, table_dtype = table_type
    # summed in float32 at least, rounded to the table's dtype once: a bf16 table's scatter-add stalled (4096
    # cotangents of 1e-3 on one token summed to 0.5, not 4.096), as every other weight's gradient, a dot with
    # float32 accumulation, does not
    acc = jnp.promote_types(table_dtype, jnp.float32)
    g_VD = jnp.zeros(shape, acc).at[tokens_BT].add(g_BTD.astype(acc)).astype(table_dtype)
    return constrain(g_VD, (None, "act_embed")), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)
