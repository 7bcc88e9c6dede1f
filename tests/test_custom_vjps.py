"""The hand-written backward passes of the layer pieces (RMSNorm, the gated MLP's act(g)·u) against autodiff of
their plain formulas in float64, and what they buy: the residuals a scanned layer stack saves per layer; forward-mode
autodiff through the models under `models.plain_autodiff`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from experiments.lm_step import lm_loss
from models import Transformer, TransformerConfig, plain_autodiff
from models.glu import ACTIVATIONS, glu
from models.moe import MoEConfig
from models.transformer import rms_norm


def plain_rms_norm(x, scale, eps, offset):
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * (offset + scale)


def vjp64(f, *args):
    """f's value and its VJP for a fixed random cotangent, in float64."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        out, vjp = jax.vjp(f, *args)
        ct = jnp.asarray(np.random.default_rng(9).normal(size=out.shape))
        return out, vjp(ct), ct


@pytest.mark.parametrize("scale_shape,offset", [((16,), 0.0), ((16,), 1.0), ((), 0.0)], ids=["D", "gemma", "scalar"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_rms_norm_backward_equals_autodiff_in_float64(scale_shape, offset, dtype, tol):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 16)) * 3
    scale = rng.normal(size=scale_shape)
    ref, (dx_ref, ds_ref), ct = vjp64(lambda x, s: plain_rms_norm(x, s, 1e-5, offset), x, scale)
    out, vjp = jax.vjp(lambda x, s: rms_norm(x, s, 1e-5, offset), jnp.asarray(x, dtype),
                       jnp.asarray(scale, jnp.float32))
    dx, ds = vjp(jnp.asarray(np.asarray(ct), dtype))
    assert out.dtype == dx.dtype == dtype and ds.dtype == jnp.float32 and ds.shape == scale_shape
    for got, want in ((out, ref), (dx, dx_ref), (ds, ds_ref)):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_rms_norm_of_zero_and_tiny_rows_keeps_eps():
    """eps bounds 1 / RMS: a zero row (a zero-initialised or masked activation) normalises to 0 with a finite
    gradient, and rows whose mean square is below eps shrink rather than blow up to unit RMS. The test above, on
    rows of RMS ~3, passed without eps (5e-7 relative)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 16)) * np.array([[0.0], [1e-3], [1.0]])
    scale = rng.normal(size=(16,))
    ref, (dx_ref, ds_ref), ct = vjp64(lambda x, s: plain_rms_norm(x, s, 1e-5, 0.0), x, scale)
    out, vjp = jax.vjp(lambda x, s: rms_norm(x, s, 1e-5, 0.0), jnp.asarray(x, jnp.float32),
                       jnp.asarray(scale, jnp.float32))
    for got, want in zip((out, *vjp(jnp.asarray(np.asarray(ct), jnp.float32))), (ref, dx_ref, ds_ref)):
        want = np.asarray(want)
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_backward_equals_autodiff_in_float64(act):
    rng = np.random.default_rng(1)
    g, u = rng.normal(size=(6, 24)) * 3, rng.normal(size=(6, 24))
    ref, grads_ref, ct = vjp64(lambda g, u: ACTIVATIONS[act](g) * u, g, u)
    out, vjp = jax.vjp(lambda g, u: glu(g, u, act), jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32))
    for got, want in zip((out, *vjp(jnp.asarray(np.asarray(ct), jnp.float32))), (ref, *grads_ref)):
        want = np.asarray(want)  # absolute slack: float32 gelu_tanh(-6) underflows to 0 (float64: 2e-6)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())



def test_an_unknown_activation_name_is_refused_by_name():
    """glu(g, u, 'gelu') and glu_linear(..., 'relu') failed in a bare KeyError: 'gelu' from inside the custom VJP;
    now a ValueError names the argument and the names it takes (a callable still runs)."""
    from models.glu import glu_linear

    g = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"act='gelu'.*'silu', 'gelu_tanh'.*or an elementwise function"):
        glu(g, g, "gelu")
    with pytest.raises(ValueError, match=r"act='relu'"):
        glu_linear(g, g, jnp.ones((4, 2)), "relu")
    np.testing.assert_allclose(glu(g, g, jax.nn.relu), g)

def test_a_scanned_layer_stack_saves_four_model_wide_and_two_mlp_wide_rows_per_layer():
    """Per layer: the two norms' inputs, the two normed row sets (one per group of products sharing it), and the
    MLP's gate and up (`glu_linear` recomputes their product for the down projection's backward). Autodiff of the
    plain pieces saved 9 and 6: the normalised rows of each norm, one reshaped copy of the normed rows per product,
    and σ(g), silu(g) and their products; `glu` alone still saved the product (3)."""
    D, F, L, rows = 24, 40, 5, 3 * 16  # distinct sizes, so that shapes identify what is saved
    cfg = TransformerConfig(vocab_size=64, d_model=D, n_layers=L, n_heads=4, head_dim=8, mlp_dim=F, max_seq_len=16,
                            scan_unroll=1)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # (no init)
    tok = np.zeros((3, 16), np.int32)
    saved = [a.shape for a, _ in saved_residuals(lambda p: lm_loss(graphdef, p, {"inputs": tok, "targets": tok}),
                                                 params)]
    stacked = lambda *shapes: sum(s in shapes for s in saved)  # noqa: E731  [L, ...]: saved by the layer scan
    assert stacked((L, 3, 16, D), (L, rows, D)) == 4, saved
    assert stacked((L, 3, 16, F), (L, rows, F)) == 2, saved


def test_each_remat_policy_saves_what_it_names_in_a_scanned_layer_stack():
    """The default (rolled) layer scan under each remat policy, by the [L, ...] activations it saves: 'full' only each
    layer's input, 'save_dots' the products (the attention scores' batched dot among them) and no elementwise
    result, 'save_dots_no_batch' the same less the batched dots, 'none' more than any. Checked by value only (remat
    vs none equal), a policy that saved everything or nothing passed, and so did remat switched off in a rolled
    scan (the unrolled one is checked by FLOPs in test_transformer)."""
    D, L = 24, 5
    saved = {}
    for remat in ("none", "full", "save_dots", "save_dots_no_batch"):
        cfg = TransformerConfig(vocab_size=64, d_model=D, n_layers=L, n_heads=4, head_dim=8, mlp_dim=40,
                                max_seq_len=16, scan_unroll=1, remat=remat)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # (no init)
        tok = np.zeros((3, 16), np.int32)
        loss = lambda p, g=graphdef: lm_loss(g, p, {"inputs": tok, "targets": tok})  # noqa: E731
        # the per-layer activations the scan stacks, not the stacked weights it reads in place
        saved[remat] = [a.shape for a, why in saved_residuals(loss, params) if a.shape[:1] == (L,)
                        and "argument" not in why]
    assert saved["full"] == [(L, 3, 16, D)], saved["full"]
    batched = lambda shapes: [s for s in shapes if len(s) > 4]  # noqa: E731  [L, B, K, G, T, S]: attention's scores
    rowwise = lambda shapes: [s for s in shapes if s[-1] == 1]  # noqa: E731  1 / RMS, softmax row sums: elementwise
    assert batched(saved["save_dots"]) and not rowwise(saved["save_dots"]), saved["save_dots"]
    assert not batched(saved["save_dots_no_batch"]) and not rowwise(saved["save_dots_no_batch"]), saved
    assert len(saved["none"]) > len(saved["save_dots"]) > len(saved["save_dots_no_batch"]) > 1, saved


def test_block_causal_attention_saves_keys_and_values_once():
    """One VJP over all query blocks: the backward keeps k and v whole, not each block's key prefix (which made
    (T/C + 1)/2 copies: remat 'none' at T = 2048, C = 64 kept 227 MB of temp where it now keeps 163)."""
    from models.attention import attention, make_mask

    B, T, N, K, H = 2, 64, 4, 2, 8
    q = jax.random.normal(jax.random.key(0), (B, T, N, H))
    k, v = (jax.random.normal(jax.random.key(i), (B, T, K, H)) for i in (1, 2))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = make_mask(pos, pos)
    saved = [a.shape for a, _ in saved_residuals(lambda q, k, v: attention(q, k, v, mask, causal_block=16).sum(),
                                                 q, k, v)]
    keys = [s for s in saved if len(s) == 4 and s[:2] == (B, K) and s[3] == H]  # [B, K, S', H]: k, v or a prefix
    assert keys == [(B, K, T, H)] * 2, saved


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_a_scanned_layer_stack_reads_its_parameters_in_place(remat):
    """Each scan step takes its layer's parameters as they lie in the stacked arrays, so the backward reads them
    from the arguments; a per-step slice made the scan save a copy of every layer's parameters (8-layer d256
    model, remat full: temp 75 MB -> 14.5 MB), and so did q / k / v / o reshaped to 2-D (remat none: 66.6 -> 58.3 MB;
    `models.linear`'s `contract` keeps them in their own shapes)."""
    cfg = TransformerConfig(vocab_size=64, d_model=24, n_layers=5, n_heads=4, head_dim=8, mlp_dim=40, max_seq_len=16,
                            scan_unroll=1, remat=remat)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # (no init)
    tok = np.zeros((3, 16), np.int32)
    saved = saved_residuals(lambda p: lm_loss(graphdef, p, {"inputs": tok, "targets": tok}), params)
    # [L, ...] stacked weights, in any shape (a reshaped copy too); no activation here has these sizes
    sizes = {x.size for x in jax.tree.leaves(params["blocks"])}
    weights = [(a.shape, why) for a, why in saved if a.shape[:1] == (5,) and a.size in sizes]
    assert len(weights) >= 7 and all("argument" in why for _, why in weights), weights


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_a_pattern_period_of_several_layers_of_one_kind_saves_no_parameter_slice(remat):
    """With two or more layers of one kind per pattern period (here 2:1 local / global, three per period), a layer's
    parameters are a slice of its kind's group; sliced inside the layer's checkpoint, the backward slices them again
    instead of the scan saving a copy of those layers' parameters (8-layer d256 model, alternating: temp 113.7 ->
    80.1 MB under remat full, 240.5 -> 207.0 MB under save_dots). Remat 'none' keeps the copy (faster)."""
    cfg = TransformerConfig(vocab_size=64, d_model=24, n_layers=6, n_heads=4, head_dim=8, mlp_dim=40, max_seq_len=16,
                            scan_unroll=1, remat=remat, attn_pattern="2:1", sliding_window=4)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # (no init)
    tok = np.zeros((3, 16), np.int32)
    saved = saved_residuals(lambda p: lm_loss(graphdef, p, {"inputs": tok, "targets": tok}), params)
    slices = {(2,) + x.shape[1:] for x in jax.tree.leaves(params["blocks"])}  # [L/P, ...]: one slot's layers
    assert not [(a.shape, why) for a, why in saved if a.shape in slices]
    w_up = params["blocks"]["w_up"]  # the backward reads each slot's layers from the [L/P, 3, ...] group itself
    assert [why for a, why in saved if a.shape == (2, 3) + w_up.shape[1:]]


def test_the_dit_layer_scan_reads_its_parameters_in_place():
    """The DiT's q / k / v / o weights ([D, N, K], [N, K, D]) reach `models.linear` in their own shapes: reshaped to
    2-D, each was a new array that the layer scan saved per layer (a copy of those weights every step; the default
    video preset's train step kept 1.75 MiB more temp)."""
    from models.video import DiTConfig, VideoDiT

    L = 3
    cfg = DiTConfig(latent_shape=(3, 8, 8), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=L, n_heads=2,
                    mlp_dim=64, text_dim=16)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0))))  # (no init)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    text = jax.random.normal(jax.random.key(1), (2, 5, 16))
    valid, pooled = jnp.ones((2, 5), bool), text.mean(1)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x, jnp.asarray([0.1, 0.9]), text, valid, pooled) ** 2)

    saved = saved_residuals(loss, params)
    attn = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
            if any(getattr(k, "key", None) in ("wq", "wk", "wv", "wo") for k in path)]
    assert attn and all(a.shape[0] == L for a in attn)
    sizes = {a.size for a in attn}
    weights = [(a.shape, why) for a, why in saved if a.shape[:1] == (L,) and a.size in sizes]
    assert weights and all("argument" in why for _, why in weights), weights


