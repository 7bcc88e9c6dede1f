"""Invariants of the decoder Transformer: causality, scan/remat/jit equivalences, packing, padding, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import KVCache, Transformer, TransformerConfig
from models.losses import cross_entropy

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                        qkv_bias=True, final_logit_softcap=30.0)


def make(cfg=CFG, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # randomise norm scales and biases so nothing hides behind ones and zeros
    state = nnx.state(model)
    leaves, tdef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tdef, leaves))
    return model


def with_cfg(model, **changes):
    """Same parameters under a different (compatible) config."""
    other = Transformer(dataclasses.replace(model.cfg, **changes), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


def loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(st):
        logits = nnx.merge(graphdef, st)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])[0]

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)


def test_param_count_matches_tree(model):
    for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=False, n_kv_heads=1)):
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(nnx.state(m)))


def test_causality_by_gradient(model):
    # Unique tokens: the gradient w.r.t. an embedding row is the gradient w.r.t. one position.
    T = 10
    tok = jax.random.permutation(jax.random.key(2), CFG.vocab_size)[:T][None]
    graphdef, state = nnx.split(model)

    def logit_sum_at(st, t):
        return nnx.merge(graphdef, st)(tok)[0, t].sum()

    for t in (0, 4, T - 2):
        g_embed = jax.grad(logit_sum_at)(state, t)["embed"][...]
        per_pos = jnp.abs(g_embed[tok[0]]).sum(-1)  # [T]
        assert jnp.all(per_pos[t + 1:] == 0.0), f"position {t} depends on a later token"
        assert jnp.all(per_pos[: t + 1] > 0.0)


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(scan_unroll=True)])
def test_scan_equals_unrolled(model, tokens, change):
    l1, g1 = loss_and_grads(model, tokens)
    l2, g2 = loss_and_grads(with_cfg(model, **change), tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_equals_no_remat(model, tokens, policy):
    l1, g1 = loss_and_grads(model, tokens)
    l2, g2 = loss_and_grads(with_cfg(model, remat=policy), tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_jit_equals_eager_and_reference_attention(model, tokens):
    graphdef, state = nnx.split(model)
    eager = model(tokens)
    jitted = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    ref = with_cfg(model, attn_impl="reference")(tokens)
    np.testing.assert_allclose(eager, ref, atol=1e-5)


def test_cudnn_is_asked_for_its_causal_mask_type_only_when_nothing_else_is_masked(model, tokens, monkeypatch):
    """cuDNN needs a GPU: jax's entry point is intercepted and run by XLA, to check what the model asks for
    (`is_causal` and no mask tensor, unless segments or padding mask more) and that it means the same."""
    calls, real = [], jax.nn.dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("is_causal", False), kw.get("mask") is not None))
        return real(*args, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    cudnn = with_cfg(model, attn_impl="cudnn")
    np.testing.assert_allclose(cudnn(tokens), model(tokens), atol=1e-5)
    assert set(calls) == {(True, False)}
    calls.clear()
    seg = jnp.array([[1] * 5 + [2] * 7] * 2)
    np.testing.assert_allclose(cudnn(tokens, segment_ids_BT=seg), model(tokens, segment_ids_BT=seg), atol=1e-5)
    pad = jnp.broadcast_to(jnp.arange(12) < 9, (2, 12))
    np.testing.assert_allclose(cudnn(tokens, padding_mask_BT=pad)[:, :9], model(tokens, padding_mask_BT=pad)[:, :9],
                               atol=1e-5)
    assert set(calls) == {(False, True)}


def test_packed_equals_separate(model):
    a = jax.random.randint(jax.random.key(3), (1, 5), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(4), (1, 7), 0, CFG.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out = model(packed, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(out[:, :5], model(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], model(b), atol=1e-5)


def test_padding_is_never_attended(model, tokens):
    real = tokens[:, :8]
    junk = jax.random.randint(jax.random.key(5), (2, 4), 0, CFG.vocab_size)
    padded = jnp.concatenate([real, junk], axis=1)
    mask = jnp.arange(12)[None] < 8
    out = model(padded, padding_mask_BT=jnp.broadcast_to(mask, (2, 12)))
    np.testing.assert_allclose(out[:, :8], model(real), atol=1e-5)
    # left padding with shifted positions gives the same logits for the real tokens
    left = jnp.concatenate([junk, real], axis=1)
    pos = jnp.broadcast_to(jnp.maximum(jnp.arange(12) - 4, 0), (2, 12))
    out = model(left, positions_BT=pos, padding_mask_BT=jnp.broadcast_to(jnp.arange(12) >= 4, (2, 12)))
    np.testing.assert_allclose(out[:, 4:], model(real), atol=1e-5)


def test_chunked_prefill_with_cache_equals_full_forward(model, tokens):
    full = model(tokens)
    cache = KVCache.zeros(CFG, 2, 16)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        logits, cache = model(tokens[:, lo:hi], cache=cache)
        outs.append(logits)
    assert int(cache.length) == 12
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_bf16_compute_close_to_f32(tokens):
    model = make(dataclasses.replace(CFG, final_logit_softcap=None))
    f32 = model(tokens)
    bf16 = with_cfg(model, dtype="bfloat16")
    assert nnx.state(bf16)["blocks"]["wq"][...].dtype == jnp.float32  # params stay f32
    out = bf16(tokens)
    assert out.dtype == jnp.float32
    # Stated tolerance: bf16 keeps 8 mantissa bits (rel. 2^-8 = 0.4%) per op; over two layers the
    # logits stay within 5% of the f32 logit scale and the loss within 1%.
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(out - f32).max()) < 0.05 * scale
    lf = cross_entropy(f32[:, :-1], tokens[:, 1:])[0]
    lb = cross_entropy(out[:, :-1], tokens[:, 1:])[0]
    assert abs(float(lb - lf)) < 0.01 * float(lf)


@pytest.mark.parametrize("field,value,words", [
    ("n_kv_heads", 3, "n_kv_heads"), ("head_dim", 7, "head_dim"), ("attn_impl", "flash", "attn_impl"),
    ("remat", "some", "remat"), ("dtype", "int8", "dtype"), ("d_model", 30, "head_dim"),
    ("scan_unroll", 0, "scan_unroll"),
])
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(CFG, **{field: value})
