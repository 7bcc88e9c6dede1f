"""MoE layer: every dispatch path equals a dense reference (values and gradients), capacity drops exactly the
predicted tokens, auxiliary losses match their formulas, bias balancing works, expert parallel == single device."""

import contextlib
import dataclasses
import functools
import json
import re
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import plain_autodiff
from models.moe import (
    ACTIVATIONS,
    MoE,
    MoEConfig,
    expert_load,
    load_balancing_loss,
    route,
    router_z_loss,
    top_k_indices,
    update_router_bias,
)
from models.moe_dispatch import capacity_slots, grouped_swiglu
from parallel import make_mesh, shard_batch, shard_state

D = 16
# one gmm tile size: the default four each add a tile loop per expert, forward and backward (a gmm gradient's compile
# 2.8 -> ~0.6 s); what the tests built on CFG check (routing, aux, padding, meshes, transforms) is the same for any
# tiles. The default tiles are the "gmm" variant's below (values and gradients against the reference), the config
# test's tile-loop count and the bf16 test's; other tile sizes test_grouped_swiglu's and "gmm_tiles=256,16,4"
CFG = MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=24, gmm_tile_rows=(8,))


def build(fn):
    """fn() -> module, initialised under one jit (eager init compiles every initializer op separately: slow)."""
    graphdef = nnx.split(nnx.eval_shape(fn))[0]
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(fn()))())


@functools.cache
def _params(d, n_experts, mlp_dim, n_shared, seed):
    """Parameters depend on the shapes only: initialise once per shape, share across dispatch variants."""

    def fn():
        m = MoE(d, MoEConfig(n_experts=n_experts, top_k=1, expert_mlp_dim=mlp_dim, n_shared_experts=n_shared,
                             renormalize=False), rngs=nnx.Rngs(seed))
        m.router_bias[...] = 0.05 * jax.random.normal(jax.random.key(seed + 7), m.router_bias.shape)
        m.router[...] = 20 * m.router[...]  # spread routing probabilities so renormalisation and the bias matter
        return m

    return nnx.state(build(fn))


def make(cfg, seed=0, d=D):
    """An MoE with a non-zero router bias, so the selection-only bias is exercised everywhere."""
    graphdef = nnx.split(nnx.eval_shape(lambda: MoE(d, cfg, rngs=nnx.Rngs(seed))))[0]
    return nnx.merge(graphdef, _params(d, cfg.n_experts, cfg.expert_mlp_dim, cfg.n_shared_experts, seed))


def tokens(B=4, T=12, d=D, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, d))


def reference(p, x_BTD, cfg):
    """Every expert computes every token; mask and sum. Written independently of models.moe."""
    B, T, Dm = x_BTD.shape
    x = x_BTD.reshape(-1, Dm)
    logits = x @ p["router"]
    probs = jax.nn.softmax(logits, -1) if cfg.router == "softmax" else jax.nn.sigmoid(logits)
    sel = jnp.argsort(-(jax.lax.stop_gradient(probs) + p["router_bias"]), axis=-1, stable=True)[:, :cfg.top_k]
    w = jnp.take_along_axis(probs, sel, -1)
    if cfg.renormalize:
        w = w / w.sum(-1, keepdims=True)
    gate_NE = jnp.sum(jax.nn.one_hot(sel, cfg.n_experts) * w[..., None], axis=1)
    h_NEF = jax.nn.silu(jnp.einsum("nd,edf->nef", x, p["w_gate"])) * jnp.einsum("nd,edf->nef", x, p["w_up"])
    y = jnp.einsum("ne,nef,efd->nd", gate_NE, h_NEF, p["w_down"])
    if cfg.n_shared_experts:
        y = y + (jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])) @ p["shared_down"]
    return y.reshape(B, T, Dm)


def jitted(model, **kw):
    """model(x, **kw) under jit (eager calls compile every primitive separately: slow)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, **kw))
    return lambda x: f(state, x)


def probe(y):  # a fixed, non-symmetric linear functional of the output
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


def module_value_and_grad(model, x, **kw):
    graphdef, state = nnx.split(model)

    def f(st, x):
        y, aux = nnx.merge(graphdef, st)(x, **kw)
        return probe(y), (y, aux)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)


@functools.cache
def reference_value_and_grad(cfg):
    """(params, ((probe, y), (d/dparams, d/dx))) of the dense reference on tokens(); cached per config."""
    state = nnx.to_pure_dict(nnx.state(make(cfg)))

    def ref_fn(st, x):
        y = reference(st, x, cfg)
        return probe(y), y

    return state, jax.jit(jax.value_and_grad(ref_fn, argnums=(0, 1), has_aux=True))(state, tokens())


VARIANTS = {
    "gmm": dict(dropless_impl="gmm"),
    "gmm_tiles=256,16,4": dict(dropless_impl="gmm", gmm_tile_rows=(256, 16, 4)),  # 256 > the padded rows: unused
    "blocks": dict(dropless_impl="blocks"),
    "ragged_dot": dict(dropless_impl="ragged_dot"),
    "dense": dict(dropless_impl="dense"),
    "capacity_C=T": dict(dropless_impl="capacity"),
    "capacity_dispatch_CF=E/k": dict(dispatch="capacity", capacity_factor=4.0),
}
CASES = {  # router and expert variants × the dispatch paths that handle them differently
    # the default gmm tiles (64, 32, 16, 8 at these shapes: every size used) under mixtral-gmm
    **{f"mixtral-{v}": (dataclasses.replace(CFG, gmm_tile_rows=None), v) for v in VARIANTS},
    # (one gmm tile size: the router / shared-expert / expert-count paths do not depend on the tiles, and each tile
    # size adds a loop per expert to compile; the default tiles are mixtral-gmm's)
    **{f"deepseek-{v}": (MoEConfig(n_experts=16, top_k=4, expert_mlp_dim=8, n_shared_experts=2, router="sigmoid",
                                   gmm_tile_rows=(8,)), v)
       for v in ("gmm", "capacity_dispatch_CF=E/k")},
    # 12 experts: gmm's expert scan, unrolled by 8, runs one unrolled step and a remainder of 4
    "12experts-gmm": (MoEConfig(n_experts=12, top_k=3, expert_mlp_dim=8, gmm_tile_rows=(8,)), "gmm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_path_equals_dense_reference(case):
    """Values and gradients (params and input) of every dropless implementation and of capacity dispatch with
    room for every token equal the dense reference; nothing is reported dropped; the bias gets no gradient."""
    base, variant = CASES[case]
    x = tokens()
    state, ((ref_val, ref_y), ref_grads) = reference_value_and_grad(base)
    (val, (y, aux)), (g_state, g_x) = module_value_and_grad(make(dataclasses.replace(base, **VARIANTS[variant])), x)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    assert float(aux["dropped_frac"]) == 0.0
    np.testing.assert_allclose(g_x, ref_grads[1], atol=1e-5)
    g = nnx.to_pure_dict(g_state)
    assert not np.any(g["router_bias"]), "the bias must get no gradient (it is updated outside the optimizer)"
    for k in state:
        np.testing.assert_allclose(g[k], ref_grads[0][k], atol=1e-5, err_msg=f"d/d{k}")


@pytest.mark.parametrize("columns", [True, False], ids=["columns", "rows"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_grouped_swiglu_tiles_cover_every_run_and_match_a_per_row_reference(act, columns):
    """Runs of 0, 42, 6 and 10 rows with tiles (32, 8, 2): 42 = 32 + 8 + 2 uses every tile size. Values and
    gradients (x and the three expert weights, through the custom VJP) equal each row's own expert SwiGLU; rows
    past the runs give 0, and expert 0 (no rows) gets no weight gradient. Both ways of forming the weight gradients
    (`weight_grad_columns`: from columns of xᵀ and gᵀ, the CPU default, or from row tiles)."""
    with mock.patch("models.moe_dispatch.weight_grad_columns", lambda: columns):
        _check_grouped_swiglu(act)


@functools.cache
def _grouped_arrays():
    """x, g and w of _grouped_problem: drawn in one program, once (eagerly each draw compiled on its own)."""

    def draw():
        ks = jax.random.split(jax.random.key(0), 5)
        return (jax.random.normal(ks[0], (64, 8)), jax.random.normal(ks[1], (64, 8)),
                (jax.random.normal(ks[2], (4, 8, 6)), jax.random.normal(ks[3], (4, 8, 6)),
                 jax.random.normal(ks[4], (4, 6, 8))))

    return jax.jit(draw)()


def _grouped_problem(act):
    """(sizes, run_E, x, cotangent g, w, per_row reference) for grouped_swiglu: runs of 0, 42, 6 and 10 rows of 64."""
    sizes = (32, 8, 2)
    run_E = jnp.array([0, 42, 6, 10])
    expert_R = np.array([1] * 42 + [2] * 6 + [3] * 10 + [-1] * 6)  # -1: rows past the runs stay 0
    x, g, w = _grouped_arrays()

    def per_row(x, w):
        e = np.maximum(expert_R, 0)
        h = act(jnp.einsum("ri,rio->ro", x, w[0][e])) * jnp.einsum("ri,rio->ro", x, w[1][e])
        return jnp.einsum("rf,rfd->rd", h, w[2][e]) * (expert_R >= 0)[:, None]

    return sizes, run_E, x, g, w, per_row


def _check_grouped_swiglu(act):
    act = ACTIVATIONS[act]
    sizes, run_E, x, g, w, per_row = _grouped_problem(act)
    # the reference's output read from its gradient's program (eagerly per_row compiled op by op)
    ((y0, want), g0), ((y1, _), g1) = [
        jax.jit(jax.value_and_grad(lambda x, w, f=f: (jnp.vdot(f(x, w), g), f(x, w)), argnums=(0, 1),
                                   has_aux=True))(x, w)
        for f in (per_row, lambda x, w: grouped_swiglu(x, w, run_E, sizes, act))]
    np.testing.assert_allclose(y1, y0, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(grouped_swiglu, static_argnums=(3, 4))(x, w, run_E, sizes, act), want,
                               atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5), g1, g0)
    assert not any(np.any(d[0]) for d in g1[1]), "expert 0 has no rows: no weight gradient"


def test_grouped_swiglu_under_plain_autodiff_is_the_per_row_reference_in_both_modes():
    """models.plain_autodiff's form of grouped_swiglu (each expert on every row, kept on its run's rows: the tile
    loops' while loops refuse reverse mode, so jvp-of-grad failed) gives the tiled values, 0 past the runs, and its
    jvp and gradient are the per-row reference's."""
    act = ACTIVATIONS["silu"]
    sizes, run_E, x, g, w, per_row = _grouped_problem(act)
    tiled = jax.jit(grouped_swiglu, static_argnums=(3, 4))(x, w, run_E, sizes, act)
    f = lambda x, w: jnp.vdot(grouped_swiglu(x, w, run_E, sizes, act), g)  # noqa: E731
    ref = lambda x, w: jnp.vdot(per_row(x, w), g)  # noqa: E731

    def slope_and_grads(f, x, w):  # one program each (eagerly every op compiled on its own)
        return jax.jvp(f, (x, w), jax.tree.map(jnp.cos, (x, w)))[1], jax.grad(f, argnums=(0, 1))(x, w)

    with plain_autodiff():  # traced under the switch
        plain, (slope, grads) = jax.jit(lambda x, w: (grouped_swiglu(x, w, run_E, sizes, act),
                                                      slope_and_grads(f, x, w)))(x, w)
    want_slope, want_grads = jax.jit(lambda x, w: slope_and_grads(ref, x, w))(x, w)
    np.testing.assert_allclose(plain, tiled, rtol=1e-6, atol=1e-6)
    assert not np.any(plain[58:])
    np.testing.assert_allclose(slope, want_slope, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5), grads, want_grads)


