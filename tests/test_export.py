"""jax.export of the model as a pure function of (parameter leaves, tokens): symbolic batch and length, a KV-cache
prefill with a symbolic batch, and on a mesh. Each exported program is serialized, read back and compared with the
plain jitted call."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from models import KVCache, Transformer, TransformerConfig, generate
from models.moe import MoEConfig
from parallel import create_sharded, make_mesh, shard_batch

# alternating sliding-window (W 4) / global layers, GQA: the rope tables, the blocked causal and the sliding-window
# kernels all size themselves from T
CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                        attn_pattern="alternating", sliding_window=4)


def _pure(graphdef, state):
    """(leaves, the jitted forward of (leaves, tokens)): nnx.State's Param nodes are not serializable pytrees."""
    leaves, tree = jax.tree.flatten(state)
    return leaves, jax.jit(lambda ls, t: nnx.merge(graphdef, jax.tree.unflatten(tree, ls))(t))


def _specs(leaves):
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]


def _round_trip(exported):
    return export.deserialize(exported.serialize())


def test_symbolic_batch_and_length_forward():
    """Symbolic (b, t) failed at trace time: Python comparisons of T (the rope tables' size, the causal block rows,
    `window < T`) were inconclusive on a symbolic dimension."""
    leaves, f = _pure(*nnx.split(Transformer(CFG, rngs=nnx.Rngs(0))))
    b, t = export.symbolic_shape("b, t")
    e = _round_trip(export.export(f)(_specs(leaves), jax.ShapeDtypeStruct((b, t), jnp.int32)))
    for shape in ((2, 8), (3, 3)):  # longer than the window, and within it
        x = jax.random.randint(jax.random.key(1), shape, 0, CFG.vocab_size)
        np.testing.assert_allclose(e.call(leaves, x), f(leaves, x), atol=1e-6)


def test_symbolic_batch_cached_prefill_and_decode():
    """KVCache.zeros refused a symbolic batch ("must be an int >= 1"), and the cached attention's query blocks
    compared B·N·T·S with a byte limit."""
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)

    def prefill_and_step(ls, prompt_BP):
        model = nnx.merge(graphdef, jax.tree.unflatten(tree, ls))
        _, cache = model(prompt_BP, cache=KVCache.zeros(CFG, prompt_BP.shape[0], 8))
        return model(prompt_BP[:, -1:], cache=cache)[0][:, -1]

    f = jax.jit(prefill_and_step)
    b, = export.symbolic_shape("b")
    e = _round_trip(export.export(f)(_specs(leaves), jax.ShapeDtypeStruct((b, 6), jnp.int32)))
    x = jax.random.randint(jax.random.key(2), (3, 6), 0, CFG.vocab_size)
    np.testing.assert_allclose(e.call(leaves, x), f(leaves, x), atol=1e-6)


def test_symbolic_forward_on_a_mesh():
    """On a mesh the embedding lookup compared the symbolic token count with V (whether to split the lookup over the
    vocab shards)."""
    mesh = make_mesh({"data": 2, "tensor": 4})
    leaves, f = _pure(*create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh))
    x = jax.random.randint(jax.random.key(3), (4, 8), 0, CFG.vocab_size)
    with jax.set_mesh(mesh):
        x = shard_batch(x, mesh)
        b, t = export.symbolic_shape("2*b, t")  # the batch a multiple of the data axis
        e = _round_trip(export.export(f)(_specs(leaves), jax.ShapeDtypeStruct((b, t), jnp.int32)))
        np.testing.assert_allclose(e.call(leaves, x), f(leaves, x), atol=1e-6)


