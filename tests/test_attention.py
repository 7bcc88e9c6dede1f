"""The 'xla' attention kernel (dense and block-causal, float32 inside) equals a float64 einsum reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import plain_autodiff
from models.attention import attention, make_mask
from models.sliding_window import dense_window_mask
from tests.test_sliding_window import jaxpr_dots, qkv, segments


@pytest.mark.parametrize("T,C,N,K,layout,cap", [
    (40, 16, 4, 2, "packed", None),  # 3 blocks, the last one ragged
    (64, 16, 4, 1, "random", None),  # MQA, many short documents
    (33, 8, 2, 2, "none", None),
    (20, 64, 4, 4, "none", None),  # block > T: one dense block
    (40, None, 4, 2, "packed", None),  # the dense kernel
    # soft-capped scores (Gemma 2), a cap small enough that tanh bends them: blocked and dense
    (40, 16, 4, 2, "packed", 1.5),
    (33, None, 4, 1, "random", 1.5),
])
def test_xla_attention_equals_reference_float64(T, C, N, K, layout, cap):
    B, H = 2, 8
    with jax.enable_x64(True):
        q, k, v = qkv(B, T, N, K, H, jnp.float64, seed=T)
        valid = jnp.arange(T)[None].repeat(B, 0) < T - 3  # the last 3 slots are padding
        mask = dense_window_mask(T, None, segments(layout, B, T), valid)
        real = np.asarray(mask.any(-1)[:, 0])  # rows with a visible key; the others are garbage by design
        ct = jnp.where(real[..., None, None], jax.random.normal(jax.random.key(9), q.shape, jnp.float64), 0.0)

        def run(impl, block, dtype):
            f = lambda *a: attention(*a, mask, impl=impl, causal_block=block, logit_softcap=cap)  # noqa: E731
            args = tuple(x.astype(dtype) for x in (q, k, v))
            grad = jax.grad(lambda *a: (f(*a) * ct.astype(dtype)).sum(), argnums=(0, 1, 2))
            # one program for the (primal) output and the gradient: half the compiles
            return jax.jit(lambda *a: (f(*a), grad(*a)))(*args)

        (o_ref, g_ref), (o, g) = run("reference", None, jnp.float64), run("xla", C, jnp.float32)
        np.testing.assert_allclose(np.asarray(o)[real], np.asarray(o_ref)[real], atol=2e-6)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, atol=2e-6)
        o64, g64 = run("xla", C, jnp.float64)  # the kernel itself in float64: nothing but rounding differs
        np.testing.assert_allclose(np.asarray(o64)[real], np.asarray(o_ref)[real], atol=1e-12)
        for a, b in zip(g64, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("impl,block,dtype,tol", [("xla", None, jnp.bfloat16, 1e-2), ("xla", 8, jnp.bfloat16, 1e-2),
                                                  ("swa", 8, jnp.bfloat16, 1e-2), ("xla", 8, jnp.float32, 2e-2)])
def test_gradients_at_peaked_scores_match_float64(impl, block, dtype, tol):
    """Scores ~1e3 (a near one-hot softmax, as trained heads have): the backward's row statistic must match the dP it
    is subtracted from. Taken as rowsum(dO ∘ O), with O rounded to bf16, it was off by ~2^-9·|dO||V|, as large as
    dS itself: dq / dk were 74% / 88% off the float64 gradient of the same bf16 inputs (sliding window: 16% / 31%);
    summed from dP for bf16 now, at most 0.4%, as jax.nn.dot_product_attention's autodiff (0.39% / 0.10%). float32
    keeps the shortcut (a pass over the scores fewer): 1.1% / 1.0% here, where autodiff has 0.01%."""
    from models.sliding_window import local_attention

    B, T, N, K, H = 2, 16, 4, 2, 16
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.bfloat16) for x in qkv(B, T, N, K, H, seed=11))
        q, k = q * 30, k * 30  # scores q·k / 4 of std ~900
        mask = dense_window_mask(T, None, segments("packed", B, T))
        ct = jax.random.normal(jax.random.key(12), q.shape, jnp.float64)

        def grads(dt, ref):
            if impl == "xla":
                f = lambda *a: attention(*a, mask, impl="reference" if ref else "xla", causal_block=block)  # noqa: E731
            else:
                f = lambda *a: local_attention(*a, 3, segment_ids_BT=segments("packed", B, T),  # noqa: E731
                                               impl="dense" if ref else "blocked", block=block)
            loss = lambda *a: (f(*a).astype(jnp.float64) * ct).sum()  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(x.astype(dt) for x in (q, k, v)))

        for name, a, b in zip("qkv", grads(dtype, False), grads(jnp.float64, True)):
            rel = float(jnp.abs(a.astype(jnp.float64) - b).max() / jnp.abs(b).max())
            assert rel < tol, f"d{name}: {rel:.3g} of the float64 gradient's scale"


def test_causal_block_skips_the_blocks_above_the_diagonal():
    """Executed score work: Q = 4 blocks of a causal kernel compute (Q + 1) / 2Q of the dense scores."""
    B, T, N, H = 1, 256, 2, 16
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    mask = dense_window_mask(T, None)

    def flops(block):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, mask, causal_block=block))
        return fn.lower(q, q, q).compile().cost_analysis()["flops"]

    skipped_matmul = (1 - 5 / 8) * 2 * 2 * B * N * T * T * H  # QK^T and PV on 6 of the 16 blocks
    saved = flops(None) - flops(64)
    assert 1.0 <= saved / skipped_matmul <= 1.15  # plus the softmax's elementwise work on those scores


@pytest.mark.parametrize("N,K", [(4, 2), (3, 1)])
def test_dense_xla_attention_equals_jax_on_every_row(N, K):
    """Dense 'xla' (no causal_block) keeps jax.nn.dot_product_attention's semantics on every row, fully masked
    rows (padding queries) included: uniform weights over all keys, and the same gradients."""
    B, T, H = 2, 24, 8
    q, k, v = qkv(B, T, N, K, H, seed=3)
    valid = jnp.arange(T)[None].repeat(B, 0) < T - 4
    mask = dense_window_mask(T, None, segments("packed", B, T), valid)
    mask = mask & valid[:, None, :, None]  # padding queries see nothing: fully masked rows
    assert not bool(mask[:, 0, -1].any())
    ct = jax.random.normal(jax.random.key(5), q.shape)

    def run(f):
        grad = jax.grad(lambda *a: (f(*a) * ct).sum(), argnums=(0, 1, 2))
        return jax.jit(f)(q, k, v), jax.jit(grad)(q, k, v)

    o, g = run(lambda q, k, v: attention(q, k, v, mask, impl="xla"))
    o_jax, g_jax = run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"))
    np.testing.assert_allclose(o, o_jax, atol=1e-5)
    for a, b in zip(g, g_jax):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("block,cap", [(None, None), (8, None), (None, 1.5), (8, 1.5)])
def test_fully_masked_rows_send_no_gradient_to_queries_or_keys(block, cap):
    """A fully masked row's output is a constant mix of v (its scores are constants), so a loss on it moves
    v only: dq and dk are exactly zero, dense and block-causal alike. Under a soft-cap too, where the backward's
    tanh factor 1 - (s / c)² of such a row's masked score (-0.7 · float32 max) was -inf: only a select of the live
    rows keeps it out of dq / dk (with a product by the row mask instead, both soft-capped cases got NaN)."""
    B, T, N, K, H = 2, 32, 4, 2, 8
    q, k, v = qkv(B, T, N, K, H, seed=4)
    valid = jnp.arange(T)[None].repeat(B, 0) < T - 5
    mask = dense_window_mask(T, None, None, valid) & valid[:, None, :, None]
    dead = ~np.asarray(mask.any(-1)[:, 0])  # [B, T]: the 5 padding queries
    assert dead.sum() == 2 * 5
    ct = jnp.where(dead[..., None, None], jax.random.normal(jax.random.key(6), q.shape), 0.0)
    loss = lambda q, k, v: (attention(q, k, v, mask, causal_block=block, logit_softcap=cap) * ct).sum()  # noqa: E731
    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert float(jnp.abs(dq).max()) == 0.0 and float(jnp.abs(dk).max()) == 0.0
    assert float(jnp.abs(dv).max()) > 0.0


@pytest.mark.parametrize("block", [None, 8])
def test_soft_capped_reverse_over_reverse_with_padding_queries_is_finite_and_matches_autodiff(block):
    """A Hessian-vector product by reverse-over-reverse (grad of <grad, u>) through the custom VJP, soft-capped, with
    padding queries (no visible key): the backward's tanh factor 1 - (s / c)² is -inf on those rows, and the select
    that zeroes their dS sends a zero cotangent into it: 0 · -inf made dv NaN everywhere (first order was finite).
    Compared with autodiff of the einsum oracle on the live rows (the loss reads only those)."""
    B, T, N, K, H = 2, 16, 4, 2, 8
    q, k, v = qkv(B, T, N, K, H, seed=5)
    valid = jnp.arange(T)[None].repeat(B, 0) >= 3  # left padding: queries 0-2 see no key
    mask = dense_window_mask(T, None, None, valid)
    live = np.asarray(mask.any(-1)[:, 0])
    ct = jnp.where(live[..., None, None], jax.random.normal(jax.random.key(7), q.shape), 0.0)
    u = qkv(B, T, N, K, H, seed=8)

    def hvp(impl):
        loss = lambda *a: (attention(*a, mask, impl=impl, causal_block=block, logit_softcap=1.5) * ct).sum()  # noqa: E731
        along_u = lambda *a: sum((g * d).sum() for g, d in zip(jax.grad(loss, argnums=(0, 1, 2))(*a), u))  # noqa: E731
        return jax.jit(jax.grad(along_u, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(hvp("xla"), hvp("reference")):
        assert bool(jnp.isfinite(got).all())
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("impl,block", [("xla", None), ("xla", 4), ("reference", None)])
def test_masked_keys_get_no_weight_however_low_the_visible_scores(impl, block):
    """Every visible score at -5e4 (q = -2.5·k): each query still averages its visible values only. A
    masked score of -1e4 (a common constant) would outweigh them and attend the future; the tests above, with
    scores of |s| <~ 1e3, passed it."""
    T, H = 8, 4
    k = jnp.full((1, T, 1, H), 100.0)
    q = -k * 2.5  # every score: -250 · 100 · H / sqrt(H) = -5e4
    v = jnp.arange(T, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, T, 1, H))
    out = attention(q, k, v, dense_window_mask(T, None), impl=impl, causal_block=block)
    want = np.cumsum(np.arange(T)) / np.arange(1, T + 1)  # the mean of v over keys 0..t
    np.testing.assert_allclose(np.asarray(out)[0, :, 0, 0], want, rtol=1e-6)


def test_soft_capped_scores_asked_of_cudnn_run_the_xla_kernel():
    """cuDNN's fused kernel has no soft-cap: the request runs our 'xla' kernel (block skipping, its own backward),
    not the einsum reference. Runs on CPU: the soft-capped path never reaches cuDNN."""
    q, k, v = qkv(2, 24, 4, 2, 8)
    mask = dense_window_mask(24, None)
    run = lambda impl: attention(q, k, v, mask, impl=impl, logit_softcap=5.0, causal_block=8)  # noqa: E731
    np.testing.assert_array_equal(run("cudnn"), run("xla"))


def test_is_causal_with_one_query_is_refused_in_the_singular():
    """A decode step (one query) under is_causal: refused before cuDNN (so on CPU too), reading "1 query"."""
    q, k, v = qkv(1, 4, 2, 2, 8)
    with pytest.raises(ValueError, match=r"is_causal needs T == S \(got 1 query, 4 keys\)$"):  # "1 queries"
        attention(q[:, :1], k, v, jnp.ones((1, 1, 1, 4), bool), impl="cudnn", is_causal=True)


# 4100 = 16·256 + 4: T / 16 rounded down (256 rows) would make 17 blocks; rounded up (257), 16
@pytest.mark.parametrize("T,block,n_blocks", [(256, 64, 4), (2048, 64, 16), (4096, 512, 8), (4100, 64, 16)])
def test_long_sequences_run_at_most_16_query_blocks_and_scaling_counts_them(T, block, n_blocks):
    """Each block is unrolled in the program: at T = 8192, 128 blocks of 64 compiled in 60 s (16 of 512: 13 s) and ran
    1.12x slower. The kernel's QK^T products (one per block) give the blocks and the keys each scores, which
    `scaling.flops.executed_keys` must count the same."""
    from scaling.flops import executed_keys

    H = 16
    q = jax.ShapeDtypeStruct((1, T, 2, H), jnp.float32)
    mask = dense_window_mask(T, None)

    jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, mask, causal_block=block))(q, q, q).jaxpr
    out_shapes = [e.outvars[0].aval.shape for e in jaxpr_dots(jaxpr)]
    scores = [shape[-2:] for shape in out_shapes if shape[-1] != H]  # QK^T: (rows, keys); PV ends in H
    assert len(scores) == n_blocks
    assert sum(r * s for r, s in scores) / T == executed_keys(T, kernel="causal_blocked", block=block)


def test_causal_block_with_fewer_queries_than_keys_runs_dense():
    """causal_block promises causality by index, which means nothing when T != S (a chunk's queries after cached
    keys): the kernel must ignore it there. Blocking those queries anyway scored block i against keys [0, (i + 1)·C)
    only and dropped the later keys the chunk sees."""
    from models.attention import make_mask

    B, T, S, N, K, H = 2, 12, 40, 4, 2, 8
    q, _, _ = qkv(B, T, N, K, H, seed=7)
    _, k, v = qkv(B, S, N, K, H, seed=8)
    q_pos = jnp.broadcast_to(S - T + jnp.arange(T), (B, T))  # the last T positions of the S keys
    mask = make_mask(q_pos, jnp.broadcast_to(jnp.arange(S), (B, S)))
    want = attention(q, k, v, mask, impl="reference")
    np.testing.assert_allclose(attention(q, k, v, mask, causal_block=4), want, atol=1e-5)


def test_causal_block_refuses_a_mask_broadcast_over_queries_or_keys():
    """causal_block promises a mask causal by position; a [B, 1, 1, S] key-padding mask (broadcast over T, as
    attention's shape check allows) failed in the blocked kernel in a bare "Incompatible shapes for broadcasting"
    (block i's mask slice [lo:hi] of a size-1 T was empty), and a [B, 1, T, 1] one ran silently, each block seeing
    its whole key prefix (1.87 off the dense result at T = 8, blocks of 2). Neither is causal at T = S > 1: refused
    by name. A whole mask, and any mask without causal_block or at T <= C (one dense block), still runs."""
    B, T, N, K, H = 1, 8, 2, 1, 4
    q, k, v = qkv(B, T, N, K, H, jnp.float32)
    for shape in ((B, 1, 1, T), (B, 1, T, 1)):
        mask = jnp.ones(shape, bool)
        with pytest.raises(ValueError, match=r"causal_block=2 promises a mask causal by position.*broadcast over T"):
            attention(q, k, v, mask, causal_block=2)
        assert attention(q, k, v, mask).shape == q.shape
        assert attention(q, k, v, mask, causal_block=8).shape == q.shape
    mask = dense_window_mask(T, None)
    np.testing.assert_allclose(attention(q, k, v, mask, causal_block=2), attention(q, k, v, mask), atol=1e-6)


@pytest.mark.parametrize("impl,block", [("xla", None), ("xla", 4), ("swa", 4)])
def test_a_traced_scale_is_taken_and_differentiated(impl, block):
    """A scale that is a jit argument or a learned temperature is a tracer. The custom-VJP kernels took it as a static
    (nondiff) argument and jax raised UnexpectedTracerError (about custom_vjp's nondiff_argnums) where 'reference'
    ran; it is now folded into q, and d/dscale matches the float64 reference's. A traced soft-cap names itself."""
    from models.sliding_window import local_attention

    B, T, N, K, H, W = 2, 12, 4, 2, 8, 5
    with jax.enable_x64(True):
        q, k, v = qkv(B, T, N, K, H, jnp.float64, seed=5)
        seg = segments("packed", B, T)
        mask = dense_window_mask(T, W if impl == "swa" else None, seg)

        def loss(scale, q, impl):
            if impl == "swa":
                o = local_attention(q, k, v, W, segment_ids_BT=seg, scale=scale, block=block, impl="blocked")
            else:
                o = attention(q, k, v, mask, impl=impl, scale=scale, causal_block=block)
            return (o * jnp.cos(jnp.arange(H))).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)  # the reference jitted too (eager: per op)
        g, g_ref = grad(0.4, q, impl), grad(0.4, q, "reference")
        np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-10)
        np.testing.assert_allclose(g[1], g_ref[1], atol=1e-12)
    with pytest.raises(ValueError, match="logit_softcap"):
        jax.jit(lambda c: attention(q, k, v, mask, logit_softcap=c))(5.0)


def test_head_counts_and_one_sided_segments_are_refused_by_name():
    """6 query heads over 4 kv heads failed in a bare reshape deep in the kernel; segment ids on one side of
    make_mask in a TypeError (None == array)."""
    q, k, v = qkv(1, 4, 6, 4, 8, jnp.float32)
    mask = make_mask(jnp.arange(4)[None], jnp.arange(4)[None])
    for impl in ("xla", "reference"):
        with pytest.raises(ValueError, match="query heads N must be a multiple of the kv heads K"):
            attention(q, k, v, mask, impl=impl)
    with pytest.raises(ValueError, match="make_mask: pass segment ids for both"):
        make_mask(jnp.arange(4)[None], jnp.arange(4)[None], q_seg_BT=jnp.zeros((1, 4), jnp.int32))


def test_bad_causal_block_is_refused_by_name():
    """causal_block 0, -1 or True ran silently (blocks of max(C, T / 16) rows), 2.5 failed in range() naming no
    argument; numpy ints stay accepted (None, one dense block, everywhere)."""
    q, k, v = qkv(1, 8, 2, 2, 4, jnp.float32)
    mask = make_mask(jnp.arange(8)[None], jnp.arange(8)[None])
    for block in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="attention: causal_block must be an int >= 1 .* or None"):
            attention(q, k, v, mask, causal_block=block)
    assert attention(q, k, v, mask, causal_block=np.int64(3)).shape == q.shape


