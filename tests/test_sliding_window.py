"""Blocked sliding-window attention equals a dense masked float64 reference, values and gradients."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import plain_autodiff
from models.attention import reference_attention
from models.sliding_window import choose_impl, dense_window_mask, local_attention, sliding_window_attention


def qkv(B, T, N, K, H, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (B, T, n, H), dtype) for k, n in zip(ks, (N, K, K)))


def jaxpr_dots(jaxpr):
    """The dot_general equations of a jaxpr, also inside custom-VJP calls and other sub-jaxprs."""
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                yield from jaxpr_dots(inner)


def segments(layout, B, T):
    if layout == "none":
        return None
    if layout == "packed":  # three documents of uneven length, the last cut by the row end
        cuts = np.array([0, T // 3, T // 3 + 5, T])
        seg = np.zeros(T, np.int32)
        for i in range(3):
            seg[cuts[i]:cuts[i + 1]] = i + 1
        return jnp.broadcast_to(jnp.asarray(seg), (B, T))
    rng = np.random.default_rng(0)  # "random": many short documents
    return jnp.asarray(np.sort(rng.integers(1, 6, size=(B, T)), axis=1))


GRID = [  # (T, W, block, N, K, layout, soft-cap)
    (37, 1, 8, 4, 2, "none", None),
    (37, 5, 8, 4, 2, "packed", None),
    (64, 16, 16, 4, 1, "random", None),
    (50, 7, 16, 2, 2, "packed", None),
    (33, 64, 8, 4, 4, "none", None),  # W >= T: plain causal
    (40, 12, 64, 6, 3, "random", None),  # block > T
    (50, 7, 16, 4, 2, "packed", 1.5),  # soft-capped scores (Gemma 2), tanh bending them
    (45, 10, 8, 4, 2, "none", None),  # W - 1 = C + 1: the oldest visible key one block further back
]


@pytest.mark.parametrize("T,W,C,N,K,layout,cap", GRID)
def test_blocked_equals_dense_float64(T, W, C, N, K, layout, cap):
    B, H = 2, 8
    with jax.enable_x64(True):
        q, k, v = qkv(B, T, N, K, H, jnp.float64)
        seg = segments(layout, B, T)
        valid = jnp.arange(T)[None].repeat(B, 0) < T - 3  # the last 3 slots are padding
        mask = dense_window_mask(T, W, seg, valid)

        def ref(q, k, v):
            return reference_attention(q, k, v, mask, H ** -0.5, logit_softcap=cap)

        def ours(q, k, v):
            return sliding_window_attention(q, k, v, W, segment_ids_BT=seg, valid_BT=valid, block=C,
                                            logit_softcap=cap)

        real = np.asarray(mask.any(-1)[:, 0])  # rows with at least one visible key
        ct = jax.random.normal(jax.random.key(9), q.shape, jnp.float64)

        def out_and_grad(f):  # jitted (op-by-op dispatch took seconds), output and gradient in one program
            return jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: (f(*a) * ct).sum(), argnums=(0, 1, 2))(*a)))

        (o_ref, g_ref), (o, g) = out_and_grad(ref)(q, k, v), out_and_grad(ours)(q, k, v)
        np.testing.assert_allclose(np.asarray(o)[real], np.asarray(o_ref)[real], atol=1e-10)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("pad", [0, 4])
def test_blocked_equals_dense_on_every_row_with_or_without_padding(pad):
    """Without a padding mask or segment ids (the grid above always passes one) the first blocks' front-filled key
    slots are masked by their slot alone; with left padding, a query whose window holds only padding sees no key and
    outputs 0 in both kernels (not the dense one's uniform weights over the whole row, future keys included)."""
    B, T, W = 2, 20, 3
    q, k, v = qkv(B, T, 4, 2, 8, seed=1)
    valid = jnp.arange(T)[None].repeat(B, 0) >= pad if pad else None
    blocked, dense = jax.jit(lambda q, k, v: [local_attention(q, k, v, W, valid_BT=valid, impl=impl, block=8)
                                              for impl in ("blocked", "dense")])(q, k, v)  # one program for both
    np.testing.assert_allclose(blocked, dense, atol=1e-6)
    assert not np.asarray(dense)[:, :pad].any()


def test_keys_outside_every_window_change_nothing():
    B, T, N, K, H, W = 1, 48, 2, 1, 8, 6
    q, k, v = qkv(B, T, N, K, H)
    run = jax.jit(lambda k, v: sliding_window_attention(q, k, v, W, block=16))  # one program for both (eager: per op)
    out = run(k, v)
    # key 10 is seen only by queries 10 .. 15; perturb it and everything else must stay put
    k2, v2 = k.at[:, 10].add(5.0), v.at[:, 10].add(5.0)
    out2 = run(k2, v2)
    changed = np.asarray(jnp.abs(out2 - out).max(axis=(0, 2, 3)) > 0)
    assert changed[10:16].all() and not changed[:10].any() and not changed[16:].any()


def test_bf16_close_to_f32():
    q, k, v = qkv(2, 70, 4, 2, 16)
    # one program for both (eagerly each op compiled on its own)
    f32, bf = jax.jit(lambda q, k, v: (sliding_window_attention(q, k, v, 9, block=32), sliding_window_attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)), 9, block=32)))(q, k, v)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf.astype(jnp.float32), f32, atol=3e-2)


