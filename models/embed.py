"""Token-embedding lookup that gathers the table in the compute dtype but sums its gradient in float32; the LM head's
gather (`gathered_head`).

Under FSDP the table is sharded along `embed` and all-gathered (the sharding constraint below) before the
lookup: casting first makes that all-gather move compute-dtype bytes (half of float32 for bf16), as every other
weight's does. (Not on XLA:CPU, whose float normalization runs a bf16 all-gather as convert, float32 all-gather,
convert: the values are the bf16 ones, the bytes float32's; scaling.memory counts that for backend 'cpu'.)
Autodiff of `take(table.astype(bf16))` would then scatter-add the gradient in bf16, where a token seen thousands
of times in a batch loses most of its gradient to rounding; the backward here scatter-adds the cotangent in float32
(the table's dtype when wider) and rounds the sum to the table's dtype once: for a float32 table exactly the gradient
of `take(table).astype(bf16)`, for a bf16 table (param_dtype='bfloat16') that sum rounded, where autodiff's bf16
scatter-add stalls.

The gradient is constrained to the table's own ('vocab', 'embed') layout, so that the partitioner scatter-adds into
each device's shard: it moves each device's cotangent rows to the devices holding their columns (an all-to-all of the
local [B·T/n, D] cotangent) instead of all-reducing a whole float32 [V, D] gradient, which it did when the gradient was
constrained replicated. Measured on 8 CPU devices (V 32768, D 512, 2 layers, B 8 x T 32, an AdamW step): temp bytes
202 -> 146 MiB on {fsdp: 8}, 213 -> 164 on {data: 2, fsdp: 4}, 229 -> 173 on {fsdp: 4, tensor: 2}, collective
operand bytes 286 -> 222, 305 -> 257, 272 -> 208 MiB, step time 0.82x; identical gradients and update ({data: 8}:
the same program). Where a device's tokens rival V (from 2V on {fsdp: 8} at V 256) the partitioner's cost model
all-reduces the whole gradient again, as before.

The cotangent is laid out for that scatter first (`_in_table_columns`): its D split as the table's columns, its rows
over the batch axes left (`data`). Left to the partitioner, a cotangent whose rows were split over {data, fsdp}
could not reach D over `fsdp` but by gathering all of it on every device ("Involuntary full rematerialization" on
every {data, fsdp} mesh: the demo's, at V 320 and at V 32768); now one all-to-all over `fsdp` moves it, and each
device's partial [V, D/fsdp] sum is all-reduced over `data`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel.autodiff import custom_vjp
from parallel.rules import constrain, logical_to_spec


def embed_lookup(table_VD, tokens_BT, dtype):
    """table [V, D] (any dtype), int tokens [...] → rows [..., D] in `dtype`; the gradient to `table` is in the table's
    dtype, in the table's layout. An id outside [0, V), negative included, gives a NaN row and adds to no row of the
    gradient (the model checks concrete ids; under jit a bad id shows as NaN logits, not another token's). The table is
    gathered over `embed` (fsdp) in `dtype`; over `vocab` (tensor) it is gathered whole only where that moves fewer
    bytes than the alternative (`_vocab_split_lookup`): a device's tokens at least V/2. Below that the rows are looked
    up in each device's vocab shard (the partitioner masks a local gather and all-reduces the [B/n, T, D] rows over
    `tensor`), and no device holds the whole table: at V 131072, D 256, 64 tokens a device on {fsdp: 4, tensor: 2} (8
    CPU devices), an AdamW step's temp 272.8 -> 161.0 MiB, all-gather bytes 259.5 -> 131.5 MiB (all-reduce +0.1 MiB),
    0.83x the step time; at V 32768, D 512, temp 138.0 -> 81.3 MiB. (At V 256, D 128 with 1024 tokens a device it moved
    7% more bytes: gathered there.)"""
    return _lookup(table_VD, tokens_BT, jnp.dtype(dtype), (table_VD.shape, table_VD.dtype))


@functools.partial(custom_vjp, nondiff_argnums=(2, 3))
def _lookup(table_VD, tokens_BT, dtype, table_type):
    # cast where the table lies (its own sharding), then gather it: else propagation moves the all-gather
    # in front of the cast
    table_VD = constrain(table_VD.astype(dtype), ("vocab", "embed"))
    # ids laid out as a batch whatever the caller's layout: the backward (`_in_table_columns`) reaches its layout
    # from this one cheaply, but from ids the partitioner had split along T over the batch axes (t2v's concatenated
    # captions) only by replicating them: XLA's "Involuntary full rematerialization" on {data, fsdp} meshes
    tokens_BT = constrain(tokens_BT, _token_axes(tokens_BT))
    vocab = "vocab" if _vocab_split_lookup(table_VD.shape[0], tokens_BT) else None
    # ids outside [0, V) gather NaN rows, negative ones too: jnp.take wrapped -1 to row V - 1 (an ignore index -100
    # read token V - 100 under jit, where `check_token_ids` cannot see the values), silently; the same gather, less
    # the select that wrapped them
    return constrain(table_VD, (vocab, "act_embed")).at[tokens_BT].get(mode="fill", wrap_negative_indices=False)


def _vocab_split_lookup(V, tokens_BT) -> bool:
    """Whether to look tokens [B, T] up in the vocab shards of a [V, D] table (each device's partial rows all-reduced
    over the `vocab` axes: ~2·N·D elements moved for a device's N tokens) rather than gather the table over them
    (~V·D): where 2·N < V. Shapes only: static under jit."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not isinstance(tokens_BT.size, int):  # a symbolic [B, T] (jax.export): the table gathered
        return False
    lead = _token_axes(tokens_BT)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    split = 1
    for entry in logical_to_spec(lead, mesh, tokens_BT.shape, replicate_indivisible=True):
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            split *= sizes[a]
    return 2 * tokens_BT.size // split < V


def _token_axes(tokens_BT) -> tuple:
    """The logical axes of tokens [B, T] (any rank: a decode step's [B], a batch of [B, T])."""
    return (("batch", "act_seq") + (None,) * tokens_BT.ndim)[:tokens_BT.ndim]


def _lookup_fwd(table_VD, tokens_BT, dtype, table_type):
    return _lookup(table_VD, tokens_BT, dtype, table_type), tokens_BT  # the table's values are not needed


def _lookup_bwd(dtype, table_type, tokens_BT, g_BTD):
    shape, table_dtype = table_type
    # summed in float32 at least, rounded to the table's dtype once: a bf16 table's scatter-add stalled (4096
    # cotangents of 1e-3 on one token summed to 0.5, not 4.096), as every other weight's gradient, a dot with
    # float32 accumulation, does not
    acc = jnp.promote_types(table_dtype, jnp.float32)
    tokens_BT, g_BTD = _in_table_columns(shape, tokens_BT, g_BTD)
    # an id outside [0, V) (a NaN row forward) adds to no row: a negative one added to row V + id
    g_VD = jnp.zeros(shape, acc).at[tokens_BT].add(g_BTD.astype(acc), mode="drop", wrap_negative_indices=False)
    g_VD = g_VD.astype(table_dtype)
    # the table's own layout: the partitioner then scatter-adds into each shard, no device holds a whole [V, D] sum
    return constrain(g_VD, ("vocab", "embed")), None


def _in_table_columns(shape, tokens_BT, g_BTD):
    """tokens [B, T], cotangent [B, T, D] (any leading dims) → the same, constrained for a scatter-add into a
    ('vocab', 'embed') table of `shape` [V, D]: D split as the table's columns, B and T as `batch` and `act_seq`
    less the table's mesh axes. Each device then adds its rows into its own columns (partial sums over the axes
    left, all-reduced as [V, D/fsdp]); a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tokens_BT, g_BTD
    lead = _token_axes(tokens_BT)
    # the table's names first: logical_to_spec names a mesh axis once, so B and T go without the table's axes
    _, d, *bt = logical_to_spec(("vocab", "embed", *lead), mesh, (*shape, *tokens_BT.shape),
                                replicate_indivisible=True)
    return (jax.lax.with_sharding_constraint(tokens_BT, P(*bt)),
            jax.lax.with_sharding_constraint(g_BTD, P(*bt, d)))


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def gathered_head(head_DV, dtype):
    """The LM head [D, V] (any dtype; a tied table's transpose too) → the same values in `dtype`, cast where they lie
    and gathered whole over `embed` (still split over `vocab`), once for the forward's and the backward's products;
    its gradient comes back in the head's dtype and own ('embed', 'vocab') layout.

    Left to the partitioner, the head was all-gathered once per product: on {fsdp: 4, tensor: 2} two gathers of the
    same [D, V/2] (replica groups spelled two ways, so CSE kept both), both scheduled before the lookup and live into
    the backward (an AdamW step at V 32768, D 512 on 8 CPU devices: temp 174.7 -> 142.7 MiB, all-gather bytes
    176 -> 144 MiB; other meshes' programs unchanged). A plain constraint would constrain the cotangent to that
    gathered layout too: a whole [D, V/tensor] summed on every device, as the lookup's gradient was before.
    (The gradient's partial product is still whole over `embed` on each device before its reduction to the shards,
    as every FSDP weight's: its contraction runs over the tokens, which the batch axes split.)"""
    return _head(head_DV, jnp.dtype(dtype), head_DV.dtype)


@functools.partial(custom_vjp, nondiff_argnums=(1, 2))
def _head(head_DV, dtype, head_dtype):
    # cast before the gather (its bytes in `dtype`), as for the lookup's table
    head_DV = constrain(head_DV.astype(dtype), ("embed", "vocab"))
    return constrain(head_DV, (None, "vocab"))


def _head_bwd(dtype, head_dtype, _, g_DV):
    # the head's own layout: the partitioner reduces each device's partial product into its shard
    return (constrain(g_DV.astype(head_dtype), ("embed", "vocab")),)


_head.defvjp(lambda head_DV, dtype, head_dtype: (_head(head_DV, dtype, head_dtype), None), _head_bwd)
