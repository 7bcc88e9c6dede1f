"""Invariants of the decoder Transformer: causality, scan/remat/jit equivalences, packing, padding, dtypes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import KVCache, Transformer, TransformerConfig
from models.linear import linear
from models.losses import cross_entropy
from models.moe import MoEConfig
from models.video.text import TextEncoder

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
    for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=False, n_kv_heads=1),
                dataclasses.replace(CFG, post_norms=True)):  # Gemma-2 style: post-sublayer norm scales too
        m = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # the shapes alone (no draw to compile)  # noqa: B023
        assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(nnx.state(m)))


@pytest.mark.parametrize("norm_offset", [1.0, 0.5, 2.0, -1.0])
def test_a_fresh_model_with_norm_offset_computes_what_one_without_does(norm_offset):
    """norm_offset re-parameterises every RMSNorm scale as offset + w (Gemma stores w around 0): a fresh model's
    scales are then 1 - offset (zeros under Gemma's 1), the q / k norms' too, so it computes what the same seed
    computes without the offset (q / k scales initialised to ones would scale q and k by 2 under offset 1; zeros
    under offset 0.5 scaled every norm by 0.5). The text encoder's final norm too."""
    tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, (1, 8))
    cfg = dataclasses.replace(CFG, qk_norm=True, post_norms=True)
    plain, offset = (Transformer(dataclasses.replace(cfg, norm_offset=o), rngs=nnx.Rngs(0)) for o in (0.0, norm_offset))
    np.testing.assert_allclose(np.asarray(plain(tokens)), np.asarray(offset(tokens)), rtol=1e-6, atol=1e-6)
    plain, offset = (TextEncoder(dataclasses.replace(cfg, norm_offset=o), rngs=nnx.Rngs(0)) for o in (0.0, norm_offset))
    np.testing.assert_allclose(np.asarray(plain(tokens).tokens_BLE), np.asarray(offset(tokens).tokens_BLE),
                               rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize("cfg", [
    TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=6, mlp_dim=48,
                      qkv_bias=True, post_norms=True, qk_norm=True),
    TransformerConfig(vocab_size=64, d_model=32, n_layers=8, n_heads=9, n_kv_heads=3, head_dim=6, mlp_dim=48,
                      tie_embeddings=True, moe_every=2,
                      moe=MoEConfig(n_experts=7, top_k=2, expert_mlp_dim=10, n_shared_experts=2)),
    # OLMo 2: q / k norm scales over all heads, [N, H] and [K, H], split with the heads they scale
    TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=6, mlp_dim=48,
                      pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="all_heads"),
], ids=["dense_untied", "moe_tied", "olmo2"])
def test_every_parameter_names_its_logical_axes(cfg):
    """Sharding reads each parameter's logical names through parallel/rules.py; a parameter without them is
    replicated on every device without a word, and a misnamed dimension is split along the wrong axis. So every
    dimension of every parameter carries a name of the rules table (never a mesh axis of its own), and each name
    sits on a dimension of the size it means (sizes chosen distinct so a swap shows). The router's expert columns
    are the one deliberate None: replicated, as every token scores every expert."""
    from parallel.rules import PARAM_RULES

    m = cfg.moe
    sizes = {"vocab": {cfg.vocab_size}, "embed": {cfg.d_model}, "norm": {cfg.d_model}, "heads": {cfg.n_heads},
             "kv_heads": {cfg.kv_heads}, "head_dim": {cfg.hd}, "layers": {cfg.n_layers // cfg.moe_every},
             "mlp": {cfg.mlp_dim} | ({m.expert_mlp_dim, m.n_shared_experts * m.expert_mlp_dim} if m else set()),
             "expert": {m.n_experts} if m else set()}
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    seen = set()
    for path, v in nnx.to_flat_state(state):
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == v.ndim, (path, names, v.shape)
        for name, size in zip(names, v.shape):
            if name is None:
                assert path[-1] in ("router", "router_bias") and size == m.n_experts, (path, names, v.shape)
                continue
            assert name in PARAM_RULES, (path, name)
            assert size in sizes[name], (path, names, v.shape)
            seen.add(name)
        if path[0] in ("blocks", "moe_blocks"):  # stacked for the layer scan: the pipeline splits 'layers'
            assert names[0] == "layers", (path, names)
    assert seen == {k for k, s in sizes.items() if s}, seen  # the test saw every kind of dimension


def test_causality_by_gradient(model):
    # Unique tokens: the gradient w.r.t. an embedding row is the gradient w.r.t. one position.
    T = 10
    tok = jax.random.permutation(jax.random.key(2), CFG.vocab_size)[:T][None]
    graphdef, state = nnx.split(model)

    def logit_sum_at(st, t):
        return nnx.merge(graphdef, st)(tok)[0, t].sum()

    grad = jax.jit(jax.grad(logit_sum_at))  # t traced: one compile for the three positions
    for t in (0, 4, T - 2):
        g_embed = grad(state, t)["embed"][...]
        per_pos = jnp.abs(g_embed[tok[0]]).sum(-1)  # [T]
        assert jnp.all(per_pos[t + 1:] == 0.0), f"position {t} depends on a later token"
        assert jnp.all(per_pos[: t + 1] > 0.0)


@pytest.fixture(scope="module")
def base_loss_and_grads(model, tokens):
    """The module model's (scanned, no remat) loss and gradients: the side every variant below is compared with,
    compiled once for all of them."""
    return loss_and_grads(model, tokens)


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(scan_unroll=True)])
def test_scan_equals_unrolled(model, tokens, change, base_loss_and_grads):
    l1, g1 = base_loss_and_grads
    l2, g2 = loss_and_grads(with_cfg(model, **change), tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch"])
def test_remat_equals_no_remat(model, tokens, policy, base_loss_and_grads):
    l1, g1 = base_loss_and_grads
    l2, g2 = loss_and_grads(with_cfg(model, remat=policy), tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("layers", [dict(scan_unroll=True), dict(scan_layers=False)])
def test_remat_recomputes_when_the_layers_are_unrolled(model, tokens, layers):
    """jax.checkpoint(prevent_cse=False) is safe in a rolled scan only: with scan_unroll=True XLA merged the
    recomputed forward into the first (compiled FLOPs 1.00x of remat 'none'), remat silently off on every backend."""
    flops = {}
    for remat in ("none", "full"):
        graphdef, state = nnx.split(with_cfg(model, remat=remat, **layers))
        loss = lambda st: cross_entropy(nnx.merge(graphdef, st)(tokens[:, :-1]), tokens[:, 1:])[0]  # noqa: E731
        ca = jax.jit(jax.grad(loss)).lower(state).compile().cost_analysis()
        flops[remat] = (ca[0] if isinstance(ca, list) else ca)["flops"]
    assert flops["full"] > 1.1 * flops["none"], flops


def hidden_and_probe_grads(model, tokens):
    """hidden_states(all_layers=True) [L + 1, B, T, D] and the gradient of a fixed probe of every entry."""
    graphdef, state = nnx.split(model)

    def probe(st):
        h = nnx.merge(graphdef, st).hidden_states(tokens, all_layers=True)
        return jnp.sum(jnp.sin(h.astype(jnp.float32))), h

    (_, h), g = jax.jit(jax.value_and_grad(probe, has_aux=True))(state)
    return h, g


def test_unembed_of_the_hidden_states_is_the_logits(model, tokens):
    """The LM head of hidden_states() (here the head by hand: untied, soft-capped at 30) is __call__'s logits, and
    the layer stack's last entry is the final hidden states."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, t: (lambda m: (m(t), m.hidden_states(t), m.hidden_states(t, all_layers=True),
                                             m.unembed(m.hidden_states(t))))(nnx.merge(graphdef, st)))
    logits, h_BTD, every, unembedded = run(state, tokens)
    assert h_BTD.shape == tokens.shape + (CFG.d_model,) and every.shape == (CFG.n_layers + 1,) + h_BTD.shape
    np.testing.assert_array_equal(every[-1], h_BTD)
    np.testing.assert_array_equal(unembedded, logits)
    by_hand = 30.0 * np.tanh(np.asarray(h_BTD, np.float64) @ np.asarray(model.lm_head[...], np.float64) / 30.0)
    np.testing.assert_allclose(logits, by_hand, atol=1e-5)
    embed = np.asarray(model.embed[...])[np.asarray(tokens)]  # entry 0: the embeddings, as HF's hidden_states[0]
    np.testing.assert_array_equal(every[0], embed)
    with pytest.raises(ValueError, match="takes no KV cache"):
        model.hidden_states(tokens, cache=KVCache.zeros(CFG, 2, 16))
    with pytest.raises(ValueError, match=r"unembed takes hidden states \[batch, length, d_model=32\]"):
        model.unembed(h_BTD[0])
    with pytest.raises(ValueError, match=r"unembed takes hidden states \[batch, length, d_model=32\].*got shape "
                                         r"\(2, \d+, 31\)"):  # (not the LM head's matmul error)
        model.unembed(jnp.zeros(h_BTD.shape[:-1] + (31,)))


@pytest.fixture(scope="module")
def base_hidden_and_probe_grads(model, tokens):
    """The module model's (scanned, no remat, float32) hidden states and probe gradients, compiled once for the
    variants compared with them below."""
    return hidden_and_probe_grads(model, tokens)


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(scan_unroll=True), dict(remat="full"),
                                    dict(remat="save_dots"), dict(remat="save_dots_no_batch"), dict(dtype="bfloat16")])
def test_all_hidden_states_and_their_gradients_equal_across_scan_and_remat(model, tokens, change,
                                                                           base_hidden_and_probe_grads):
    """The layers' outputs are the layer scan's ys (the unscanned loop's stack), and remat recomputes them
    equal. bf16 (on CPU the scan's residuals kept as bits, models.residuals) against float32, to bf16's rounding:
    scanned and unscanned bf16 differ by an ulp there too, as their logits do (0.012 of 1.8, fused differently)."""
    h1, g1 = base_hidden_and_probe_grads
    h2, g2 = hidden_and_probe_grads(with_cfg(model, **change), tokens)
    if "dtype" in change:
        np.testing.assert_allclose(np.asarray(h2, np.float32), h1, atol=0.05)  # measured 0.023
        rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
        assert max(jax.tree.leaves(jax.tree.map(rel, g2, g1))) < 0.03
        return
    np.testing.assert_allclose(h1, h2, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g1, g2)  # |g| up to ~100


@pytest.mark.parametrize("cfg", [  # one gmm tile size: the default four each add a tile loop per expert (compile)
    dataclasses.replace(CFG, n_layers=4, moe_every=2, moe=MoEConfig(n_experts=4, top_k=2, expert_mlp_dim=16,
                                                                    gmm_tile_rows=(8,))),
    dataclasses.replace(CFG, n_layers=4, attn_pattern="alternating", sliding_window=4),  # window < T: it binds
], ids=["moe", "sliding_window"])
def test_hidden_states_of_moe_and_local_layers(cfg, tokens):
    """Pattern period 2 (dense / MoE stacks, local / global layers): the layers' outputs come out in layer order;
    layer l's output is layer l + 1's input, checked against the scan-free loop over the same stacked parameters."""
    model = make(cfg)
    graphdef, state = nnx.split(model)
    # one program (a compile each took most of the time): logits, the unembedded final hidden states, every layer's
    # output, and return_aux's hidden states and aux beside __call__'s
    run = jax.jit(lambda st, t: (lambda m: (m(t), m.unembed(m.hidden_states(t)), m.hidden_states(t, all_layers=True),
                                            m.hidden_states(t, return_aux=True), m(t, return_aux=True)))
                  (nnx.merge(graphdef, st)))
    logits, unembedded, every, (h, aux), (_, want) = run(state, tokens)
    np.testing.assert_array_equal(unembedded, logits)
    assert every.shape == (cfg.n_layers + 1,) + tokens.shape + (cfg.d_model,)
    unscanned = nnx.jit(lambda m, t: m.hidden_states(t, all_layers=True))(with_cfg(model, scan_layers=False), tokens)
    np.testing.assert_allclose(every, unscanned, atol=1e-5)
    assert np.abs(np.diff(np.asarray(every), axis=0)).max(axis=(1, 2, 3)).min() > 1e-2  # every entry its own
    # return_aux: the MoE aux dict __call__ returns (a head trained with an MoE backbone needs its losses)
    np.testing.assert_array_equal(h, every[-1])
    assert jax.tree.structure(aux) == jax.tree.structure(want) and (aux != {}) == (cfg.moe is not None)
    jax.tree.map(np.testing.assert_array_equal, aux, want)


@pytest.fixture(scope="module")
def one_device_hidden_states():
    """The one-device side of the mesh tests below, computed once for the three meshes: (cfg, graphdef, params,
    tokens, fn(every) the jitted hidden_states, {every: its one-device result})."""
    cfg = dataclasses.replace(CFG, pipeline_microbatches=2)
    tok = jax.random.randint(jax.random.key(7), (8, 12), 0, CFG.vocab_size)
    graphdef, params = nnx.split(make(cfg))
    fn = lambda every: jax.jit(lambda p, t: nnx.merge(graphdef, p).hidden_states(t, all_layers=every))  # noqa: E731
    return cfg, graphdef, params, tok, fn, {every: fn(every)(params, tok) for every in (False, True)}


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "sequence": 4},
                                   {"stage": 2, "data": 4}], ids=["dp_fsdp_tp", "sp", "pp"])
def test_hidden_states_on_a_mesh_equal_one_device(shape, one_device_hidden_states):
    """Sharded as activations (batch over data / fsdp, sequence over 'sequence'); under a pipeline the final
    hidden states only: all_layers=True is refused by name (gpipe hands back the last stage's output)."""
    from parallel import make_mesh, shard_batch, shard_state

    cfg, graphdef, params, tok, fn, want = one_device_hidden_states
    mesh = make_mesh(shape)
    sharded = shard_state(params, mesh)  # the rules' placements, as create_sharded's (without compiling an init)
    with jax.set_mesh(mesh):
        tok = shard_batch(tok, mesh)
        for every in (False, True) if "stage" not in shape else (False,):
            got = fn(every)(sharded, tok)
            np.testing.assert_allclose(got, want[every], atol=2e-6)
            spec = tuple(got.sharding.spec) + (None,) * (got.ndim - len(got.sharding.spec))
            batch_axes = ("data", "fsdp") if "fsdp" in shape else "data"
            assert spec == (None,) * every + (batch_axes, "sequence" if "sequence" in shape else None, None)
            if every:  # the LM head of every layer's states (the logit lens): [L + 1, B, T, V], sharded as they are
                lens = jax.jit(lambda p, h: nnx.merge(graphdef, p).unembed(h))
                np.testing.assert_allclose(lens(sharded, got), lens(params, want[True]), atol=1e-5)
        if "stage" not in shape:  # a batch the mesh does not divide: __call__'s error (replicated only to decode)
            for run in (lambda m, t: m(t), lambda m, t: m.hidden_states(t)):
                with pytest.raises(ValueError, match="dimension 'batch' of size 3 does not divide mesh axes"):
                    jax.jit(lambda p, t, run=run: run(nnx.merge(graphdef, p), t))(sharded, tok[:3])
        if "stage" in shape:
            with pytest.raises(ValueError, match=r"all_layers=True\) under pipeline parallelism"):
                fn(True)(sharded, tok)


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
    with pytest.raises(ValueError, match="'cudnn' .* takes bfloat16 or float16"):  # cuDNN refused it at run time
        with_cfg(model, attn_impl="cudnn")
    # bf16 runs differ by rounding (~0.02 here); a mask ignored differs by far more (checked for the segments)
    cudnn, ref = with_cfg(model, attn_impl="cudnn", dtype="bfloat16"), with_cfg(model, dtype="bfloat16")
    ref_logits = ref(tokens)
    np.testing.assert_allclose(cudnn(tokens), ref_logits, atol=0.05)
    assert set(calls) == {(True, False)}
    calls.clear()
    seg = jnp.array([[1] * 5 + [2] * 7] * 2)
    cudnn_seg = cudnn(tokens, segment_ids_BT=seg)
    np.testing.assert_allclose(cudnn_seg, ref(tokens, segment_ids_BT=seg), atol=0.05)
    assert np.abs(cudnn_seg - ref_logits).max() > 0.2
    pad = jnp.broadcast_to(jnp.arange(12) < 9, (2, 12))
    np.testing.assert_allclose(cudnn(tokens, padding_mask_BT=pad)[:, :9], ref(tokens, padding_mask_BT=pad)[:, :9],
                               atol=0.05)
    assert set(calls) == {(False, True)}


def test_packed_equals_separate(model):
    a = jax.random.randint(jax.random.key(3), (1, 5), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(4), (1, 7), 0, CFG.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    # one program for the three forwards (eagerly each call compiled its layer scan)
    out, out_a, out_b = jax.jit(lambda p, a, b: (model(p, positions_BT=pos, segment_ids_BT=seg), model(a),
                                                 model(b)))(packed, a, b)
    np.testing.assert_allclose(out[:, :5], out_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], out_b, atol=1e-5)


def test_segment_ids_are_matched_by_equality_in_any_order(model):
    """Documents numbered 2 then 1 in a row attend only within themselves. Ids that rise along the row (as above)
    cannot tell `==` from `q_seg <= k_seg`: every key a causal query sees is earlier, so its id is never larger."""
    a = jax.random.randint(jax.random.key(3), (1, 5), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(4), (1, 7), 0, CFG.vocab_size)
    seg = jnp.array([[2] * 5 + [1] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out, out_a, out_b = jax.jit(lambda a, b: (model(jnp.concatenate([a, b], axis=1), positions_BT=pos,
                                                    segment_ids_BT=seg), model(a), model(b)))(a, b)  # one program
    np.testing.assert_allclose(out[:, :5], out_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], out_b, atol=1e-5)


def test_logits_depend_on_positions_through_their_differences_only(model, tokens):
    """RoPE rotates q and k by their positions, so a score sees only their difference: every position shifted by 1000
    gives the same logits, spread out (doubled) it does not. The other tests compare the model with itself at the
    same positions, and passed with k not rotated at all (queries alone carrying absolute positions)."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    # one program, the positions an argument (eagerly each call compiled its layer scan)
    at = jax.jit(lambda p: model(tokens, positions_BT=p))
    base = at(pos)
    np.testing.assert_allclose(at(pos + 1000), base, atol=2e-5)  # measured 1.5e-6
    assert np.abs(at(2 * pos) - base).max() > 0.1  # measured 0.40


def test_padding_is_never_attended(model, tokens):
    real = tokens[:, :8]
    junk = jax.random.randint(jax.random.key(5), (2, 4), 0, CFG.vocab_size)
    padded = jnp.concatenate([real, junk], axis=1)
    mask = jnp.arange(12)[None] < 8
    left = jnp.concatenate([junk, real], axis=1)
    pos = jnp.broadcast_to(jnp.maximum(jnp.arange(12) - 4, 0), (2, 12))
    # one program for the three forwards (eagerly each call compiled its layer scan)
    out, alone, out_left = jax.jit(lambda padded, real, left: (
        model(padded, padding_mask_BT=jnp.broadcast_to(mask, (2, 12))), model(real),
        model(left, positions_BT=pos, padding_mask_BT=jnp.broadcast_to(jnp.arange(12) >= 4, (2, 12)))))(
        padded, real, left)
    np.testing.assert_allclose(out[:, :8], alone, atol=1e-5)
    # left padding with shifted positions gives the same logits for the real tokens
    np.testing.assert_allclose(out_left[:, 4:], alone, atol=1e-5)


@pytest.mark.parametrize("layers", [dict(), dict(scan_layers=False)], ids=["scanned", "unscanned"])
def test_chunked_prefill_with_cache_equals_full_forward(model, tokens, layers):
    """Also with scan_layers=False, whose loop hands each layer its slice of the cache (every layer reading layer 0's
    passed every test: no decoding test ran unscanned layers)."""
    model = with_cfg(model, **layers) if layers else model
    # jitted: eager, the unscanned layer loop ran op by op (13 s against 2 s on a loaded 2-core machine); cached calls
    # run eagerly in test_cache_overflow_raises_when_static_and_gives_nan_when_traced
    fwd = jax.jit(lambda t, c=None: model(t, cache=c))
    full = fwd(tokens)
    cache = KVCache.zeros(CFG, 2, 16)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        logits, cache = fwd(tokens[:, lo:hi], cache)
        outs.append(logits)
    assert int(cache.length) == 12
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", [dict(), dict(attn_pattern="alternating", sliding_window=8),
                                     dict(attn_pattern="local", sliding_window=512)],
                         ids=["global", "local_global", "local"])
def test_a_decode_step_writes_its_slots_in_place(dtype, pattern):
    """The cache crossed the layer scan as xs / ys: every decode step sliced each layer's k / v out, wrote the whole
    layer into a fresh ys stack and copied it back (4 layers, 512 slots: temporaries of 1.6-3.4 times the cache; B 8,
    P 10, N 1000 decoded 2.4x slower than HF's generate). Carried, with only the new slot written, a step's
    temporaries are a layer's slices (0.3-0.8 times). A rolling buffer read its old slots before writing the new
    one: XLA copied the whole local stack to keep them (8 local layers, W 512, B 8: temporaries 1.07 times the cache,
    a step 1.6x slower than the parent layout)."""
    cfg = dataclasses.replace(CFG, n_layers=4, max_seq_len=1024, dtype=dtype, **pattern)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    cache = KVCache.zeros(cfg, 2, 512)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c), donate_argnums=2)
    temp = step.lower(state, jnp.zeros((2, 1), jnp.int32), cache).compile().memory_analysis().temp_size_in_bytes
    assert temp < sum(x.nbytes for x in cache.k + cache.v), temp


def test_cache_overflow_raises_when_static_and_gives_nan_when_traced(model, tokens):
    """A global layer's cache holds max_len tokens; past them it must not wrap into a sliding window silently."""
    with pytest.raises(ValueError, match="KVCache overflow.*max_len"):  # the chunk alone is too long
        model(tokens, cache=KVCache.zeros(CFG, 2, 8))
    _, cache = model(tokens[:, :6], cache=KVCache.zeros(CFG, 2, 8))
    with pytest.raises(ValueError, match="KVCache overflow"):  # concrete length 6 + 4 > 8
        model(tokens[:, 6:10], cache=cache)
    _, full_cache = model(tokens[:, :8], cache=KVCache.zeros(CFG, 2, 8))
    with pytest.raises(ValueError, match="hold 8 tokens .* this call of 1 token after 8 "):  # a decode step: "1 tokens"
        model(tokens[:, 8:9], cache=full_cache)
    # filling it exactly is no overflow (a bound of >= passed: every call stopped short of max_len or went past)
    full = model(tokens)
    np.testing.assert_allclose(model(tokens[:, 6:8], cache=cache)[0], full[:, 6:8], atol=1e-5)
    step = jax.jit(lambda t, c: model(t, cache=c))  # traced length: positions >= 8 come back NaN
    outs = []
    for t in range(6, 12):
        logits, cache = step(tokens[:, t:t + 1], cache)
        outs.append(logits)
    outs = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(outs[:, :2], full[:, 6:8], atol=1e-5)
    assert bool(jnp.isnan(outs[:, 2:]).all())


def test_eager_cached_calls_crossing_a_prefix_bucket_score_every_written_slot(model):
    """A cached call with a concrete length (eager) picks its bucket of slots now: the smallest holding length + T.
    A chunk or a decode step that ends one slot past a bucket (65 of 64) must score that slot, its own last token;
    the decoding tests run traced lengths (lax.switch), which choose the bucket another way."""
    tok = jax.random.randint(jax.random.key(3), (1, 66), 0, CFG.vocab_size)
    full = model(tok)
    for cuts in ((0, 60, 65, 66), (0, 64, 65)):
        cache, outs = KVCache.zeros(CFG, 1, 130), []  # buckets of 64, 128, then all 130 slots
        for lo, hi in zip(cuts, cuts[1:]):
            logits, cache = model(tok[:, lo:hi], cache=cache)
            outs.append(logits)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full[:, :cuts[-1]], atol=1e-5)


def test_cached_decoding_soft_caps_its_scores():
    """Every cached path (a decode step's prefix of slots, a short chunk over the ring plus itself, a chunk longer
    than the window) applies attn_logit_softcap as the full forward does. At the default init_std this cap moves the
    logits by 2e-6, and the soft-capped decoding tests elsewhere passed with it dropped from a decode step; at
    init_std 0.3 it moves them by 5.4."""
    cfg = dataclasses.replace(CFG, attn_pattern="alternating", sliding_window=4, attn_logit_softcap=1.0, init_std=0.3)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(4), (2, 14), 0, CFG.vocab_size)
    full = m(tok)
    assert float(jnp.abs(full - with_cfg(m, attn_logit_softcap=None)(tok)).max()) > 1.0  # the cap has teeth
    step = jax.jit(lambda t, c: m(t, cache=c))
    cache, outs = KVCache.zeros(cfg, 2, 16), []
    for lo, hi in ((0, 6), (6, 7), (7, 10), (10, 11), (11, 14)):  # T > W, decode steps, 1 < T <= W
        logits, cache = step(tok[:, lo:hi], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_rolling_buffers_decode_past_max_len():
    """Local layers with W slots never overflow: decoding 12 tokens with max_len 4 equals the full forward."""
    m = make(dataclasses.replace(CFG, attn_pattern="local", sliding_window=3))
    tok = jax.random.randint(jax.random.key(2), (1, 12), 0, CFG.vocab_size)
    cache, outs = KVCache.zeros(m.cfg, 1, 4), []
    step = jax.jit(lambda t, c: m(t, cache=c))
    for t in range(12):
        # eager (a concrete length, whose overflow would raise) up to the first token past max_len, then one compile
        logits, cache = m(tok[:, t:t + 1], cache=cache) if t <= 4 else step(tok[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), m(tok), atol=1e-5)



def test_a_window_past_the_int32_range_decodes_as_causal_attention():
    """W >= T is causal attention; the no-cache forward ran it, but cached decoding compared the int32 position
    differences with W = 2**31 and raised OverflowError ("An overflow was encountered while parsing an argument")."""
    m = make(dataclasses.replace(CFG, attn_pattern="local", sliding_window=2**31))
    tok = jax.random.randint(jax.random.key(2), (1, 8), 0, CFG.vocab_size)
    full = with_cfg(m, attn_pattern="global", sliding_window=None)(tok)
    cache, outs = KVCache.zeros(m.cfg, 1, 8), []
    for t0, t1 in ((0, 5), (5, 6), (6, 8)):
        logits, cache = m(tok[:, t0:t1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_rope_at_long_positions_equals_a_float64_rotation():
    """apply_rope against the half-split rotation computed in float64, at positions up to 4095: the HF parity tests
    stop at 40, where positions cast to bf16 (exact up to 256) passed them. NumPy positions (constant tables) and
    traced ones alike."""
    from models.rope import apply_rope, inv_frequencies

    H = 16
    pos = np.array([[0, 1, 255, 257, 1001, 2049, 4095]])
    x = np.random.default_rng(0).normal(size=(1, pos.shape[1], 2, H))
    inv = inv_frequencies(H, 1e4)
    ang = (pos[..., None] * inv.astype(np.float64))[:, :, None, :]
    x1, x2 = x[..., :H // 2], x[..., H // 2:]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    for p in (pos, jnp.asarray(pos)):
        # float32 angles: position·freq rounds by up to 2.4e-4 rad at 4095
        np.testing.assert_allclose(apply_rope(jnp.asarray(x, jnp.float32), p, inv), want, atol=2e-3)
    # bf16 q / k rotated in float32 and returned in bf16, as documented (a float32 result passed every other test)
    x16 = jnp.asarray(x, jnp.bfloat16)
    x1, x2 = np.split(np.asarray(x16, np.float64), 2, -1)
    want16 = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    out16 = apply_rope(x16, pos, inv)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float64), want16, rtol=2 ** -8, atol=2e-3)
    from models.rope import rope_tables

    # float32 tables from int64 NumPy positions too (NumPy promotes int64 · float32 to float64), as transformers'
    assert all(t.dtype == np.float32 for t in rope_tables(pos, inv))


def test_rope_frequencies_are_float64_values_rounded_once():
    """inv_frequencies promises float64 values rounded once to float32 (transformers' float32 ones are a few ulps
    off, so its parity test's rtol=1e-6 passed frequencies computed in float32 too): Llama 3.1's own settings
    (head dim 128, theta 5e5, llama3 x8 over 8192) and plain / linear ones against Meta's scalar reference in
    Python floats, to half a float32 ulp."""
    import math

    from models import RopeScaling
    from models.rope import inv_frequencies

    def llama31(freq, factor=8.0, low=1.0, high=4.0, old=8192):  # Meta's apply_scaling, one frequency
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            return freq
        if wavelen > old / low:
            return freq / factor
        smooth = (old / wavelen - low) / (high - low)
        return (1 - smooth) * freq / factor + smooth * freq

    for hd, theta, scaling, f in [(128, 5e5, RopeScaling("llama3"), llama31), (80, 1e4, None, lambda v: v),
                                  (96, 1e6, RopeScaling("linear", 3.0), lambda v: v / 3.0)]:
        want = np.array([f(1.0 / theta ** (i / hd)) for i in range(0, hd, 2)])
        got = inv_frequencies(hd, theta, scaling)
        assert got.dtype == np.float32
        assert (np.abs(got - want) <= np.spacing(got) / 2).all(), (hd, np.abs(got - want) / np.spacing(got))


def test_cross_entropy_ignores_negative_targets_like_a_float64_reference():
    """-100 (HF's ignore index) and weight-0 positions drop out of the mean, even when their logits or targets are
    garbage (NaN logits, target >= V); a target >= V at a weighted position gives NaN rather than a silent loss."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    targets[0, 1], targets[1, 4], targets[1, 0] = -100, -1, 7  # ignored, ignored, out of range under weight 0
    targets[0, 3] = 0  # id 0 is a token (a trained BPE's <|endoftext|>): `targets <= 0` ignoring it passed
    weights = rng.uniform(0.5, 2.0, (2, 5)).astype(np.float32)
    weights[1, 0] = 0.0
    logits[0, 1] = np.nan  # garbage at an ignored position
    used = (targets >= 0) & (weights > 0)
    l64 = logits.astype(np.float64)
    logz = np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1)
    nll = logz - np.take_along_axis(l64, np.clip(targets, 0, 6)[..., None], -1)[..., 0]
    want = (nll * weights)[used].sum() / weights[used].sum()
    loss, n = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(n), weights[used].sum(), rtol=1e-6)
    logits[0, 1] = 0.0
    unweighted, n = cross_entropy(jnp.asarray(logits), jnp.asarray(np.where(targets == 7, -100, targets)))
    assert float(n) == 7 and np.isfinite(float(unweighted))
    grad = jax.grad(lambda lg: cross_entropy(lg, jnp.asarray(targets), jnp.asarray(weights))[0])(jnp.asarray(logits))
    assert bool(jnp.isfinite(grad).all()) and not grad[0, 1].any() and not grad[1, 4].any()
    assert np.isnan(float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))[0]))  # 7 >= V, weight 1
    # a weighted mean also when the weights sum to less than 1; no weight at all: (0, 0)
    small = np.zeros((2, 5), np.float32)
    small[0, 0] = 0.5
    loss, n = cross_entropy(jnp.asarray(logits), jnp.asarray(np.clip(targets, 0, 6)), jnp.asarray(small))
    np.testing.assert_allclose((float(loss), float(n)), (nll[0, 0], 0.5), rtol=1e-6)
    loss, n = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 5)))
    assert (float(loss), float(n)) == (0.0, 0.0)



def test_cross_entropy_of_bf16_logits_is_summed_in_float32():
    """bf16 logits (as a bf16 LM head gives): the log-partition is taken in float32 on the bf16 values, so the loss
    equals a float64 reference of those values to float32 rounding; a logsumexp in bf16 was 2e-3 off here (11.1569
    for 11.1591)."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 6, 1000)) * 3, jnp.bfloat16)
    targets = rng.integers(0, 1000, (2, 6))
    l64 = np.asarray(logits, np.float64)
    logz = np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1)
    want = (logz - np.take_along_axis(l64, targets[..., None], -1)[..., 0]).mean()
    loss, _ = cross_entropy(logits, jnp.asarray(targets))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_cross_entropy_of_huge_logits_is_exact_relative_to_the_row_max():
    """log Σ exp(x) - x_target taken as two absolute float32 numbers kept the loss only to ulp(max logit): logits
    near 1e4 gave 1.40723 for a float64 1.40761, a tie at 3e38 gave 0 for log 2. Relative to the row max the loss
    is exact to float32 rounding; the gradient is softmax - onehot either way."""
    cases = (([1e4, 1e4 - 1, -1e4, 1e4 - 2, 0.0], 1), ([3e38, 3e38], 0), ([3e38, -3e38, 0.0], 2),
             ([-np.inf, 2.0, -np.inf, 1.0], 3))
    for row, t in cases:
        l64 = np.asarray(row, np.float64)
        m = l64.max()
        p = np.exp(l64 - m) / np.exp(l64 - m).sum()
        want = np.log(np.exp(l64 - m).sum()) - (l64[t] - m)
        logits = jnp.asarray([[row]], jnp.float32)
        loss, _ = cross_entropy(logits, jnp.asarray([[t]]))
        np.testing.assert_allclose(float(loss), want, rtol=1e-6, err_msg=str(row))
        grad = jax.grad(lambda lg: cross_entropy(lg, jnp.asarray([[t]]))[0])(logits)[0, 0]  # noqa: B023
        np.testing.assert_allclose(np.asarray(grad), p - np.eye(len(row))[t], atol=1e-7, err_msg=str(row))


def test_cross_entropy_of_a_target_past_the_vocab_is_nan_whatever_its_integer_type():
    """uint32 2**32 - 1 (a -1 ignore id stored unsigned) read class V - 1 and 2**32 - 2 class V - 2, and a numpy
    int64 2**32 + 2 wrapped to int32 2 (class 2): finite losses of other classes. Past the vocabulary at a weighted
    position is NaN, as the docstring says; at a weight-0 one it changes nothing, and negative int64 ids stay
    ignored. Narrow ids stay scored when V is past their type (uint8 ids of a 256-token vocabulary)."""
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(1, 3, 4)).astype(np.float32))
    want = cross_entropy(logits, jnp.asarray([[1, 2, 3]]), jnp.asarray([[1.0, 1.0, 0.0]]))
    for bad in (np.array([[1, 2, 2**32 - 1]], np.uint32), np.array([[1, 2, 2**32 - 2]], np.uint32),
                np.array([[1, 2, 2**32 + 2]], np.int64), np.array([[1, 2, 2**63 - 1]], np.uint64)):
        assert np.isnan(float(cross_entropy(logits, bad)[0])), bad
        if bad.dtype.itemsize == 4:  # (a jitted call takes int64 as int32 at its boundary, before us)
            assert np.isnan(float(jax.jit(cross_entropy)(logits, jnp.asarray(bad))[0])), bad
        np.testing.assert_array_equal(cross_entropy(logits, bad, jnp.asarray([[1.0, 1.0, 0.0]])), want)
    np.testing.assert_array_equal(cross_entropy(logits, np.array([[1, 2, -2**32 - 5]], np.int64)), want)
    for V, ids in ((256, np.array([[255, 0]], np.uint8)), (200, np.array([[127, -1]], np.int8))):  # V past the type
        loss, n = cross_entropy(jnp.zeros((1, 2, V)), ids)
        np.testing.assert_allclose(float(loss), np.log(V), rtol=1e-6)


def test_cross_entropy_refuses_negative_weights():
    """Weights (1, -1) returned the loss difference, -0.397, as the "mean" with Σ weights 0, and (2, -1) a positive
    but meaningless 0.313, silently; an inf weight gave inf / inf = NaN without a word. Concrete weights: a
    ValueError naming the position; under jit: NaN. A negative weight at an ignored position (target < 0) is no
    weight. Float targets raised take_along_axis's 'indices must be of integer type', naming neither argument."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(1, 3, 5)).astype(np.float32))
    targets = jnp.asarray([[1, 2, -100]])
    for w in ([[1.0, -1.0, 0.0]], [[2.0, -1.0, 0.0]], [[1.0, np.nan, 1.0]], [[1.0, np.inf, 1.0]]):
        with pytest.raises(ValueError, match=r"weights_BT must be >= 0 .* at \[b, t\] = \[0, 1\]"):
            cross_entropy(logits, targets, jnp.asarray(w))
        assert np.isnan(float(jax.jit(cross_entropy)(logits, targets, jnp.asarray(w))[0]))
    ok = cross_entropy(logits, targets, jnp.asarray([[1.0, 1.0, -1.0]]))  # -1 at an ignored position
    np.testing.assert_array_equal(ok, cross_entropy(logits, targets))
    np.testing.assert_array_equal(jax.jit(cross_entropy)(logits, targets, jnp.asarray([[1.0, 1.0, -1.0]])), ok)
    with pytest.raises(ValueError, match=r"targets_BT must be integer token ids, got float32"):
        cross_entropy(logits, targets.astype(jnp.float32))


def test_cross_entropy_refuses_weights_or_targets_not_shaped_like_the_logits():
    """Per-row weights [B] broadcast over T when B == T: a silently wrong loss (rows' weights applied to columns);
    targets one token short failed inside the computation with a bare broadcasting error."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 4, 7)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, 7, (4, 4)))
    with pytest.raises(ValueError, match=r"weights \(4,\) must be \[B, T\].*np.repeat"):
        cross_entropy(logits, targets, jnp.asarray([1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"targets \(4, 3\) must be the logits' \[B, T\] \(4, 4\)"):
        cross_entropy(logits, targets[:, :3])
    # the repeat the message names gives the per-row mean: rows 0 and 1 alone
    loss, n = cross_entropy(logits, targets, jnp.asarray(np.repeat(np.array([1.0, 1.0, 0.0, 0.0])[:, None], 4, 1)))
    want, _ = cross_entropy(logits[:2], targets[:2])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(n) == 8


def test_cross_entropy_takes_array_likes():
    """Weights (or targets) as a plain list raised AttributeError: 'list' object has no attribute 'astype'."""
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(1, 3, 5)).astype(np.float32))
    want = cross_entropy(logits, jnp.asarray([[1, 2, 3]]), jnp.asarray([[1.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(cross_entropy(logits, [[1, 2, 3]], [[1.0, 1.0, 0.0]]), want)
    np.testing.assert_array_equal(cross_entropy(logits, np.array([[1, 2, 3]]), [[True, True, False]]), want)


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



def test_bf16_logits_are_float32_products(tokens):
    """dtype=bfloat16: the LM head accumulates and outputs float32 (config: logits stay float32), so the logits
    are not bf16 values cast up. No soft-cap here: its tanh alone would leave the bf16 grid."""
    out = make(dataclasses.replace(CFG, final_logit_softcap=None, dtype="bfloat16"))(tokens)
    assert out.dtype == jnp.float32
    assert float(jnp.mean(out != out.astype(jnp.bfloat16).astype(jnp.float32))) > 0.5


@pytest.mark.parametrize("impl", ["plain", "transposed_grad"])
def test_linear_float32_output_keeps_operand_gradient_dtypes(impl):
    """linear(..., out_dtype=float32) on bf16 operands: the float64 product of the operands to float32 precision;
    gradients in bf16 equal to autodiff of a bf16 product cast up afterwards (the cotangent rounded to bf16, so
    the backward keeps bf16 matmuls)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = (jax.random.normal(k, s).astype(jnp.bfloat16) for k, s in ((kx, (24, 64)), (kw, (64, 40))))
    g = jax.random.normal(kg, (24, 40))
    y, pull = jax.vjp(lambda x, w: linear(x, w, impl, out_dtype=jnp.float32), x, w)
    _, pull_ref = jax.vjp(lambda x, w: (x @ w).astype(jnp.float32), x, w)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(pull(g), pull_ref(g)):
        assert got.dtype == ref.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("field,value,words", [
    ("n_kv_heads", 3, "n_kv_heads"), ("head_dim", 7, "head_dim"), ("attn_impl", "flash", "attn_impl"),
    ("remat", "some", "remat"), ("dtype", "int8", "dtype"), ("d_model", 30, "head_dim"),
    ("scan_unroll", 0, "scan_unroll"),
    # 0 / False must not fall through to the defaults (n_heads, d_model // n_heads)
    ("n_kv_heads", 0, "n_kv_heads"), ("head_dim", 0, "head_dim"), ("n_kv_heads", True, "n_kv_heads"),
    ("head_dim", -8, "head_dim"),
    # values that used to give NaN logits or silently drop a setting
    ("rope_theta", 0.0, "rope_theta"), ("norm_eps", -1e-6, "norm_eps"),
    ("sliding_window", 4, "sliding_window: is set but attn_pattern='global'"),
    # sizes from JSON / YAML as floats: they used to fail inside JAX (or, moe_every=1.5, build a dense model)
    ("vocab_size", 64.0, "vocab_size: must be a positive int"), ("swa_block", 16.0, "swa_block"),
    ("attn_block", 8.5, "attn_block"), ("scan_unroll", 2.0, "scan_unroll"), ("moe_every", 1.5, "moe_every"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling: must be a models.RopeScaling"),
    ("moe", {"n_experts": 4}, "moe: must be a models.moe.MoEConfig"),
    ("dtype", np.dtype("int8"), "dtype: unsupported 'int8'"), ("param_dtype", 3, "param_dtype: unsupported 3"),
    # a TypeError deep inside, or a truthy string taken as True (biases built, embeddings tied for "no")
    ("rope_theta", "1e4", "rope_theta: must be a number"), ("norm_eps", None, "norm_eps: must be a number"),
    ("attn_logit_softcap", "5", "attn_logit_softcap: must be a number or None"),
    ("init_std", -1.0, "init_std: must be positive"), ("qkv_bias", "no", "qkv_bias: must be True or False"),
    ("tie_embeddings", "no", "tie_embeddings: must be True or False"),
    # None / an int failed inside str methods (AttributeError, no field named)
    ("attn_pattern", None, "attn_pattern: must be a string"), ("attn_pattern", 2, "attn_pattern: must be a string"),
    ("qk_norm", "yes", "qk_norm: must be True or False"),
    ("local_rope_theta", 1e4, "local_rope_theta: is set but attn_pattern='global' has no local layer"),
    ("local_rope_theta", 0.0, "local_rope_theta: must be positive or None"),
    ("pre_norms", "no", "pre_norms: must be True or False"),
    ("qk_norm_scope", "layer", "qk_norm_scope: unknown 'layer'; use 'head' .* or 'all_heads'"),
    ("qk_norm_scope", "all_heads", "qk_norm_scope: 'all_heads' is set but qk_norm=False"),  # no norm to scope
])
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(CFG, **{field: value})


def test_dtype_objects_are_kept_as_their_names():
    """jnp.bfloat16 / np.dtype('float32') were refused (names only: an object is no JSON and no cache key); they
    are stored as their names, equal configs and hashes included."""
    from models.video import DiTConfig

    cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16, param_dtype=np.dtype("float32"))
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32") and type(cfg.dtype) is str
    named = dataclasses.replace(CFG, dtype="bfloat16")
    assert cfg == named and hash(cfg) == hash(named)
    assert DiTConfig(dtype=jnp.bfloat16).dtype == "bfloat16"


@pytest.mark.parametrize("kw,words", [
    (dict(kind="dynamic"), "RopeScaling.kind: unknown 'dynamic'"), (dict(kind="LINEAR"), "RopeScaling.kind"),
    (dict(kind="yarn", beta_slow=0), "yarn needs beta_fast > 0, beta_slow > 0"),
    (dict(kind="yarn", attention_factor=-1.0), "RopeScaling.attention_factor: must be positive"),
    (dict(kind="yarn", truncate=1), "RopeScaling.truncate: must be True or False"),
    (dict(kind="linear", factor=0.0), "RopeScaling.factor"),
    (dict(low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor < high_freq_factor"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings >= 1"),
    (dict(factor="8"), "RopeScaling.factor: must be a number"),
    # YaRN-only scales on another kind were dropped (attention_scale 1.0); swapped betas interpolated the fast dims
    (dict(kind="linear", attention_factor=2.0), "RopeScaling.attention_factor: only kind='yarn' uses it"),
    (dict(kind="llama3", mscale=0.707, mscale_all_dim=1.0), "RopeScaling.mscale: only kind='yarn' uses it"),
    # as were YaRN's ramp settings on llama3 / linear (`--set model.rope_scaling.factor=4` with beta_fast=16 ran
    # llama3 x4, the betas unread) and llama3's band on yarn / linear: refused unless left at their defaults
    (dict(kind="llama3", beta_fast=16.0), "RopeScaling.beta_fast: only kind='yarn' uses it; kind='llama3' would"),
    (dict(kind="linear", beta_slow=2.0), "RopeScaling.beta_slow: only kind='yarn' uses it"),
    (dict(kind="llama3", truncate=False), "RopeScaling.truncate: only kind='yarn' uses it"),
    (dict(kind="yarn", low_freq_factor=2.0), "RopeScaling.low_freq_factor: only kind='llama3' uses it"),
    (dict(kind="linear", high_freq_factor=8.0), "RopeScaling.high_freq_factor: only kind='llama3' uses it"),
    (dict(kind="yarn", beta_fast=1.0, beta_slow=32.0), "RopeScaling.beta_fast: must be >= beta_slow"),
    # a negative mscale made the attention factor negative (scores x 925 at mscale_all_dim=-5, factor 8) or divided
    # by zero on the first forward (mscale_all_dim=-10, factor e)
    (dict(kind="yarn", factor=8.0, mscale=1.0, mscale_all_dim=-5.0), "RopeScaling.mscale_all_dim: must be >= 0"),
    (dict(kind="yarn", factor=8.0, mscale=-20.0, mscale_all_dim=1.0), "RopeScaling.mscale: must be >= 0"),
])
def test_rope_scaling_errors_name_the_field(kw, words):
    from models.config import RopeScaling

    with pytest.raises(ValueError, match=words):
        RopeScaling(**kw)
    # the same fields at their defaults (as dataclasses.replace(scaling, kind=...) keeps them) stay accepted
    for kind in ("llama3", "linear", "yarn"):
        RopeScaling(kind=kind, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, beta_fast=32, beta_slow=1.0,
                    truncate=True)


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_a_rope_theta_yarn_cannot_use_is_refused(theta):
    """YaRN's ramp divides by log(rope_theta) (as transformers' does): theta 1 raised ZeroDivisionError on the first
    forward, theta 0.5 interpolated the wrong dimensions silently. Other kinds take any finite theta > 0."""
    from models.config import RopeScaling
    from models.rope import inv_frequencies

    yarn = RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=64)
    with pytest.raises(ValueError, match=f"TransformerConfig.rope_theta: {theta} with rope_scaling kind='yarn': YaRN "
                                         "needs rope_theta > 1"):
        dataclasses.replace(CFG, rope_theta=theta, rope_scaling=yarn)
    for other in ("linear", "llama3"):  # finite frequencies at theta 0.5: accepted
        s = RopeScaling(kind=other, factor=4.0, original_max_position_embeddings=64)
        cfg = dataclasses.replace(CFG, rope_theta=0.5, rope_scaling=s)
        assert np.isfinite(inv_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)).all()


def test_apply_rope_names_positions_of_the_wrong_shape():
    """positions [T] (one sequence's) failed with a bare IndexError inside the table's indexing; [1, T] is shared
    by every row, as the video model passes it."""
    from models.rope import apply_rope, inv_frequencies

    x = jnp.ones((2, 5, 3, 8))
    inv = inv_frequencies(8, 1e4)
    for bad in (np.arange(5), jnp.arange(5), np.zeros((2, 5, 1)), np.zeros((3, 5)), np.zeros((2, 4))):
        with pytest.raises(ValueError, match=r"positions_BT must be \[batch, length\] = \(2, 5\) or \[1, length\]"):
            apply_rope(x, bad, inv)
    shared = apply_rope(x, np.arange(5)[None], inv)
    np.testing.assert_array_equal(shared, apply_rope(x, np.broadcast_to(np.arange(5), (2, 5)), inv))


def test_apply_rope_names_a_head_dim_its_frequencies_do_not_fit():
    """An odd head dim failed with "array split does not result in an equal division", frequencies of another head
    dim with a broadcasting TypeError; neither named the head dim (TransformerConfig refuses an odd one)."""
    from models.rope import apply_rope, inv_frequencies

    pos = np.arange(5)[None]
    for h, inv_h in ((5, 4), (5, 6), (8, 6), (8, 16)):
        with pytest.raises(ValueError, match=rf"x_BTNH's head dim {h} must be 2 x len\(inv_freq_F\) = "
                                             rf"{2 * len(inv_frequencies(inv_h, 1e4))}"):
            apply_rope(jnp.ones((1, 5, 2, h)), pos, inv_frequencies(inv_h, 1e4))
    assert apply_rope(jnp.ones((1, 5, 2, 8)), pos, inv_frequencies(8, 1e4)).shape == (1, 5, 2, 8)


def test_inv_frequencies_refuses_a_head_dim_rope_cannot_rotate():
    """An odd head dim gave ceil(H / 2) frequencies, not the documented H // 2 (apply_rope then blamed "2 x
    len(inv_freq_F) = H + 1" and told the caller to pass inv_frequencies(head_dim, theta), the very call), and with
    YaRN a bare "operands could not be broadcast"; 0 or a negative one gave no frequencies at all."""
    from models.config import RopeScaling
    from models.rope import inv_frequencies

    yarn = RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=64)
    for bad in (5, 7, 0, -2, 6.5, True):
        for scaling in (None, RopeScaling("linear", 2.0), RopeScaling("llama3"), yarn):
            with pytest.raises(ValueError, match=rf"inv_frequencies: head_dim must be a positive even integer .*"
                                                 rf"got {bad!r}"):
                inv_frequencies(bad, 1e4, scaling)
    for good in (2, 6, np.int64(8), 8.0):  # any integral even size (a numpy int, a whole float) still works
        assert inv_frequencies(good, 1e4, yarn).shape == (int(good) // 2,)


def test_tokens_of_length_zero_are_refused_by_name():
    """tokens [B, 0] failed inside attention with "zero-size array to reduction operation max" (generate refuses an
    empty prompt by name); an empty batch [0, T] still runs."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens must hold at least one token per row, got shape \(2, 0\)"):
        model(jnp.zeros((2, 0), jnp.int32))
    assert model(jnp.zeros((0, 3), jnp.int32)).shape == (0, 3, CFG.vocab_size)


@pytest.mark.parametrize("window", [True, (3, False)])
def test_bool_sliding_window_is_refused(window):
    """True is an int in Python: it must not become a window of 1."""
    with pytest.raises(ValueError, match="sliding_window.*bools"):
        dataclasses.replace(CFG, attn_pattern="local", sliding_window=window)


def test_bad_token_ids_and_masks_are_refused_or_read_as_ints():
    """Ids >= V gathered NaN rows that spread to the whole row, -1 wrapped to the last id; a 0/1 int padding
    mask (a tokenizer's attention_mask) is the bool mask."""
    cfg = dataclasses.replace(CFG, n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(ValueError, match=f"vocab_size={cfg.vocab_size}"):
            model(jnp.array([[1, bad, 2]]))
    with pytest.raises(ValueError, match="integer ids"):
        model(jnp.array([[1.0, 2.0]]))
    graphdef, state = nnx.split(model)
    ok, bad = jnp.array([[1, 2, 3]]), jnp.array([[1, cfg.vocab_size, 3]])  # concrete batches closed over by jit
    np.testing.assert_allclose(jax.jit(lambda s: nnx.merge(graphdef, s)(ok))(state), model(ok), rtol=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        jax.jit(lambda s: nnx.merge(graphdef, s)(bad))(state)
    tok = jnp.array([[3, 4, 5, 0]])
    mask = jnp.array([[1, 1, 1, 0]])
    np.testing.assert_array_equal(model(tok, padding_mask_BT=mask), model(tok, padding_mask_BT=mask.astype(bool)))
    with pytest.raises(ValueError, match="padding_mask_BT must be bool"):
        model(tok, padding_mask_BT=mask.astype(jnp.float32))
    # positions / segment ids as lists, as tokens and masks may be: a bare TypeError deep in the layer scan before
    pos, seg = [[2, 3, 4, 5]], [[0, 0, 1, 1]]
    np.testing.assert_array_equal(model(tok, positions_BT=pos, segment_ids_BT=seg),
                                  model(tok, positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg)))


def test_inputs_and_caches_of_the_wrong_shape_are_refused_by_name():
    """positions [T] raised an IndexError in RoPE, segment ids [T] a jnp.pad error, 1-D tokens an unpacking error,
    a cache of another batch or model a broadcast inside the layer scan; window 0 gave zeros from 'dense'."""
    from models.sliding_window import local_attention
    from models.transformer import KVCache

    cfg = dataclasses.replace(CFG, n_layers=2, attn_pattern="alternating", sliding_window=4)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tok = jnp.zeros((2, 12), jnp.int32)
    for kw, words in [(dict(positions_BT=jnp.arange(12)), r"positions_BT must be \[batch, length\] = \(2, 12\)"),
                      (dict(positions_BT=jnp.zeros((2, 11), jnp.int32)), r"positions_BT .* got shape \(2, 11\)"),
                      (dict(segment_ids_BT=jnp.ones(12, jnp.int32)), r"segment_ids_BT .* got shape \(12,\)"),
                      (dict(padding_mask_BT=jnp.ones((2, 13), bool)), r"padding_mask_BT .* got shape \(2, 13\)"),
                      (dict(cache=KVCache.zeros(cfg, 3, 16)), "KVCache holds k .* need 2 of \\[1, 2, 2, slots"),
                      (dict(cache=KVCache.zeros(CFG, 2, 16)), "allocate KVCache.zeros\\(cfg, batch, max_len\\) for "
                                                              "this model")]:
        with pytest.raises(ValueError, match=words):
            model(tok, **kw)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\], got shape \(12,\)"):
        model(tok[0])
    assert model(tok, cache=KVCache.zeros(cfg, 2, 16))[0].shape == (2, 12, cfg.vocab_size)
    q = jnp.ones((1, 8, 2, 4))
    for w in (0, 2.5, True):
        with pytest.raises(ValueError, match="sliding window must be an int >= 1"):
            local_attention(q, q, q, w, impl="dense")


def test_numpy_int_sizes_become_plain_ints():
    """Sizes from a numpy sweep are ints (a float is refused), stored as plain ints so configs stay JSON-able."""
    cfg = dataclasses.replace(CFG, d_model=np.int64(32), moe=MoEConfig(np.int64(4), 2, np.int32(16)))
    assert type(cfg.d_model) is int and type(cfg.moe.n_experts) is int and type(cfg.moe.expert_mlp_dim) is int
    # windows, floats and flags too: a numpy window crashed layer_windows, numpy floats failed the JSON export
    for window in (np.int64(4), (np.int64(4), np.int32(8)), [4, 8]):
        local = dataclasses.replace(CFG, n_layers=2, attn_pattern="local", sliding_window=window,
                                    rope_theta=np.float32(1e4), norm_eps=np.float64(1e-5), qkv_bias=np.bool_(True))
        assert local.layer_windows() == ((4, 4) if np.ndim(window) == 0 else (4, 8))
        assert json.loads(json.dumps(dataclasses.asdict(local)))["rope_theta"] == 1e4 and local.qkv_bias is True
    assert cfg.kv_cache_bytes(1, 16, 2) == cfg.kv_cache_bytes(1, 16, "bfloat16")  # bytes per element, as before
    # scan_unroll too (it stayed a numpy int, and RunConfig.to_json failed at the first checkpoint); True stays True
    assert type(dataclasses.replace(CFG, scan_unroll=np.int64(2)).scan_unroll) is int
    assert dataclasses.replace(CFG, scan_unroll=True).scan_unroll is True


@pytest.mark.parametrize("partitionable", [True, False])
def test_params_drawn_flat_on_cpu_are_the_bits_of_a_draw_in_their_shape(partitionable):
    """models.params draws flat and reshapes on CPU (XLA:CPU compiles a rank-5 draw ~8x slower): the values must be
    exactly those of nnx's normal initializer in the parameter's shape, in both of JAX's threefry modes; zeros and
    ones take their key too, so later parameters do not move when an earlier one becomes constant."""
    from models.params import param

    assert jax.default_backend() == "cpu"
    with jax.threefry_partitionable(partitionable), nnx.use_eager_sharding(False):
        for shape, dtype in (((5,), jnp.float32), ((6, 4), jnp.bfloat16), ((3, 3, 3, 2, 4), jnp.float32),
                             ((2, 8, 3, 4), jnp.float32)):
            key = jax.random.key(len(shape))
            # the key param takes; bf16 drawn in float32 and rounded once (test_bf16_parameters_are_the_float32_...)
            want = nnx.initializers.normal(0.02)(nnx.Rngs(params=key).params(), shape, jnp.float32).astype(dtype)
            got = param(nnx.Rngs(params=key), shape, (None,) * len(shape), dtype, 0.02)[...]
            assert got.dtype == want.dtype and got.shape == shape
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        after = []
        for std, const in ((0.02, None), (0, 0.0), (None, 1.0)):  # std 0: zeros, None: ones (biases, norm scales)
            rngs = nnx.Rngs(params=0)
            p = param(rngs, (4, 4), (None, None), jnp.float32, std)[...]
            assert const is None or (p == const).all(), (std, p)
            after.append(param(rngs, (3,), (None,), jnp.float32, 1.0)[...])
        np.testing.assert_array_equal(after[0], after[1])
        np.testing.assert_array_equal(after[0], after[2])


def test_config_with_a_huge_layer_count_is_checked_without_a_tuple_per_layer():
    """__post_init__ built the per-layer pattern to validate it: TransformerConfig(n_layers=10**12) raised a
    MemoryError, and with attn_pattern='alternating' (a generator per layer) it ran for hours (5.9 s at 10**7
    layers, linear). The checks now count local layers per period, so a size sweep's configs are instant, and the
    count agrees with the per-layer tuple. The work is bounded by Python events, not wall time: ~4,100 calls and
    lines here; a loop per layer would take hours (no test timeout ends it), so it is stopped at 100,000."""
    import sys

    class OverBudget(BaseException):  # (not an Exception: no `except Exception` in the code under test swallows it)
        pass

    events = 0

    def budget(frame, event, arg):
        nonlocal events
        events += 1
        if events > 100_000:
            raise OverBudget(f"over 100,000 Python events in {frame.f_code.co_qualname}: a loop per layer?")
        return budget

    previous = sys.gettrace()
    sys.settrace(budget)
    try:
        for pattern, window, n_local in (("global", None, 0), ("alternating", 4096, 5 * 10**11),
                                         ("5:1", 8, 833333333334), ("999999999999:1", 8, 999999999999)):
            cfg = TransformerConfig(n_layers=10**12, attn_pattern=pattern, sliding_window=window)
            assert cfg._n_local() == n_local
        with pytest.raises(ValueError, match="got 1 windows for 833333333334 local layers"):
            TransformerConfig(n_layers=10**12, attn_pattern="5:1", sliding_window=(8,))
    finally:
        sys.settrace(previous)
    for n_layers in range(1, 9):
        for pattern in ("global", "local", "alternating", "1:1", "2:1", "3:1"):
            try:
                cfg = TransformerConfig(n_layers=n_layers, attn_pattern=pattern, sliding_window=4)
            except ValueError:
                continue
            assert cfg._n_local() == sum(cfg.local_layers()) == sum(w is not None for w in cfg.layer_windows())


def test_bf16_qkv_bias_gradients_sum_over_tokens_in_float32():
    # q / k / v biases' gradients sum the cotangent over all B·T tokens: bf16 sums of 4K-256K tokens were 0.6-1.7% off
    # (of the largest), cast up to the float32 parameters' gradients; float32 sums are exact to ~1e-7
    from experiments.lm_step import lm_loss
    from tests.test_video_models import bf16_token_sums

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_dim=64, max_seq_len=32,
                            qkv_bias=True, dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 33)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    assert bf16_token_sums(jax.grad(lambda p: lm_loss(graphdef, p, batch)), params, tokens=32) == []


def test_forward_and_gradient_under_rank_promotion_raise():
    """jax_numpy_rank_promotion='raise' (researchers' shape check) refused every model: RMSNorm's [D] scale, the
    q / k / v biases and RoPE's [F] frequencies were broadcast over [B, T, ...] implicitly. Broadcast explicitly,
    the same loss and gradients (the MoE router bias: tests/test_moe.py)."""
    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mlp_dim=32, max_seq_len=8,
                            qkv_bias=True, qk_norm=True)
    build = lambda: Transformer(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, params = nnx.split(nnx.eval_shape(build))[0], jax.jit(lambda: nnx.state(build()))()  # one program
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9), dtype=np.int32))

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p)(tok[:, :-1]), tok[:, 1:])[0]

    want = jax.jit(jax.value_and_grad(loss))(params)
    with jax.numpy_rank_promotion("raise"):
        got = jax.jit(jax.value_and_grad(loss))(params)  # another function object: traced under the setting
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bf16_parameters_are_the_float32_init_rounded():
    """param_dtype='bfloat16' draws the float32 init and rounds it once: jax.random.normal drawn in bfloat16 has 128
    values, none beyond 2.9 sigma (torch's bf16 normal_ ~3600, to 5 sigma), and the same seed gave another model than
    the float32 one rounded."""
    cfg = dataclasses.replace(CFG, d_model=64, mlp_dim=256)
    f32 = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    bf16 = nnx.to_pure_dict(nnx.state(Transformer(dataclasses.replace(cfg, param_dtype="bfloat16"),
                                                  rngs=nnx.Rngs(0)), nnx.Param))
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
        assert b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    w = np.asarray(bf16["blocks"]["w_up"].astype(jnp.float32))
    z = w / w.std()
    assert len(np.unique(w)) > 1000 and np.abs(z).max() > 3.5


def test_query_pre_attn_scalar_scales_scores_by_its_inverse_square_root():
    """Scores scaled by s**-0.5 (Gemma 2's query_pre_attn_scalar s) instead of head_dim**-0.5: the same logits as the
    default scale with q's projection (weight and bias) multiplied by sqrt(head_dim / s), by linearity (RoPE too)."""
    model, H = make(), CFG.d_model // CFG.n_heads
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    s = 4.0 * H
    scaled, ref = with_cfg(model, query_pre_attn_scalar=s), with_cfg(model)
    c = (H / s) ** 0.5
    ref.blocks.wq[...] = model.blocks.wq[...] * c
    ref.blocks.bq[...] = model.blocks.bq[...] * c
    got = scaled(tokens)
    np.testing.assert_allclose(got, ref(tokens), atol=2e-5, rtol=2e-5)
    assert not np.allclose(got, model(tokens), atol=1e-3)  # the scalar changes the logits at all


def test_embed_scale_multiplies_the_embeddings_by_sqrt_d_model():
    """embed_scale (Gemma) multiplies the token embeddings by sqrt(d_model): the same logits as no scaling with the
    (untied) embedding table multiplied by sqrt(d_model) by hand."""
    model = make()
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    ref = with_cfg(model)
    ref.embed[...] = model.embed[...] * CFG.d_model ** 0.5
    np.testing.assert_allclose(with_cfg(model, embed_scale=True)(tokens), ref(tokens), atol=2e-5, rtol=2e-5)