def test_grouped_swiglu_under_plain_autodiff_rounds_as_the_tiles_do_in_bf16():
    """bf16 rows and weights: the plain form rounds the gate / up products and the output to bf16 where the tiles do
    (float32 products, bf16 results), so its values are the tiled kernel's bit for bit (the float32 test above cannot
    tell: unrounded gate / up products were 0.5 off at outputs of ~100)."""
    act = ACTIVATIONS["silu"]
    sizes, run_E, x, _, w, _ = _grouped_problem(act)
    x, w = x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), w)
    run = jax.jit(grouped_swiglu, static_argnums=(3, 4))
    tiled = run(x, w, run_E, sizes, act)
    with plain_autodiff():
        plain = run(x, w, run_E, sizes, act)
    assert plain.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(tiled, np.float32))

def test_grouped_swiglu_weight_gradients_are_row_major_products_on_cpu():
    """On CPU no dot of the grouped SwiGLU's gradient contracts the rows of both operands (XLA:CPU runs that form on
    Eigen, and in bf16 as a float32 dot); formed from row tiles, its weight gradients all do. The default (no patch)
    is the columns form: only the two patched forms were checked, so a CPU default of row tiles passed."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's dot lowering")
    sizes, run_E = (32, 8), jnp.array([40, 0, 24])
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (64, 16))
    w = (jax.random.normal(ks[1], (3, 16, 24)), jax.random.normal(ks[2], (3, 16, 24)),
         jax.random.normal(ks[3], (3, 24, 16)))

    def rows_both(columns):  # columns None: the backend's default
        patch = mock.patch("models.moe_dispatch.weight_grad_columns", lambda: columns)
        with patch if columns is not None else contextlib.nullcontext():
            f = jax.jit(jax.grad(lambda x, w: grouped_swiglu(x, w, run_E, sizes, jax.nn.silu).sum(), argnums=(0, 1)))
            hlo = f.lower(x, w).compile().as_text()
        return re.findall(r" dot\([^\n]*lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{0\}", hlo)

    assert rows_both(True) == [] and rows_both(None) == []
    assert len(rows_both(False)) >= 3  # gate, up and down, per expert and tile size unless XLA merges them


def test_bf16_shared_experts_keep_their_products_in_bf16_on_cpu():
    """dtype bf16: the shared experts' products go through models.linear like the dense MLP's, so XLA:CPU runs them
    as bf16 dots (plain `@` products of bf16 operands ran as float32 dots, forward and backward: 9 of them). The
    float32 dots left are the router's (float32 by design): forward (contracting D), dw (the rows) and dx (E; XLA
    may make it a reduction)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's dot lowering")
    from tests.test_linear import dots_of

    cfg = MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=24, n_shared_experts=1, dropless_impl="gmm")
    graphdef, state = nnx.split(build(lambda: MoE(D, cfg, rngs=nnx.Rngs(0))))
    x = jax.random.normal(jax.random.key(1), (2, 20, D))

    def loss(s, x):
        return jnp.sum(nnx.merge(graphdef, s)(x, compute_dtype=jnp.bfloat16)[0].astype(jnp.float32) ** 2)

    dots = dots_of(jax.jit(jax.grad(loss)).lower(state, x).compile().as_text())
    f32 = sorted(d[2] for d in dots if d[:2] != ("bf16", "bf16") and not d[3])
    assert len(f32) <= 3 and set(f32) <= {D, cfg.n_experts, 2 * 20}, sorted(set(dots))
    assert sum(d[:2] == ("bf16", "bf16") for d in dots) >= 9  # the shared experts' 3 forward + 6 backward products


def test_top_k_indices_is_a_stable_descending_sort():
    """Iterative argmax (k ≤ 4) and the sort (k > 4) both pick the largest scores first, lower index on ties."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (64, 9)).astype(np.float32)  # few distinct values: many ties
    want = np.argsort(-scores, axis=-1, kind="stable")
    for k in range(1, 8):
        np.testing.assert_array_equal(np.asarray(top_k_indices(jnp.asarray(scores), k)), want[:, :k])


def test_top_k_indices_never_repeats_an_expert_when_scores_are_minus_inf():
    """A -inf score (a router_bias of -inf prunes an expert) with fewer finite scores than k: the argmax passes (k <= 4)
    masked picked experts with -inf too, so the next pass took expert 0 again ([0, 0] for k=2 of [1, -inf, -inf,
    -inf], where the sort gives [0, 1]); a token then held two slots of one expert, and at decode (C = T = 1)
    capacity dispatch dropped its second, 'dropless' one. Now the -inf ties go to the lowest unpicked index."""
    s = np.full((3, 5), -np.inf, np.float32)
    s[0, 0], s[1, 1], s[1, 3] = 1, 2, 1  # row 2: all -inf
    want = np.argsort(-s, axis=-1, kind="stable")
    for k in range(1, 6):
        np.testing.assert_array_equal(np.asarray(top_k_indices(jnp.asarray(s), k)), want[:, :k])


def test_route_and_top_k_refuse_a_router_or_k_they_cannot_run():
    """route(..., router='Softmax') ran sigmoid routing (weights 0.552 / 0.448 where softmax gives 0.626 / 0.374):
    any name but 'softmax' fell through to the sigmoid. top_k_indices with k above the E scores returned expert 0
    twice ([0, 1, 0] for k=3 of 2) by the argmax passes, and only E columns by the sort (k > 4). Both are refused by
    name now; every k from 1 to E still runs."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    with pytest.raises(ValueError, match=r"router='Softmax'.*softmax or sigmoid"):
        route(logits, jnp.zeros(4), 2, "Softmax")
    for k in (3, 6):
        with pytest.raises(ValueError, match=rf"k={k}.*2 scores"):
            top_k_indices(logits[:, :2], k)
    with pytest.raises(ValueError, match=r"k=0"):
        top_k_indices(logits, 0)
    assert top_k_indices(logits, 4).shape == (3, 4)


