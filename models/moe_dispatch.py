"""The expert computation of `models.moe.MoE`: capacity dispatch (GShard) and the dropless implementations.

Shapes as in models/moe.py: B batch rows, T tokens per row, D d_model, E experts, K experts per token, F expert
width, C slots per expert per row, N tokens per group, A = N·K assignments, R padded rows. `w` is always the
experts' (gate [E, D, F], up [E, D, F], down [E, F, D]) and `act` their activation.

`capacity_dispatch` gathers each row's assignments into [E, B, C, D] buffers (the overflow dropped).
`dropless_dispatch` computes every assignment; the implementations (`MoEConfig.dropless_impl`, measured in
benchmarks/moe_dispatch.py and benchmarks/moe_train.py):
- 'gmm' (CPU default): expert-sorted rows in tiles, one loop per expert and tile size (`grouped_swiglu`);
- 'blocks': one batched matmul over fixed-size blocks, each block's expert weights gathered;
- 'ragged_dot': `jax.lax.ragged_dot`, a grouped GEMM on GPU/TPU (default there);
- 'dense': every expert on every token, gated (E/K× the FLOPs);
- 'capacity': capacity dispatch with C = T (nothing can drop; the default when experts are sharded).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from models.glu import glu, glu_linear
from models.linear import linear, transposed
from models.residuals import from_bits, packs, to_bits
from parallel.autodiff import custom_vjp
from parallel.rules import constrain, logical_to_spec

DROPLESS_IMPLS = ("auto", "gmm", "blocks", "ragged_dot", "dense", "capacity")
CPU_DROPLESS_IMPL = "gmm"  # fastest measured on CPU (docs/benchmarks.md, Mixture of Experts)


def swiglu(x_ND, w_gate_DF, w_up_DF, w_down_FD, act=jax.nn.silu):
    """Dense SwiGLU on rows x [..., D] → [..., D] (the shared experts, and the dense baseline), through
    models.linear as the dense block's MLP: plain `@` products of bf16 operands (bf16 output) ran as float32 dots
    on XLA:CPU, forward and backward. 2-D rows [N, D] take 'auto' products; other shapes (the sequence sharded)
    plain ones."""
    flat = x_ND.ndim == 2
    gate, up = (linear(x_ND, w, "auto", flatten=flat) for w in (w_gate_DF, w_up_DF))
    return glu_linear(gate, up, w_down_FD, act, "auto", flatten=flat)


def expert_swiglu(x_ErD, w, act):
    """Each expert's SwiGLU on its own rows: [E, *rows, D] → [E, *rows, D] (batched over E)."""
    w_gate_EDF, w_up_EDF, w_down_EFD = w
    h_ErF = glu(jnp.einsum("e...d,edf->e...f", x_ErD, w_gate_EDF), jnp.einsum("e...d,edf->e...f", x_ErD, w_up_EDF),
                act)  # keeps gate and up for the backward, not act's intermediates (models.glu)
    return jnp.einsum("e...f,efd->e...d", h_ErF, w_down_EFD)


def capacity_slots(experts_BTK, n_experts: int, capacity: int, valid_BT=None):
    """Slot of every assignment in its row's [E·C] buffer: (slot [B, T, K] int32, kept [B, T, K] bool).

    slot = e·C + position in expert e's queue, or E·C (a trash slot) when the position is ≥ C. Queue order is
    token-major (MaxText's): token t's K choices in rank order, then token t+1's. So kept[:, t] depends only on
    experts[:, :t + 1]: later tokens cannot evict earlier ones (GShard's all-first-choices-first order would let
    them, breaking causality). valid_BT [B, T] bool: False tokens (padding) join no queue and are never kept.
    """
    B, T, K = experts_BTK.shape
    hot_BAE = jax.nn.one_hot(experts_BTK.reshape(B, T * K), n_experts, dtype=jnp.int32)
    if valid_BT is not None:
        hot_BAE = hot_BAE * jnp.repeat(valid_BT, K, axis=1)[..., None].astype(jnp.int32)
    pos_BTK = jnp.sum((jnp.cumsum(hot_BAE, axis=1) - 1) * hot_BAE, axis=-1).reshape(B, T, K)
    kept_BTK = pos_BTK < capacity
    if valid_BT is not None:
        kept_BTK &= valid_BT[..., None]
    return jnp.where(kept_BTK, experts_BTK * capacity + pos_BTK, n_experts * capacity), kept_BTK


