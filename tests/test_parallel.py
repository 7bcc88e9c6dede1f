"""Each parallelism strategy, chosen by mesh shape alone, equals the single-device train step."""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.lm_step import lm_loss, make_optimizer, make_train_step
from models import Transformer, TransformerConfig
from parallel import abstract_sharded, create_sharded, init_optimizer, make_mesh, shard_batch, shard_state, use_rules

# attn_block=8: two query blocks of the block-causal kernel at T = 16, sliced along a sharded sequence axis; q / k
# norms over heads the tensor axis splits
CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=64, qkv_bias=True,
                        attn_block=8, qk_norm=True)
# no warmup: with warmup_steps=1 the first update's lr is 0, and the 'updated' parameters the strategies were
# compared on were the initial ones, bit for bit
OPT = make_optimizer(1e-2, total_steps=10, warmup_steps=0)


def batch():
    """Two packed documents per row, split at a different place in every row: segment ids and positions differ
    per row, so a pipeline stage that read another microbatch's context would be caught."""
    tok = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(8, 17)).astype(np.int32)
    t = np.arange(16)
    split = np.arange(8)[:, None] + 4  # row r: a document of r + 4 tokens, then another
    seg = np.where(t < split, 1, 2).astype(np.int32)
    pos = np.where(t < split, t, t - split).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg, "positions": pos}


def two_steps(graphdef, params, b):
    """(loss, grads, params after two AdamW steps on b: the second reads the moments the first left)."""
    loss, grads = jax.jit(jax.value_and_grad(lambda p: lm_loss(graphdef, p, b)))(params)
    # sharded like the params, as the step returns it (a replicated state compiled the step again for the second)
    opt_state = init_optimizer(OPT, params)
    step = make_train_step(graphdef, OPT)
    # the step donates its params: a copy made by one program (eagerly, each leaf's copy compiled its own: 12 a mesh)
    copied = jax.jit(lambda p: jax.tree.map(jax.numpy.copy, p))(params)
    new_params, opt_state, _ = step(copied, opt_state, b)
    new_params, _, _ = step(new_params, opt_state, b)
    return loss, grads, new_params


def placed(cfg, mesh, graphdef_params=None):
    """(graphdef, params) of Transformer(cfg, rngs=nnx.Rngs(0)) (or of the plain `graphdef_params` given) placed on
    `mesh` by the rules: create_sharded's placements, with no init compiled for each mesh."""
    graphdef, params = graphdef_params or nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    # from host copies: a device array put on a mesh compiles a slicing program per leaf shape and sharding
    return graphdef, shard_state(jax.device_get(params), mesh)