def test_capacity_drops_exactly_the_predicted_tokens():
    """4 experts, top-2, 8 tokens per row, C = ceil(2·8/4·0.5) = 2. Router = 10·I and token t = e_first + 0.9·e_second,
    so each token's choices are known. Token-major order: t0's two choices, then t1's, and so on."""
    E = 4
    cfg = MoEConfig(n_experts=E, top_k=2, expert_mlp_dim=8, dispatch="capacity", capacity_factor=0.5)
    assert cfg.capacity(8) == 2
    first = [0, 0, 0, 1, 1, 2, 3, 3]
    second = [1, 2, 3, 0, 2, 3, 0, 1]
    # t0 (0, 1) both kept; t1 (0, 2) both, e0 now full; t2 (0, 3) drops e0, e3 kept; t3 (1, 0): e1 kept (full),
    # e0 dropped; t4 (1, 2): e1 dropped, e2 kept (full); t5 (2, 3): e2 dropped, e3 kept (full); t6, t7: all full
    kept = np.array([[1, 1], [1, 1], [0, 1], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]], bool)
    # made in numpy, and the routing below in one program (eagerly each op compiled on its own)
    x = (np.eye(E, dtype=np.float32)[first] + 0.9 * np.eye(E, dtype=np.float32)[second])[None]  # [1, 8, 4]
    x = np.concatenate([x, x[:, ::-1]])  # a second row, reversed: capacity is per row

    def fn():
        m = MoE(E, cfg, rngs=nnx.Rngs(0))
        m.router[...] = 10 * jnp.eye(E)
        for w in (m.w_gate, m.w_up, m.w_down):  # outputs of order 1, so a dropped second choice is visible
            w[...] = 25 * w[...]
        return m

    m = build(fn)

    @jax.jit
    def routing(x, router):
        weights, experts, _ = route(x @ router, 0.0, 2)
        return weights, experts, capacity_slots(experts, E, 2)[1]

    weights, experts, kept_got = (np.asarray(a) for a in routing(x, m.router[...]))
    np.testing.assert_array_equal(experts[0], np.stack([first, second], -1))
    np.testing.assert_array_equal(kept_got[0], kept)
    # row 2 is row 1 reversed: t0 (3, 1) both; t1 (3, 0) both, e3 full; t2 (2, 3): e2 kept, e3 dropped; t3 (1, 2)
    # both, e1 and e2 full; t4 (1, 0): e1 dropped, e0 kept (full); t5..t7 ask only for full experts
    rev_kept = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [0, 0]], bool)
    np.testing.assert_array_equal(kept_got[1], rev_kept)

    y, aux = jitted(m)(x)
    np.testing.assert_allclose(aux["dropped_frac"], 1 - (kept.sum() + rev_kept.sum()) / 32)
    # output = Σ_k weight · kept · expert(x), computed per token in numpy
    p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(m)).items()}
    silu = lambda a: a / (1 + np.exp(-a))
    mask = np.stack([kept, rev_kept])
    xs, ws, es = np.asarray(x, np.float64), np.asarray(weights), np.asarray(experts)
    want = np.zeros_like(xs)
    for b, t, k in np.ndindex(2, 8, 2):
        e = es[b, t, k]
        want[b, t] += ws[b, t, k] * mask[b, t, k] * (silu(xs[b, t] @ p["w_gate"][e]) * (xs[b, t] @ p["w_up"][e])
                                                      @ p["w_down"][e])
    np.testing.assert_allclose(y, want, atol=1e-5)
    # dropless on the same routing drops nothing and differs exactly on the tokens that lost an assignment
    dropless = nnx.eval_shape(lambda: MoE(E, dataclasses.replace(cfg, dispatch="dropless"), rngs=nnx.Rngs(0)))
    m_dl = nnx.merge(nnx.split(dropless)[0], nnx.state(m))
    y_dl, aux_dl = jitted(m_dl)(x)
    assert float(aux_dl["dropped_frac"]) == 0.0
    same = np.all(np.isclose(y, y_dl, atol=1e-5), axis=-1)
    np.testing.assert_array_equal(same, mask.all(-1))



def test_capacity_slots_are_causal_and_skip_padding():
    """kept[:, :t] depends only on the choices of tokens < t (a later token can never evict an earlier one), and
    padding tokens join no queue: the real tokens are kept exactly as in the row with the pads removed."""
    E, K, C, T = 4, 2, 3, 12
    rng = np.random.default_rng(0)
    # jitted: eagerly each of its ops compiled on its own, again for every row length of `alone` below
    slots = jax.jit(capacity_slots, static_argnums=(1, 2))
    for _ in range(20):
        experts = np.stack([rng.permutation(E)[:K] for _ in range(2 * T)]).reshape(2, T, K)
        t = int(rng.integers(1, T))
        other = experts.copy()
        other[:, t:] = np.stack([rng.permutation(E)[:K] for _ in range(2 * (T - t))]).reshape(2, T - t, K)
        kept = np.asarray(slots(jnp.asarray(experts), E, C)[1])
        np.testing.assert_array_equal(np.asarray(slots(jnp.asarray(other), E, C)[1])[:, :t], kept[:, :t])

        valid = rng.random((2, T)) < 0.6
        slot, kept = (np.asarray(a) for a in slots(jnp.asarray(experts), E, C, jnp.asarray(valid)))
        assert not kept[~valid].any() and (slot[~valid] == E * C).all()  # pads: trash slot, never kept
        for b in range(2):
            alone = np.asarray(slots(jnp.asarray(experts[b][valid[b]][None]), E, C)[1])[0]
            np.testing.assert_array_equal(kept[b][valid[b]], alone)


def test_padding_tokens_take_no_capacity_and_leave_the_aux_values():
    """MoE(x, valid_BT): the real tokens' outputs and every aux value equal those of the row without its pads, when
    both rows get the same C (here 2); padding tokens output 0."""
    E, T, pad = 4, 16, 8
    cfg = MoEConfig(n_experts=E, top_k=2, expert_mlp_dim=8, dispatch="capacity", capacity_factor=0.16)
    assert cfg.capacity(T) == cfg.capacity(T + pad) == 2
    m = build(lambda: MoE(D, cfg, init_std=0.5, rngs=nnx.Rngs(0)))

    @jax.jit
    def inputs():  # one program (eagerly each op compiled on its own)
        x = jax.random.normal(jax.random.key(0), (2, T, D))
        junk = 5 * jax.random.normal(jax.random.key(1), (2, pad, D))
        xp = jnp.stack([jnp.concatenate([junk[0], x[0]]), jnp.concatenate([x[1], junk[1]])])  # left / right padded
        return x, xp, jnp.stack([jnp.arange(T + pad) >= pad, jnp.arange(T + pad) < T])

    x, xp, valid = inputs()
    run = jax.jit(lambda m, x, v=None: m(x, valid_BT=v))
    y, aux = run(m, x)
    yp, auxp = run(m, xp, valid)
    yp = np.asarray(yp)
    np.testing.assert_allclose(np.stack([yp[0, pad:], yp[1, :T]]), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.stack([yp[0, :pad], yp[1, T:]]), 0.0)
    assert 0 < aux["dropped_frac"] < 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), auxp, aux)


@pytest.mark.parametrize("impl", ["gmm", "dense"])
def test_dropless_padding_tokens_output_zero_and_real_tokens_are_unchanged(impl):
    """Dropless: a pad is not routed either (routed output 0), and the real tokens equal the unpadded row's. Only
    capacity dispatch was tested with pads: a dropless layer that routed them passed (its real tokens do not see
    the pads, and the aux values leave them out anyway). A pad whose expert output overflows (x ~ 1e30, finite)
    also outputs 0, as under capacity dispatch: its zero weight times that inf was NaN."""
    cfg = dataclasses.replace(CFG, dropless_impl=impl)
    m = make(cfg)

    @jax.jit
    def inputs():  # one program (eagerly each op compiled on its own)
        x, junk = tokens(B=2, T=8), 5 * tokens(B=2, T=4, seed=3)
        junk = junk.at[:, 1].multiply(1e30)
        return x, jnp.concatenate([junk, x], axis=1), jnp.broadcast_to(jnp.arange(12) >= 4, (2, 12))  # left padded

    x, xp, valid = inputs()
    run = jax.jit(lambda m, x, v=None: m(x, valid_BT=v)[0])
    y, yp = run(m, x), run(m, xp, valid)
    np.testing.assert_array_equal(yp[:, :4], 0.0)
    np.testing.assert_allclose(yp[:, 4:], y, rtol=1e-5, atol=1e-6)