def test_symbolic_bf16_scan_gradient_exports():
    """A bf16 layer scan on CPU keeps its residuals as bits (models.residuals): with symbolic shapes, serializing
    the loss's VJP (vjp_order=1) failed inside jax ("Too many leaves for PyTreeDef"). The scan then keeps them as
    they are."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=48, dtype="bfloat16")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    loss = jax.jit(lambda ls, t: nnx.merge(graphdef, jax.tree.unflatten(tree, ls))(t).mean())
    b, t = export.symbolic_shape("b, t")
    e = export.export(loss)(_specs(leaves), jax.ShapeDtypeStruct((b, t), jnp.int32))
    e = export.deserialize(e.serialize(vjp_order=1))
    x = jax.random.randint(jax.random.key(4), (2, 5), 0, cfg.vocab_size)
    for got, want in zip(jax.grad(e.call)(leaves, x), jax.grad(loss)(leaves, x)):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("moe", [MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=16),  # dropless ('gmm' on CPU)
                                 MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=16, dropless_impl="blocks"),
                                 MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=16, dispatch="capacity",
                                           capacity_factor=0.5),  # C = ceil(T/4) < T: tokens drop
                                 MoEConfig(n_experts=2, top_k=2, expert_mlp_dim=16, dispatch="capacity")])  # C = T
def test_symbolic_moe_forward(moe):
    """An MoE Transformer failed to export with a symbolic batch (the 'gmm' tiles and the 'blocks' block size came
    from the token count) and with a symbolic length (the capacity C = ceil(K·T·CF/E): "tokens=t must be a whole
    number"). The live model at each concrete shape is the reference (its capacity from scaling.flops)."""
    cfg = dataclasses.replace(CFG, moe_every=2, moe=moe)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    f = jax.jit(lambda ls, t: nnx.merge(graphdef, jax.tree.unflatten(tree, ls))(t, return_aux=True))
    b, t = export.symbolic_shape("b, t")
    e = _round_trip(export.export(f)(_specs(leaves), jax.ShapeDtypeStruct((b, t), jnp.int32)))
    dropped = []
    for shape in ((2, 8), (3, 5), (1, 1)):
        x = jax.random.randint(jax.random.key(5), shape, 0, cfg.vocab_size)
        (got, got_aux), (want, want_aux) = e.call(leaves, x), f(leaves, x)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(got_aux["dropped_frac"], want_aux["dropped_frac"], atol=1e-7)
        dropped.append(float(want_aux["dropped_frac"]))
    assert (max(dropped) > 0) == (moe.capacity_factor < 1)  # the capacity binds (C < T) where it should


def test_symbolic_length_with_a_cache_refused():
    """A symbolic prompt length with a KV cache (generate, or a hand-written cached prefill) failed deep inside with
    "Symbolic dimension comparison ... is inconclusive" (a cache sized from it: "must be an int >= 1"); it is refused
    up front, naming the bucket alternative."""
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    model = lambda ls: nnx.merge(graphdef, jax.tree.unflatten(tree, ls))  # noqa: E731
    b, p = export.symbolic_shape("b, p")
    spec = jax.ShapeDtypeStruct((b, p), jnp.int32)
    with pytest.raises(ValueError, match="prompt_tokens: a symbolic length p .*left_pad"):
        export.export(jax.jit(lambda ls, t: generate(model(ls), t, 4)))(_specs(leaves), spec)
    with pytest.raises(ValueError, match=r"KVCache.zeros\(max_len=p \+ 4\): a symbolic max_len .*concrete max_len"):
        export.export(jax.jit(lambda ls, t: model(ls)(t, cache=KVCache.zeros(CFG, t.shape[0], t.shape[1] + 4))[0]))(
            _specs(leaves), spec)
    with pytest.raises(ValueError, match="tokens: a symbolic length p .*KV cache.*concrete lengths"):
        export.export(jax.jit(lambda ls, t: model(ls)(t, cache=KVCache.zeros(CFG, t.shape[0], 16))[0]))(
            _specs(leaves), spec)
    b, = export.symbolic_shape("b")  # a symbolic batch at a bucket length exports, and generates the same tokens
    g = jax.jit(lambda ls, t: generate(model(ls), t, 4))
    e = _round_trip(export.export(g)(_specs(leaves), jax.ShapeDtypeStruct((b, 6), jnp.int32)))
    x = jax.random.randint(jax.random.key(6), (3, 6), 0, CFG.vocab_size)
    np.testing.assert_array_equal(e.call(leaves, x), g(leaves, x))


def test_separate_prefill_and_decode_exports_serialize_the_cache():
    """Serving exports the prefill (tokens -> logits, cache) and one decode step ((token, cache) -> logits, cache)
    as two programs; the KVCache between them is a NamedTuple, which `Exported.serialize` refused ("Cannot serialize
    PyTreeDef containing an unregistered type KVCache"). Reference: the live jitted prefill and steps."""
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    model = lambda ls: nnx.merge(graphdef, jax.tree.unflatten(tree, ls))  # noqa: E731
    prefill = jax.jit(lambda ls, p: model(ls)(p, cache=KVCache.zeros(CFG, p.shape[0], 12)))
    step = jax.jit(lambda ls, tok, cache: model(ls)(tok, cache=cache))
    b, = export.symbolic_shape("b")
    ep = export.export(prefill)(_specs(leaves), jax.ShapeDtypeStruct((b, 6), jnp.int32))
    cache_spec = jax.tree.unflatten(ep.out_tree, ep.out_avals)[1]  # the cache as the prefill returns it, batch b
    es = export.export(step)(_specs(leaves), jax.ShapeDtypeStruct((b, 1), jnp.int32), cache_spec)
    ep, es = _round_trip(ep), _round_trip(es)
    x = jax.random.randint(jax.random.key(7), (3, 6), 0, CFG.vocab_size)
    (got, got_cache), (want, want_cache) = ep.call(leaves, x), prefill(leaves, x)
    for _ in range(4):  # past the window (4): the rolling buffer wraps
        np.testing.assert_allclose(got, want, atol=1e-6)
        tok = jnp.argmax(want[:, -1:], -1).astype(jnp.int32)
        (got, got_cache), (want, want_cache) = es.call(leaves, tok, got_cache), step(leaves, tok, want_cache)
    np.testing.assert_allclose(got, want, atol=1e-6)