def assert_same_grads(grads, ref_grads):
    """Each leaf within 1e-4 of its own largest reference gradient: the summation-order noise is <= ~1e-6 of it on
    every mesh (measured: 8e-7, 1.05e-6 on the OLMo 2 tensor split), and a flat atol=1e-5 let a norm scale's gradient
    (largest 3e-4) be 3% wrong on one mesh (Adam's steps, scale-invariant, cannot see it). strict: the trees' leaves
    pair up one to one (jax.tree.map checked that; a plain zip stops at the shorter)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-4 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


def assert_same_step(out, ref):
    """Loss within 1e-5, gradients as `assert_same_grads`; parameters within 1e-4. Adam divides each gradient by its
    own running magnitude, so the ~2e-8 summation-order noise of a near-zero gradient moves its parameter by up to
    ~2e-5 in two steps of lr 1e-2 (measured on every mesh); a step gone wrong moves parameters by ~lr."""
    (loss, grads, new_params), (ref_loss, ref_grads, ref_params) = out, ref
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_same_grads(grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-4), new_params, ref_params)


@pytest.fixture(scope="module")
def reference():
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    return jax.device_get(two_steps(graphdef, params, batch()))


MESHES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tp": {"data": 4, "tensor": 2},
    "sp": {"data": 2, "sequence": 4},
    "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
    "pp": {"stage": 4, "data": 2},  # GPipe: 4 stages x 1 layer, 2 microbatches
    "pp_fsdp": {"stage": 2, "fsdp": 4},
}


@pytest.mark.parametrize("name", list(MESHES))
def test_strategy_equals_single_device(name, reference):
    mesh = make_mesh(MESHES[name])
    cfg = dataclasses.replace(CFG, pipeline_microbatches=2)  # only read when the mesh has a stage axis
    graphdef, params = placed(cfg, mesh)
    if "stage" in mesh.shape:  # each stage holds its own layers
        wq = params["blocks"]["wq"][...]
        assert wq.addressable_shards[0].data.shape[0] == CFG.n_layers // mesh.shape["stage"]
    if "fsdp" in mesh.shape:  # each device holds 1 / fsdp of a weight's d_model (equal values alone: replicated passes)
        wq = params["blocks"]["wq"][...]
        assert wq.addressable_shards[0].data.shape[1] == CFG.d_model // mesh.shape["fsdp"]
    with jax.set_mesh(mesh):
        out = two_steps(graphdef, params, shard_batch(batch(), mesh))
    assert_same_step(out, reference)
    # the steps leave each parameter placed as it came (a step that gathered FSDP's weights kept them whole)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[2]), jax.tree.leaves(params)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (jax.tree_util.keystr(path), a.sharding, b.sharding)


def test_pipeline_with_sliding_window_layers_equals_single_device():
    """The sliding-window kernel's backward built its primal with jnp.zeros, which varies over no mesh axis: inside
    gpipe's shard_map over `stage`, jax.vjp refused the cotangent (typed float32[...]{V:stage}), so no model with
    local layers could train on a pipeline mesh."""
    cfg = dataclasses.replace(CFG, attn_pattern="alternating", sliding_window=5, swa_block=8, pipeline_microbatches=2)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ref = jax.device_get(two_steps(graphdef, params, batch()))
    mesh = make_mesh({"stage": 2, "data": 4})
    graphdef, params = placed(cfg, mesh, (graphdef, params))
    with jax.set_mesh(mesh):
        out = two_steps(graphdef, params, shard_batch(batch(), mesh))
    assert_same_step(out, ref)


@pytest.mark.parametrize("shape", [{"stage": 2}, {"stage": 2, "data": 1, "tensor": 1}])
def test_pipeline_over_stage_alone_with_sliding_window_layers_equals_single_device(shape):
    """On a mesh of `stage` alone (what bf16 on XLA:CPU must use; size-1 axes are manual too) every axis is manual
    inside gpipe's shard_map, and the sliding-window kernel's constrain_leading passed P.UNCONSTRAINED there, which
    jax refuses ("cannot contain `P.UNCONSTRAINED` when no mesh axis_types are `Auto`"): no model with local layers
    ran. Loss and gradients of one device."""
    cfg = dataclasses.replace(CFG, attn_pattern="alternating", sliding_window=5, swa_block=8, pipeline_microbatches=2)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    grad = lambda gd: jax.jit(jax.value_and_grad(lambda p, b: lm_loss(gd, p, b)))  # noqa: E731
    ref_loss, ref_grads = jax.device_get(grad(graphdef)(params, batch()))
    mesh = make_mesh(shape, devices=jax.devices()[:2])
    graphdef, params = placed(cfg, mesh, (graphdef, params))
    with jax.set_mesh(mesh):
        loss, grads = grad(graphdef)(params, shard_batch(batch(), mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_same_grads(grads, ref_grads)


def test_per_example_gradients_by_vmap_through_a_pipeline_over_stage_alone_equal_single_device():
    """jax.vmap(jax.grad(loss)) over the rows (per-example gradients) on a mesh of `stage` alone: inside gpipe's
    shard_map every axis is manual, and vmap batched the model's activation constraints into P.UNCONSTRAINED, which
    jax refuses there ("cannot contain `P.UNCONSTRAINED` when no mesh axis_types are `Auto`"). On rows split over
    'data' the batch of 1 each call sees was refused telling to use a multiple of 4 rows (there were 4).
    Against one device."""
    from models.losses import cross_entropy

    cfg = dataclasses.replace(CFG, n_layers=2)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    b = batch()
    tok, seg = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)[:4], b["segment_ids"][:4]

    def per_example(gd):
        def loss(p, t, s):
            return cross_entropy(nnx.merge(gd, p)(t[None, :-1], segment_ids_BT=s[None]), t[None, 1:])[0]
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))

    ref = jax.device_get(per_example(graphdef)(params, tok, seg))
    mesh = make_mesh({"stage": 2}, devices=jax.devices()[:2])
    gd, placed_params = placed(cfg, mesh, (graphdef, params))
    with jax.set_mesh(mesh):
        grads = per_example(gd)(placed_params, tok, seg)
    assert_same_grads(grads, ref)
    # rows split over 'data': each vmapped call sees a batch of 1, which the error now says how to run
    mesh = make_mesh({"data": 4}, devices=jax.devices()[:4])
    gd, placed_params = placed(cfg, mesh, (graphdef, params))
    rows = shard_batch({"t": tok, "s": seg}, mesh)
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"'batch' of size 1 does not divide.*use_rules\(batch=None\)"):
            per_example(gd)(placed_params, rows["t"], rows["s"])
        with use_rules(batch=None):
            grads = per_example(gd)(placed_params, rows["t"], rows["s"])
    assert_same_grads(grads, ref)


def test_olmo2_block_with_heads_split_over_tensor_equals_single_device():
    """OLMo 2's block (no pre-norms, post-norms, q / k norms over all heads): with the heads split over `tensor`, the
    [N, H] / [K, H] norm scales are split with them and each token's mean of squares spans the shards. Loss and
    gradients (AdamW's steps are the other test's) on a data x sequence x tensor mesh against one device."""
    cfg = dataclasses.replace(CFG, pre_norms=False, post_norms=True, qk_norm_scope="all_heads")
    grad = lambda gd: jax.jit(jax.value_and_grad(lambda p, b: lm_loss(gd, p, b)))  # noqa: E731
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ref_loss, ref_grads = jax.device_get(grad(graphdef)(params, batch()))
    mesh = make_mesh({"data": 2, "sequence": 2, "tensor": 2})
    graphdef, params = placed(cfg, mesh, (graphdef, params))
    assert params["blocks"]["q_norm"][...].addressable_shards[0].data.shape == (4, 2, 8)  # [L, N / 2, H]
    with jax.set_mesh(mesh):
        loss, grads = grad(graphdef)(params, shard_batch(batch(), mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_same_grads(grads, ref_grads)


def device0_bytes(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device.id == 0)


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state():
    mesh = make_mesh({"fsdp": 8})
    graphdef, params = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        opt_state = init_optimizer(OPT, params)
    for tree in (params, opt_state):
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        # norm scales stay replicated by rule ("norm" -> None): a few hundred bytes of rounding
        assert abs(device0_bytes(tree) - total / 8) < 0.02 * total, (device0_bytes(tree), total)


def test_init_optimizer_on_unsharded_params_and_no_scan_pipeline_refused():
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))  # plain single-device arrays
    ref = jax.jit(OPT.init)(params)
    jax.tree.map(np.testing.assert_array_equal, init_optimizer(OPT, params), ref)
    with pytest.raises(ValueError, match="params holds no arrays"):
        init_optimizer(OPT, {})
    # without the scanned stack the layers would only be sharded over 'stage', every device running every layer
    cfg = dataclasses.replace(CFG, scan_layers=False, pipeline_microbatches=2)
    mesh = make_mesh({"stage": 2, "data": 4})
    # only traced (eval_shape): shapes and shardings, no init compiled
    gd, p = abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="scan_layers=False under pipeline parallelism"):
        jax.eval_shape(lambda p, t: nnx.merge(gd, p)(t), p, jax.ShapeDtypeStruct((8, 16), jax.numpy.int32))
    # 8 rows in 4 microbatches of 2 cannot split over data=4: named, not an XLA sharding error
    cfg = dataclasses.replace(CFG, pipeline_microbatches=4)
    gd, p = abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="pipeline_microbatches=4: a batch of 8 rows"):
        jax.eval_shape(lambda p, t: nnx.merge(gd, p)(t), p, jax.ShapeDtypeStruct((8, 16), jax.numpy.int32))
    # 4 rows over data=4: the fix read "use a divisor of 1 microbatches"
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"axes \(4\); use a divisor of 1 as the microbatch count"):
        jax.eval_shape(lambda p, t: nnx.merge(gd, p)(t), p, jax.ShapeDtypeStruct((4, 16), jax.numpy.int32))


def collectives(hlo: str):
    pat = re.compile(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")
    return [m.groups() for m in pat.finditer(hlo)]


def test_tensor_parallel_is_megatron_shaped():
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, mlp_dim=64)
    mesh = make_mesh({"tensor": 8})
    # compiled, not run: the parameters' shapes and shardings, no init compiled
    graphdef, params = abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    tok = jax.numpy.zeros((2, 16), jax.numpy.int32)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)).lower(params, tok).compile().as_text()
    ops = collectives(hlo)
    # one all-reduce of the [B·T, D] activations after attention and one after the MLP (scan body);
    # the only all-gather is the embedding table for the lookup; no weight is ever replicated
    assert [s for s, op in ops if op == "all-reduce"] == ["f32[32,32]{1,0}"] * 2, ops
    assert [s for s, op in ops if op == "all-gather"] == ["f32[64,32]{1,0}"], ops
    wq = params["blocks"]["wq"].get_value()  # a ShapeDtypeStruct with its sharding
    assert wq.sharding.shard_shape(wq.shape) == (2, 32, 1, 4)


def test_pipeline_bubbles_do_not_poison_gradients_and_cpu_bf16_is_refused():
    """RMSNorm with eps 0 is NaN on a zero row: the pipeline's idle ticks must not compute on zeros (their
    Jacobians are multiplied by 0 in the backward, and 0 x NaN poisoned every layer's gradient)."""
    cfg = dataclasses.replace(CFG, norm_eps=0.0, pipeline_microbatches=2)
    b = batch()
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: lm_loss(graphdef, p, b)))(params)
    mesh = make_mesh({"stage": 2, "data": 4})
    gd, on_mesh = placed(cfg, mesh, (graphdef, params))
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    gd16 = nnx.graphdef(nnx.eval_shape(lambda: Transformer(bf16, rngs=nnx.Rngs(0))))
    gdp = nnx.graphdef(nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, param_dtype="bfloat16"),
                                                          rngs=nnx.Rngs(0))))
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: lm_loss(gd, p, b)))(on_mesh, shard_batch(b, mesh))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert_same_grads(grads, ref_grads)
        # bfloat16 with other mesh axes would abort the process in XLA:CPU: a Python error instead, naming which
        # setting is bfloat16 (it told bf16 parameters under float32 compute to "compute in float32")
        p16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.bfloat16, sharding=x.sharding), on_mesh)
        for g, p, says in ((gd16, on_mesh, r"bfloat16 activations \(TransformerConfig.dtype\)"),
                           (gdp, p16, r"bfloat16 parameters \(TransformerConfig.param_dtype\)")):
            with pytest.raises(ValueError, match="bfloat16 pipeline parallelism with other mesh axes.*" + says):
                jax.jit(lambda p, b, g=g: lm_loss(g, p, b)).lower(p, shard_batch(b, mesh))