def test_padding_mask_of_the_wrong_shape_is_refused_by_name():
    """valid_BT must be [B, T]: a [T] or [B, T + 1] mask failed in a reshape or a broadcast that named neither the
    argument nor the shape it needs ('cannot reshape array of shape (6,) into shape 12')."""
    m, x = make(CFG), tokens(B=2, T=6)
    for shape in ((6,), (2, 7), (1, 6), (2, 6, 1)):
        want = re.escape(f"MoE valid_BT: shape {shape}") + ".*" + re.escape("[B, T] = (2, 6)")
        with pytest.raises(ValueError, match=want):
            m(x, valid_BT=jnp.ones(shape, bool))


def test_input_of_the_wrong_rank_or_width_is_refused_by_name():
    """x must be [B, T, D] with D = d_model: a [N, D] batch of tokens failed with 'not enough values to unpack
    (expected 3, got 2)', a wrong width with a dot_general shape error naming neither."""
    m = make(CFG)
    for shape in ((6, D), (2, 6, D + 2), (1, 2, 6, D)):
        want = re.escape(f"MoE x: shape {shape}") + ".*" + re.escape(f"[B, T, D] with D = d_model = {D}")
        with pytest.raises(ValueError, match=want):
            m(jnp.ones(shape))
    for shape in ((0, 6, D), (2, 0, D)):  # a ZeroDivisionError in a reshape, named nothing
        with pytest.raises(ValueError, match=re.escape(f"MoE x: shape {shape} holds no tokens")):
            m(jnp.ones(shape))


def test_padding_only_batch_gives_zero_aux_and_finite_gradients():
    """valid_BT all False (a batch of padding only): routed output 0, every aux value 0 (load too: no assignment to
    share out), and finite gradients for both dispatches; a 0 / 0 in a per-real-token mean would be NaN."""
    x, valid = tokens(B=2, T=6), jnp.zeros((2, 6), bool)
    for cfg in (CFG, dataclasses.replace(CFG, dispatch="capacity", capacity_factor=0.5, router="sigmoid")):
        graphdef, state = nnx.split(make(cfg))

        def f(st, x):
            y, aux = nnx.merge(graphdef, st)(x, valid_BT=valid)
            return probe(y) + aux["lb_loss"] + aux["z_loss"], (y, aux)

        (loss, (y, aux)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)
        np.testing.assert_array_equal(y, 0.0)
        assert float(loss) == 0.0
        jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0.0), aux)
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_aux_losses_equal_their_formulas():
    E, K, T = 4, 2, 8
    # each function one program for every call below (eagerly each op compiled on its own), inputs made in numpy
    load_balancing_loss_, expert_load_ = (jax.jit(f, static_argnums=2 - (f is expert_load))
                                          for f in (load_balancing_loss, expert_load))
    router_z_loss_ = jax.jit(router_z_loss)
    # perfect balance: uniform probabilities, every expert chosen equally often -> the documented minimum, 1
    uniform = np.full((T, E), 1 / E, np.float32)
    balanced = np.array([[0, 1], [2, 3]] * (T // 2), np.int32)
    np.testing.assert_allclose(load_balancing_loss_(uniform, balanced, E), 1.0, rtol=1e-6)
    np.testing.assert_allclose(expert_load_(balanced, E), np.full(E, 1 / E))
    # total collapse onto experts 0 and 1 with all probability on them -> E/2 · (0.5·0.5·2)... by formula
    probs = np.tile(np.array([0.7, 0.3, 0.0, 0.0], np.float32), (T, 1))
    collapsed = np.tile(np.array([0, 1], np.int32), (T, 1))
    np.testing.assert_allclose(load_balancing_loss_(probs, collapsed, E), E * (0.5 * 0.7 + 0.5 * 0.3), rtol=1e-6)
    # a generic case against numpy: f = counts / (T·K), P = mean probs
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(E), T).astype(np.float32)
    sel = np.argsort(-p, -1)[:, :K]
    f = np.bincount(sel.ravel(), minlength=E) / (T * K)
    np.testing.assert_allclose(load_balancing_loss_(p, sel.astype(np.int32), E), E * np.sum(f * p.mean(0)),
                               rtol=1e-5)
    # z-loss: zero logits -> log(E)^2; generic -> mean(logsumexp^2)
    np.testing.assert_allclose(router_z_loss_(np.zeros((T, E), np.float32)), np.log(E) ** 2, rtol=1e-6)
    z = rng.normal(size=(T, E)).astype(np.float32) * 3
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(router_z_loss_(z), np.mean(lse ** 2), rtol=1e-5)


def test_aux_functions_take_route_outputs_of_any_token_shape_and_refuse_mismatches_by_name():
    """route gives [B, T, ·]; the aux functions took only [T, ·] rows and failed on its outputs with a bare
    'Incompatible types for broadcasting: float32[4] and float32[20]' (the n_experts slip too, unnamed)."""
    E, K = 4, 2
    logits = np.random.default_rng(0).normal(size=(2, 5, E)).astype(np.float32)
    valid = np.ones((2, 5), bool)
    valid[1, 3:] = False

    def both(lg, v):  # one program: [B, T, ·] and the same tokens as [B·T, ·] rows
        _, ex, p = route(lg, jnp.zeros(E), K)
        flat = (p.reshape(-1, E), ex.reshape(-1, K), v.reshape(-1))
        return ((load_balancing_loss(p, ex, E, v), router_z_loss(lg, v), expert_load(ex, E, v)),
                (load_balancing_loss(*flat[:2], E, flat[2]), router_z_loss(lg.reshape(-1, E), flat[2]),
                 expert_load(flat[1], E, flat[2])))

    got, want = jax.jit(both)(logits, valid)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    p, ex = np.full((10, E), 1 / E, np.float32), np.zeros((10, K), np.int32)
    with pytest.raises(ValueError, match=r"load_balancing_loss: n_experts=3.*probs"):
        load_balancing_loss(p, ex, 3)
    with pytest.raises(ValueError, match=r"load_balancing_loss: .*valid_T \(9,\)"):
        load_balancing_loss(p, ex, E, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"expert_load: .*experts .*\(2, 5\).*valid_T \(10,\)"):
        expert_load(ex.reshape(2, 5, K), E, np.ones(10, bool))
    with pytest.raises(ValueError, match=r"router_z_loss: .*logits .*\(10,\).*valid_T \(2, 5\)"):
        router_z_loss(p, np.ones((2, 5), bool))


def test_module_aux_outputs():
    """aux from the layer: losses are the formulas on its own router outputs; load sums to 1 over experts."""
    m, x = make(CFG), tokens()
    _, aux = jitted(m)(x)

    def formulas(x, router, bias):  # one program (eagerly each op compiled on its own)
        logits = x.reshape(-1, D) @ router
        _, sel, probs = route(logits, bias, CFG.top_k)
        return load_balancing_loss(probs, sel, CFG.n_experts), router_z_loss(logits), expert_load(sel, CFG.n_experts)

    lb, z, load = jax.jit(formulas)(x, m.router[...], m.router_bias[...])
    np.testing.assert_allclose(aux["lb_loss"], lb, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(aux["load"], load, rtol=1e-6)
    np.testing.assert_allclose(aux["load"].sum(), 1.0, rtol=1e-6)
    assert aux["lb_loss"] > 1.0  # random routing is not perfectly balanced


def test_sigmoid_router_balances_its_normalised_scores():
    """DeepSeek-V3's sigmoid scores do not sum to 1 per token: the balancing loss takes them normalised per token
    (independent numpy formula E · Σ_e f_e · P_e), so equal scores still give 1. Only the softmax router's aux was
    tested: raw sigmoid scores (E / 2 = 4 for equal scores of 0.5) passed."""
    cfg = dataclasses.replace(CFG, router="sigmoid")
    m, x = make(cfg), tokens()
    _, aux = jitted(m)(x)

    @jax.jit
    def routing(x, router, bias):  # one program (eagerly each op compiled on its own)
        logits = x.reshape(-1, D) @ router
        return logits, route(logits, bias, cfg.top_k, "sigmoid")[1]

    logits, sel = (np.asarray(a) for a in routing(x, m.router[...], m.router_bias[...]))
    logits = logits.astype(np.float64)
    scores = 1 / (1 + np.exp(-logits))
    f = np.bincount(sel.reshape(-1), minlength=cfg.n_experts) / sel.size
    p = (scores / scores.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(aux["lb_loss"], cfg.n_experts * np.sum(f * p), rtol=1e-5)
    graphdef, state = nnx.split(m)
    zero = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # new variables: make()'s parameters are shared
    zero.router[...] = jnp.asarray(np.zeros(zero.router.shape, np.float32))  # every score 0.5, ties to the lowest
    assert np.abs(np.asarray(m.router[...])).max() > 0
    _, aux = jitted(zero)(x)
    load = np.asarray(aux["load"])
    np.testing.assert_allclose(aux["lb_loss"], cfg.n_experts * np.sum(load / cfg.n_experts), rtol=1e-6)  # = 1


def test_sigmoid_router_balancing_loss_is_finite_for_very_negative_logits():
    """A diverged sigmoid router (every expert's logit of a token below ~-88) underflows σ to 0 in float32: the
    normalised scores were 0 / 0 and the balancing loss NaN. Normalised in log space now, equal to the float64
    formula s / Σ s, and its gradient is finite."""
    cfg = dataclasses.replace(CFG, router="sigmoid")
    m, x = make(cfg), jnp.abs(tokens())
    graphdef, state = nnx.split(m)
    far = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    far.router[...] = far.router[...] - 20.0  # x >= 0: every logit is about -20 · Σ_d x_d
    logits = np.asarray(x.reshape(-1, D), np.float64) @ np.asarray(far.router[...], np.float64)
    assert logits.max() < -110 and np.all(np.asarray(jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))) == 0)
    _, aux = jitted(far)(x)
    sel = np.asarray(route(jnp.asarray(logits, jnp.float32), far.router_bias[...], cfg.top_k, "sigmoid")[1])
    f = np.bincount(sel.reshape(-1), minlength=cfg.n_experts) / sel.size
    log_s = -np.logaddexp(0, -logits)  # log σ in float64: exact where σ itself underflows
    p = np.exp(log_s - log_s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(aux["lb_loss"], cfg.n_experts * np.sum(f * p), rtol=1e-5)

    graphdef, state = nnx.split(far)

    g = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(x)[1]["lb_loss"]))(state)["router"][...]
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0


