"""models.residuals: a layer scan's bf16 / f16 residuals kept as uint16 bits change no value or gradient, and keep
XLA:CPU from converting whole residual stacks to float32 in every iteration."""

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, TransformerConfig
from models.losses import cross_entropy
from models.moe import MoEConfig
from models.residuals import bits_residuals

needs_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="bits_residuals acts on the CPU backend only")


def unpacked(fn, dtype):
    return fn


def assert_close(got, want):
    """Leaf by leaf, within 2% of the leaf's largest magnitude: the packed and unpacked programs fuse differently,
    and XLA may keep a bf16 intermediate in float32 (excess precision) in one and round it in the other."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.02 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


@needs_cpu
def test_any_function_keeps_its_values_and_gradients():
    """Mixed dtypes in and out (bf16, f16, f32, int32), a closed-over int array, inside a scan."""
    ks = jax.random.split(jax.random.key(0), 4)
    xs = (jax.random.normal(ks[0], (3, 8, 5), jnp.bfloat16), jax.random.normal(ks[1], (3, 5, 5), jnp.float16),
          jax.random.normal(ks[2], (3, 5)), jnp.arange(15, dtype=jnp.int32).reshape(3, 5))
    shift = jnp.arange(8, dtype=jnp.int32)

    def body(c, x):
        a, w, b, i = x
        h = jnp.tanh((a.astype(jnp.float16) @ w).astype(jnp.float32) + b + c + jnp.roll(i, 1) + shift[:, None])
        return jnp.sin(h), (h.astype(jnp.bfloat16), i * 2)

    def loss(wrap, c, xs):
        c, (hs, ints) = jax.lax.scan(wrap(body, jnp.bfloat16), c, xs)
        return (c ** 2).sum() + hs.astype(jnp.float32).sum() + ints.sum()

    c = jax.random.normal(ks[3], (8, 5))
    grads = [jax.jit(jax.value_and_grad(lambda c, a, w, b, wrap=wrap: loss(wrap, c, (a, w, b, xs[3])),
                                        argnums=(0, 1, 2, 3)))(c, *xs[:3]) for wrap in (bits_residuals, unpacked)]
    assert_close(*grads)



@needs_cpu
def test_one_wrapped_function_called_twice_keeps_each_calls_backward():
    """The backward's layout (the VJP's tree, the residuals' dtypes) was looked up by the packed residuals' shapes
    and dtypes alone: two calls of one wrapped function in one gradient whose residuals pack alike took the later
    call's layout. bf16 and f16 residuals of one shape (both uint16 bits) gave the bf16 call cos(x) read from f16
    bits, silently (1.87 for 0.996); weights of two shapes that are not residuals failed in jax's custom-VJP shape
    check."""
    x_bf, x_f16 = jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16), jnp.linspace(-0.5, 1.5, 4, dtype=jnp.float16)
    sin = lambda x: jnp.sin(x).astype(jnp.float32)  # noqa: E731
    for wrap in (bits_residuals(sin, jnp.bfloat16), sin):
        g = jax.grad(lambda a, b, f=wrap: f(a).sum() + f(b).sum(), (0, 1))(x_bf, x_f16)
        np.testing.assert_allclose(np.asarray(g[0], np.float32), np.cos(np.asarray(x_bf, np.float32)), atol=1e-2)
        np.testing.assert_allclose(np.asarray(g[1], np.float32), np.cos(np.asarray(x_f16, np.float32)), atol=1e-3)

    def scaled(w, x):  # w's shape lives in the VJP's tree only (its sum's transpose), not in a residual
        return jnp.tanh(x * w.astype(x.dtype).sum()).astype(jnp.float32)

    x = jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16)
    w1, w2 = jnp.full((2, 2), 0.1), jnp.full((3, 3), 0.05)
    grads = [jax.grad(lambda a, b, f=f: (f(a, x) * 2 + f(b, x) ** 2).sum(), (0, 1))(w1, w2)
             for f in (bits_residuals(scaled, jnp.bfloat16), scaled)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-6)

@needs_cpu
def test_only_bf16_and_f16_are_packed_and_their_bits_round_trip():
    """bf16 and f16 travel as their own uint16 bits (bit-exact both ways); any other compute dtype leaves the body
    itself, not a custom-VJP wrapper around it (the module's contract: float32 models keep plain autodiff)."""
    from models.residuals import from_bits, packs, to_bits

    body = lambda c, x: (c + x, None)  # noqa: E731
    assert bits_residuals(body, jnp.float32) is body and not packs(jnp.float32) and not packs(jnp.int32)
    x = jnp.asarray([1.0, -2.5, 3e-3, np.inf], jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        assert packs(dtype) and bits_residuals(body, dtype) is not body
        bits = to_bits(x.astype(dtype))
        assert bits.dtype == jnp.uint16
        np.testing.assert_array_equal(bits, np.asarray(x.astype(dtype)).view(np.uint16))
        np.testing.assert_array_equal(from_bits(bits, dtype), x.astype(dtype))
    assert to_bits(x) is x and from_bits(x, jnp.float32) is x


@needs_cpu
def test_float32_residuals_are_kept_bit_for_bit():
    """A float32 body has no bf16 rounding to excuse: its gradients equal autodiff's to float32 rounding (the 2 %
    band above let a packing that rounded float32 residuals to bf16 pass: 1.2e-2 off here)."""
    ks = jax.random.split(jax.random.key(0), 2)
    c, ws = jax.random.normal(ks[0], (8, 5)), jax.random.normal(ks[1], (3, 5, 5))
    body = lambda c, w: (jnp.tanh(c @ w) * 1.7 + c, None)  # noqa: E731

    def loss(wrap, c, ws):
        return (jax.lax.scan(wrap(body, jnp.bfloat16), c, ws)[0] ** 2).sum()

    got, want = (jax.jit(jax.grad(lambda c, ws, w=w: loss(w, c, ws), argnums=(0, 1)))(c, ws)
                 for w in (bits_residuals, unpacked))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


def tiny(**kw):
    return TransformerConfig(**{**dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                       max_seq_len=16, dtype="bfloat16"), **kw})


def grad_fn(cfg, tokens, rng=None):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(st):
        logits, aux = nnx.merge(graphdef, st)(tokens[:, :-1], return_aux=True, rng=rng)
        return cross_entropy(logits, tokens[:, 1:])[0] + 0.01 * aux.get("lb_loss", 0.0)

    return jax.jit(jax.value_and_grad(loss)), state


@needs_cpu
@pytest.mark.parametrize("kw", [dict(), dict(remat="full", qkv_bias=True), dict(remat="save_dots", post_norms=True),
                                # one gmm tile size (the default four each add a tile loop per expert: 8.1 -> 5.7 s
                                # of CPU); the tile loops run inside grouped_swiglu's own VJP, whatever the sizes
                                dict(moe=MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=16, router_jitter=0.1,
                                                   gmm_tile_rows=(8,)),
                                     moe_every=2, attn_pattern="alternating", sliding_window=4)],
                         ids=["dense", "remat-full", "save-dots-post-norms", "moe-jitter-local"])