def test_pipeline_idle_ticks_do_not_poison_gradients_through_filler():
    """Before tick s, stage s > 0 holds no activation of its depth, only filler (the batch itself): a layer finite on
    every real activation but NaN there (sqrt(h + b), its real inputs made positive by the stage before) turned the
    gradients NaN through the dropped output (0 x NaN). As jax.grad of the layers run one after the other."""
    from parallel import gpipe

    layer = lambda p, h, _: jax.numpy.sqrt(h + p)  # noqa: E731
    b_L = jax.numpy.array([10.0, 0.0])  # stage 0 adds 10: stage 1's real inputs are positive, the raw batch is not
    x_BTD = -jax.numpy.linspace(1.0, 5.0, 4).reshape(4, 1, 1)
    loss = lambda run: lambda b, x: run(b, x).sum()  # noqa: E731
    ref = jax.grad(loss(lambda b, x: layer(b[1], layer(b[0], x, None), None)), argnums=(0, 1))(b_L, x_BTD)
    with jax.set_mesh(make_mesh({"stage": 2}, devices=jax.devices()[:2])):
        got = jax.jit(jax.grad(loss(lambda b, x: gpipe(layer, b, x, n_microbatches=2)), argnums=(0, 1)))(b_L, x_BTD)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)


def test_pipeline_idle_ticks_do_not_poison_plain_autodiff_gradients_or_hvps():
    """Under plain_autodiff (the documented way to forward mode and HVPs) gpipe's custom VJP steps aside: the plain
    layers ran on the idle ticks' filler again and the same sqrt layer's gradient and jvp-of-grad HVP were NaN. As
    jax.grad / jax.jvp of the layers run one after the other."""
    from parallel import gpipe
    from parallel.autodiff import plain_autodiff

    layer = lambda p, h, _: jax.numpy.sqrt(h + p)  # noqa: E731
    b_L, v_L = jax.numpy.array([10.0, 0.0]), jax.numpy.array([0.3, -0.7])
    x_BTD = -jax.numpy.linspace(1.0, 5.0, 4).reshape(4, 1, 1)
    seq = lambda b: layer(b[1], layer(b[0], x_BTD, None), None).sum()  # noqa: E731
    pip = lambda b: gpipe(layer, b, x_BTD, n_microbatches=2).sum()  # noqa: E731
    hvp = lambda f: lambda b: jax.jvp(jax.grad(f), (b,), (v_L,))[1]  # noqa: E731
    with jax.set_mesh(make_mesh({"stage": 2}, devices=jax.devices()[:2])), plain_autodiff():
        for got, ref in ((jax.jit(jax.grad(pip))(b_L), jax.grad(seq)(b_L)), (jax.jit(hvp(pip))(b_L), hvp(seq)(b_L)),
                         (jax.jit(lambda b: jax.jvp(pip, (b,), (v_L,))[1])(b_L), jax.jvp(seq, (b_L,), (v_L,))[1])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5)