def test_a_float_mask_is_refused_not_read_inverted():
    """An additive float mask (0 where attended, -inf where not, as Hugging Face builds them) was read by its
    truthiness, i.e. inverted: every kernel attended exactly the masked keys (outputs 1.99 off the bool mask's).
    jax.nn.dot_product_attention refuses it; so does `attention` now, naming the fix. Bool and 0/1 int masks run."""
    q, k, v = qkv(1, 6, 2, 2, 8, seed=2)
    causal = dense_window_mask(6, None)
    want = attention(q, k, v, causal, impl="reference")
    for impl in ("xla", "reference"):
        np.testing.assert_allclose(attention(q, k, v, causal.astype(jnp.int32), impl=impl), want, atol=1e-6)
        with pytest.raises(ValueError, match=r"mask_B1TS must be bool .* got float32.*bias == 0"):
            attention(q, k, v, jnp.where(causal, 0.0, -jnp.inf), impl=impl)


def test_mask_and_value_shapes_are_checked_by_name():
    """A [B, T, S] mask (no head axis) at a decode step (T = 1) with B == K broadcast row b's mask onto kv head b:
    wrong outputs, no error (1.44 off the [B, 1, T, S] result); with T > 1 it failed in a bare broadcast error.
    A value head dim other than q's failed in a bare reshape, though the message named it."""
    B, S, N, K, H = 2, 6, 4, 2, 8
    q, _, _ = qkv(B, 1, N, K, H, jnp.float32)
    _, k, v = qkv(B, S, N, K, H, jnp.float32, seed=1)
    valid = np.arange(S)[None] >= np.array([[3], [0]])  # row 0 left-padded
    for impl in ("xla", "reference"):
        attention(q, k, v, jnp.asarray(valid[:, None, None, :]), impl=impl)  # [B, 1, 1, S] is fine
        with pytest.raises(ValueError, match=r"mask_B1TS: shape \(2, 1, 6\)"):
            attention(q, k, v, jnp.asarray(valid[:, None, :]), impl=impl)
        with pytest.raises(ValueError, match="query heads N must be a multiple of the kv heads K"):
            attention(q, k, jnp.concatenate([v, v], -1), jnp.asarray(valid[:, None, None, :]), impl=impl)