def test_a_bf16_transformer_keeps_its_loss_and_gradients(kw):
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    rng = jax.random.key(2) if "moe" in kw else None
    f, state = grad_fn(tiny(**kw), tokens, rng)
    got = f(state)
    with mock.patch("models.transformer.bits_residuals", unpacked):
        f, state = grad_fn(tiny(**kw), tokens, rng)
        want = f(state)
    assert_close(got, want)


def stack_conversions(compiled_text: str, n_layers: int) -> list[str]:
    """Instructions converting a whole [n_layers, ...] bf16 array to float32."""
    return re.findall(rf"= f32\[{n_layers},[\d,]+\]\{{[\d,]+\}} convert\(", compiled_text)


@needs_cpu
def test_a_bf16_layer_scan_converts_no_residual_stack_to_float32():
    """Without the bits, XLA:CPU writes each layer's residuals by converting the whole bf16 stack to float32 and
    back (the check below fails then: it is asserted too, so the test keeps seeing what it guards against)."""
    cfg = tiny(n_layers=3)
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    f, state = grad_fn(cfg, tokens)
    assert stack_conversions(f.lower(state).compile().as_text(), 3) == []
    with mock.patch("models.transformer.bits_residuals", unpacked):
        f, state = grad_fn(cfg, tokens)
        assert stack_conversions(f.lower(state).compile().as_text(), 3)


def perturbed(split, scale=0.1):
    graphdef, state = split
    leaves, tdef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.unflatten(tdef, [x + scale * rng.standard_normal(x.shape).astype(x.dtype)
                                               for x in leaves])