@pytest.mark.parametrize("shape", [{"stage": 2}, {"stage": 2, "data": 1, "tensor": 1}])
def test_bf16_pipeline_with_size_one_axes_runs_on_cpu(shape):
    """A size-1 axis beside `stage` passed the bfloat16 guard above (it splits nothing) but, left to GSPMD in gpipe's
    shard_map, XLA:CPU aborted the process on the gradient's bfloat16 all-reduce ("Invalid binary instruction opcode
    copy"; found by a property fuzz of the train step: {stage: 2, tensor: 1}). Gradients as run layer by layer."""
    from parallel import gpipe

    mesh = make_mesh(shape, devices=jax.devices()[:2])
    w_LDD = jax.random.normal(jax.random.key(0), (2, 8, 8), jax.numpy.bfloat16) / 4
    x_BTD = jax.random.normal(jax.random.key(1), (4, 3, 8), jax.numpy.bfloat16)
    layer = lambda w, x, _: jax.numpy.tanh(x @ w)  # noqa: E731
    loss = lambda run: lambda w, x: (run(w, x).astype(jax.numpy.float32) ** 2).sum()  # noqa: E731
    ref = jax.jit(jax.grad(loss(lambda w, x: layer(w[1], layer(w[0], x, None), None))))(w_LDD, x_BTD)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss(lambda w, x: gpipe(layer, w, x, n_microbatches=2))))(w_LDD, x_BTD)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_bubble_fraction_counts_the_idle_ticks_of_the_schedule():
    """gpipe's schedule, enumerated: at tick t of M + S - 1, stage s works on microbatch t - s if that exists, else
    idles. bubble_fraction (what benchmarks/pipeline_bubble.py reports) is the idle share of all stage-ticks."""
    from parallel.pipeline import bubble_fraction

    for S, M in ((1, 4), (2, 1), (2, 2), (4, 2), (4, 8), (8, 3)):
        ticks = M + S - 1
        idle = sum(not 0 <= t - s < M for t in range(ticks) for s in range(S))
        assert bubble_fraction(S, M) == pytest.approx(idle / (ticks * S)), (S, M)
    for S, M in ((1, 0), (4, 0), (0, 4)):  # no schedule: (1, 0) divided by zero, (4, 0) said 1.0
        with pytest.raises(ValueError, match="must be >= 1"):
            bubble_fraction(S, M)
    # counts, as gpipe takes them: 2.5 microbatches said 0.545, True stages 0.0 (numpy's ints are counts too)
    for S, M in ((4, 2.5), (True, 4), (4, True), (4.0, 8)):
        with pytest.raises(ValueError, match=r"must be >= 1, and ints \(counts"):
            bubble_fraction(S, M)
    assert bubble_fraction(np.int64(4), np.int32(8)) == 3 / 11


def test_pipeline_microbatches_take_rows_from_every_data_shard():
    """GPipe microbatch m = rows m::M: each holds rows of every data shard, so a stage's [B/M, T, D] work per tick
    is split over the data axis (contiguous rows sat on half the data shards: each device did 2x the rows)."""
    from parallel.pipeline import gpipe

    mesh = make_mesh({"stage": 2, "data": 4})
    W = jax.random.normal(jax.random.key(0), (4, 16, 16)) / 4  # 4 layers
    x = jax.random.normal(jax.random.key(1), (8, 4, 16))  # B=8, T=4, D=16; M=2: 4 rows per microbatch
    f = lambda w, x: gpipe(lambda wl, h, c: jax.numpy.tanh(h @ wl), w, x, n_microbatches=2)  # noqa: E731
    with jax.set_mesh(mesh):
        Ws = jax.device_put(W, jax.sharding.NamedSharding(mesh, jax.P("stage")))
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data")))
        y = jax.jit(f)(Ws, xs)
        hlo = jax.jit(f).lower(Ws, xs).compile().as_text()
    ref = x
    for i in range(4):
        ref = jax.numpy.tanh(ref @ W[i])
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)  # rows come back in order
    # per device and tick: 4 rows / 4 data shards = 1 row x T=4 positions
    assert set(re.findall(r"= (f32\[[0-9,]+\])[^ ]* dot\(", hlo)) == {"f32[4,16]"}, hlo
    # activations only move forward, stage 0 -> 1 (device 2d -> 2d + 1, stage inner): a ring back to stage 0 (whose
    # input is the batch) gave the same values and sent every tick's output over the links for nothing
    assert re.findall(r"source_target_pairs=(\{\S*\})", hlo) == ["{{0,1},{2,3},{4,5},{6,7}}"], hlo
    # misuse named (jax's shard_map axis error, IndexError, a reshape TypeError before)
    layer = lambda wl, h, c: jax.numpy.tanh(h @ wl)  # noqa: E731
    for m, args, says in ((make_mesh({"data": 8}), (W, x, None), "has no 'stage' axis to pipeline over"),
                          (mesh, ({}, x, None), "params holds no arrays"),
                          (mesh, ({"a": W, "b": W[:2]}, x, None), r"one leading dim L \(the first leaf has 4\); these "
                           r"differ: \{\"\['b'\]\": \(2, 16, 16\)\}"),  # a scan error from inside before
                          (mesh, (W, x, {"pos": jax.numpy.zeros((4, 4))}), "each needs the batch's leading dim 8"),
                          # 3 layers over 2 stages, 7 rows in 2 microbatches: jax's shard_map / reshape errors before
                          (mesh, (W[:3], x, None), r"n_layers=3 must be divisible by the 'stage' mesh axis \(2 "),
                          (mesh, (W, x[:7], None), "batch 7 must be divisible by n_microbatches=2")):
        with jax.set_mesh(m), pytest.raises(ValueError, match=says):
            gpipe(layer, *args, n_microbatches=2)


def test_gpipe_names_python_number_leaves():
    """A Python number among the params or ctx leaves (a scale; the ints of a nested position list), or a 0-d first
    parameter, failed as an AttributeError / IndexError from gpipe's own shape checks, not as the ValueErrors naming
    them (found by a property fuzz of the pipeline)."""
    from parallel.pipeline import gpipe

    W, x = np.ones((4, 4, 4), np.float32), np.ones((8, 3, 4), np.float32)
    layer = lambda wl, h, c: h @ wl  # noqa: E731
    with jax.set_mesh(make_mesh({"stage": 2, "data": 4})):
        for args, says in ((({"w": W, "s": 1.0}, x, None), r"these differ: \{\"\['s'\]\": \(\)\}"),
                           (({"a": np.float32(1.0), "w": W}, x, None), r"the first leaf has 4\); these differ: "),
                           ((W, x, {"scale": 0.5}), r"each needs the batch's leading dim 8; got shapes \[\(\)\]"),
                           ((W, x, {"pos": [[0] * 3] * 8}), "each needs the batch's leading dim 8")):
            with pytest.raises(ValueError, match=says):
                gpipe(layer, *args, n_microbatches=2)