def test_bf16_key_gradients_sum_their_windows_in_float32():
    """A key's gradient is the sum of its nk window blocks' parts: summed in bf16 (autodiff of the stacked windows),
    dk / dv were 1.6-2.3x further from float64 than the global kernel's, which sums its blocks in float32."""
    from models.attention import attention

    T, W, C = 256, 129, 8  # 17 key blocks per query block
    with jax.enable_x64(True):
        q, k, v = qkv(1, T, 2, 1, 32, jnp.float64)
        ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float64)
        mask = dense_window_mask(T, W)

        def grads(f, dtype):
            loss = lambda *a: jnp.sum(f(*a).astype(jnp.float64) * ct)  # noqa: E731
            # one program per variant (eager: ~600 op-by-op compiles, 5x the time); the same errors to the digit
            return jax.jit(jax.grad(loss, (0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))

        ref = grads(lambda q, k, v: local_attention(q, k, v, W, impl="dense"), jnp.float64)
        blocked = grads(lambda q, k, v: sliding_window_attention(q, k, v, W, block=C), jnp.bfloat16)
        glob = grads(lambda q, k, v: attention(q, k, v, mask, causal_block=C), jnp.bfloat16)
        rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float64) - b) / jnp.linalg.norm(b))  # noqa: E731
        errs = [(name, b.dtype, rel(b, r), rel(g, r)) for name, b, g, r in zip("qkv", blocked, glob, ref)]
    for name, dtype, blocked_err, global_err in errs:
        assert dtype == jnp.bfloat16
        assert blocked_err < 1.3 * global_err, (name, blocked_err, global_err)