def test_keys_of_another_batch_are_refused_by_name():
    """k / v of another batch than q: batch 3 against 2 failed in jnp.einsum's "Size of label 'b' ...", naming no
    argument; batch 1 ran forward ('xla' broadcast it) but its gradient failed in jax's custom-VJP shape check
    (dk [2, ...] for a k [1, ...])."""
    q, k, v = qkv(2, 4, 4, 2, 8, jnp.float32)
    mask = dense_window_mask(4, None)
    for impl in ("xla", "reference"):
        for b in (1, 3):
            kb, vb = (jnp.concatenate([x, x])[:b] for x in (k, v))
            with pytest.raises(ValueError, match=rf"attention: .*k \({b}, 4, 2, 8\).*q's batch B=2"):
                attention(q, kb, vb, mask, impl=impl)
        with pytest.raises(ValueError, match=r"v \(1, 4, 2, 8\).*q's batch B=2"):
            attention(q, k, v[:1], mask, impl=impl)



def test_make_mask_reads_an_integer_padding_mask_as_nonzero_and_stays_bool():
    """A 0/1 int padding mask (a tokenizer's attention_mask) gave an int32 mask (bitwise &), one of 2s masked every
    key, and a NumPy one failed in numpy's UFuncTypeError; Transformer's padding_mask_BT and the sliding-window
    kernels read ints as != 0. Now make_mask does too, and returns bool; a float one is refused by name."""
    idx = np.arange(4)[None]
    want = make_mask(jnp.asarray(idx), jnp.asarray(idx), k_valid_BS=jnp.array([[True, True, False, True]]))
    for valid in (jnp.array([[1, 1, 0, 1]]), jnp.array([[2, 2, 0, 2]]), np.array([[1, 1, 0, 1]])):
        got = make_mask(jnp.asarray(idx), jnp.asarray(idx), k_valid_BS=valid)
        assert got.dtype == jnp.bool_
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"make_mask: k_valid_BS must be a bool mask .* got dtype float32"):
        make_mask(jnp.asarray(idx), jnp.asarray(idx), k_valid_BS=jnp.ones((1, 4)))