def test_sequence_parallel_splits_the_work():
    """Per device, the compiled gradient of {data 2, sequence 4} does the FLOPs of {data 8}: projections run on
    [B, T, D] (flattening [B, T] rows of a sharded sequence made XLA gather it: 3.7x the FLOPs, and more at
    sequence 8). The block-causal kernel's static query blocks cost ~6% more under a sharded sequence (0.6%
    with attn_block=None)."""
    from parallel.sharding import abstract_sharded

    tok = np.zeros((8, 64), np.int32)
    cfg = dataclasses.replace(CFG, max_seq_len=64, n_layers=2)
    flops = {}
    for name, shape in (("dp", {"data": 8}), ("sp", {"data": 2, "sequence": 4})):
        mesh = make_mesh(shape)
        graphdef, params = abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)  # compiled only
        with jax.set_mesh(mesh):
            b = shard_batch({"inputs": tok, "targets": tok}, mesh)
            c = jax.jit(jax.grad(lambda p, b: lm_loss(graphdef, p, b))).lower(params, b).compile()
        ca = c.cost_analysis()
        flops[name] = (ca[0] if isinstance(ca, list) else ca)["flops"]
    assert flops["sp"] <= 1.1 * flops["dp"], flops


def test_sequence_parallel_splits_the_sliding_window_blocks():
    """Sliding-window layers too: the blocked kernel's [B·Q] block rows are split over batch and sequence devices
    (left to XLA they were replicated over the sequence axis: 1.49x this model's gradient FLOPs on {data 2,
    sequence 4}, 4.0x the kernel's; experiments.aot's XLA temp was 1.39x scaling.memory's estimate), and the
    values are those of {data 8}."""
    rng = np.random.default_rng(0)
    tok = rng.integers(0, CFG.vocab_size, size=(8, 64)).astype(np.int32)
    cfg = dataclasses.replace(CFG, max_seq_len=64, n_layers=2, attn_pattern="local", sliding_window=8, swa_block=16)
    flops, grads, plain = {}, {}, nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    for name, shape in (("dp", {"data": 8}), ("sp", {"data": 2, "sequence": 4})):  # 4 blocks of 16 queries
        mesh = make_mesh(shape)
        graphdef, params = placed(cfg, mesh, plain)
        with jax.set_mesh(mesh):
            b = shard_batch({"inputs": tok, "targets": tok}, mesh)
            grad = jax.jit(jax.grad(lambda p, b: lm_loss(graphdef, p, b))).lower(params, b).compile()  # traced once
            ca = grad.cost_analysis()
            grads[name] = jax.tree.leaves(grad(params, b))
        flops[name] = (ca[0] if isinstance(ca, list) else ca)["flops"]
    assert flops["sp"] <= 1.1 * flops["dp"], flops
    for a, b in zip(grads["dp"], grads["sp"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_embedding_lookup_gathers_in_the_compute_dtype_and_sums_its_gradient_in_float32():
    """The lookup's values and table gradient equal `take(table).astype(bf16)`'s exactly, and a token seen 4096
    times gets the exact f32 sum (a bf16 scatter-add stalls at 256: 256 + 1 rounds back to 256)."""
    from models.embed import embed_lookup

    table = jax.random.normal(jax.random.key(0), (64, 32))
    tok = np.concatenate([np.zeros((1, 4096)), np.random.default_rng(0).integers(0, 64, (1, 4096))], 0).astype(
        np.int32)
    ct = jax.numpy.ones((2, 4096, 32), jax.numpy.bfloat16)
    for dtype in (jax.numpy.float32, jax.numpy.bfloat16):
        ref, ref_vjp = jax.vjp(lambda t: jax.numpy.take(t, tok, axis=0).astype(dtype), table)
        out, vjp = jax.vjp(lambda t: embed_lookup(t, tok, dtype), table)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, ref)
        (g,), (g_ref,) = vjp(ct.astype(dtype)), ref_vjp(ct.astype(dtype))
        assert g.dtype == jax.numpy.float32
        np.testing.assert_array_equal(g, g_ref)
        counts = np.bincount(tok.ravel(), minlength=64).astype(np.float32)
        np.testing.assert_array_equal(g, np.broadcast_to(counts[:, None], (64, 32)))


def test_embedding_lookup_of_an_id_outside_the_vocab_is_nan_and_adds_no_gradient_negative_ids_too():
    """Under jit the model cannot check the ids: one >= V gathered a NaN row, but a negative one wrapped (-1 read and
    trained row V - 1; an ignore index -100 as an input, token V - 100), a silent wrong answer. Now both are NaN
    rows, adding to no row of the gradient."""
    from models.embed import embed_lookup

    table = jax.random.normal(jax.random.key(0), (8, 4))
    tok = np.asarray([[1, -1, 8, -8, 2]], np.int32)
    out, vjp = jax.jit(lambda t, i: jax.vjp(lambda t: embed_lookup(t, i, jax.numpy.float32), t))(table, tok)
    assert np.isnan(out[0, 1:4]).all()
    np.testing.assert_array_equal(out[0, [0, 4]], table[np.asarray([1, 2])])
    (g,) = vjp(jax.numpy.ones_like(out))
    want = np.zeros((8, 4), np.float32)
    want[[1, 2]] = 1.0  # only the in-vocabulary ids' rows
    np.testing.assert_array_equal(g, want)


def test_the_gathered_head_is_cast_to_the_compute_dtype_and_its_gradient_comes_back_in_the_heads():
    """gathered_head equals `head.astype(dtype)`, values and gradient: a float32 head under bf16 compute gets a
    float32 gradient (the bf16 cotangent cast up), as every other float32 weight does. Left in bf16 (the cast
    dropped), it passed the tests of untied models; tied, adding it to the lookup's float32 gradient failed."""
    from models.embed import gathered_head

    head = jax.random.normal(jax.random.key(0), (32, 64))
    ct = jax.random.normal(jax.random.key(1), (32, 64))
    for dtype in (jax.numpy.float32, jax.numpy.bfloat16):
        ref, ref_vjp = jax.vjp(lambda h: h.astype(dtype), head)
        out, vjp = jax.vjp(lambda h: gathered_head(h, dtype), head)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, ref)
        (g,), (g_ref,) = vjp(ct.astype(dtype)), ref_vjp(ct.astype(dtype))
        assert g.dtype == jax.numpy.float32
        np.testing.assert_array_equal(g, g_ref)


