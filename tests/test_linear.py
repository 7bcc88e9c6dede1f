"""models.linear: the transposed-weight-gradient product equals autodiff of x @ w, alone and in the Transformer;
on the CPU backend its low-precision products stay low-precision dots."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, TransformerConfig
from models.linear import linear
from models.losses import cross_entropy


def xw(dtype=jnp.float32, D=16, F=40):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kx, (24, D)).astype(dtype), jax.random.normal(kw, (D, F)).astype(dtype),
            jax.random.normal(kg, (24, F)).astype(dtype))


@pytest.mark.parametrize("D, F", [(16, 40), (40, 16)], ids=["x-transposed", "g-transposed"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_value_and_gradients_equal_autodiff_of_matmul(dtype, tol, D, F):
    x, w, g = xw(dtype, D, F)

    def vjp(f):
        y, pull = jax.vjp(f, x, w)
        return (y, *pull(g))

    ref = jax.jit(lambda: vjp(lambda x, w: x @ w))()
    for fn in (lambda: vjp(lambda x, w: linear(x, w, "transposed_grad")),
               lambda: jax.checkpoint(lambda: vjp(lambda x, w: linear(x, w, "transposed_grad")))()):
        out = jax.jit(fn)()
        for a, b in zip(out, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


TRANSPOSED = re.compile(r"\[(\d+),1,(\d+)\] = transpose\[permutation=\(1, 2, 0\)\]")  # models.linear.transposed


def test_auto_takes_the_transposed_gradient_on_cpu_only_there():
    x, w, _ = xw()

    def grad_jaxpr(impl):
        return str(jax.make_jaxpr(jax.grad(lambda w: linear(x, w, impl).sum()))(w))

    assert TRANSPOSED.search(grad_jaxpr("transposed_grad"))
    assert not TRANSPOSED.search(grad_jaxpr("plain"))
    assert bool(TRANSPOSED.search(grad_jaxpr("auto"))) == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="matmul_impl='dense'"):
        linear(x, w, "dense")
    with pytest.raises(ValueError, match="matmul_impl"):
        TransformerConfig(matmul_impl="dense")


@pytest.mark.parametrize("tie", [False, True])
def test_transformer_loss_and_gradients_equal_plain_matmuls(tie):
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                            qkv_bias=True, tie_embeddings=tie, matmul_impl="transposed_grad")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves, tdef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    state = jax.tree.unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    tok = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    plain = nnx.graphdef(Transformer(dataclasses.replace(cfg, matmul_impl="plain"), rngs=nnx.Rngs(0)))

    def run(gd):
        loss = lambda s: cross_entropy(nnx.merge(gd, s)(tok[:, :-1]), tok[:, 1:])[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(state)

    (l0, g0), (l1, g1) = run(plain), run(graphdef)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D, F", [(16, 40), (40, 16), (16, 16)])
def test_the_narrower_of_x_and_the_cotangent_is_transposed(D, F):
    """dw comes from xᵀ [D, M] when D <= F, else from gᵀ [F, M] (then dwᵀ [F, D] is transposed back)."""
    x, w, _ = xw(jnp.float32, D, F)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: linear(x, w, "transposed_grad").sum()))(w))
    shapes = {(int(a), int(b)) for a, b in TRANSPOSED.findall(jaxpr)}
    assert shapes == ({(D, 24)} if D <= F else {(F, 24), (D, F)}), shapes


def dots_of(compiled_text: str) -> list[tuple[str, str, int, bool, str]]:
    """(lhs element type, rhs element type, contraction size, batched, 'lhs/rhs contracting dims') of every dot in a
    compiled HLO module (fusion parameters included)."""
    shapes = {name: (ty, [int(d) for d in dims.split(",") if d])
              for name, ty, dims in re.findall(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]", compiled_text)}
    out = []
    for line in compiled_text.splitlines():
        m = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\).*?lhs_contracting_dims=\{([\d,]*)\}.*?"
                      r"rhs_contracting_dims=\{([\d,]*)\}", line)
        if m:
            (ta, dims_a), (tb, _) = shapes[m.group(1)], shapes[m.group(2)]
            size = int(np.prod([dims_a[int(i)] for i in m.group(3).split(",") if i]))
            out.append((ta, tb, size, "lhs_batch_dims" in line, f"{m.group(3)}/{m.group(4)}"))
    return out


@pytest.mark.parametrize("scan_unroll", [True, 1], ids=["unrolled", "scanned"])
def test_no_weight_gradient_contracts_the_leading_dims_of_both_operands_on_cpu(scan_unroll):
    """XLA:CPU runs a dot contracting both operands' leading (token) dims on Eigen at about half the rate of its
    YNNPACK products; with 'auto' no projection's weight gradient takes that form, in a real layer scan too (where
    x is a slice of the stacked residuals). With plain products they all do."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's dot lowering")
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, mlp_dim=128, max_seq_len=64,
                            scan_unroll=scan_unroll)
    tok = jax.random.randint(jax.random.key(1), (2, 65), 0, 256)

    def leading_both(impl):
        graphdef, state = nnx.split(Transformer(dataclasses.replace(cfg, matmul_impl=impl), rngs=nnx.Rngs(0)))
        loss = lambda s: cross_entropy(nnx.merge(graphdef, s)(tok[:, :-1]), tok[:, 1:])[0]  # noqa: E731
        dots = dots_of(jax.jit(jax.grad(loss)).lower(state).compile().as_text())
        return [d for d in dots if not d[3] and d[4] == "0/0"]

    assert leading_both("auto") == []
    assert len(leading_both("plain")) >= 4  # q / k / v / o and the MLP's: XLA may merge products sharing an input