def test_an_unrolled_stack_does_not_keep_the_glu_activations_until_the_backward():
    """glu's backward recomputes act(g) from (g, u) behind an optimization barrier: without it XLA merges that
    recomputation with the forward's and keeps σ(g), silu(g) alive until the backward (more temp memory)."""
    from unittest import mock

    cfg = TransformerConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, mlp_dim=256, max_seq_len=64,
                            scan_unroll=True)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # (no init)
    tok = np.zeros((4, 64), np.int32)

    def temp():
        grad = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, {"inputs": tok, "targets": tok})))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    with_barrier = temp()
    with mock.patch("models.glu._fresh", lambda res: res):
        merged = temp()
    assert with_barrier < merged, (with_barrier, merged)


def test_the_dit_mlp_saves_only_its_gate_and_up_per_layer():
    """The DiT's SwiGLU goes through `glu_linear`: the layer scan saves gate and up ([L, B·S, F] or [L, B, S, F])
    where autodiff of silu(g)·u saved five MLP-wide arrays and `glu` three (the default video preset's train step:
    temp 198.3 -> 172.9 MiB with `glu`)."""
    from models.video import DiTConfig, VideoDiT

    L, F = 3, 72  # F: no other activation or weight of this model ends in it
    cfg = DiTConfig(latent_shape=(3, 8, 8), latent_channels=4, patch=(1, 2, 2), d_model=32, n_layers=L, n_heads=2,
                    mlp_dim=F, text_dim=16)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0))))  # (no init)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
    text = jax.random.normal(jax.random.key(1), (2, 5, 16))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x, jnp.asarray([0.1, 0.9]), text, jnp.ones((2, 5), bool),
                                              text.mean(1)) ** 2)

    S = 3 * 4 * 4  # tokens: 3 frames of 4 × 4 patches
    saved = [a.shape for a, _ in saved_residuals(loss, params)]
    assert saved.count((L, 2, S, F)) + saved.count((L, 2 * S, F)) == 2, saved


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
@pytest.mark.parametrize("F, D", [(24, 10), (10, 24)], ids=["narrow-out", "wide-out"])
def test_glu_linear_equals_autodiff_in_float64(impl, F, D):
    """act(g)·u @ w and its three gradients equal autodiff of the plain formula (float64 reference), both ways of
    forming the weight gradient, with the cotangent or the product being the narrower operand."""
    from models.glu import glu_linear

    rng = np.random.default_rng(2)
    g, u, w = rng.normal(size=(2, 7, F)) * 2, rng.normal(size=(2, 7, F)), rng.normal(size=(F, D))
    ref, grads_ref, ct = vjp64(lambda g, u, w: (jax.nn.silu(g) * u) @ w, g, u, w)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(lambda g, u, w: glu_linear(g, u, w, "silu", impl), f32(g), f32(u), f32(w))
    plain = glu_linear(f32(g), f32(u), f32(w), "silu", impl)  # the primal a forward without a VJP runs (inference)
    for got, want in zip((plain, out, *vjp(f32(np.asarray(ct)))), (ref, ref, *grads_ref)):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- forward mode under models.plain_autodiff ---------------------------------------------------------------------