def test_embedding_gradient_of_a_bf16_table_is_summed_in_float32():
    """param_dtype='bfloat16': a token seen 4096 times with cotangents of 1e-3 gets ~4.096 (the float32 sum rounded
    to bf16), not the 0.5 where a bf16 scatter-add stalls; the gradient keeps the table's dtype."""
    from models.embed import embed_lookup

    table = jax.numpy.ones((8, 4), jax.numpy.bfloat16)
    tok = np.zeros((1, 4096), np.int32)
    g = jax.grad(lambda t: (embed_lookup(t, tok, jax.numpy.bfloat16).astype(jax.numpy.float32) * 1e-3).sum())(table)
    assert g.dtype == jax.numpy.bfloat16
    want = float(jax.numpy.bfloat16(1e-3)) * 4096  # the bf16 cotangent, summed exactly
    np.testing.assert_allclose(np.asarray(g[0], np.float32), want, rtol=2 ** -8)
    assert float(jax.numpy.abs(g[1:]).max()) == 0.0


@functools.cache
def _single_device_lm_grad(cfg):
    """(batch, graphdef, params, single-device gradient) of lm_loss on a fixed [8, 16] batch; once per config (the
    lm-head, lookup and embedding-gradient tests share their vocab-512 untied model)."""
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    b = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return b, graphdef, params, jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, b)))(params)


def _sharded_lm_grad(cfg, shape):
    """(compiled HLO, gradient on a `shape` mesh, single-device gradient) of lm_loss on a fixed [8, 16] batch. Once
    per config and mesh: the tests that read the same program (e.g. {fsdp: 4, tensor: 2} at vocab 512, untied, for
    the head's gathers, the lookup's and the table gradient's) read one compile."""
    return _sharded_lm_grad_on(cfg, tuple(shape.items()))


@functools.cache
def _sharded_lm_grad_on(cfg, shape):
    b, graphdef, params, want = _single_device_lm_grad(cfg)
    mesh = make_mesh(dict(shape))
    gd, p = placed(cfg, mesh, (graphdef, params))  # create_sharded's placements, no init compiled on the mesh
    with jax.set_mesh(mesh):
        sb = shard_batch(b, mesh)
        grad = jax.jit(jax.grad(lambda p, b: lm_loss(gd, p, b))).lower(p, sb).compile()  # read and run: traced once
        return grad.as_text(), grad(p, sb), want


@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}])
def test_embedding_gradient_is_summed_into_the_table_shards(shape):
    """The lookup's gradient is scatter-added into each device's shard of the table (an all-to-all of the cotangent
    rows), not all-reduced whole: constrained replicated, every device held and all-reduced a float32 [V, D] (2 GiB a
    device at V 128K, D 4096). The values are the single-device gradient's."""
    cfg = TransformerConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=4, mlp_dim=64)
    hlo, got, want = _sharded_lm_grad(cfg, shape)
    got, want = got["embed"][...], want["embed"][...]
    # (a combined all-reduce's result is a tuple of shapes, which `collectives` does not read)
    whole = [s for s in re.findall(r"= (\([^)]*\)|\S+) all-reduce(?:-start)?\(", hlo) if "f32[512,32]" in s]
    assert whole == [], whole
    # nor is the cotangent gathered whole to be split along D: on {data, fsdp} the partitioner could not move its
    # rows' split to D's but by gathering every row on every device (it warned "Involuntary full rematerialization")
    gathered = [s for s, op in collectives(hlo) if op == "all-gather" and s.startswith("f32[8,16,32]")]
    assert gathered == [], gathered
    # the token ids are laid out with their cotangent rows: gathered once (left unconstrained, {fsdp: 4, tensor: 2}
    # gathered them twice and permuted them)
    ids = [s for s, op in collectives(hlo) if s.startswith("s32[")]
    assert len(ids) == 1, ids
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


_NO_REMATERIALIZATION = """
import sys, jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_compilation_cache", False)  # a cached program is not partitioned again: no warning
from flax import nnx
from experiments.aot import abstract_train_inputs
from experiments.lm_step import make_optimizer, make_train_step
from models import Transformer, TransformerConfig
from models.moe import MoEConfig
from parallel import make_mesh
OPT = make_optimizer(1e-2, total_steps=10, warmup_steps=0)
cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                        attn_pattern="alternating", sliding_window=8, moe=MoEConfig(n_experts=4, top_k=2,
                        expert_mlp_dim=32), moe_every=2)
for shape in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 2, "expert": 4}):
    print("mesh", shape, file=sys.stderr, flush=True)
    mesh = make_mesh(shape)
    # the step's inputs as sharded ShapeDtypeStructs (a [8, 16] batch): the partitioner sees the shardings of a
    # built state and batch, and nothing is initialised (a jitted init compiled on every mesh: a third of the time)
    gd, *inputs = abstract_train_inputs(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), OPT, mesh, 8, 16)
    with jax.set_mesh(mesh):
        make_train_step(gd, OPT).lower(*inputs).compile()
"""