def test_softcap_and_scale_match_reference():
    B, T, N, K, H, W, cap = 1, 30, 2, 1, 8, 7, 5.0
    q, k, v = qkv(B, T, N, K, H)

    def both(q, k, v):  # one program for the kernel and the reference (eagerly each op compiled on its own)
        ours = sliding_window_attention(q, k, v, W, block=8, scale=0.3, logit_softcap=cap)
        s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // K, axis=2)) * 0.3
        s = cap * jnp.tanh(s / cap)
        s = jnp.where(dense_window_mask(T, W)[0], s, -jnp.inf)
        return ours, jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), jnp.repeat(v, N // K, axis=2))

    ours, ref = jax.jit(both)(q, k, v)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bad_window():
    q, k, v = qkv(1, 8, 2, 2, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, 0)
    # a fractional window ran as its ceiling (2.5 gave W = 3's output), where local_attention refused it
    for w in (2.5, True, 3.0):
        with pytest.raises(ValueError, match="sliding window must be an int >= 1"):
            sliding_window_attention(q, k, v, w)
    np.testing.assert_array_equal(sliding_window_attention(q, k, v, np.int64(3)), sliding_window_attention(q, k, v, 3))


def test_bad_block_is_refused_by_name():
    """block 0, a negative one or True ran silently as blocks of one query row (C = max(1, min(block, T))); 2.5 failed
    in jnp.pad naming no argument. Numpy ints stay accepted."""
    q, k, v = qkv(1, 8, 2, 2, 4)
    for impl in ("blocked", "dense"):
        for block in (0, -2, True, 2.5, None):
            with pytest.raises(ValueError, match=r"block \(swa_block\) must be an int >= 1"):
                local_attention(q, k, v, 3, impl=impl, block=block)
    with pytest.raises(ValueError, match=r"block \(swa_block\) must be an int >= 1"):
        sliding_window_attention(q, k, v, 3, block=0)
    assert sliding_window_attention(q, k, v, 3, block=np.int64(3)).shape == q.shape


def test_non_bool_padding_mask_is_refused_by_name():
    # a float 0/1 mask failed inside jnp's `&` with a TypeError naming neither valid_BT nor the fix
    q, k, v = qkv(1, 8, 2, 2, 4)
    for impl in ("blocked", "dense"):
        with pytest.raises(ValueError, match=r"valid_BT must be a bool mask.*mask > 0"):
            local_attention(q, k, v, 3, valid_BT=jnp.ones((1, 8), jnp.float32), impl=impl)
    with pytest.raises(ValueError, match="valid_BT must be a bool mask"):
        sliding_window_attention(q, k, v, 3, valid_BT=np.ones((1, 8)))


def test_an_integer_padding_mask_reads_nonzero_as_real_in_both_kernels():
    """A tokenizer's 0/1 attention_mask (int) ran exactly as the bool mask in both kernels, then was refused as not
    bool; Transformer and attention() read int masks as != 0. An int mask of 2s was 'padding' in the blocked kernel
    (2 & True == 0) and 'valid' in the dense one: != 0 in both now."""
    q, k, v = qkv(2, 12, 2, 2, 4)
    valid = np.arange(12)[None] < np.array([[12], [7]])
    for impl in ("blocked", "dense"):
        want = local_attention(q, k, v, 3, valid_BT=jnp.asarray(valid), impl=impl, block=4)
        for as_int in (valid.astype(np.int32), jnp.asarray(valid, jnp.int8) * 2):
            np.testing.assert_array_equal(local_attention(q, k, v, 3, valid_BT=as_int, impl=impl, block=4), want)
    got = jax.jit(lambda m: sliding_window_attention(q, k, v, 3, valid_BT=m, block=4))(valid.astype(np.int32))
    np.testing.assert_allclose(got, sliding_window_attention(q, k, v, 3, valid_BT=valid, block=4), atol=1e-6)  # jit
    # the public dense mask too: its `&` made an int mask, and read 2s as padding (2 & True == 0)
    want = dense_window_mask(12, 3, valid_BT=jnp.asarray(valid))
    for as_int in (valid.astype(np.int32), jnp.asarray(valid, jnp.int8) * 2):
        got = dense_window_mask(12, 3, valid_BT=as_int)
        assert got.dtype == jnp.bool_
        np.testing.assert_array_equal(got, want)


def test_padded_batch_on_tpu_never_uses_splash(monkeypatch):
    # our splash call takes no padding mask: picking it for a padded batch would attend to padding keys
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v = qkv(2, 12, 2, 2, 4)
    valid = jnp.arange(12)[None] < jnp.array([[12], [7]])
    out = local_attention(q, k, v, 3, valid_BT=valid, block=4)  # 'auto' on the patched backend
    np.testing.assert_allclose(out, sliding_window_attention(q, k, v, 3, valid_BT=valid, block=4), atol=1e-6)
    with pytest.raises(ValueError, match="valid_BT.*'blocked'"):
        local_attention(q, k, v, 3, valid_BT=valid, impl="splash")
    assert choose_impl("auto", jnp.float32, False, False, backend="tpu") == "splash"
    assert choose_impl("auto", jnp.float32, False, False, has_padding=True, backend="tpu") == "blocked"


def test_auto_on_gpu_takes_cudnn_only_where_it_applies():
    """cuDNN's local window takes no segment ids, padding or soft-cap, and 16-bit only: anything else would fail
    with "swa_impl='cudnn' supports neither ..." (dropping the padding condition passed every test)."""
    pick = lambda dt, seg=False, cap=False, pad=False: choose_impl("auto", dt, seg, cap, has_padding=pad,  # noqa: E731
                                                                   backend="gpu", seq_len=255)
    assert pick(jnp.bfloat16) == pick(jnp.float16) == "cudnn"
    assert pick(jnp.float32) == "blocked"
    assert pick(jnp.bfloat16, seg=True) == pick(jnp.bfloat16, cap=True) == pick(jnp.bfloat16, pad=True) == "blocked"


@pytest.mark.parametrize("seg, cap", [(False, None), (True, 2.0)], ids=["plain", "segments_softcap"])
def test_splash_on_tpu_equals_the_blocked_kernel_and_takes_only_lengths_its_blocks_divide(monkeypatch, seg, cap):
    """The TPU path (the Pallas splash kernel, run here in interpret mode) against the blocked kernel, GQA; 'auto'
    picked splash for any T and its 128-blocks failed at T = 255 (tokens[:, :-1]) with jax's block-size error."""
    import functools

    from models import sliding_window as sw

    sk, _ = sw._splash()
    monkeypatch.setattr(sk, "make_splash_mha", functools.partial(sk.make_splash_mha, interpret=True))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    T = 256
    q, k, v = qkv(1, T, 4, 2, 64)
    s = jnp.asarray(np.repeat([[1, 2, 3]], [100, 60, 96], axis=1), jnp.int32) if seg else None
    got = local_attention(q, k, v, 17, segment_ids_BT=s, logit_softcap=cap)  # 'auto' on the patched backend
    want = sliding_window_attention(q, k, v, 17, segment_ids_BT=s, block=64, logit_softcap=cap)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert choose_impl("auto", jnp.float32, seg, cap is not None, backend="tpu", seq_len=T) == "splash"
    assert choose_impl("auto", jnp.float32, seg, cap is not None, backend="tpu", seq_len=T - 1) == "blocked"
    out = local_attention(q[:, :-1], k[:, :-1], v[:, :-1], 17)  # T = 255: the blocked kernel
    np.testing.assert_allclose(out, sliding_window_attention(q[:, :-1], k[:, :-1], v[:, :-1], 17), atol=1e-6)
    with pytest.raises(ValueError, match="swa_impl='splash' needs a sequence length divisible by 128, got 255"):
        local_attention(q[:, :-1], k[:, :-1], v[:, :-1], 17, impl="splash")


def test_splash_on_a_mesh_runs_per_device_and_equals_the_dense_reference(monkeypatch):
    """jax lowers a Pallas TPU (Mosaic) kernel only per device: on a mesh of several devices (any TPU pod slice or
    multi-chip host, where 'auto' picks splash) the step failed to lower with jax's NotImplementedError 'Mosaic kernels
    cannot be automatically partitioned. Please wrap the call in a shard_map'. Lowered for TPU from this CPU on a
    {data: 2, tensor: 2} mesh, value and gradients now hold the kernel; run in interpret mode there, rows split over
    data and heads over tensor, they equal the dense masked reference (GQA, [1, T] segment ids, which splash's vmap
    refused though every other kernel broadcasts them). Inside a shard_map manual over some axes (gpipe's), where
    the kernel's outputs fail jax's varying-axes check, 'auto' takes the blocked kernel and 'splash' names itself."""
    import functools

    from models import sliding_window as sw
    from parallel import make_mesh

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v = qkv(2, 128, 4, 2, 16)
    s = jnp.asarray(np.repeat([[1, 2, 3]], [40, 50, 38], axis=1), jnp.int32)  # [1, T]: every row
    do = jax.random.normal(jax.random.key(5), q.shape)

    def step(impl):
        loss = lambda q, k, v: jnp.sum(local_attention(q, k, v, 17, segment_ids_BT=s, impl=impl) * do)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))

    def in_pipeline(x):  # a shard_map manual over some axes (gpipe's `stage`): the kernel cannot run there
        assert choose_impl("auto", jnp.float32, False, False, backend="tpu", seq_len=128) == "blocked"
        with pytest.raises(ValueError, match=r"swa_impl='splash' cannot run inside a shard_map manual over \('data"):
            local_attention(q, k, v, 17, impl="splash")
        return x

    want = step("dense")(q, k, v)
    with jax.set_mesh(mesh := make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])):
        assert "@tpu_custom_call(" in step("splash").trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
        sk, _ = sw._splash()
        monkeypatch.setattr(sk, "make_splash_mha", functools.partial(sk.make_splash_mha, interpret=True))
        got = step("splash")(q, k, v)
        jax.shard_map(in_pipeline, mesh=mesh, in_specs=jax.P(), out_specs=jax.P(), axis_names={"data"})(jnp.zeros(()))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_under_plain_autodiff_auto_takes_the_blocked_kernel_and_fused_ones_are_refused(monkeypatch):
    """cuDNN's and splash's kernels keep JAX's own custom VJPs, which refuse forward mode: under models.plain_autodiff
    'auto' picked splash on a TPU (cuDNN on a GPU) and jax.jvp failed with JAX's TypeError; it takes the blocked
    kernel there now, and an explicit 'cudnn' / 'splash' is a ValueError naming swa_impl at trace time. Outside the
    switch the choice is unchanged."""
    import functools

    from models import sliding_window as sw

    sk, _ = sw._splash()
    monkeypatch.setattr(sk, "make_splash_mha", functools.partial(sk.make_splash_mha, interpret=True))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v = qkv(1, 128, 2, 2, 16)
    slope = lambda impl: jax.jvp(lambda q: local_attention(q, k, v, 17, impl=impl).sum(), (q,), (k,))  # noqa: E731
    assert choose_impl("auto", jnp.float32, False, False, seq_len=128) == "splash"
    assert choose_impl("auto", jnp.bfloat16, False, False, backend="gpu") == "cudnn"
    with plain_autodiff():
        np.testing.assert_allclose(slope("auto"), slope("blocked"), rtol=0)
        assert choose_impl("auto", jnp.float32, False, False, seq_len=128) == "blocked"
        assert choose_impl("auto", jnp.bfloat16, False, False, backend="gpu") == "blocked"
        for impl in ("cudnn", "splash"):
            with pytest.raises(ValueError, match=f"swa_impl='{impl}'.*plain_autodiff.*swa_impl='auto' or 'blocked'"):
                local_attention(q.astype(jnp.bfloat16), k, v, 17, impl=impl)
    assert choose_impl("auto", jnp.float32, False, False, seq_len=128) == "splash"