def test_make_mask_equals_a_loop_reference_diagonal_segments_and_padding_included():
    """make_mask against a plain loop over (t, s): key s visible to query t iff slot_s <= slot_t (its own slot
    included: a strict < left the first query of every row no key), same segment, key valid; query slots offset
    from the key slots as in cached decoding."""
    rng = np.random.default_rng(0)
    B, T, S = 2, 3, 7
    q_idx, k_idx = np.tile(np.arange(4, 4 + T), (B, 1)), np.tile(np.arange(S), (B, 1))
    q_seg, k_seg = rng.integers(0, 2, (B, T)), rng.integers(0, 2, (B, S))
    valid = rng.random((B, S)) > 0.2
    want = np.zeros((B, 1, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                want[b, 0, t, s] = k_idx[b, s] <= q_idx[b, t] and q_seg[b, t] == k_seg[b, s] and valid[b, s]
    got = make_mask(jnp.asarray(q_idx), jnp.asarray(k_idx), jnp.asarray(q_seg), jnp.asarray(k_seg), jnp.asarray(valid))
    np.testing.assert_array_equal(got, want)
    tril = np.tril(np.ones((3, 3), bool))
    np.testing.assert_array_equal(make_mask(jnp.arange(3)[None], jnp.arange(3)[None])[0, 0], tril)


@pytest.mark.parametrize("cap", [0, 0.0, -1.0])
def test_a_soft_cap_that_is_not_positive_is_refused(cap):
    """logit_softcap=0 (flash-attn's "no soft-cap") made every score 0·tanh(s / 0) = 0: uniform attention over the
    visible keys, silently, in every kernel; TransformerConfig refuses it ("must be positive or None"), the building
    blocks now do too. None is no cap."""
    from models.sliding_window import local_attention

    q, k, v = qkv(1, 6, 2, 2, 8, seed=3)
    mask = dense_window_mask(6, None)
    for impl in ("xla", "reference"):
        with pytest.raises(ValueError, match=r"logit_softcap must be > 0 or None"):
            attention(q, k, v, mask, impl=impl, logit_softcap=cap)
    for impl in ("blocked", "dense"):
        with pytest.raises(ValueError, match=r"logit_softcap must be > 0 or None"):
            local_attention(q, k, v, 3, impl=impl, logit_softcap=cap)
    np.testing.assert_allclose(attention(q, k, v, mask, logit_softcap=None), attention(q, k, v, mask), atol=0)

def test_cudnn_under_plain_autodiff_is_refused_naming_the_field():
    """cuDNN's fused kernel keeps JAX's own custom VJP, which forward mode refuses: under models.plain_autodiff
    attn_impl='cudnn' is a ValueError naming the field and the fix at trace time (JAX's TypeError came at jvp time,
    naming no field). Soft-capped scores run 'xla' whatever attn_impl, so those still differentiate both ways."""
    q, k, v = qkv(1, 8, 2, 2, 8, dtype=jnp.bfloat16)
    mask = make_mask(jnp.arange(8)[None], jnp.arange(8)[None])
    with plain_autodiff():
        with pytest.raises(ValueError, match="attn_impl='cudnn'.*plain_autodiff.*attn_impl='xla'"):
            attention(q, k, v, mask, impl="cudnn")
        f = lambda impl: lambda q: attention(q, k, v, mask, impl=impl, logit_softcap=5.0).astype(float).sum()  # noqa
        np.testing.assert_array_equal(jax.jvp(f("cudnn"), (q,), (k,)), jax.jvp(f("xla"), (q,), (k,)))


def pretend_cudnn_gpu(monkeypatch, capability=(9, 0)):
    """Make jax trace its cuDNN attention as on a GPU with cuDNN 9 of this compute capability (H100 / H200: 9.0,
    A100: 8.0), from this CPU: lower the result with lowering_platforms=('cuda',)."""
    from jax._src.cudnn import fused_attention_stablehlo as fas

    monkeypatch.setattr(fas, "check_cudnn_version", lambda: 90800)
    cc = lambda c: tuple(map(int, c.split(".")))  # noqa: E731
    monkeypatch.setattr(fas, "check_compute_capability", lambda c: cc(c) <= capability)
    monkeypatch.setattr(fas, "is_cuda_compute_capability_equal", lambda c: cc(c) == capability)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("kind,T,S", [("causal", 7, 7), ("mask", 8, 5), ("mask", 7, 7), ("window", 7, 7),
                                      ("auto_window", 7, 7), ("key_mask", 8, 6)])
def test_cudnn_trains_at_odd_lengths_through_an_exact_padding(monkeypatch, kind, T, S):
    """jax's cuDNN wrapper refuses the gradient of any call whose T or S is odd ('Unsupported sequence length Q 7,
    KV 7': its check counts a bias even when none is passed), while the forward takes them: an LM at T = 255
    (tokens[:, :-1] of 256), the DiT's 3 latent frames (temporal attention) or an odd caption failed to trace on a
    GPU. The differentiated call now pads T and S to even lengths (a key masked for every query, a query row
    dropped), which lowers to cuDNN's forward and backward kernels; with jax's 'xla' kernel standing in for cuDNN on
    this CPU, the value and gradients are the dense reference's."""
    from models.attention import reference_attention

    pretend_cudnn_gpu(monkeypatch)
    B, N, K, H, W = 2, 4, 2, 16, 3
    q = jax.random.normal(jax.random.key(0), (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(jax.random.key(i), (B, S, K, H), jnp.bfloat16) for i in (1, 2))
    if kind == "key_mask":  # [B, 1, 1, S], broadcast over the queries as `attention` documents: jax's cuDNN wrapper
        # refused it unpadded ('Bias must have same seq length as QKV, got 1 and 6'), even lengths or no gradient
        mask = jnp.arange(S)[None, None, None, :] < jnp.asarray([S - 2, S])[:, None, None, None]
    elif kind == "mask":  # a padded batch: row 0 sees its first S - 2 keys (causal when T == S)
        mask = jnp.arange(S)[None, None, None, :] < jnp.asarray([S - 2, S])[:, None, None, None]
        mask = mask & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]) if T == S else jnp.broadcast_to(
            mask, (B, 1, T, S))
    else:
        mask = dense_window_mask(T, None if kind == "causal" else W)
    if kind == "causal":
        attend = lambda q, k, v: attention(q, k, v, mask, impl="cudnn", is_causal=True)  # noqa: E731
    elif kind in ("mask", "key_mask"):
        attend = lambda q, k, v: attention(q, k, v, mask, impl="cudnn")  # noqa: E731
    else:
        from models.sliding_window import local_attention

        impl = "auto" if kind == "auto_window" else "cudnn"
        attend = lambda q, k, v: local_attention(q, k, v, W, impl=impl)  # noqa: E731
    loss = lambda attend: lambda q, k, v: (attend(q, k, v).astype(jnp.float32) * v[:, :1, :1, :1]).sum()  # noqa: E731
    step = jax.value_and_grad(loss(attend), (0, 1, 2))
    hlo = jax.jit(step).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"@__cudnn\$fmha\w*Softmax\(", hlo) and re.search(r"@__cudnn\$fmha\w*SoftmaxBackward\(", hlo)

    dpa = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation, **kw: dpa(*a, **kw))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    # jitted (eagerly each op of the padded forward and backward compiles on its own); a fresh function, traced
    # again with 'xla' standing in for cuDNN, not the cuda trace above
    ref = jax.jit(jax.value_and_grad(loss(lambda q, k, v: reference_attention(q, k, v, mask, H ** -0.5)),
                                     (0, 1, 2)))(*f32)
    got = jax.jit(lambda *a: step(*a))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=3e-2 * (1 + float(np.abs(b).max())))