def test_train_step_has_no_involuntary_full_rematerialization():
    """An MoE / sliding-window train step (the demo's model, small) on the meshes that mix fsdp with data, tensor or
    expert compiles without XLA's "Involuntary full rematerialization" (a tensor it cannot reshard efficiently,
    replicated whole on every device, then split). It warned on each, for the embedding's gradient (`models.embed`).
    The warning is XLA's, on stderr: a subprocess's, with jax's compilation cache off."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _NO_REMATERIALIZATION], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("mesh {") == 3, run.stderr[-3000:]
    assert "Involuntary full rematerialization" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}])
def test_lm_head_is_gathered_once(shape, tied):
    """The LM head [D, V] is all-gathered over `embed` once, for the forward's product and the backward's: on
    {fsdp: 4, tensor: 2} the partitioner gathered it for each (the same [D, V/2], CSE missed it), both copies live
    from before the lookup into the backward. Its gradient still reaches the parameter's shards (the single-device
    values)."""
    cfg = TransformerConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, tie_embeddings=tied)
    hlo, got, want = _sharded_lm_grad(cfg, shape)
    head = f"f32[32,{512 // shape.get('tensor', 1)}]"
    gathers = [s for s, op in collectives(hlo) if op == "all-gather" and s.startswith(head)]
    assert gathers == [head + "{1,0}"], gathers
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 got, want)


@pytest.mark.parametrize("vocab,split", [(512, True), (64, False)])
@pytest.mark.parametrize("shape", [{"fsdp": 4, "tensor": 2}, {"data": 4, "tensor": 2}])
def test_lookup_gathers_the_table_over_tensor_only_for_many_tokens(shape, vocab, split):
    """With a device's tokens (32 here) under V/2, the lookup reads each device's vocab shard and all-reduces the rows:
    no device gathers the whole [V, D] table (it did, beside the fsdp-gathered [V/2, D] it was built from: the step's
    peak at V 131072); above, the table is gathered whole (fewer bytes moved). Gradients: the single-device ones."""
    cfg = TransformerConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, mlp_dim=64)
    hlo, got, want = _sharded_lm_grad(cfg, shape)
    whole = [s for s, op in collectives(hlo) if op == "all-gather" and s.startswith(f"f32[{vocab},32]")]
    assert bool(whole) != split, whole
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 got, want)


_FSDP_BF16_GATHERS = """
import os, shutil, sys, jax, numpy as np
jax.config.update("jax_num_cpu_devices", 8)
from flax import nnx
from experiments.lm_step import lm_loss
from models import Transformer, TransformerConfig
from parallel import abstract_sharded, make_mesh
mesh = make_mesh({"fsdp": 8})
b = {"inputs": np.zeros((8, 16), np.int32), "targets": np.zeros((8, 16), np.int32)}
for embeddings in ("untied", "tied"):
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, dtype="bfloat16",
                            tie_embeddings=embeddings == "tied")
    # only lowered and compiled: the parameters' shapes and shardings, no init program compiled (and dumped)
    gd, p = abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        jax.jit(jax.value_and_grad(lambda p: lm_loss(gd, p, b))).lower(p).compile()
    dump = sys.argv[1]  # this compile's dumps into a folder of their own
    os.makedirs(os.path.join(dump, embeddings))
    for f in os.listdir(dump):
        if os.path.isfile(os.path.join(dump, f)):
            shutil.move(os.path.join(dump, f), os.path.join(dump, embeddings, f))
"""


@pytest.fixture(scope="module")
def fsdp_bf16_dumps(tmp_path_factory):
    """One subprocess (one jax start-up) compiles both variants: dumps/untied, dumps/tied."""
    import os
    import subprocess
    import sys

    dump = tmp_path_factory.mktemp("dumps")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
           f" --xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning"}
    subprocess.run([sys.executable, "-c", _FSDP_BF16_GATHERS, str(dump)], env=env, check=True, timeout=300,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    return dump


@pytest.mark.parametrize("embeddings", ["untied", "tied"])
def test_fsdp_all_gathers_every_weight_in_bf16_under_bf16_compute(fsdp_bf16_dumps, embeddings):
    """Read after XLA's SPMD partitioner (a dump): the CPU backend later widens bf16 collectives to f32, so the
    compiled HLO cannot show what a GPU or TPU would move. Before `models.embed`, the embedding table's all-gather
    was float32 (the partitioner gathered the f32 parameter, then cast it)."""
    tmp_path = fsdp_bf16_dumps / embeddings
    dumps = [f for f in tmp_path.iterdir() if "jit__lambda" in f.name and "after_spmd-partitioning" in f.name]
    gathers = [m.group(1) for f in dumps for m in re.finditer(r"= (\S+) all-gather\(", f.read_text())]
    # one per weight of the 2 scanned layers' forward and backward, the LM head / embedding: not a handful
    assert len(gathers) >= 10, gathers
    assert all(s.startswith("bf16[") for s in gathers), gathers


def halo_conv(x, w, pad):
    """A 'same' convolution of [B, H, W, C] along H for halo_map: 'valid' over x padded with `pad` zero rows."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("rows,kernel", [(8, 3), (4, 5), (8, 7), (4, 9)],
                         ids=["band>=halo", "2-hop", "partial-hop", "taller-than-image"])
def test_halo_map_convolves_bands_like_one_device(rows, kernel):
    """parallel.halo.halo_map on {data 2, sequence 4}: a 'same' convolution of a [B, H, W, C] image split over
    `sequence` along H equals one device's, forward and backward (bands of 2 rows with halo 1; of 1 row with halo 2,
    fetched from two neighbours; of 2 rows with halo 3, the second neighbour giving only 1 of its rows; halo 4 on a
    4-row image, the farthest hops all padding)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, rows, 3, 4)).astype(np.float32)
    w = rng.normal(size=(kernel, 3, 4, 5)).astype(np.float32)
    ct = rng.normal(size=(2, rows, 3, 5)).astype(np.float32)

    def vjp(f, x, w):
        y, back = jax.vjp(f, x, w)
        return y, *back(ct)

    ref = jax.jit(lambda x, w: vjp(lambda x, w: halo_conv(x, w, kernel // 2), x, w))(x, w)
    mesh = make_mesh({"data": 2, "sequence": 4})
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "sequence")))
        sharded = lambda x, w: halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=kernel // 2)  # noqa: E731
        out = jax.jit(lambda x, w: vjp(sharded, x, w))(xs, w)
    for got, want in zip(out, ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_halo_map_gradient_computes_only_the_band_s_rows():
    """halo_map's custom VJP exchanges the output gradient's halo rows, so the data-gradient convolution on each device
    outputs its band's 2 rows; autodiff through the input's halo exchange computed all 2 + 2·halo rows of the extended
    band (2x on 2-row bands) and sent the halos back. Values and XLA's FLOP count (it counts no padding taps) are the
    same either way: the convolutions' shapes in the compiled gradient tell them apart."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 3, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    ct = rng.normal(size=(2, 8, 3, 5)).astype(np.float32)
    mesh = make_mesh({"data": 2, "sequence": 4})
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "sequence")))
        loss = lambda x, w: (halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1) * ct).sum()  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(xs, w).compile().as_text()
    # per device: 1 row of B, the band's 2 of H's 8 rows, 4 input channels (the weight gradient is [3, 3, 4, 5])
    dx = [s for s in re.findall(r"= f32\[([0-9,]+)\][^ ]* convolution\(", hlo) if s.endswith(",4")]
    assert dx == ["1,2,3,4"], dx