@pytest.mark.parametrize("scan_unroll", [True, 1], ids=["unrolled", "scanned"])
def test_bf16_compute_keeps_every_dot_in_bf16_on_cpu(scan_unroll):
    """XLA:CPU converts a dot with bf16 output, or one reading a transpose it can fold, to float32 (about 4x slower
    on AMX machines); models.linear accumulates in float32 instead and materialises xᵀ. Every dot of a bf16-compute
    Transformer's loss gradient (projections, attention, LM head) must read bf16 operands."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's dot lowering")
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, mlp_dim=128, max_seq_len=64,
                            dtype="bfloat16", scan_unroll=scan_unroll)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tok = jax.random.randint(jax.random.key(1), (2, 65), 0, 256)
    loss = lambda s: cross_entropy(nnx.merge(graphdef, s)(tok[:, :-1]), tok[:, 1:])[0]  # noqa: E731
    dots = dots_of(jax.jit(jax.grad(loss)).lower(state).compile().as_text())
    assert len(dots) >= 2 * 7 * 2  # forward and backward products of both layers at least
    assert all(d[:2] == ("bf16", "bf16") for d in dots), sorted(set(dots))


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
@pytest.mark.parametrize("x_shape,w_shape,contract", [((6, 5), (5, 2, 3), 1), ((2, 3, 4, 5), (4, 5, 7), 2)],
                         ids=["q-like", "o-like"])
def test_weights_in_their_own_shapes_equal_the_reshaped_product(impl, x_shape, w_shape, contract):
    """`contract`: x's last dims against w's first ones; values and both gradients equal the 2-D product's."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    K = int(np.prod(w_shape[:contract]))
    out_shape = x_shape[:len(x_shape) - contract] + w_shape[contract:]

    def ref(x, w):
        return (x.reshape(-1, K) @ w.reshape(K, -1)).reshape(out_shape)

    got = jax.vjp(lambda x, w: linear(x, w, impl, contract=contract), x, w)
    want = jax.vjp(ref, x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    ct = jax.random.normal(jax.random.key(2), out_shape)
    for g, r in zip(got[1](ct), want[1](ct)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
def test_an_empty_contraction_is_a_zero_product_with_empty_gradients(impl):
    """A zero-size contracted dim: x @ w is zeros, as jnp gives it. Reshapes to (-1, 0) made it a bare
    ZeroDivisionError: 3-D rows on every impl, and the CPU default 'transposed_grad' even on 2-D rows."""
    from models.glu import glu_linear

    cases = [(lambda x, w: linear(x, w, impl), (2, 3, 0), (0, 4)),
             (lambda x, w: linear(x, w, impl, contract=2), (2, 3, 0), (3, 0, 4)),
             (lambda x, w: glu_linear(x, x, w, impl=impl), (2, 3, 0), (0, 4))]
    for f, x_shape, w_shape in cases:
        x, w = jnp.ones(x_shape), jnp.ones(w_shape)
        y, pull = jax.vjp(f, x, w)
        assert y.shape == x_shape[:-1 if len(w_shape) == 2 else -2] + (4,) and not y.any()
        assert [g.shape for g in pull(jnp.ones_like(y))] == [x_shape, w_shape]


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
def test_x_whose_last_dims_are_the_contracted_ones_in_another_order_is_refused(impl):
    """x [..., 5, 4] against w [4, 5, F] (contract=2): the sizes multiply to the same K, so the transposed-gradient
    path's reshape to [M, 20] ran and returned a product of mismatched features without a word."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    w = jax.random.normal(jax.random.key(1), (4, 5, 7))
    with pytest.raises(ValueError, match=r"does not end in the weight's contracted dims \(4, 5\)"):
        linear(x, w, impl, contract=2)


def test_out_dtype_on_a_weight_in_its_own_shape_is_refused_not_ignored():
    """The n-D path had no out_dtype: bf16 operands asking for float32 output silently got bf16."""
    x, w = jnp.ones((6, 5), jnp.bfloat16), jnp.ones((5, 2, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"out_dtype=float32.*2-D weight"):
        linear(x, w, out_dtype=jnp.float32)
    assert linear(x, w, out_dtype=jnp.bfloat16).dtype == jnp.bfloat16  # the operands' own dtype: nothing to do


@pytest.mark.parametrize("dtype, out_dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)],
                         ids=["transposed_grad", "out_dtype"])
def test_a_dots_saving_remat_policy_saves_the_product(dtype, out_dtype):
    """The custom VJPs' forward rules run the product as a plain dot: a policy that saves dots by primitive keeps it
    (nested inside another custom-VJP call, it was recomputed: the remat FLOPs test saw 1.21x the FLOPs)."""
    from jax._src.ad_checkpoint import saved_residuals

    x, w, _ = xw(dtype)

    def f(x, w):
        return jnp.sin(linear(x, w, "transposed_grad", out_dtype=out_dtype).astype(jnp.float32)).sum()

    saved = saved_residuals(jax.checkpoint(f, policy=jax.checkpoint_policies.checkpoint_dots), x, w)
    assert [a.shape for a, _ in saved].count((24, 40)) == 1, saved


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
@pytest.mark.parametrize("x_dtype, w_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("D, F", [(16, 40), (40, 16)], ids=["x-transposed", "g-transposed"])
def test_mixed_operand_dtypes_get_gradients_in_their_own_dtypes(impl, x_dtype, w_dtype, D, F):
    """x @ w of a float32 and a bf16 operand is float32; autodiff gives each operand its cotangent in its own
    dtype. dx in the weight's dtype (or dw in x's) went unseen: every other test has operands of one dtype.
    Both transposed operands: the narrower cotangent's branch rounding dw to w's dtype went unchecked."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (24, D)).astype(x_dtype), jax.random.normal(kw, (D, F)).astype(w_dtype)
    g = jax.random.normal(kg, (24, F))
    y, pull = jax.vjp(lambda x, w: linear(x, w, impl), x, w)
    y_ref, pull_ref = jax.vjp(lambda x, w: x @ w, x, w)
    assert y.dtype == y_ref.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, ref in zip(pull(g), pull_ref(g)):
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)