def test_scores_are_float32_products_of_bf16_operands():
    """QK^T of bf16 q, k accumulates into float32 (as the 'xla' kernel does) in the blocked sliding-window kernel
    and the soft-capped reference: a bf16 product rounded the scores before the softmax (5-6x the error)."""
    import jax
    import jax.numpy as jnp

    from models.attention import reference_attention
    from models.sliding_window import sliding_window_attention

    q = k = v = jnp.zeros((1, 8, 2, 4), jnp.bfloat16)
    mask = jnp.ones((1, 1, 8, 8), bool)

    for fn in (lambda: sliding_window_attention(q, k, v, 4, block=4),
               lambda: sliding_window_attention(q, k, v, 4, block=4, logit_softcap=5.0),
               lambda: reference_attention(q, k, v, mask, 0.5, logit_softcap=5.0)):
        first = next(jaxpr_dots(jax.make_jaxpr(fn)().jaxpr))
        assert first.outvars[0].aval.dtype == jnp.float32, first


def test_cudnn_is_asked_for_the_same_window(monkeypatch):
    """swa_impl='cudnn' hands jax a (left, right) window, both ends inclusive: W keys are (W - 1, 0). cuDNN needs a
    GPU, so jax's entry point is intercepted and run by XLA, whose local window means the same; against the
    blocked kernel, W = 1 (the diagonal alone) included."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"}))
    q, k, v = qkv(2, 24, 4, 2, 8, seed=3)
    for W in (1, 5):
        np.testing.assert_allclose(local_attention(q, k, v, W, impl="cudnn"),
                                   sliding_window_attention(q, k, v, W, block=8), atol=1e-5)


def test_the_kernel_choice_is_logged_once_with_its_reason(monkeypatch, caplog):
    """swa_impl='auto' resolves per backend and call and says which kernel it took and why, once per (kernel,
    reason): the issue asks for the choice to be logged, and no test read the log."""
    from models import sliding_window as sw

    monkeypatch.setattr(sw, "_logged", set())
    caplog.set_level(logging.INFO, logger="jaxscale")
    q, k, v = qkv(1, 8, 2, 2, 4)
    for _ in range(2):
        assert choose_impl("auto", jnp.bfloat16, False, False, backend="gpu") == "cudnn"
        local_attention(q, k, v, 3, block=4)  # 'auto' in float32: the blocked kernel on any backend
        local_attention(q, k, v, 3, block=4, impl="dense")
    assert [r.getMessage() for r in caplog.records if r.name == "jaxscale"] == [
        "sliding-window attention: cudnn (GPU, 16-bit, no segment ids, padding or soft-cap)",
        f"sliding-window attention: blocked (backend {jax.default_backend()}: blocked O(T·W) kernel)",
        "sliding-window attention: dense (set in the config)"]


def test_gpu_and_tpu_kernels_asked_of_the_cpu_say_so():
    """A user study's two errors: local_attention(impl='cudnn') on the CPU was jax's bare 'cuDNN is not detected.',
    and impl='splash' complained of the length only (padding it to 128 met the next failure)."""
    q, k, v = qkv(1, 8, 2, 2, 8, seed=0)
    with pytest.raises(ValueError, match=r"swa_impl='cudnn' is cuDNN's fused kernel for NVIDIA GPUs .* a cpu backend"):
        local_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 3, impl="cudnn")
    with pytest.raises(ValueError, match=r"divisible by 128, got 8, and a TPU \(this is a cpu backend\)"):
        local_attention(q, k, v, 3, impl="splash")


@pytest.mark.parametrize("impl", ["blocked", "dense"])
def test_windows_past_the_int32_range_are_plain_causal_attention(impl):
    """W >= T is plain causal attention (the docstring), but the masks compare int32 slot differences with W: a numpy
    int64 window of 2**32 + 1 wrapped to 1 (outputs 2.8 off causal attention), a Python 2**31 raised OverflowError."""
    q, k, v = qkv(2, 12, 4, 2, 8)
    want = local_attention(q, k, v, 12, impl=impl, block=4)
    for w in (np.int64(2**32 + 1), 2**31, 10**12):
        np.testing.assert_allclose(local_attention(q, k, v, w, impl=impl, block=4), want, atol=1e-6)
        np.testing.assert_allclose(sliding_window_attention(q, k, v, w, block=4), want, atol=1e-6)
    np.testing.assert_array_equal(dense_window_mask(12, 2**40), dense_window_mask(12, None))


def test_keys_and_per_token_arrays_of_the_wrong_shape_are_refused_by_name():
    """Keys of another length or batch, another head dim, and segment ids / padding masks not [B, T] failed in a bare
    reshape (or jnp.pad) error deep in the blocked kernel, naming no argument; a [1, T] one broadcasts, as before."""
    q, k, v = qkv(2, 12, 4, 2, 8)
    for impl in ("blocked", "dense"):
        run = lambda *a, **kw: local_attention(*a, 3, impl=impl, block=4, **kw)  # noqa: E731
        for kk, vv in ((k[:, :6], v[:, :6]), (k[:1], v[:1]), (k[..., :4], v[..., :4]), (k, v[..., :4]),
                       (k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))):
            with pytest.raises(ValueError, match=r"k and v must be \[B, T, K, H\] with q's B, T"):
                run(q, kk, vv)
        with pytest.raises(ValueError, match=r"segment_ids_BT must be \[B, T\] = \(2, 12\).*got shape \(12,\)"):
            run(q, k, v, segment_ids_BT=jnp.ones(12, jnp.int32))
        with pytest.raises(ValueError, match=r"valid_BT must be \[B, T\] = \(2, 12\).*got shape \(2, 11\)"):
            run(q, k, v, valid_BT=jnp.ones((2, 11), bool))
        np.testing.assert_allclose(run(q, k, v, segment_ids_BT=jnp.ones((1, 12), jnp.int32),
                                       valid_BT=jnp.ones((1, 12), bool)), run(q, k, v), atol=1e-6)


@pytest.mark.parametrize("shape", [{"sequence": 8}, {"data": 2, "sequence": 4}])
def test_sequence_split_blocks_stay_put_without_gathering_the_keys(shape):
    """On a sequence-split mesh each device attends its own query blocks, keys and values gathered by nobody: the
    blocks' [B, Q] rows were merged into one [B·Q] dim and split over batch x sequence, which matches the arriving
    [B / n_b, Q / n_s] tiles only at one row per batch shard, so XLA regathered them (on {sequence: 8}, B 4, the
    whole of k and v on every device: "Involuntary full rematerialization"). Values stay one device's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel import make_mesh

    q, k, v = qkv(4, 64, 2, 1, 8)
    loss = lambda q, k, v: jnp.sum(jnp.sin(sliding_window_attention(q, k, v, 5, block=8)))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    want = grad(q, k, v)
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        split = NamedSharding(mesh, P("data" if "data" in shape else None, "sequence"))
        placed = [jax.device_put(x, split) for x in (q, k, v)]
        compiled = grad.lower(*placed).compile()
        got = compiled(*placed)
    assert "all-gather" not in compiled.as_text()
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