def capacity_dispatch(x_BTD, weights_BTK, experts_BTK, w, act, capacity: int, valid_BT=None):
    """GShard dispatch with per-row capacity: (y [B, T, D], fraction of the real tokens' assignments dropped).
    Dropped assignments and padding tokens (valid_BT [B, T] False) contribute 0."""
    (B, T, D), K, E = x_BTD.shape, weights_BTK.shape[-1], w[0].shape[0]
    C = capacity
    slot_BTK, kept_BTK = capacity_slots(experts_BTK, E, C, valid_BT)
    # Invert slot → token with an int scatter (the trash slot's value is never read), then gather rows; an
    # empty slot points at the appended zero row T.
    token_BTK = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, K))
    src_BS = jax.vmap(lambda s, t: jnp.full(E * C + 1, T, jnp.int32).at[s].set(t))(
        slot_BTK.reshape(B, -1), token_BTK.reshape(B, -1))[:, :-1]
    x_pad_BTD = jnp.concatenate([x_BTD, jnp.zeros((B, 1, D), x_BTD.dtype)], axis=1)
    buf_BSD = jnp.take_along_axis(x_pad_BTD, src_BS[..., None], axis=1)
    # Expert-major layout: with experts sharded, going to it is the all-to-all that sends tokens to their experts.
    # Constraints on both sides of each transpose, so that the backward pass (whose cotangents see the same
    # constraints) also exchanges with all-to-alls instead of replicating.
    ebcd, becd = ("expert", "batch", "act_capacity", "act_embed"), ("batch", None, "act_capacity", "act_embed")
    buf_EBCD = constrain(constrain(buf_BSD.reshape(B, E, C, D), becd).transpose(1, 0, 2, 3), ebcd)
    out_BECD = constrain(constrain(expert_swiglu(buf_EBCD, w, act), ebcd).transpose(1, 0, 2, 3), becd)  # and back
    out_pad_BSD = jnp.concatenate([out_BECD.reshape(B, E * C, D), jnp.zeros((B, 1, D), out_BECD.dtype)], axis=1)
    y_BAD = jnp.take_along_axis(out_pad_BSD, slot_BTK.reshape(B, T * K, 1), axis=1)
    gate_BTK = jnp.where(kept_BTK, weights_BTK, 0.0)
    y_BTD = jnp.einsum("btk,btkd->btd", gate_BTK, y_BAD.reshape(B, T, K, D).astype(jnp.float32))
    v_BT1 = jnp.ones((B, T, 1), jnp.float32) if valid_BT is None else valid_BT[..., None].astype(jnp.float32)
    dropped = jnp.sum(v_BT1 * jnp.logical_not(kept_BTK).astype(jnp.float32)) / jnp.maximum(jnp.sum(v_BT1) * K, 1.0)
    return y_BTD.astype(x_BTD.dtype), dropped


def resolve_dropless_impl(impl: str) -> str:
    """'auto' → 'capacity' (C = T) when experts are sharded, ragged_dot on GPU/TPU, CPU_DROPLESS_IMPL on CPU.
    An explicit choice is kept; a sorted or dense one with experts sharded over `expert` warns, since it gathers
    every expert's weights onto each device (see dropless_dispatch)."""
    if impl != "auto":
        if impl != "capacity" and (n := mesh_shards("expert")) > 1:
            warnings.warn(f"MoEConfig.dropless_impl={impl!r} with the experts split {n} ways over the `expert` mesh "
                          "axis: every device all-gathers all experts' weights for each layer (no expert "
                          "parallelism, n× their memory); use dropless_impl='auto' or 'capacity' (all-to-all, C = T), "
                          "or a mesh without an `expert` axis", stacklevel=2)
        return impl
    if mesh_shards("expert") > 1:
        return "capacity"
    return "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else CPU_DROPLESS_IMPL