JVP_ERROR = r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"


def random_direction(params, seed=0, scale=0.05):
    """A tangent of params' structure, N(0, scale²) per element (params' dtypes)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def directional_fd(loss, params, v, h):
    """d loss(params + t·v) / dt at 0 from float32 losses: central differences at h and h/2, Richardson-extrapolated
    (truncation O(h⁴)). The models compute in float32 whatever the inputs: no float64 difference is to be had."""
    at = jax.jit(lambda t: loss(jax.tree.map(lambda p, d: p + t * d, params, v)))
    diff = lambda h: (at(h) - at(-h)) / (2 * h)  # noqa: E731
    return float((4 * diff(h / 2) - diff(h)) / 3)


def check_forward_mode(loss, params, seed=0, fd_rtol=1e-3, grad_rtol=1e-5, grads_too=True, hvp=False):
    """Under plain_autodiff: jax.jvp of `loss` along a random direction v equals the finite difference and <∇, v> of
    the default path's gradient; loss and (grads_too) gradient equal the default path's. v is tilted towards the
    gradient (half its norm along it), so that the slope stands well above the difference's float32 noise (a random
    direction alone can be nearly orthogonal to the gradient: slope 3e-3, noise 1.4e-5). The difference steps by h
    with h·slope = 0.01: float32 losses of O(1) round at ~1e-6, ~2e-4 of that move, and truncation stays below it
    (measured 1e-5 to 1.2e-4 off; at 3-10x the step 4e-3 to 1e-2 off, at a tenth 2e-3). Returns v; with hvp, (v, the
    Hessian-vector product along v): the plain value and gradient are then the primal of the jvp of value_and_grad
    under the switch (one program for both, the same primal computation), whose tangent is the HVP."""
    want, grads = jax.jit(jax.value_and_grad(loss))(params)
    v = random_direction(params, seed)
    norm = lambda t: np.sqrt(sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(t)))  # noqa: E731
    v = jax.tree.map(lambda d, g: d + 0.5 * norm(v) / norm(grads) * g, v, grads)
    with plain_autodiff():
        value, slope = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))(params, v)
        if hvp:
            plain, (_, along_v) = jax.jit(lambda p, v: jax.jvp(jax.value_and_grad(loss), (p,), (v,)))(params, v)
        else:
            plain = jax.jit(jax.value_and_grad(loss))(params) if grads_too else (value, grads)
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(plain[0]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(slope), along, rtol=1e-5)
    np.testing.assert_allclose(float(slope), directional_fd(loss, params, v, 1e-2 / abs(along)), rtol=fd_rtol)
    for got, g in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, g, rtol=0, atol=grad_rtol * float(np.abs(g).max()) + 1e-12)
    return (v, along_v) if hvp else v


FWD = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=16, attn_block=4)
FWD_CFGS = {
    "gqa-bias-softcap": TransformerConfig(**FWD, qkv_bias=True, attn_logit_softcap=5.0, final_logit_softcap=30.0),
    "sliding-global": TransformerConfig(**FWD, attn_pattern="alternating", sliding_window=4, swa_block=4),
    # every token on all 4 experts: top-2 routing flipped within the finite difference's step (7% off at h = 1e-3);
    # with K = E the routing and capacity's drops (queue position = token index: of T = 8, tokens 4.. dropped) are
    # fixed
    "moe-capacity": TransformerConfig(**FWD, moe=MoEConfig(n_experts=4, top_k=4, expert_mlp_dim=32,
                                                           dispatch="capacity", capacity_factor=0.5)),
    "moe-dropless": TransformerConfig(**FWD, moe=MoEConfig(n_experts=4, top_k=4, expert_mlp_dim=32,
                                                           gmm_tile_rows=(8, 4))),
}


@functools.cache  # one per config and module: the forward-mode, HVP and switch tests share it (and its eager init)
def lm_problem(name, seed=0):
    """(loss of params, params) for FWD_CFGS[name]: the LM loss on a fixed random batch, parameters perturbed off their
    init. T = 8: two query blocks of attn_block 4 and of swa_block 4 (a window of 4 < T), as few as take every branch
    (the blocks are unrolled: T = 16's four made each program ~15% slower to compile)."""
    cfg, rng = FWD_CFGS[name], np.random.default_rng(seed)
    tok = lambda: jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)  # noqa: E731
    batch = {"inputs": tok(), "targets": tok()}
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + jnp.asarray(0.05 * rng.standard_normal(p.shape), p.dtype), params)
    return lambda p: lm_loss(graphdef, p, batch), params