def test_sigmoid_router_weights_sum_to_one_for_very_negative_logits():
    """Renormalised sigmoid weights s_k / Σ s (float64, in log space) for a router whose every logit is far below 0:
    s / (Σ s + 1e-20) shrank them once Σ s neared the epsilon (logits ~-45: 0.67 + 0.25) and zeroed them below ~-88
    (the token lost its routed output and the router its task gradient)."""
    logits = np.array([[0.5, -1.0, 2.0, -3.0, 1.0]]) + np.array([[0.0], [-30.0], [-45.0], [-60.0], [-100.0]])
    # the weights and their gradient in one program (eagerly each op compiled on its own)
    weights = lambda lg: route(lg, jnp.zeros(5), 3, "sigmoid")[:2]  # noqa: E731
    (w, sel), g = jax.jit(lambda lg: (weights(lg), jax.grad(lambda lg: jnp.sum(weights(lg)[0] * jnp.arange(3.0)))(
        lg)))(logits.astype(np.float32))
    log_s = np.take_along_axis(-np.logaddexp(0, -logits), np.asarray(sel), -1)
    want = np.exp(log_s - log_s.max(-1, keepdims=True))
    np.testing.assert_allclose(w, want / want.sum(-1, keepdims=True), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.abs(np.asarray(g)).max(-1) > 0.1)  # every token learns


def test_mixtral_lb_loss_is_k_times_hf_and_layer_matches_hf():
    """Hugging Face Mixtral: our layer equals MixtralSparseMoeBlock on the same weights, and HF's
    load_balancing_loss_func is K × ours (the documented anchor difference)."""
    import torch  # the test extra: installed by requirements.lock, so a broken install fails rather than skips
    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral as hf

    E, K, F = 8, 2, 24
    hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
    block = hf.MixtralSparseMoeBlock(hf_cfg).float().eval()
    torch.manual_seed(0)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    # one gmm tile size: the layer equals HF's whatever the tiles (the default tiles: test_path_equals_dense_reference)
    m = build(lambda: MoE(D, MoEConfig(n_experts=E, top_k=K, expert_mlp_dim=F, gmm_tile_rows=(8,)), rngs=nnx.Rngs(0)))
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
    m.router[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
    m.w_gate[...] = jnp.asarray(gate_up[:, :F].transpose(0, 2, 1))
    m.w_up[...] = jnp.asarray(gate_up[:, F:].transpose(0, 2, 1))
    m.w_down[...] = jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1))
    x = np.array(tokens(2, 10))  # a writable copy: torch.from_numpy warns on read-only arrays
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
        logits = block.gate(torch.from_numpy(x))[0]
        hf_lb = float(hf.load_balancing_loss_func((logits,), E, K))
    y, aux = jitted(m)(jnp.asarray(x))
    np.testing.assert_allclose(y, want, atol=2e-5)
    np.testing.assert_allclose(K * aux["lb_loss"], hf_lb, rtol=1e-5)