def mesh_shards(logical_name: str) -> int:
    """How many ways the current mesh splits a logical axis (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec((logical_name,), mesh)[0] or ()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def dropless_dispatch(x_BTD, weights_BTK, experts_BTK, w, act, impl: str, tile_rows=None):
    """Every assignment computed: y [B, T, D]. Rows are grouped by `batch` x `act_seq` shard (each device's own
    tokens) and sorted within a group. tile_rows: the 'gmm' tile sizes (None: default_tile_rows)."""
    (B, T, D), K = x_BTD.shape, weights_BTK.shape[-1]
    fn = {"gmm": functools.partial(sorted_gmm, tile_rows=tile_rows), "blocks": sorted_blocks,
          "ragged_dot": sorted_ragged, "dense": dense_experts}[impl]
    # Whole experts on every device that holds tokens (FSDP gathers them as it does dense weights); the expert
    # index is gathered per block, so only the mlp dimension may stay split (tensor parallel).
    names = ((None, None, "act_mlp"),) * 2 + ((None, "act_mlp", None),)
    w = tuple(constrain(p, n) for p, n in zip(w, names))
    one = lambda x, wt, ex: fn(x, wt, ex, w, act)
    # Groups of one device's tokens: merged over the sequence shards too, every sequence device ran the expert
    # work of its whole batch shard (4x the FLOPs on {data: 2, sequence: 4})
    Gb, Gs = mesh_shards("batch"), mesh_shards("act_seq")
    Gb, Gs = (1 if B % Gb else Gb), (1 if T % Gs else Gs)
    if Gb * Gs == 1:
        return one(x_BTD.reshape(B * T, D), weights_BTK.reshape(-1, K), experts_BTK.reshape(-1, K)).reshape(B, T, D)
    # [Gb, Gs, rows, ·] split over (batch, act_seq), then one group axis for vmap (ragged_dot's batching rule
    # fails nested: a numpy int in its in_axes)
    group = lambda a: constrain(a.reshape(Gb, B // Gb, Gs, T // Gs, a.shape[-1]).transpose(0, 2, 1, 3, 4).reshape(
        Gb, Gs, -1, a.shape[-1]), ("batch", "act_seq", None, None)).reshape(Gb * Gs, -1, a.shape[-1])
    xs = group(x_BTD), group(weights_BTK), group(experts_BTK)
    if impl == "ragged_dot":  # its batching rule takes no unbatched operand: the weights get the group axis too,
        # split like the rows (each device still holds one copy of the experts, as it does unbatched)
        w_G = tuple(constrain(jnp.broadcast_to(p, (Gb, Gs, *p.shape)), ("batch", "act_seq", *n)).reshape(
            Gb * Gs, *p.shape) for p, n in zip(w, names))
        y = jax.vmap(lambda x, wt, ex, wg: fn(x, wt, ex, wg, act))(*xs, w_G)
    else:
        y = jax.vmap(one)(*xs)
    return y.reshape(Gb, Gs, B // Gb, T // Gs, D).transpose(0, 2, 1, 3, 4).reshape(B, T, D)


def _combine(y_AD, weights_NK):
    """Σ_k weights · expert output, in float32."""
    N, K = weights_NK.shape
    y_ND = jnp.einsum("nk,nkd->nd", weights_NK, y_AD.reshape(N, K, -1).astype(jnp.float32))
    return y_ND.astype(y_AD.dtype)


def sorted_ragged(x_ND, weights_NK, experts_NK, w, act):
    """Dropless with jax.lax.ragged_dot on expert-sorted rows: a grouped GEMM on GPU/TPU. On CPU it lowers to a
    dense masked [E, A, D] × [E, D, F] product, E× the useful FLOPs."""
    K, (w_gate_EDF, w_up_EDF, w_down_EFD) = weights_NK.shape[-1], w
    e_A = experts_NK.reshape(-1)
    order_A = jnp.argsort(e_A, stable=True)
    sizes_E = jnp.zeros(w_gate_EDF.shape[0], jnp.int32).at[e_A].add(1)
    xs_AD = x_ND[order_A // K]
    h_AF = glu(jax.lax.ragged_dot(xs_AD, w_gate_EDF, sizes_E), jax.lax.ragged_dot(xs_AD, w_up_EDF, sizes_E), act)
    ys_AD = jax.lax.ragged_dot(h_AF, w_down_EFD, sizes_E)
    return _combine(jnp.zeros_like(ys_AD).at[order_A].set(ys_AD), weights_NK)


def default_tile_rows(assignments: int, n_experts: int) -> tuple[int, ...]:
    """Tile sizes of `grouped_swiglu`, largest first: (8g, 4g, 2g, g), g = 64 (smaller when experts get < 8·64
    rows on average). Each expert's run, padded to a multiple of g, is covered greedily by the largest tiles: a
    few big matmuls per expert and at most one tile of each smaller size, the padding under g rows per expert
    (measured on CPU: docs/benchmarks.md)."""
    if jax.export.is_symbolic_dim(assignments):  # a symbolic count (jax.export's batch or length): the smallest
        g = 8  # g, the least padding at any count (a decode step's few rows)
    else:
        g = int(min(64, max(8, 2 ** math.floor(math.log2(max(1, assignments / (8 * n_experts)))))))
    return usable_tile_rows((8 * g, 4 * g, 2 * g, g), assignments, n_experts)


def usable_tile_rows(tile_rows: tuple[int, ...], assignments: int, n_experts: int) -> tuple[int, ...]:
    """The sizes of `tile_rows` that fit in block_layout's padded rows (runs padded to the smallest size)."""
    s = tile_rows[-1]
    # a symbolic count (jax.export) has no static comparison: E·s, the fewest padded rows at any count >= 1
    symbolic = jax.export.is_symbolic_dim(assignments)
    rows = n_experts * s if symbolic else (-(-assignments // s) + n_experts - 1) * s
    return tuple(t for t in tile_rows if t <= rows)  # never empty: rows >= s


def default_block_rows(assignments: int, n_experts: int) -> int:
    """Rows per block of `sorted_blocks`: 128, smaller below ~4 blocks per expert."""
    if jax.export.is_symbolic_dim(assignments):  # a symbolic count (jax.export): the smallest, as default_tile_rows
        return 8
    return int(min(128, max(8, 2 ** math.floor(math.log2(max(1, assignments / (4 * n_experts)))))))


def block_layout(experts_NK, n_experts: int, block_rows: int):
    """Expert-sorted rows with each expert's run padded to a multiple of block_rows. Returns (row_A: padded row of
    each assignment, src_R: token of each padded row (N for padding), blocks_E: blocks of each expert's run).
    R = (ceil(A / block) + E - 1)·block bounds the padded rows statically."""
    (N, K), E, b = experts_NK.shape, n_experts, block_rows
    A = N * K
    e_A = experts_NK.reshape(-1)
    order_A = jnp.argsort(e_A, stable=True).astype(jnp.int32)
    sizes_E = jnp.zeros(E, jnp.int32).at[e_A].add(1)
    blocks_E = (sizes_E + b - 1) // b
    # sorted position → padded row: add the padding of every earlier expert
    shift_E = (jnp.cumsum(blocks_E) - blocks_E) * b - (jnp.cumsum(sizes_E) - sizes_E)
    row_sorted_A = jnp.arange(A, dtype=jnp.int32) + shift_E[e_A[order_A]]
    row_A = jnp.zeros(A, jnp.int32).at[order_A].set(row_sorted_A)
    src_R = jnp.full((-(-A // b) + E - 1) * b, N, jnp.int32).at[row_sorted_A].set(order_A // K)
    return row_A, src_R, blocks_E


def _padded_rows(x_ND, src_R):
    return jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])[src_R]


def sorted_gmm(x_ND, weights_NK, experts_NK, w, act, tile_rows=None):
    """Dropless grouped matmul for CPU: expert-sorted rows, each expert's run padded to whole tiles; per expert,
    a loop over its tiles runs each tile's SwiGLU (`grouped_swiglu`), so only the occupied tiles cost anything.
    tile_rows: sizes largest first, each a multiple of the next (None: default_tile_rows)."""
    N, K, E = x_ND.shape[0], weights_NK.shape[-1], w[0].shape[0]
    sizes = default_tile_rows(N * K, E) if tile_rows is None else usable_tile_rows(tuple(tile_rows), N * K, E)
    row_A, src_R, blocks_E = block_layout(experts_NK, E, sizes[-1])
    y_RD = grouped_swiglu(_padded_rows(x_ND, src_R), w, blocks_E * sizes[-1], sizes, act)  # padding: act(0)·0 = 0
    return _combine(y_RD[row_A], weights_NK)


def sorted_blocks(x_ND, weights_NK, experts_NK, w, act):
    """Dropless block-sparse variant without loops: one batched matmul over all blocks (padded rows in blocks of
    one expert each) with each block's expert weights gathered ([nb, D, F] copies; the gradient: a scatter-add)."""
    (N, D), K, E = x_ND.shape, weights_NK.shape[-1], w[0].shape[0]
    b = default_block_rows(N * K, E)
    row_A, src_R, blocks_E = block_layout(experts_NK, E, b)
    nb = src_R.shape[0] // b
    # blocks past the last in use hold only zero rows: any expert will do, clamp to the last
    block_expert_n = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(nb), side="right",
                                                    method="compare_all"), E - 1)
    y_nbD = expert_swiglu(_padded_rows(x_ND, src_R).reshape(nb, b, D), tuple(p[block_expert_n] for p in w), act)
    return _combine(y_nbD.reshape(-1, D)[row_A], weights_NK)


def _expert_tiles(start, run, sizes, body, carry):
    """carry = body(first row, s, carry) for tiles covering rows [start, start + run) greedily, largest size s
    first (run is a multiple of sizes[-1]): one loop per size, of dynamic length."""
    for s in sizes:
        n = run // s
        carry = jax.lax.fori_loop(0, n, lambda i, c, start=start, s=s: body(start + i * s, s, c), carry)
        start, run = start + n * s, run - n * s
    return carry


def _over_experts(expert, carry, w, run_E):
    """jax.lax.scan of expert(carry, (w_gate, w_up, w_down, first row, run rows)) over the experts. Each expert's
    weights are sliced once (not per tile) and its weight gradients summed in the loop carry; unrolled up to 8
    experts, where static slices measured 5% faster (more costs compile time: 38 s at 128 experts, fully)."""
    start_E = jnp.cumsum(run_E) - run_E
    return jax.lax.scan(expert, carry, (*w, start_E, run_E), unroll=min(8, run_E.shape[0]))


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _row_io(dt):
    """(take, put, enc, dec) for row tiles of [R, ...] arrays inside the tile loops. bf16 on CPU: the arrays stay
    uint16 bits (`enc`) there, since XLA:CPU converts a whole bf16 array to float32 and back for each slice or
    update in a loop (models.residuals): 61 whole-array conversions made the bf16 layer's forward + backward 1.5x
    the float32 one's time; as bits it runs 0.64x the time it took (a bf16 MoE train step 0.73x;
    `python -m benchmarks.scan_residuals`)."""
    enc, dec = (to_bits, lambda b: from_bits(b, dt)) if packs(dt) else (lambda v: v, lambda v: v)
    take = lambda buf, r, s: dec(jax.lax.dynamic_slice_in_dim(buf, r, s))  # noqa: E731
    put = lambda buf, v, r: jax.lax.dynamic_update_slice_in_dim(buf, enc(v), r, 0)  # noqa: E731
    return take, put, enc, dec


def _swiglu_tiles(x_RD, w, run_E, sizes, act, save: bool):
    """y [R, D] (and the pre-activations gate, up [R, F] when `save`): one loop iteration per tile runs the whole
    expert SwiGLU, so the loop overhead is paid once per tile, not once per matmul (a third of the iterations)."""
    (R, _), F, dt = x_RD.shape, w[0].shape[-1], x_RD.dtype
    take, put, enc, dec = _row_io(dt)
    x_bits = enc(x_RD)

    def expert(c, xs):
        w_gate_DF, w_up_DF, w_down_FD, start, run = xs

        def body(r, s, c):
            x_sD = take(x_bits, r, s)
            a_sF, b_sF = _dot(x_sD, w_gate_DF).astype(dt), _dot(x_sD, w_up_DF).astype(dt)
            y_sD = _dot(act(a_sF) * b_sF, w_down_FD).astype(dt)
            return (put(c[0], y_sD, r),) + ((put(c[1], a_sF, r), put(c[2], b_sF, r)) if save else ())

        return _expert_tiles(start, run, sizes, body, c), None

    zeros = tuple(enc(z) for z in (jnp.zeros_like(x_RD),) + ((jnp.zeros((R, F), dt),) * 2 if save else ()))
    return tuple(dec(c) for c in _over_experts(expert, zeros, w, run_E)[0])


def _plain_grouped_swiglu(x_RD, w, run_E, sizes, act):
    """`grouped_swiglu`'s values by ops JAX differentiates in both modes, for `parallel.autodiff.plain_autodiff`:
    the tile loops' data-dependent trip counts are while loops, which reverse mode refuses. Each expert's SwiGLU
    runs on every row and is kept on its run's rows (E× the FLOPs), with the tiles' float32 products and roundings."""
    dt = x_RD.dtype
    end_E = jnp.cumsum(run_E)
    expert_R = jnp.searchsorted(end_E, jnp.arange(x_RD.shape[0]), side="right")  # E past the runs: rows stay 0

    def expert(y_RD, xs):
        w_gate_DF, w_up_DF, w_down_FD, e = xs
        a_RF, b_RF = _dot(x_RD, w_gate_DF).astype(dt), _dot(x_RD, w_up_DF).astype(dt)
        return jnp.where((expert_R == e)[:, None], _dot(act(a_RF) * b_RF, w_down_FD).astype(dt), y_RD), None

    return jax.lax.scan(expert, jnp.zeros_like(x_RD), (*w, jnp.arange(run_E.shape[0])))[0]


@functools.partial(custom_vjp, nondiff_argnums=(3, 4), plain=_plain_grouped_swiglu)
def grouped_swiglu(x_RD, w, run_E, sizes, act):
    """Expert SwiGLU over expert-sorted rows: x [R, D], w = (gate [E, D, F], up [E, D, F], down [E, F, D]),
    run_E [E] rows of each expert (consecutive runs from row 0, each a multiple of sizes[-1]) → [R, D]; rows
    past the runs stay 0. Each run is covered by tiles of `sizes` rows, largest first. A custom VJP whose
    backward is also one loop per size and expert (weight gradients summed in float32)."""
    return _swiglu_tiles(x_RD, w, run_E, sizes, act, save=False)[0]


def _grouped_swiglu_fwd(x_RD, w, run_E, sizes, act):
    y_RD, a_RF, b_RF = _swiglu_tiles(x_RD, w, run_E, sizes, act, save=True)
    return y_RD, (x_RD, w, run_E, a_RF, b_RF)


def weight_grad_columns() -> bool:
    """Whether the grouped SwiGLU's backward forms its weight gradients from columns of xᵀ and gᵀ (the CPU backend).

    A weight gradient xᵀ·da contracts the rows of both tile operands, a dot XLA:CPU runs on Eigen (no YNNPACK), and
    for bf16 operands as a converted float32 dot. Transposing the tiles inside the loop is a slow strided loop
    fusion; transposing x [R, D] and g [R, D] once, whole, and slicing each tile's columns makes every product
    row-major: the bf16 MoE trainer step 0.94x the time, float32 unchanged (0.985-0.997x; docs/benchmarks.md,
    twentieth session). Elsewhere GEMMs take either operand transposed and the copies would cost bandwidth."""
    return jax.default_backend() == "cpu"


def _grouped_swiglu_bwd(sizes, act, res, g_RD):
    x_RD, w, run_E, a_RF, b_RF = res
    dt, T = x_RD.dtype, (((0,), (0,)), ((), ()))  # T: contract the tile's rows (weight gradients)
    NT = (((1,), (1,)), ((), ()))  # times a transposed weight
    take, put, enc, dec = _row_io(dt)
    rows = tuple(enc(v) for v in (x_RD, g_RD.astype(dt), a_RF, b_RF))
    cols = tuple(map(transposed, rows[:2])) if weight_grad_columns() else None  # xᵀ, gᵀ [D, R] (as bits in bf16)

    def expert(dx_RD, xs):
        w_gate_DF, w_up_DF, w_down_FD, start, run = xs

        def body(r, s, c):
            dx_RD, dwg, dwu, dwd = c
            x_sD, g_sD, a_sF, b_sF = (take(v, r, s) for v in rows)
            act_a_sF, act_vjp = jax.vjp(act, a_sF)
            dh_sF = _dot(g_sD, w_down_FD, NT).astype(dt)
            db_sF = dh_sF * act_a_sF
            (da_sF,) = act_vjp(dh_sF * b_sF)
            dx_sD = _dot(da_sF, w_gate_DF, NT) + _dot(db_sF, w_up_DF, NT)
            h_sF = act_a_sF * b_sF
            if cols:  # the down projection's gradient as [D, F] (dwd is carried transposed)
                xT_Ds, gT_Ds = (dec(jax.lax.dynamic_slice_in_dim(v, r, s, axis=1)) for v in cols)
                dws = _dot(xT_Ds, da_sF), _dot(xT_Ds, db_sF), _dot(gT_Ds, h_sF)
            else:
                dws = _dot(x_sD, da_sF, T), _dot(x_sD, db_sF, T), _dot(h_sF, g_sD, T)
            return (put(dx_RD, dx_sD.astype(dt), r),) + tuple(a + b for a, b in zip((dwg, dwu, dwd), dws))

        ws = (w_gate_DF, w_up_DF, w_down_FD)
        shapes = (ws[0].shape, ws[1].shape, ws[2].shape[::-1] if cols else ws[2].shape)
        dx_RD, dwg, dwu, dwd = _expert_tiles(start, run, sizes, body,
                                             (dx_RD, *(jnp.zeros(sh, jnp.float32) for sh in shapes)))
        return dx_RD, tuple(d.astype(p.dtype) for d, p in zip((dwg, dwu, dwd.T if cols else dwd), ws))

    dx_RD, dw = _over_experts(expert, enc(jnp.zeros_like(x_RD)), w, run_E)
    return dec(dx_RD), dw, None


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def dense_experts(x_ND, weights_NK, experts_NK, w, act):
    """Every expert on every token, gated by the (zero for unselected) combine weights: E/K× the useful FLOPs but
    three large 2-D matmuls, [N, D] @ [D, E·F] and [N, E·F] @ [E·F, D]. With F split (tensor parallel) the merged
    dimension is F·E instead, F outer, so the split survives the reshapes (E·F all-gathered every expert's weights
    onto each device); unsplit, E·F spares w_down a transpose."""
    (N, D), (w_gate_EDF, w_up_EDF, w_down_EFD) = x_ND.shape, w
    E, F = w_gate_EDF.shape[0], w_gate_EDF.shape[-1]
    gate_NE = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], experts_NK].add(weights_NK)
    fe = mesh_shards("act_mlp") > 1
    to_2d = lambda p: p.transpose((1, 2, 0) if fe else (1, 0, 2)).reshape(D, E * F)
    h_NH = glu(x_ND @ to_2d(w_gate_EDF), x_ND @ to_2d(w_up_EDF), act)  # H: the merged E·F (or F·E)
    h_NH = (h_NH.reshape(N, F, E) * gate_NE.astype(h_NH.dtype)[:, None, :] if fe else
            h_NH.reshape(N, E, F) * gate_NE.astype(h_NH.dtype)[..., None]).reshape(N, E * F)
    return h_NH @ (w_down_EFD.transpose(1, 0, 2) if fe else w_down_EFD).reshape(E * F, D)