HVP_CFGS = ("gqa-bias-softcap", "moe-capacity")


@functools.cache  # the HVP test reads the jvp of value_and_grad that the forward-mode test checks the primal of
def forward_mode(name):
    """check_forward_mode on FWD_CFGS[name], once per module: v, or (v, HVP along v) for HVP_CFGS."""
    return check_forward_mode(*lm_problem(name), hvp=name in HVP_CFGS)


@pytest.mark.parametrize("name", list(FWD_CFGS))
def test_plain_autodiff_gives_forward_mode_the_default_values_and_gradients(name):
    """jax.jvp of a Transformer's loss (every custom VJP on its path: rms_norm, projections, blocked and sliding-window
    attention, embedding and head, glu, capacity and dropless 'gmm' experts) against a finite difference; value and
    gradient as the custom VJPs give them. Without the switch each raised JAX's jvp-of-custom_vjp TypeError."""
    forward_mode(name)


@pytest.mark.parametrize("name", HVP_CFGS)
def test_a_hessian_vector_product_by_jvp_of_grad_equals_reverse_over_reverse(name):
    """HVP as forward-over-reverse under the switch against reverse-over-reverse (∇<∇L, v>) through the custom VJPs.
    (Reverse-over-reverse through the dropless 'gmm' experts' custom VJP fails: its backward's tile loops are while
    loops; under the switch it works.) The HVP is the tangent of the jvp of value_and_grad whose primal the
    forward-mode test checks (one program), along its v (random, tilted towards the gradient)."""
    loss, params = lm_problem(name)
    v, hvp = forward_mode(name)
    dot = lambda p, v: sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(loss)(p)), jax.tree.leaves(v)))
    want = jax.jit(jax.grad(dot))(params, v)
    for got, w in zip(jax.tree.leaves(hvp), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=0, atol=2e-5 * float(np.abs(w).max()) + 1e-12)


def test_forward_mode_without_the_switch_is_jaxs_error_and_the_switch_is_part_of_jits_cache_key():
    """The default path keeps its custom VJPs (jvp raises JAX's own TypeError, unchanged); a function jitted and
    traced outside the switch is traced again inside it, and its gradient's program outside is the default one
    before and after (the forward programs are the same either way: a custom VJP's primal is the plain function)."""
    loss, params = lm_problem("gqa-bias-softcap")
    f, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    before = grad.lower(params).as_text()
    v = random_direction(params)
    f(params)
    with pytest.raises(TypeError, match=JVP_ERROR):
        jax.jvp(f, (params,), (v,))
    with plain_autodiff():
        slope = jax.jvp(f, (params,), (v,))[1]
        assert grad.lower(params).as_text() != before
    assert grad.lower(params).as_text() == before
    with pytest.raises(TypeError, match=JVP_ERROR):
        jax.jvp(f, (params,), (v,))
    assert np.isfinite(float(slope))