def test_router_bias_update_balances_a_skewed_router():
    E, K, T = 8, 2, 512
    # expert 0 favoured; every step below one program (eagerly each op compiled on its own), read in numpy
    logits = jax.jit(lambda: jax.random.normal(jax.random.key(0), (T, E)) + jnp.linspace(2.0, -2.0, E))()
    entropy = lambda load: -float(np.sum(load * np.log(load + 1e-9)))  # noqa: E731

    @jax.jit
    def step(bias):
        load = expert_load(route(logits, bias, K, router="sigmoid")[1], E)
        return load, update_router_bias(bias, load, rate=0.01)

    bias = np.zeros(E, np.float32)
    loads = []
    for _ in range(60):
        load, bias = step(bias)
        loads.append(np.asarray(load))
    bias = np.asarray(bias)
    assert float(loads[0].max()) > 0.3 and float(loads[-1].max()) < 0.75 * float(loads[0].max())
    assert entropy(loads[-1]) > entropy(loads[0]) + 0.3
    assert float(bias[0]) < 0 < float(bias[-1])  # overloaded expert pushed down, starved one pulled up

    # the bias changes the selection only: each chosen expert's weight is its own (renormalised) score
    @jax.jit
    def weights(bias):
        w, sel, probs = route(logits, bias, K, router="sigmoid")
        w_raw, sel_raw, _ = route(logits, bias, K, router="sigmoid", renormalize=False)
        return w, sel, jnp.take_along_axis(probs, sel, -1), w_raw, sel_raw

    w, sel, chosen, w_raw, sel_raw = (np.asarray(a) for a in weights(bias))
    np.testing.assert_allclose(w, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(sel_raw, sel)
    np.testing.assert_allclose(w_raw, chosen, rtol=1e-6)


def test_jitter_only_with_rng_and_bf16_close_to_f32():
    cfg = dataclasses.replace(CFG, router_jitter=0.2)
    m, x = make(cfg), tokens()
    x = x.astype(jnp.bfloat16).astype(jnp.float32)  # representable in bf16: identical routing in both dtypes
    y, aux = jitted(m)(x)  # no rng: no jitter
    y_jit, _ = jitted(m, rng=jax.random.key(3))(x)
    assert not np.allclose(y_jit, y, atol=1e-4)
    y16, aux16 = jitted(m, compute_dtype=jnp.bfloat16)(x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(aux16["lb_loss"], aux["lb_loss"], rtol=1e-6)  # the router stays float32
    err = float(np.linalg.norm(np.asarray(y16, np.float32) - np.asarray(y)) / np.linalg.norm(y))
    assert err < 2e-2, err


def test_jitter_multiplies_the_router_input_by_a_factor_centred_on_one():
    """Switch jitter draws the router input's factor from U(1 - j, 1 + j), so it pushes a token either way. Routing
    that ties at factor 1 (router [1, -1] on a 1-d input of 1, a bias cancelling expert 0's lead) sends a token to
    expert 0 exactly when its factor is above 1: about half of them. A factor drawn from [1, 1 + j) sent all of them
    there and passed every test (they only asked that the jitter changes the output)."""
    cfg = MoEConfig(n_experts=2, top_k=1, expert_mlp_dim=4, renormalize=False, router_jitter=0.3)

    def fn():
        m = MoE(1, cfg, rngs=nnx.Rngs(0))
        m.router[...] = jnp.array([[1.0, -1.0]])
        m.router_bias[...] = jnp.array([jax.nn.sigmoid(-2.0) - jax.nn.sigmoid(2.0), 0.0])
        return m

    m = build(fn)
    _, aux = jitted(m, rng=jax.random.key(0))(jnp.ones((1, 4000, 1)))
    assert abs(float(aux["load"][0]) - 0.5) < 0.05, aux["load"]


def test_jitter_draws_a_factor_per_router_input_element():
    """Switch (and transformers' Switch / Mixtral jitter_noise) multiply the router input elementwise by
    U(1 - j, 1 + j). Router = identity on a 2-d input [1, 1]: logits (u0, u1) tie without jitter, so a token goes to
    expert 0 exactly when u0 > u1: half of them. One factor per token (u, u) keeps the tie (expert 0 always) and
    passed every jitter test."""
    cfg = MoEConfig(n_experts=2, top_k=1, expert_mlp_dim=4, renormalize=False, router_jitter=0.3)

    def fn():
        m = MoE(2, cfg, rngs=nnx.Rngs(0))
        m.router[...] = jnp.eye(2)
        return m

    _, aux = jitted(build(fn), rng=jax.random.key(0))(jnp.ones((1, 4000, 2)))
    assert abs(float(aux["load"][0]) - 0.5) < 0.05, aux["load"]


def test_stacked_layers_under_scan_and_remat_equal_unrolled():
    """The integration pattern: a vmap-created stack of MoE layers run by lax.scan under jax.checkpoint."""
    # 4 experts, not CFG's 8: gmm unrolls its loop over experts (and its tile loops) in every layer, forward and
    # backward (8 took 1.8x the time); the transforms under test do not depend on the count
    L, cfg = 2, dataclasses.replace(CFG, n_experts=4, dropless_impl="gmm")

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stack(r):
        return MoE(D, cfg, rngs=r)

    graphdef, state = nnx.split(build(lambda: make_stack(nnx.Rngs(0))))
    x = tokens(B=2, T=8)

    def layer(h, st):
        y, aux = nnx.merge(graphdef, st)(h)
        return h + y, aux

    def scanned(state, x):
        h, aux = jax.lax.scan(jax.checkpoint(layer), x, state)
        return probe(h) + aux["lb_loss"].sum(), aux

    def unrolled(state, x):
        auxes = []
        for i in range(L):
            x, aux = layer(x, jax.tree.map(lambda a, i=i: a[i], state))
            auxes.append(aux)
        return probe(x) + sum(a["lb_loss"] for a in auxes), auxes

    (v1, aux1), g1 = jax.jit(jax.value_and_grad(scanned, has_aux=True))(state, x)
    (v2, aux2), g2 = jax.jit(jax.value_and_grad(unrolled, has_aux=True))(state, x)
    assert aux1["load"].shape == (L, cfg.n_experts)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(aux1["z_loss"], [a["z_loss"] for a in aux2], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_config_validation_and_accounting():
    for bad, field in [(dict(top_k=9), "top_k"), (dict(router="relu"), "router"), (dict(dispatch="x"), "dispatch"),
                       (dict(dropless_impl="x"), "dropless_impl"), (dict(capacity_factor=0), "capacity_factor"),
                       (dict(router_jitter=1.0), "router_jitter"), (dict(mlp_act="relu"), "mlp_act"),
                       (dict(mlp_act=["silu"]), "mlp_act"),  # "unhashable type: list", unnamed
                       (dict(top_k=2.0), "top_k"), (dict(n_experts=8.0), "n_experts"),
                       (dict(n_shared_experts=1.0), "n_shared_experts"),
                       # an inf overflowed in capacity(), a string or None failed unnamed, "no" meant True
                       (dict(capacity_factor=float("inf")), "capacity_factor"), (dict(lb_loss_weight=np.inf),
                                                                                 "lb_loss_weight"),
                       (dict(capacity_factor="2"), "capacity_factor"), (dict(bias_update_rate=None),
                                                                         "bias_update_rate"),
                       (dict(renormalize="no"), "renormalize"),
                       *((dict(gmm_tile_rows=t), "gmm_tile_rows") for t in ((), (128, 96), (32, 64), (64, 0), 128))]:
        with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
            MoEConfig(**bad)
    assert MoEConfig(gmm_tile_rows=[512, 128]).gmm_tile_rows == (512, 128)  # a JSON list: a hashable tuple
    # numpy scalars from a sweep are stored as plain values: the trainer's checkpoint writes the config as JSON
    swept = MoEConfig(capacity_factor=np.float32(1.5), renormalize=np.bool_(False), router_jitter=np.float64(0.1))
    assert json.loads(json.dumps(dataclasses.asdict(swept))) == dataclasses.asdict(swept)
    assert swept.renormalize is False and type(swept.capacity_factor) is float
    # one tile loop per usable size: default (64, 32, 16, 8) here; (256, 16, 4) uses 16 and 4 (256 > the padded rows)
    for tiles, loops in ((None, 4), ((256, 16, 4), 2)):
        layer = make(dataclasses.replace(CFG, dropless_impl="gmm", gmm_tile_rows=tiles))
        jaxpr = str(jax.make_jaxpr(lambda x, layer=layer: layer(x)[0])(tokens()))
        assert jaxpr.count("while[") == loops, (tiles, jaxpr.count("while["))
    # the selection bias stays float32 under bf16 params: its ±1e-3 steps would round away at |bias| >= 0.5
    assert MoE(D, CFG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).router_bias.dtype == jnp.float32
    cfg = CASES["deepseek-gmm"][0]
    for c in (CFG, cfg):
        assert c.param_count(D) == sum(v.size for v in jax.tree.leaves(nnx.state(nnx.eval_shape(
            lambda c=c: MoE(D, c, rngs=nnx.Rngs(0))))))
    assert CFG.active_params_per_token(D) == D * 8 + 3 * D * 2 * 24
    assert cfg.active_params_per_token(D) == D * 16 + 3 * D * (4 * 8 + 2 * 8)
    assert CFG.capacity(256) == 80 and CFG.capacity(3) == 1
    assert dataclasses.replace(CFG, capacity_factor=100).capacity(5) == 5  # never more than T


EP_CASES = {  # name: (mesh, dispatch changes); all with one shared expert
    "capacity_expert4_data2": ({"expert": 4, "data": 2}, dict(dispatch="capacity", capacity_factor=1.0)),
    "dropless_expert8": ({"expert": 8}, dict(dispatch="dropless")),
    "gmm_data4_fsdp2": ({"data": 4, "fsdp": 2}, dict(dispatch="dropless", dropless_impl="gmm")),
    # what 'auto' picks on GPU / TPU: ragged_dot under the row groups' vmap was a NotImplementedError
    "ragged_dot_data4_fsdp2": ({"data": 4, "fsdp": 2}, dict(dispatch="dropless", dropless_impl="ragged_dot")),
}
EP_CFG = dataclasses.replace(CFG, n_shared_experts=1)


def ep_loss(graphdef):
    def f(st, x):
        y, aux = nnx.merge(graphdef, st)(x)
        return probe(y) + aux["lb_loss"] + aux["z_loss"], aux

    return jax.jit(jax.value_and_grad(f, has_aux=True))


@functools.cache
def ep_single_device(dispatch):
    """Single-device (loss, aux), grads per dispatch mode (dropless implementations share one)."""
    graphdef, state = nnx.split(make(dataclasses.replace(EP_CFG, dispatch=dispatch, capacity_factor=1.0)))
    return ep_loss(graphdef)(state, tokens(B=8, T=12))


@pytest.mark.parametrize("name", list(EP_CASES))
def test_expert_parallel_equals_single_device(name):
    shape, change = EP_CASES[name]
    cfg = dataclasses.replace(EP_CFG, **change)
    (v0, aux0), g0 = ep_single_device(cfg.dispatch)
    mesh = make_mesh(shape)
    graphdef, state = nnx.split(make(cfg))
    state = shard_state(state, mesh)  # by the rules table: experts over `expert`, embed over `fsdp`
    with jax.set_mesh(mesh):
        xs = shard_batch(tokens(B=8, T=12), mesh)
        compiled = ep_loss(graphdef).lower(state, xs).compile()
        (v1, aux1), g1 = compiled(state, xs)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for k in aux0:
        np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-5), g1, g0)
    hlo = compiled.as_text()
    if "expert" in shape:  # experts stay sharded; tokens travel by all-to-all, nothing is replicated by all-gather
        assert state["w_gate"][...].addressable_shards[0].data.shape[0] == cfg.n_experts // shape["expert"]
        assert len(re.findall(r"all-to-all\(", hlo)) >= 2, "to the experts and back"
        assert "all-gather" not in hlo
    if cfg.dispatch == "capacity":
        assert float(aux0["dropped_frac"]) > 0  # the capacity path really dropped tokens here


@pytest.mark.parametrize("path", ["expert_swiglu", "ragged_dot"])
def test_batched_expert_paths_keep_gate_up_and_their_product_only(path):
    """expert_swiglu (capacity dispatch, the 'blocks' path) and the ragged_dot path (the GPU / TPU dropless default) go
    through `glu`: their backward keeps gate, up and the product [..., F], not act's intermediates (autodiff of
    silu(a)·b also kept σ(a) and silu(a); the capacity MoE trainer step's temp memory 563 -> 444 MiB, 0.99x the
    time)."""
    from jax._src.ad_checkpoint import saved_residuals

    from models.moe_dispatch import expert_swiglu, sorted_ragged

    E, r, D, F = 3, 5, 8, 12
    ks = jax.random.split(jax.random.key(0), 4)
    w = (jax.random.normal(ks[1], (E, D, F)), jax.random.normal(ks[2], (E, D, F)), jax.random.normal(ks[3], (E, F, D)))
    if path == "expert_swiglu":
        x, rows_F = jax.random.normal(ks[0], (E, r, D)), (E, r, F)
        f = lambda x, w: expert_swiglu(x, w, jax.nn.silu).sum()  # noqa: E731
    else:  # 7 tokens, top-2: 14 expert-sorted rows
        x, rows_F = jax.random.normal(ks[0], (7, D)), (14, F)
        experts, weights = jnp.asarray(np.arange(14).reshape(7, 2) % E), jnp.full((7, 2), 0.5)
        f = lambda x, w: sorted_ragged(x, weights, experts, w, jax.nn.silu).sum()  # noqa: E731
    saved = [a.shape for a, _ in saved_residuals(f, x, w)]
    assert saved.count(rows_F) == 3, saved


def test_dropless_paths_at_the_padded_rows_bound():
    """Every expert's run one row past a tile boundary (9, 1, 1, 1 rows in tiles of 8) fills the static bound
    (ceil(A / b) + E - 1)·b exactly; random routing never got there, and a bound one tile short passed every test
    (the last rows were dropped: errors of ~50)."""
    from models.moe_dispatch import block_layout, default_block_rows, dense_experts, sorted_blocks, sorted_gmm

    E, D, F = 4, 8, 16
    @jax.jit
    def draw():  # one program (eagerly each draw compiled on its own)
        keys = jax.random.split(jax.random.key(0), 4)
        return ((jax.random.normal(keys[0], (E, D, F)) / 3, jax.random.normal(keys[1], (E, D, F)) / 3,
                 jax.random.normal(keys[2], (E, F, D)) / 4), jax.random.normal(keys[3], (12, D)))

    w, x_ND = draw()
    experts_NK = np.array([0] * 9 + [1, 2, 3], np.int32)[:, None]
    weights_NK = np.full((12, 1), 0.7, np.float32)
    # each path under jit (eagerly every op of it compiled on its own)
    run = lambda f, **kw: jax.jit(lambda *a: f(*a, jax.nn.silu, **kw))(x_ND, weights_NK, experts_NK, w)  # noqa: E731
    want = run(dense_experts)
    np.testing.assert_allclose(run(sorted_gmm, tile_rows=(8,)), want, atol=1e-5)
    assert default_block_rows(12, E) == 8  # the same layout for the block-sparse path
    np.testing.assert_allclose(run(sorted_blocks), want, atol=1e-5)
    # a run of whole blocks or of none takes ceil(size / b) blocks: one block more each is padding computed for nothing
    sizes_E = np.array([8, 0, 3, 0])
    blocks_E = jax.jit(block_layout, static_argnums=(1, 2))(np.repeat(np.arange(E), sizes_E).astype(np.int32)[:, None],
                                                            E, 8)[2]
    np.testing.assert_array_equal(blocks_E, -(-sizes_E // 8))


def test_top1_router_learns_from_the_task_loss_only_without_renormalising():
    """Top-1 renormalised: the combine weight p/p is exactly 1, so the task loss gives the router no gradient
    (max |g| 7.5e-05 vs 2.7e3 measured); MoEConfig warns and names the Switch setting."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    grads = {}
    for renorm in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # one gmm tile size: the router's gradient does not depend on the tiles (each adds a loop to compile)
            cfg = MoEConfig(n_experts=4, top_k=1, expert_mlp_dim=8, renormalize=renorm, gmm_tile_rows=(8,))
        assert any("set renormalize=False" in str(w.message) for w in caught) == renorm
        m = build(lambda cfg=cfg: MoE(16, cfg, init_std=0.5, rngs=nnx.Rngs(0)))
        g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2)))(m)  # one program (eager: ~140 op compiles)
        grads[renorm] = float(jnp.abs(g.router[...]).max())
    assert grads[True] < 1e-3 * grads[False], grads


def test_auto_dropless_takes_ragged_dot_on_accelerators_gmm_on_cpu_and_capacity_with_sharded_experts(monkeypatch):
    """dropless_impl='auto' as the issue and docs/parallelism.md state it: jax.lax.ragged_dot on GPU / TPU, the
    measured-fastest CPU kernel on CPU, capacity buffers with C = T when an `expert` axis splits the experts (a
    fixed-size all-to-all; no ragged all-to-all on CPU); an explicit choice is kept. Only the CPU pick was exercised."""
    from models.moe_dispatch import CPU_DROPLESS_IMPL, resolve_dropless_impl

    assert CPU_DROPLESS_IMPL == "gmm"  # docs/benchmarks.md: gmm 1.1-1.3x dense, ragged_dot 3.5-4.3x on CPU
    for backend, want in (("cpu", "gmm"), ("gpu", "ragged_dot"), ("tpu", "ragged_dot")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert resolve_dropless_impl("auto") == want, backend
        assert resolve_dropless_impl("dense") == "dense"
        with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
            assert resolve_dropless_impl("auto") == "capacity", backend
        with jax.set_mesh(make_mesh({"data": 2, "fsdp": 4})):  # experts whole on every device: sorted dispatch
            assert resolve_dropless_impl("auto") == want, backend


def test_explicit_dropless_impl_with_sharded_experts_warns_that_it_gathers_every_expert():
    """docs/parallelism.md said dropless dispatch with sharded experts runs as capacity dispatch (all-to-all, experts
    stay sharded); that is 'auto' only. An explicit 'gmm' (the benchmarks' CPU pick) on {data: 2, expert: 4} kept
    each device's 2 experts as arguments but all-gathered all 8 per layer ([8, 16, 24] per weight, no all-to-all),
    silently: it now warns, naming the field and the fix. 'auto' and 'capacity' stay silent. Experts whole with their
    mlp dimension split ({data: 2, tensor: 4}): 'gmm' and 'dense' gather no weight ('dense' all-gathered all three
    expert weights per layer: its [D, E·F] reshape, F inner, lost the split)."""
    # one gmm tile size: the default four each add a tile loop per expert (this test's CPU time 5.4 -> 3.1 s); the
    # experts' weights are sliced once per expert whatever the tiles, so what is gathered is the same
    mesh, cfg = make_mesh({"data": 2, "expert": 4}), dataclasses.replace(CFG, gmm_tile_rows=(8,))
    for impl, warns in (("gmm", True), ("auto", False), ("capacity", False)):
        graphdef, state = nnx.split(make(dataclasses.replace(cfg, dropless_impl=impl)))
        state = shard_state(state, mesh)
        with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hlo = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x)[0]).lower(
                state, shard_batch(tokens(B=8), mesh)).compile().as_text()
        said = [str(w.message) for w in caught if "dropless_impl" in str(w.message)]
        assert bool(said) == warns, (impl, said)
        gathered = re.findall(r"f32\[8,16,24\][^ ]* all-gather\(", hlo)  # every expert's gate or up weight
        assert bool(gathered) == warns, (impl, gathered)
        if warns:
            assert "'auto'" in said[0] and "expert" in said[0]
    # experts split over `tensor` (their mlp dimension) stay split through dropless dispatch: nothing is gathered
    mesh = make_mesh({"data": 2, "tensor": 4})
    for impl in ("gmm", "dense"):
        m = make(dataclasses.replace(cfg, dropless_impl=impl))
        graphdef, state = nnx.split(m)
        state = shard_state(state, mesh)
        with jax.set_mesh(mesh):
            compiled = jax.jit(lambda st, x, g=graphdef: nnx.merge(g, st)(x)[0]).lower(
                state, xs := shard_batch(tokens(B=8), mesh)).compile()
            np.testing.assert_allclose(compiled(state, xs), jitted(m)(tokens(B=8))[0], atol=1e-5, err_msg=impl)
        assert state["w_gate"][...].sharding.spec == jax.P(None, None, "tensor")
        assert re.findall(r"\S+ all-gather\(", compiled.as_text()) == [], impl


def test_dropless_rows_the_mesh_cannot_split_run_as_one_group_in_decode():
    """Decoding under `replicate_indivisible` (the Transformer's KV-cache path): B = 1 on {data: 8}, and T = 3 on
    {data: 2, sequence: 4}, do not divide their mesh axes, so dropless dispatch groups those rows whole (one group;
    two batch groups) instead of reshaping B = 1 into 8 groups of 0 rows. Equal to one device."""
    from parallel.rules import replicate_indivisible

    m = make(CFG)
    for shape, (B, T) in (({"data": 8}, (1, 12)), ({"data": 2, "sequence": 4}, (2, 3))):
        x = tokens(B=B, T=T)
        want = jitted(m)(x)[0]
        with jax.set_mesh(make_mesh(shape)), replicate_indivisible():
            np.testing.assert_allclose(jitted(m)(x)[0], want, atol=1e-6, err_msg=str(shape))


def test_capacity_is_the_exact_ceiling_of_k_t_cf_over_e():
    """ceil(K·T·CF / E) in floats took a slot more whenever the product was whole: 1·100·1.1 / 2 = 55.000000000000007
    gave 56 (a review swept 311 such cases). Against exact fractions, and the accounting uses the same count."""
    from fractions import Fraction

    from models import TransformerConfig
    from scaling.flops import executed_slots, lm_shape

    for E, K, cf, T in [(2, 1, 1.1, 100), (3, 2, 1.1, 45), (8, 2, 1.25, 64), (4, 1, 0.7, 10), (64, 4, 2.0, 256)]:
        cfg = MoEConfig(n_experts=E, top_k=K, expert_mlp_dim=8, capacity_factor=cf, dispatch="capacity")
        want = max(1, min(T, -(-Fraction(K * T) * Fraction(str(cf)) // E)))
        assert cfg.capacity(T) == want, (E, K, cf, T)
    dense = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64,
                              moe=MoEConfig(n_experts=2, top_k=1, expert_mlp_dim=8, capacity_factor=1.1,
                                            dispatch="capacity"))
    assert executed_slots(lm_shape(dense).moe, 100) == 2 * 55 / 100


def test_router_bias_update_moves_each_layer_against_its_own_mean_load():
    """update_router_bias on the trainer's per-layer loads [L_moe, E]: each layer's bias moves by the sign of its own
    mean load minus each expert's (numpy, per row). A mean over all layers passed every test (one MoE layer there),
    yet moves an expert of a layer whose loads all sit above the global mean down, everyone, never balancing it."""
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], np.float32)  # layer means 0.25 and 0.25
    load[1] *= 2  # layer 1 summed over 2 microbatches: mean 0.5, above every load of layer 0
    bias = np.array([[0.0, 0.1, -0.1, 0.2], [0.3, 0.0, 0.0, -0.3]], np.float32)
    want = bias + 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(update_router_bias(jnp.asarray(bias), jnp.asarray(load), 0.01), want, atol=1e-7)


def test_router_bias_update_refuses_a_load_that_would_reshape_the_bias():
    """One layer's bias [E] given the Transformer's per-layer load [L_moe, E] came back [L_moe, E] (each row moved by
    its own layer's load), silently; a stacked microbatch load [A, L_moe, E] grew the stacked bias the same way. A load
    that broadcasts to the bias's shape (a pooled [E] for the stacked [L_moe, E]) keeps working."""
    load = jnp.asarray([[0.4, 0.2, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]])
    wrong = ((jnp.zeros(4), load), (jnp.zeros((2, 4)), jnp.stack([load, load])), (jnp.zeros((2, 4)), load[0, :3]))
    for bias, ld in wrong:
        with pytest.raises(ValueError, match=r"update_router_bias: load .* does not match bias"):
            update_router_bias(bias, ld, 0.1)
    np.testing.assert_allclose(update_router_bias(jnp.zeros((2, 4)), load[0], 0.1), [[-0.1, 0.1, 0.1, 0.1]] * 2)


def test_top_k_equal_to_n_experts_is_a_valid_config_that_routes_every_expert():
    """top_k = n_experts (every expert on every token, weighted by the router: a soft mixture) is allowed, as the
    check's message says ("pick at most E"); only its refusal of top_k > E was tested. Against the float64 formula."""
    cfg = MoEConfig(n_experts=4, top_k=4, expert_mlp_dim=8, dropless_impl="dense")
    m, x = make(cfg), tokens(B=1, T=5)
    y, aux = jitted(m)(x)
    p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(m)).items()}
    xs = np.asarray(x, np.float64)[0]
    logits = xs @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # renormalised over all E: the softmax itself
    h = lambda e: (xs @ p["w_gate"][e]) / (1 + np.exp(-(xs @ p["w_gate"][e]))) * (xs @ p["w_up"][e])  # noqa: E731
    want = sum(probs[:, e, None] * (h(e) @ p["w_down"][e]) for e in range(4))
    np.testing.assert_allclose(y[0], want, atol=1e-5)
    np.testing.assert_allclose(aux["load"], np.full(4, 0.25), rtol=1e-6)


def test_aux_values_read_a_float_valid_mask_as_real_tokens():
    """valid_T given as float weights (0.5: a real token): every sum over real tokens and their count agree, so a
    balanced router's lb_loss is 1 and the z-loss the mean of logsumexp² (they read 2.0 and 2x, the count halved)."""
    E = 4
    probs, experts, logits = jnp.full((4, E), 1 / E), jnp.arange(4)[:, None], jnp.zeros((4, E))
    for v in (jnp.full(4, 0.5), jnp.array([0.5, 2.0, 0.0, 1.0])):
        real = np.asarray(v) != 0
        np.testing.assert_allclose(load_balancing_loss(probs, experts, E, v),
                                   load_balancing_loss(probs, experts, E, jnp.asarray(real)), rtol=1e-6)
        np.testing.assert_allclose(expert_load(experts, E, v), expert_load(experts, E, jnp.asarray(real)), rtol=1e-6)
        np.testing.assert_allclose(router_z_loss(logits, v), np.log(E) ** 2, rtol=1e-6)
    np.testing.assert_allclose(load_balancing_loss(probs, experts, E, jnp.full(4, 0.5)), 1.0, rtol=1e-6)


def test_z_loss_gradient_reaches_the_router_as_its_formula():
    """aux['z_loss'] = mean_n lse(x_n W)² must train the router: its gradient is (2 / N) Σ_n lse_n · x_n ⊗ softmax_n
    (float64 numpy). Only its value was tested: a z-loss read through stop_gradient (no gradient at all, the
    ST-MoE stabiliser silently off) passed every test."""
    m, x = make(CFG), tokens(B=2, T=6)
    graphdef, state = nnx.split(m)
    g = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(x)[1]["z_loss"]))(state)["router"][...]
    xs = np.asarray(x, np.float64).reshape(-1, D)
    logits = xs @ np.asarray(m.router[...], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = 2 / len(xs) * xs.T @ (lse[:, None] * np.exp(logits - lse[:, None]))
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_lb_loss_gradient_reaches_the_router_as_its_float64_finite_difference(router):
    """aux['lb_loss'] = E · Σ_e f_e · P_e trains the router through P_e (mean of the per-token normalised scores) only;
    f_e (the routing counts) is piecewise constant. Against central differences of the float64 formula in the
    router weights, the selection held fixed. Only the sigmoid gradient's finiteness was tested: the softmax
    router's balancing loss read through stop_gradient (no balancing at all, the layer free to collapse) passed the
    other 51 tests."""
    cfg = dataclasses.replace(CFG, router=router)
    m, x = make(cfg), tokens(B=2, T=6)
    graphdef, state = nnx.split(m)
    g = jax.jit(jax.grad(lambda st: nnx.merge(graphdef, st)(x)[1]["lb_loss"]))(state)["router"][...]
    xs = np.asarray(x, np.float64).reshape(-1, D)
    sel = np.asarray(jax.jit(lambda x, r, b: route(x.reshape(-1, D) @ r, b, cfg.top_k, router)[1])(  # (one program)
        x, m.router[...], m.router_bias[...]))
    f = np.bincount(sel.reshape(-1), minlength=cfg.n_experts) / sel.size

    def lb(w):
        logits = xs @ w
        s = np.exp(logits - logits.max(-1, keepdims=True)) if router == "softmax" else 1 / (1 + np.exp(-logits))
        return cfg.n_experts * np.sum(f * (s / s.sum(-1, keepdims=True)).mean(0))

    w0, eps = np.asarray(m.router[...], np.float64), 1e-6
    want = np.zeros_like(w0)
    for i in np.ndindex(w0.shape):
        step = np.zeros_like(w0)
        step[i] = eps
        want[i] = (lb(w0 + step) - lb(w0 - step)) / (2 * eps)
    assert np.abs(want).max() > 1e-2  # the routing is unbalanced: a real gradient to match
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_capacity_dispatch_runs_under_strict_dtype_promotion():
    """jax_numpy_dtype_promotion='strict' (researchers' dtype check): the dropped fraction multiplied a float32
    mask by a bool one, a TypePromotionError in every capacity layer's forward."""
    cfg = MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=8, dispatch="capacity", capacity_factor=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    graphdef, state = nnx.split(build(lambda: MoE(D, cfg, rngs=nnx.Rngs(0))))
    want = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)  # one program each (eagerly: one per op)
    with jax.numpy_dtype_promotion("strict"):
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_route_takes_its_bias_under_rank_promotion_raise():
    """route's router bias [E] was added to the [B, T, E] probabilities by an implicit rank promotion, an error
    under jax_numpy_rank_promotion='raise' in every MoE layer."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 4))
    bias = jnp.array([0.0, 1.0, 0.0, -1.0])
    want = route(logits, bias, 2, "sigmoid")
    with jax.numpy_rank_promotion("raise"):
        got = route(logits, bias, 2, "sigmoid")
    jax.tree.map(np.testing.assert_array_equal, got, want)
