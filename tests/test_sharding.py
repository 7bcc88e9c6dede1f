"""Sharded over the 8 fake devices == single device; the rules table and mesh errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.lm_step import lm_loss
from models import Transformer, TransformerConfig
from parallel import create_sharded, logical_to_spec, make_mesh, shard_batch

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, qkv_bias=True)


def loss_grads(graphdef, state, batch):
    return jax.jit(jax.value_and_grad(lambda s: lm_loss(graphdef, s, batch)))(state)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_equals_single_device(mesh_shape):
    tok = jax.random.randint(jax.random.key(0), (4, 17), 0, CFG.vocab_size)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    l1, g1 = loss_grads(graphdef, state, batch)

    mesh = make_mesh(mesh_shape)
    graphdef, sstate = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    wq = sstate["blocks"]["wq"][...]
    assert wq.sharding.spec == logical_to_spec(("layers", "embed", "heads", "head_dim"), mesh)
    tensor = mesh.shape["tensor"]
    assert wq.addressable_shards[0].data.shape[2] == CFG.n_heads // tensor  # really split, not replicated
    with jax.set_mesh(mesh):
        l2, g2 = loss_grads(graphdef, sstate, shard_batch(batch, mesh))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), atol=1e-5), g1, g2)


def test_rules_errors_and_fallbacks():
    mesh = make_mesh({"data": 2, "tensor": 4})
    with pytest.raises(ValueError, match="'mlp' of size 6 does not divide"):
        logical_to_spec(("embed", "mlp"), mesh, shape=(32, 6))
    # MQA: one kv head cannot be split over 4 tensor ranks, so K/V are replicated instead
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, shape=(32, 1, 8)) == jax.P(None, None, None)
    # axes absent from the mesh drop out: fsdp is not in this mesh
    assert logical_to_spec(("embed", "vocab"), mesh) == jax.P(None, "tensor")


@pytest.mark.parametrize("shape,words", [({"data": 3}, "needs 3 devices"), ({"data": -1, "tensor": 3}, "not divisible"),
                                         ({"data": -1, "tensor": -1}, "only one"), ({"batch": 8}, "unknown")])
def test_mesh_errors(shape, words):
    with pytest.raises(ValueError, match=words):
        make_mesh(shape)


def test_mesh_fill():
    mesh = make_mesh({"tensor": 2, "data": -1})
    assert dict(mesh.shape) == {"data": 4, "tensor": 2}