@pytest.mark.parametrize("H,capability", [(100, (9, 0)), (264, (9, 0)), (256, (8, 0))])
def test_cudnn_head_dims_it_refuses_name_the_field_and_auto_takes_the_blocked_kernel(monkeypatch, H, capability):
    """cuDNN takes head dims that are multiples of 8, up to 256 from Hopper on and 128 before (an A100 with
    Gemma's 256): jax's NotImplementedError 'The head dim must be <= 128 and a multiple of 8' named no setting.
    An explicit 'cudnn' is a ValueError naming attn_impl / swa_impl, head_dim and the fix; swa_impl='auto' takes
    the blocked kernel (an even head dim cuDNN takes still gets cuDNN)."""
    from models.sliding_window import choose_impl, local_attention

    pretend_cudnn_gpu(monkeypatch, capability)
    q, k, v = qkv(1, 8, 2, 1, H, jnp.bfloat16)
    h_max = 256 if capability >= (9, 0) else 128
    with pytest.raises(ValueError, match=rf"attn_impl='cudnn': .*at most {h_max} .*head_dim={H}; use attn_impl='xla'"):
        jax.jit(lambda q, k, v: attention(q, k, v, dense_window_mask(8, None), impl="cudnn")).trace(q, k, v)
    with pytest.raises(ValueError, match=rf"swa_impl='cudnn': .*head_dim={H}; use swa_impl='auto' or 'blocked'"):
        jax.jit(lambda q, k, v: local_attention(q, k, v, 3, impl="cudnn")).trace(q, k, v)
    assert choose_impl("auto", jnp.bfloat16, False, False, head_dim=H) == "blocked"
    assert choose_impl("auto", jnp.bfloat16, False, False, head_dim=128) == "cudnn"
    np.testing.assert_array_equal(local_attention(q, k, v, 3), local_attention(q, k, v, 3, impl="blocked"))