def test_halo_map_convolves_rows_also_split_over_another_axis():
    """Rows split over ('sequence', 'tensor') (act_height=('sequence', 'tensor') in use_rules; halo_axis then splits
    over sequence alone) and the kernel's output channels over tensor: the bands reached the convolution still split
    over tensor, which XLA's partitioner computed wrong (off by 17 here; the VAE's loss came out 0.4080 for 0.4065)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 3, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    ct = rng.normal(size=(2, 8, 3, 4)).astype(np.float32)

    def vjp(f, x, w):
        y, back = jax.vjp(f, x, w)
        return y, *back(ct)

    ref = jax.jit(lambda x, w: vjp(lambda x, w: halo_conv(x, w, 1), x, w))(x, w)
    mesh = make_mesh({"data": 2, "sequence": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(None, ("sequence", "tensor"))))
        ws = jax.device_put(w, NamedSharding(mesh, P(None, None, None, "tensor")))
        sharded = lambda x, w: halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1)  # noqa: E731
        out = jax.jit(lambda x, w: vjp(sharded, x, w))(xs, ws)
    for got, want in zip(out, ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_halo_map_takes_a_negative_dim_and_refuses_a_halo_other_than_fn_s_radius():
    """dim=-3 of a [B, H, W, C] image is H, as in jnp: halo_map split dim 0 (P(*(None,) * -3, axis) is P(axis))
    while it exchanged H's halo rows, a wrong result without an error (off by 9.5). A halo other than fn's radius
    gave each band another number of rows, silently: kernel 5 with halo 1 a result 0 rows tall, an even kernel
    one row too many per band. A negative halo, and an axis the mesh lacks (a bare KeyError), raise naming them."""
    import jax.numpy as jnp

    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 3, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})):
        got = jax.jit(lambda x, w: halo_map(halo_conv, x, w, axis="sequence", dim=-3, halo=1))(x, w)
        np.testing.assert_allclose(np.asarray(got), halo_conv(x, w, 1), rtol=1e-5, atol=1e-5)
        for kernel, halo in ((5, 1), (3, 2), (2, 1)):
            with pytest.raises(ValueError, match=f"halo={halo} .*halo must be fn's radius"):
                halo_map(halo_conv, x, jnp.ones((kernel, 3, 4, 5)), axis="sequence", dim=1, halo=halo)
        with pytest.raises(ValueError, match="halo=-1 must be an int >= 0"):
            halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=-1)
        with pytest.raises(ValueError, match="axis='tensor' is not an axis of the current mesh"):
            halo_map(halo_conv, x, w, axis="tensor", dim=1, halo=1)


def test_halo_map_takes_frames_with_no_rows():
    """An empty dim (frames 0 rows tall) gives fn's empty result and gradients, as one device does: bands of 0 rows
    divided by zero in the halo exchange (ZeroDivisionError), also from the VAE on {data 2, sequence 4}, where one
    device returned the empty latents."""
    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = np.zeros((2, 0, 3, 4), np.float32)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})):
        sharded = lambda x, w: halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1).sum()  # noqa: E731
        y = halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1)
        dx, dw = jax.grad(sharded, argnums=(0, 1))(x, w)
    assert y.shape == (2, 0, 3, 5)
    assert dx.shape == x.shape and np.all(np.asarray(dw) == 0)


def test_halo_map_on_an_explicit_mesh_moves_x_onto_the_axis():
    """jax.make_mesh's default Explicit axes: rows split over `sequence`, whole, or split over data alone all give one
    device's values and gradients (whole rows failed in the gradient with JAX's "Expected cotangent type
    float32[2,8,5,3] but got float32[2,8@sequence,5,3]", naming neither the mesh nor a fix); x split over `sequence`
    along another dim is refused by name."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel.halo import halo_map

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    ref_y = halo_conv(x, w, 1)
    ref = jax.grad(lambda x, w: jnp.sin(halo_conv(x, w, 1)).sum(), argnums=(0, 1))(x, w)
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    loss = lambda x, w: jnp.sin(halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1)).sum()  # noqa: E731
    with jax.set_mesh(mesh):
        # (split over ('data', 'sequence') along dim 1 itself was refused as "along dim 1, not dim 1")
        for spec in (P("data", "sequence"), P(), P("data"), P(None, ("data", "sequence")), P(None, "data")):
            xs = jax.device_put(x, NamedSharding(mesh, spec))
            y = jax.jit(lambda x, w: halo_map(halo_conv, x, w, axis="sequence", dim=1, halo=1))(xs, w)
            np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
            for g, want in zip(jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, w), ref):
                np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4)
        # a weight split over `sequence` enters whole, as in_specs P() take it on an Auto mesh (its gradient failed
        # with "Expected cotangent type float32[3,3,3,4@sequence] but got float32[3,3,3,4]"), its gradient split so
        ws = jax.device_put(w, NamedSharding(mesh, P(None, None, None, "sequence")))
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "sequence")))
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)
        assert jax.typeof(got[1]).sharding.spec == P(None, None, None, "sequence")
        for g, want in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match=r"split over axis='sequence' along dim 2, not dim 1: reshard it"):
            jax.jit(loss)(jax.device_put(x, NamedSharding(mesh, P("data", None, "sequence"))), w)


def test_halo_axis_splits_only_what_it_can():
    """halo_axis: the axis when it divides the dim; None for an indivisible dim, a mesh without the axis, and bfloat16
    on XLA:CPU beside other mesh axes (a bfloat16 all-reduce in a shard_map manual over some axes only aborts the
    process there; the VAE's {data 2, sequence 4} bf16 gradient did)."""
    import jax.numpy as jnp

    from parallel.halo import halo_axis

    with jax.set_mesh(make_mesh({"data": 2, "sequence": 4})):
        assert halo_axis("act_height", 8, jnp.float32) == ("sequence", 4)
        assert halo_axis("act_height", 6, jnp.float32) == (None, 1)
        assert halo_axis("act_height", 8, jnp.bfloat16) == ((None, 1) if jax.default_backend() == "cpu"
                                                            else ("sequence", 4))
    with jax.set_mesh(make_mesh({"sequence": 8})):
        assert halo_axis("act_height", 8, jnp.bfloat16) == ("sequence", 8)
    with jax.set_mesh(make_mesh({"data": 8})):
        assert halo_axis("act_height", 8, jnp.float32) == (None, 1)
    assert halo_axis("act_height", 8) == (None, 1)  # no mesh