@needs_cpu
def test_a_bf16_dit_and_text_encoder_keep_their_gradients():
    """The DiT's blocks take the conditioning (timestep vector, text states) as arguments of the packed layer: the
    gradients reaching the text encoder through cross-attention and the pooled caption must be those of autodiff.
    Both bf16 programs are judged against the float32 gradient: the packed one within 1.5x the autodiff one's own
    distance from it (a lost path is ~100% off). The two bf16 programs 2% apart (assert_close) held on one
    machine's dot kernels (1.7%) and not on others' (2.04% with XLA's YNNPACK fusions off), each being 2-4% from
    float32."""
    from models.video import DiTConfig, TextEncoder, VideoDiT

    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0]])

    def grads(dtype="bfloat16"):
        dit_cfg = DiTConfig(latent_shape=(3, 8, 8), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=3,
                            n_heads=2, mlp_dim=64, text_dim=16, dtype=dtype)
        txt_cfg = TransformerConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, mlp_dim=32, max_seq_len=8,
                                    dtype=dtype)
        dit = nnx.split(VideoDiT(dit_cfg, rngs=nnx.Rngs(0)))
        enc = nnx.split(TextEncoder(txt_cfg, pad_id=0, rngs=nnx.Rngs(1)))
        dit, enc = perturbed(dit), perturbed(enc)  # adaLN-Zero gates start at 0: no block would see the text

        def loss(dit_state, enc_state):
            text = nnx.merge(enc[0], enc_state)(tokens)
            out = nnx.merge(dit[0], dit_state)(x, jnp.asarray([0.1, 0.9]), *text)  # tokens, valid, pooled
            return jnp.sum(out ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(dit[1], enc[1])

    got = grads()
    with mock.patch("models.video.dit.bits_residuals", unpacked), mock.patch("models.video.text.bits_residuals",
                                                                             unpacked):
        want = grads()
    for a, b, f32 in zip(*(jax.tree.leaves(t) for t in (got, want, grads("float32"))), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b, f32 = (np.asarray(v, np.float32) for v in (a, b, f32))
        err, own = np.abs(a - f32).max(), np.abs(b - f32).max()
        assert err <= 1.5 * own + 0.005 * np.abs(f32).max(), (err, own, np.abs(f32).max())


def in_loop_conversions(hlo: str, rows: int) -> list[str]:
    """Lines converting a whole [rows, ...] array to float32 inside a while loop (its body and what it calls)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, comps[head.group(1)] = head.group(1), []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line)
    todo, seen = re.findall(r"body=%?([\w.\-]+)", hlo), set()
    while todo:
        c = todo.pop()
        if c not in seen and c in comps:
            seen.add(c)
            todo += [n for ln in comps[c] for n in re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", ln)]
    return [ln for c in seen for ln in comps[c] if re.search(rf"= f32\[{rows},[\d,]*\]\S* convert\(", ln)]


@needs_cpu
def test_bf16_grouped_swiglu_keeps_its_tile_loops_free_of_whole_array_conversions():
    """The MoE's tile loops slice and update [R, ...] row arrays: kept as bits, no iteration converts a whole array
    (without them, every slice and update did: asserted too); values and gradients unchanged."""
    from models.moe_dispatch import grouped_swiglu

    sizes, R, run_E = (32, 8, 2), 64, jnp.array([0, 42, 6, 10])
    ks = jax.random.split(jax.random.key(0), 5)
    x, g = (jax.random.normal(k, (R, 8)).astype(jnp.bfloat16) for k in ks[:2])
    w = tuple(jax.random.normal(k, s).astype(jnp.bfloat16) for k, s in zip(ks[2:], [(4, 8, 6), (4, 8, 6), (4, 6, 8)]))

    def run():
        f = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(grouped_swiglu(x, w, run_E, sizes, jax.nn.silu), g)
                                       .astype(jnp.float32), argnums=(0, 1)))
        return f(x, w), in_loop_conversions(f.lower(x, w).compile().as_text(), R)

    got, conversions = run()
    assert conversions == []
    with mock.patch("models.moe_dispatch.packs", lambda dtype: False):
        want, conversions = run()
    assert conversions
    assert_close(got, want)


@needs_cpu
def test_second_derivatives_through_a_packed_scan_under_plain_autodiff():
    """The packed residuals are integer bits, which carry no derivative: reverse-over-reverse through them drops
    their terms (a toy scan's HVP came out all 0, a 2-layer bf16 model's 60-90% off per leaf), as residuals.py and
    parallel/autodiff.py say. Under plain_autodiff, where bits_residuals is fn, it equals forward-over-reverse."""
    from models import plain_autodiff

    def loss(w_LDD, x):
        body = bits_residuals(lambda x, w: (jnp.tanh(x @ w.astype(x.dtype)) + x, None), jnp.bfloat16)
        return jax.lax.scan(body, x, w_LDD)[0].astype(jnp.float32).sum()

    rng = np.random.default_rng(0)
    w, v = (jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32) for _ in range(2))
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.bfloat16)
    with plain_autodiff():
        rev = jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w, x), v))(w)
        fwd = jax.jvp(lambda w: jax.grad(loss)(w, x), (w,), (v,))[1]
    assert float(jnp.abs(fwd).max()) > 1.0
    np.testing.assert_allclose(rev, fwd, rtol=0, atol=0.02 * float(jnp.abs(fwd).max()))
