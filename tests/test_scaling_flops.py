"""scaling.flops / scaling.dit against XLA's cost_analysis() and the real parameter trees.

Tolerances: the accounting counts matmuls and attention dots only, XLA counts every op, so XLA's
count must lie in [ours, ours x (1 + elementwise share)] with the share stated per test (norms,
softmax, SiLU, RoPE and the loss are a few percent at these widths). XLA counts a scanned layer
body once, so models are compiled with scan_layers=False.
"""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lm_step import lm_loss
from models import KVCache, Transformer, TransformerConfig
from models.moe import MoEConfig
from models.sliding_window import sliding_window_attention
from scaling.dit import dit_forward_flops, dit_param_count, dit_sampling_flops, dit_train_flops
from scaling.flops import (
    LMShape,
    MoESpec,
    attended_keys,
    attention_flops_per_token,
    capacity_slots,
    decode_flops_per_token,
    executed_keys,
    lm_shape,
    matmul_flops_per_token,
    mfu,
    param_counts,
    recompute_flops_per_token,
    train_flops_per_token,
)
from scaling.memory import lm_param_table, param_table_from_state

CONFIGS = [
    TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, mlp_dim=384),
    TransformerConfig(vocab_size=256, d_model=128, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=32, mlp_dim=256,
                      tie_embeddings=True, qkv_bias=True),
]


def xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("cfg", CONFIGS + [TransformerConfig(vocab_size=100, d_model=48, n_layers=5, n_heads=6,
                                                             n_kv_heads=1, mlp_dim=64),
                                           # Gemma-2 style: 4 norm scales per layer (post-attention, post-MLP too)
                                           TransformerConfig(vocab_size=100, d_model=48, n_layers=3,
                                                             n_heads=4, mlp_dim=64, post_norms=True),
                                           # MoE every other layer (own 'moe_blocks' stack), shared expert
                                           TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4,
                                                             n_kv_heads=2, mlp_dim=64, qkv_bias=True,
                                                             post_norms=True, moe_every=2,
                                                             moe=MoEConfig(4, 2, 16, n_shared_experts=1)),
                                           TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                             mlp_dim=64, moe=MoEConfig(4, 1, 16, renormalize=False)),
                                           # Qwen3-MoE style: q / k norms ([head_dim] each), dense and MoE stacks
                                           TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                             n_kv_heads=2, head_dim=12, mlp_dim=64, qk_norm=True,
                                                             moe_every=2, moe=MoEConfig(4, 2, 16)),
                                           # OLMo 2 style: no pre-norms, q / k norms over all heads ([N·H], [K·H])
                                           TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                                             n_kv_heads=2, head_dim=12, mlp_dim=64, qk_norm=True,
                                                             qk_norm_scope="all_heads", pre_norms=False,
                                                             post_norms=True, moe_every=2, moe=MoEConfig(4, 2, 16))])
def test_param_counts_and_table_match_real_tree(cfg):
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    real = param_table_from_state(state)
    assert sum(p.size for p in real) == param_counts(cfg).total == cfg.param_count()
    ours = {p.path: (p.shape, p.axes) for p in lm_param_table(cfg)}
    assert ours == {p.path: (p.shape, p.axes) for p in real}
    pc = param_counts(cfg)
    assert pc.matmul_active == cfg.matmul_params()  # the config delegates its accounting to scaling.flops
    assert pc.total == pc.embedding + pc.non_embedding



def test_param_table_dtypes_match_a_bf16_moe_tree():
    """Under param_dtype='bfloat16' every parameter of the table has the real tree's dtype, the MoE selection bias's
    float32 (kept so whatever the params) included: memory_per_device counts its bytes from these dtypes."""
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, param_dtype="bfloat16",
                            dtype="bfloat16", moe=MoEConfig(4, 2, 16))
    real = param_table_from_state(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))
    ours = {p.path: (p.shape, p.dtype) for p in lm_param_table(cfg)}
    assert ours == {p.path: (p.shape, p.dtype) for p in real}
    assert {p.dtype for p in real} == {"bfloat16", "float32"}


def test_moe_layers_are_the_ones_the_model_makes_moe():
    """lm_shape's MoE layers are models.TransformerConfig.moe_layers() for every layer count and moe_every (4 layers,
    moe_every=2 has as many MoE layers whichever two they are: an off-by-one placement passed the tree comparison);
    with 5 layers the counts follow the real tree too."""
    moe = MoEConfig(4, 2, 16)
    for L in range(1, 7):
        for every in range(1, min(L, 3) + 1):
            cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=L, n_heads=4, mlp_dim=64, moe=moe,
                                    moe_every=every)
            s = lm_shape(cfg)
            assert [s.is_moe_layer(i) for i in range(L)] == list(cfg.moe_layers()), (L, every)
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, mlp_dim=64, moe=moe, moe_every=2)
    real = param_table_from_state(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))
    assert sum(p.size for p in real) == param_counts(cfg).total
    assert {p.path: p.shape for p in lm_param_table(cfg)} == {p.path: p.shape for p in real}

@pytest.mark.parametrize("cfg", CONFIGS)
def test_train_flops_match_cost_analysis(cfg):
    B, T = 2, 128
    cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)
    # what the model's kernels execute (block-causal: 3 of 4 [64, 64] score blocks); elementwise work <= 5%
    ours = train_flops_per_token(cfg, T, kernel="executed") * B * T
    assert ours <= xla <= 1.05 * ours, xla / ours
    dense = train_flops_per_token(cfg, T, kernel="dense")
    assert dense == pytest.approx(cfg.flops_per_token(T, causal=False))  # the config delegates here
    assert dense - ours / (B * T) == pytest.approx(3 * 4 * cfg.n_heads * cfg.hd * cfg.n_layers * T / 4)
    # model FLOPs (MFU) count only attended keys: causal halves the score work
    assert train_flops_per_token(cfg, T) == pytest.approx(cfg.flops_per_token(T, causal=True))


def test_remat_full_recompute_matches_cost_analysis():
    cfg = dataclasses.replace(CONFIGS[0], scan_layers=False, remat="full")
    B, T = 2, 128
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)
    hw = train_flops_per_token(cfg, T, kernel="executed", remat="full", include_recompute=True) * B * T
    assert hw <= xla <= 1.06 * hw, xla / hw
    extra = recompute_flops_per_token(cfg, T, "full", kernel="dense")
    assert 0.2 < extra / train_flops_per_token(cfg, T, kernel="dense") < 0.3  # most of one more forward


def test_hardware_flops_default_to_the_configs_remat_and_a_bad_remat_is_named():
    """`include_recompute=True` gives hardware FLOPs (the docstring): without remat=, the config's own policy, as
    memory_per_device takes it (it counted remat 'none': a remat='full' config's HFU read 23% low); a misspelt
    remat is refused whether or not the recompute is counted (it was ignored without include_recompute)."""
    cfg = dataclasses.replace(CONFIGS[0], remat="full")
    T = 128
    assert train_flops_per_token(cfg, T, include_recompute=True) == train_flops_per_token(
        cfg, T, remat="full", include_recompute=True) > train_flops_per_token(cfg, T)
    assert train_flops_per_token(cfg, T, remat="none", include_recompute=True) == train_flops_per_token(cfg, T)
    with pytest.raises(ValueError, match="remat='ful'"):
        train_flops_per_token(cfg, T, remat="ful")


def test_remat_save_dots_recomputes_no_matmul():
    """'save_dots' keeps every dot's output, batched ones (QK^T, PV) included: its backward reruns elementwise work
    only (recompute 0, the docstring). XLA: a save_dots step counts 0.4% above a step without remat, where
    save_dots_no_batch adds its attention dots (+3.4%)."""
    B, T = 2, 128
    xla = {}
    for remat in ("none", "save_dots"):
        cfg = dataclasses.replace(CONFIGS[0], scan_layers=False, remat=remat)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
        xla[remat] = xla_flops(jax.value_and_grad(lambda s, t, g=graphdef: lm_loss(g, s, {"inputs": t, "targets": t})),
                               state, tok)
        hw = train_flops_per_token(cfg, T, kernel="executed", remat=remat, include_recompute=True) * B * T
        assert hw <= xla[remat] <= 1.03 * hw, (remat, xla[remat] / hw)
    assert recompute_flops_per_token(CONFIGS[0], T, "save_dots", kernel="executed") == 0.0
    assert xla["save_dots"] <= 1.01 * xla["none"], xla["save_dots"] / xla["none"]


def test_remat_full_does_not_rerun_the_shared_experts_down_projection():
    """Remat 'full' reruns an MoE layer's shared experts' gate and up but not their down projection (its output only
    feeds the saved next-layer input): compiled FLOPs differenced over the shared experts' width (XLA: 1.017x ours,
    their SiLU and gating; counting the down rerun put XLA at 0.93x)."""
    from models.moe import MoEConfig

    def flops(n_shared):
        # a dense and an MoE layer (4 layers, two MoE: the same 1.017x)
        cfg = TransformerConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, moe_every=2,
                                moe=MoEConfig(4, 2, 32, dispatch="capacity", n_shared_experts=n_shared), remat="full",
                                scan_layers=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        tok = jax.ShapeDtypeStruct((2, 64), jnp.int32)
        xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)
        return xla, train_flops_per_token(cfg, 64, kernel="executed", remat="full", include_recompute=True) * 2 * 64

    (x1, o1), (x4, o4) = flops(1), flops(4)
    assert 1.0 <= (x4 - x1) / (o4 - o1) <= 1.03, (x4 - x1) / (o4 - o1)


@functools.cache
def train_step_flops(cfg, B, T):
    """XLA's FLOPs of a compiled train step (loss and gradients) on [B, T] tokens; cached per config."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    return xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)


@pytest.mark.parametrize("kw", [dict(post_norms=True), dict(pre_norms=False, post_norms=True),
                                dict(post_norms=True, moe_every=2, moe=MoEConfig(4, 2, 64, dropless_impl="dense"))])
def test_remat_full_reruns_the_down_projection_under_post_norms(kw):
    """Remat 'full' on a post-norm block (Gemma 2 / 3; OLMo 2 without pre-norms) reruns the MLP's down projection
    (the 'dense' dropless kernel's down products too): the post-norm's gradient needs its input, the down product's
    output. It was counted as not rerun, as in a pre-norm block: XLA's recompute (remat minus none) was 1.32x ours
    (1.13x with the dense MoE kernel), its step 1.08x the hardware count."""
    cfg = TransformerConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_dim=256, remat="full",
                            scan_layers=False, **kw)
    B, T = 2, 64
    xla = train_step_flops(cfg, B, T)
    hw = train_flops_per_token(cfg, T, kernel="executed", include_recompute=True) * B * T
    assert hw <= xla <= 1.04 * hw, xla / hw
    rerun = (xla - train_step_flops(dataclasses.replace(cfg, remat="none"), B, T)) / (
        recompute_flops_per_token(cfg, T, "full", kernel="executed") * B * T)
    assert 1.0 <= rerun <= 1.05, rerun


@pytest.mark.parametrize("remat,kernel", [("full", "capacity"), ("save_dots_no_batch", "capacity"),
                                          ("full", "dense"), ("save_dots_no_batch", "dense")])
def test_remat_recompute_of_gqa_windows_and_capacity_moe(remat, kernel):
    """Hardware FLOPs with remat on GQA + alternating windows + capacity-dispatch MoE: 'full' reruns the
    attention-out projection and the routed experts' down products, 'save_dots_no_batch' the routed experts
    (batched over E) — both were missing (XLA 1.13x / 1.22x ours); the executed count has the padded slots.
    The 'dense' dropless kernel's products are 2-D and gated before the down product: 'save_dots_no_batch' keeps
    them all and 'full' reruns only gate and up. Counting them as the capacity path's put XLA's step at 0.96x ours
    and XLA's recompute (remat minus none) at 0.39x / 0.92x; both counts now within their elementwise surplus."""
    moe = MoEConfig(4, 2, 32, **(dict(dispatch="capacity") if kernel == "capacity" else dict(dropless_impl="dense")))
    # 2 layers, a local dense one and a global MoE one (4 repeated both): XLA 1.04-1.05x ours, recompute 1.03x / 1.34x
    cfg = TransformerConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                            attn_pattern="alternating", sliding_window=16, swa_block=16, attn_block=32,
                            moe=moe, moe_every=2, remat=remat, scan_layers=False)
    B, T = 2, 64
    xla = train_step_flops(cfg, B, T)
    hw = train_flops_per_token(cfg, T, kernel="executed", remat=remat, include_recompute=True)
    assert hw * B * T <= xla <= 1.06 * hw * B * T, xla / (hw * B * T)
    if kernel == "dense":  # the recompute alone: XLA's (remat minus none) over ours (1.03x full, 1.33x attention only)
        rerun = (xla - train_step_flops(dataclasses.replace(cfg, remat="none"), B, T)) / (
            recompute_flops_per_token(cfg, T, remat, kernel="executed") * B * T)
        assert 1.0 <= rerun <= 1.4, rerun


def test_config_windows_and_post_norms_plug_in():
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=6, n_heads=4, mlp_dim=128, attn_pattern="2:1",
                            sliding_window=16, post_norms=True)
    assert lm_shape(cfg).windows == cfg.layer_windows() == (16, 16, None, 16, 16, None)
    for T in (8, 100):  # the config delegates: window pattern and post-norms reach scaling.flops through it
        assert train_flops_per_token(cfg, T) == pytest.approx(cfg.flops_per_token(T, causal=True))
    assert param_counts(cfg).total == cfg.param_count()
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(state))  # the real tree, post-norms included


def test_duck_typed_sliding_window_with_global_every_places_the_global_layers_like_the_config():
    """A config with `sliding_window` and `global_every` (no layer_windows()): every k-th layer, counted from 1, is
    global, as TransformerConfig's 'k-1:1' pattern puts it (layer 0 global was a local layer's FLOPs miscounted)."""
    from types import SimpleNamespace

    for every, pattern in ((3, "2:1"), (2, "1:1")):
        real = TransformerConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=4, mlp_dim=64, attn_pattern=pattern,
                                 sliding_window=8)
        duck = SimpleNamespace(vocab_size=64, d_model=32, n_layers=6, n_heads=4, mlp_dim=64, sliding_window=8,
                               global_every=every)
        assert lm_shape(duck).windows == real.layer_windows()
        assert train_flops_per_token(duck, 40) == pytest.approx(train_flops_per_token(real, 40))


def test_causal_blocked_keys_follow_the_kernels_block_cap():
    """models.attention runs at most 16 query blocks (rows = max(causal_block, T / 16)): at T = 1024 causal_block 32
    and 64 execute the same work, which XLA counts and executed_keys must count too (without the cap it counted
    32-row blocks: 3% fewer keys, inside the elementwise tolerance, so equality is what tells)."""
    from models.attention import attention

    B, T, N, H = 1, 1024, 2, 16
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]
    xla = {C: xla_flops(lambda q, k, v, C=C: attention(q, k, v, causal, causal_block=C, is_causal=True), q, q, q)
           for C in (32, 64)}
    assert xla[32] == xla[64]
    ours = {C: 4 * N * H * executed_keys(T, None, "causal_blocked", C) * B * T for C in (32, 64)}
    assert ours[32] == ours[64]
    assert ours[64] <= xla[64] <= 1.15 * ours[64], xla[64] / ours[64]
    # lengths that are no multiple of 16: the blocks the kernel cuts (causal_block_rows, rounded up), by hand
    from models.attention import causal_block_rows

    for T, C in ((1000, 32), (1030, 64), (4100, 256)):
        rows = causal_block_rows(T, C)
        assert rows > C and executed_keys(T, None, "causal_blocked", C) == sum(
            (min(lo + rows, T) - lo) * min(lo + rows, T) for lo in range(0, T, rows)) / T, (T, C)


def test_windowed_model_flops_match_cost_analysis():
    """models.Transformer with local layers (blocked kernel) and global ones (dense masked kernel). 'executed' reads
    the config's swa_block (it took block=256 unless passed: 33% over XLA at W = 128, blocks of 64)."""
    cfg = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, mlp_dim=256, attn_pattern="1:1",
                            sliding_window=32, swa_block=32, scan_layers=False)
    B, T = 2, 256
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)
    ours = train_flops_per_token(cfg, T, kernel="executed") * B * T
    assert ours == train_flops_per_token(cfg, T, kernel="executed", block=cfg.swa_block) * B * T
    assert ours <= xla <= 1.08 * ours, xla / ours
    assert train_flops_per_token(cfg, T) < ours  # model FLOPs count only the attended keys


def test_a_window_that_spans_the_rows_runs_the_global_kernel():
    """A local layer whose window covers the whole row (W >= T: Mistral's 4096 at a shorter training length)
    runs the block-causal global kernel (models.transformer.Block._attend), not the blocked one: counted as blocked,
    XLA executed 0.92x the count here at W = T and W = 2T (0.82x with every layer local)."""
    B, T = 2, 256
    for W in (T, 2 * T):
        cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_dim=64, attn_pattern="1:1",
                                sliding_window=W, swa_block=128, attn_block=32, scan_layers=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
        xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state,
                        tok)
        ours = train_flops_per_token(cfg, T, kernel="executed") * B * T
        assert ours <= xla <= 1.06 * ours, (W, xla / ours)


@pytest.mark.parametrize("oracle", [dict(attn_block=32, attn_impl="reference"),
                                    dict(attn_pattern="local", sliding_window=16, swa_block=32, swa_impl="dense")],
                         ids=["attn_impl=reference", "swa_impl=dense"])
def test_the_attention_oracles_are_counted_dense(oracle):
    """attn_impl='reference' (models.attention's autodiff oracle) ignores attn_block, and swa_impl='dense' (the local
    layers' oracle) scores all T keys under a window mask: counted as the blocked kernels, XLA executed 1.40x and
    1.77x the count."""
    B, T = 2, 256
    cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_dim=64, scan_layers=False, **oracle)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    xla = xla_flops(jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t})), state, tok)
    ours = train_flops_per_token(cfg, T, kernel="executed") * B * T
    assert ours <= xla <= 1.1 * ours, xla / ours


def test_an_lm_shape_keeps_the_dense_sliding_window_oracle_under_overrides():
    """lm_shape(cfg) of a swa_impl='dense' config, passed on with a `windows=` (or `moe=`) override, is rebuilt from
    its fields: swa_dense was read from `swa_impl` alone, so the rebuilt shape counted the blocked kernel (attention
    FLOPs 16384 a token, 1/8 of the dense 131072 here)."""
    cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_dim=64, attn_pattern="local",
                            sliding_window=8, swa_block=16, swa_impl="dense")
    s = lm_shape(cfg)
    want = attention_flops_per_token(cfg, 256, kernel="executed")
    assert want == 4.0 * 4 * 16 * 256 * 2  # every layer scores all T keys
    assert lm_shape(s, windows=s.windows) == s
    assert attention_flops_per_token(s, 256, kernel="executed", windows=s.windows) == want


@pytest.mark.parametrize("T,W", [(40, 1), (40, 7), (40, 40), (40, 100), (1, 5)])
def test_attended_keys_counts_the_mask(T, W):
    mask = np.tril(np.ones((T, T), bool)) & (np.arange(T)[:, None] - np.arange(T)[None] < W)
    assert attended_keys(T, W) == pytest.approx(mask.sum() / T)
    assert attended_keys(T, None) == pytest.approx((T + 1) / 2)


# (128, 33, 32): W - 1 a whole number of blocks, where ceil(W / C) would count a third key block
@pytest.mark.parametrize("T,W,C", [(256, 64, 64), (200, 50, 32), (128, 33, 32)])
def test_sliding_window_kernel_flops_match_cost_analysis(T, W, C):
    B, N, K, H = 2, 4, 2, 32
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.float32)
    xla = xla_flops(lambda q, k, v: sliding_window_attention(q, k, v, W, block=C), q, kv, kv)
    ours = 4 * N * H * executed_keys(T, W, "blocked", C) * B * T
    assert ours <= xla <= 1.15 * ours, xla / ours  # + masking/softmax on the blocked scores
    # per-layer windows: a 2-layer model with one local (W) and one global layer
    cfg = TransformerConfig(vocab_size=64, d_model=N * H, n_layers=2, n_heads=N, n_kv_heads=K, mlp_dim=64)
    both = train_flops_per_token(cfg, T, windows=(W, None))
    assert both - train_flops_per_token(cfg, T, windows=(None, None)) == pytest.approx(
        3 * 4 * N * H * (attended_keys(T, W) - attended_keys(T)))


def test_moe_active_flops_match_reference_layer():
    T, D, F, E, k = 64, 64, 96, 8, 2

    def moe(x, router, wg, wu, wd):  # dropless top-k: each token multiplies only its k experts
        vals, idx = jax.lax.top_k(x @ router, k)
        g = jax.nn.softmax(vals)
        h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, wg[idx])) * jnp.einsum("td,tkdf->tkf", x, wu[idx])
        return jnp.einsum("tk,tkd->td", g, jnp.einsum("tkf,tkfd->tkd", h, wd[idx]))

    # shapes only: cost_analysis reads the program, not the values (drawn eagerly they were 6 more compiles)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((T, D), (D, E), (E, D, F), (E, D, F), (E, F, D))]
    xla = xla_flops(moe, *args)
    spec = MoESpec(n_experts=E, top_k=k, expert_mlp_dim=F)
    base = TransformerConfig(vocab_size=64, d_model=D, n_layers=1, n_heads=4, mlp_dim=F)
    pc = param_counts(base, moe=spec)
    ours = 2 * pc.mlp_active * T  # the MoE MLP's forward: router + k experts per token
    assert ours <= xla <= 1.1 * ours, xla / ours
    # + the router's selection bias (E parameters, no FLOPs)
    assert pc.mlp_total == E * 3 * D * F + D * E + E and pc.total - pc.active == (E - k) * 3 * D * F + E
    # duck-typed MoE fields on a config are picked up the same way
    duck = dataclasses.make_dataclass("MoECfg", ["vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim",
                                                 "n_experts", "top_k"])(64, D, 1, 4, F, E, k)
    assert param_counts(duck) == pc and lm_shape(duck).moe == spec


def test_moe_matches_models_moe():
    """The real MoE layer (models/moe.py): parameter tree, its own counts, and capacity dispatch's FLOPs."""
    import models.moe as moe
    d, T = 64, 128
    mc = moe.MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=96, n_shared_experts=1, dispatch="capacity")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoE(d, mc, rngs=nnx.Rngs(0))))
    cfg = dataclasses.make_dataclass("Cfg", ["vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "moe"])(
        64, d, 1, 4, 96, mc)  # an LM config carrying a MoEConfig, read duck-typed
    pc = param_counts(cfg)
    assert pc.mlp_total == sum(x.size for x in jax.tree.leaves(state)) == mc.param_count(d)
    assert pc.mlp_active == mc.active_params_per_token(d)
    xla = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, jax.ShapeDtypeStruct((2, T, d), jnp.float32))
    # capacity dispatch computes capacity_factor x the routed experts' work (padded slots included)
    executed = 2 * pc.mlp_active + matmul_flops_per_token(cfg, executed=True) - matmul_flops_per_token(cfg)
    assert executed == pytest.approx(2 * pc.mlp_active + 2 * 0.25 * 2 * 3 * d * 96)
    assert executed * 2 * T <= xla <= 1.06 * executed * 2 * T, xla / (executed * 2 * T)


@pytest.mark.parametrize("E,K,CF", [(8, 2, 1.25), (4, 2, 4.0), (8, 1, 16.0)])  # the last two: C clamped to T
def test_moe_capacity_slots_clamped_like_the_layer(E, K, CF):
    import models.moe as moe
    d, T = 32, 32
    mc = moe.MoEConfig(n_experts=E, top_k=K, expert_mlp_dim=48, dispatch="capacity", capacity_factor=CF,
                       renormalize=K > 1)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoE(d, mc, rngs=nnx.Rngs(0))))
    cfg = dataclasses.make_dataclass("Cfg", ["vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "moe"])(
        64, d, 1, 4, 48, mc)
    pc = param_counts(cfg)
    extra = matmul_flops_per_token(cfg, executed=True, seq_len=T) - matmul_flops_per_token(cfg)
    assert extra == pytest.approx(2 * 3 * d * 48 * (E * mc.capacity(T) / T - K))
    executed = (2 * pc.mlp_active + extra) * 2 * T
    xla = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, jax.ShapeDtypeStruct((2, T, d), jnp.float32))
    assert executed <= xla <= 1.07 * executed, xla / executed


def test_forward_flops_executed_count_capacity_moe_slots():
    """forward_flops_per_token(kernel='executed') counted the routed experts at top_k rows per token, not the E·C
    capacity slots the forward runs (train_flops_per_token added them on its own): a 1-dense + 1-MoE model's
    forward ran 1.17x the count (s53 fuzz; dense models 1.01-1.03x). Whole-program counts (unrolled layers)."""
    from scaling.flops import forward_flops_per_token

    cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, scan_layers=False,
                            moe_every=2, moe=MoEConfig(4, 2, 256, dispatch="capacity"))
    B, T = 2, 64
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    xla = xla_flops(lambda s, t: nnx.merge(graphdef, s)(t), state, jax.ShapeDtypeStruct((B, T), jnp.int32))
    ours = forward_flops_per_token(cfg, T, kernel="executed") * B * T
    assert ours <= xla <= 1.05 * ours, xla / ours
    assert train_flops_per_token(cfg, T, kernel="executed") == 3 * forward_flops_per_token(cfg, T, kernel="executed")
    # generate's prefill (a KV cache) runs capacity dispatch dropless, C = T: the program and the count of a
    # dropless model through capacity buffers (its forward XLA-counted as the capacity one's, not compared whole:
    # XLA drops the last layer's work that feeds no K / V)
    from models.generate import _prefill
    from scaling.flops import prefill_flops_per_token

    twin = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless", dropless_impl="capacity"))
    xla_prefill = {}
    for c in (cfg, twin):
        gd, st = nnx.split(nnx.eval_shape(lambda c=c: Transformer(c, rngs=nnx.Rngs(0))))
        prefill = lambda s, p, g=gd: _prefill(nnx.merge(g, s), p, None, jax.random.key(0), 1, 0.0, None, None)[:2]  # noqa: E731
        xla_prefill[c] = xla_flops(prefill, st, jax.ShapeDtypeStruct((B, T), jnp.int32))
    assert xla_prefill[cfg] == xla_prefill[twin]
    assert prefill_flops_per_token(cfg, T, kernel="executed") == prefill_flops_per_token(twin, T, kernel="executed")
    sorted_kernel = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless"))  # top_k rows
    E, K, F = cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.expert_mlp_dim
    extra = (prefill_flops_per_token(cfg, T, kernel="executed")
             - prefill_flops_per_token(sorted_kernel, T, kernel="executed"))
    assert extra == pytest.approx(2 * 3 * cfg.d_model * F * (E - K))  # one MoE layer: E rows per token, not K


@pytest.mark.parametrize("pattern", [{}, {"attn_pattern": "alternating", "sliding_window": 8}])
def test_decode_flops_match_cost_analysis(pattern):
    """Global layers score the written slots rounded up to a bucket (128 of 256 here); local ones their W-slot
    rolling buffer (the new token written into it). The length is concrete here: a traced one picks the bucket at
    run time (lax.switch)."""
    cfg = dataclasses.replace(CONFIGS[0], scan_layers=False, **pattern)
    B, S = 2, 256
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, B, S))
    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    xla = xla_flops(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c._replace(length=100)), state, tok, cache)
    ours = decode_flops_per_token(cfg, 100, cache_len=S) * B
    assert ours <= xla <= 1.1 * ours, xla / ours
    # a traced length: cost_analysis counts lax.switch's largest branch, every slot scored (a full cache's count)
    traced = xla_flops(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c), state, tok, cache)
    full = decode_flops_per_token(cfg, S - 1, cache_len=S) * B
    assert full <= traced <= 1.1 * full, traced / full
    assert decode_flops_per_token(cfg, 100) < decode_flops_per_token(cfg, 100, cache_len=S)
    # the exact count (no cache_len): a cache of just context + 1 slots, which the comparison above checks against
    # XLA, for a model of global layers (an off-by-one in the exact count passed: it was only compared by "<")
    dense = CONFIGS[0]
    for c in (0, 5, 100):
        assert decode_flops_per_token(dense, c) == decode_flops_per_token(dense, c, cache_len=c + 1)


def test_decode_flops_with_a_cache_count_the_expert_rows_the_moe_step_runs():
    """With a KV cache capacity dispatch runs dropless through C = T buffers (models.moe `inference`): a decode step's
    one-token rows put one slot in every expert, E rows per token. decode_flops_per_token(cache_len=...) counted the
    model's top_k rows: XLA read 1.24x it (E 4, K 1, MoE every 2nd layer), outside the documented 10%."""
    moe = MoEConfig(4, 1, 32, dispatch="capacity", capacity_factor=1.25, renormalize=False)
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, scan_layers=False,
                            moe_every=2, moe=moe)
    B, S, context = 2, 128, 40
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, B, S))
    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    xla = xla_flops(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c._replace(length=context)), state, tok, cache)
    ours = decode_flops_per_token(cfg, context, cache_len=S) * B
    assert ours <= xla <= 1.1 * ours, xla / ours
    # by hand: E - K more rows of 3 D x F products in the one MoE layer; the exact count (no cache) stays the model's
    rows = 2 * (moe.n_experts - moe.top_k) * 3 * cfg.d_model * moe.expert_mlp_dim
    dense = dataclasses.replace(cfg, moe=None, moe_every=1)
    attn = decode_flops_per_token(dense, context, cache_len=S) - matmul_flops_per_token(dense)
    assert decode_flops_per_token(cfg, context, cache_len=S) == matmul_flops_per_token(cfg) + attn + rows
    assert decode_flops_per_token(cfg, context) == matmul_flops_per_token(cfg) + decode_flops_per_token(
        dense, context) - matmul_flops_per_token(dense)
    # the sorted dropless kernels run top_k rows a token, cached or not
    sorted_kernel = dataclasses.replace(cfg, moe=dataclasses.replace(moe, dispatch="dropless", dropless_impl="gmm"))
    assert decode_flops_per_token(sorted_kernel, context, cache_len=S) == matmul_flops_per_token(cfg) + attn


def test_prefill_flops_count_the_lm_head_once_per_prompt():
    """models.generate's prefill runs the LM head on the last prompt token only; prefill_flops_per_token (an alias of
    forward_flops_per_token) counted it for every prompt token. Measured where XLA sees it: what a larger vocabulary
    adds to the compiled prefill (unrolled layers: cost_analysis counts a scan's body once; XLA also drops the last
    layer's work that feeds no K/V, which a scanned stack cannot, so whole-program counts are not compared)."""
    from models.generate import _prefill
    from scaling.flops import forward_flops_per_token, prefill_flops_per_token

    B, P = 2, 64
    xla, ours = {}, {}
    for V in (512, 1024):
        cfg = dataclasses.replace(CONFIGS[0], vocab_size=V, scan_layers=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        prefill = lambda s, p, g=graphdef: _prefill(nnx.merge(g, s), p, None, jax.random.key(0), 1, 0.0, None, None)  # noqa: E731
        xla[V] = xla_flops(lambda s, p, f=prefill: f(s, p)[:2], state, jax.ShapeDtypeStruct((B, P), jnp.int32))
        ours[V] = prefill_flops_per_token(cfg, P) * B * P
    head = 2 * CONFIGS[0].d_model * 512 * B  # the extra 512 vocabulary rows, once per prompt row
    assert ours[1024] - ours[512] == pytest.approx(head)
    assert head <= xla[1024] - xla[512] <= 1.1 * head, (xla[1024] - xla[512]) / head
    assert prefill_flops_per_token(CONFIGS[0], 1) == forward_flops_per_token(CONFIGS[0], 1)


def test_prefill_flops_with_a_cache_count_the_keys_generate_scores():
    """generate's prefill runs through its KV cache of P + max_new_tokens slots: the first P - 1 tokens score a
    global layer's written slots rounded up to a bucket (128 of 130 here, dense: not the causal kernel's ~65), a
    local one its buffer and the chunk (W 80) or W + P - 1 rows of the blocked kernel (W 16), the last token a
    bucket. prefill_flops_per_token(kernel='executed') counted an uncached forward's kernels: XLA read 1.27x it for a
    global and two local layers. Compared on what those three layers add (XLA drops the last layer's work that feeds
    no K / V; a scanned stack is counted once, so unrolled)."""
    from models.generate import _prefill
    from scaling.flops import prefill_flops_per_token

    B, P, N = 1, 70, 60
    xla, ours, before = [], [], []
    for pattern, windows in (("G", None), ("GLLG", (80, 16))):  # what a global and two local layers add
        cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=len(pattern), n_heads=4, mlp_dim=64,
                                scan_layers=False, attn_pattern=pattern, sliding_window=windows)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        prefill = lambda s, p, g=graphdef: _prefill(nnx.merge(g, s), p, None, jax.random.key(0), N, 0.0, None,  # noqa: E731
                                                    None)[:2]
        xla.append(xla_flops(prefill, state, jax.ShapeDtypeStruct((B, P), jnp.int32)))
        ours.append(prefill_flops_per_token(cfg, P, cache_len=P + N) * B * P)
        before.append(prefill_flops_per_token(cfg, P, kernel="executed") * B * P)
    added, counted = xla[1] - xla[0], ours[1] - ours[0]
    assert counted <= added <= 1.1 * counted, (added / counted, added / (before[1] - before[0]))
    cfg = CONFIGS[0]
    assert prefill_flops_per_token(cfg, P, cache_len=P + N) == prefill_flops_per_token(cfg, P, kernel="executed",
                                                                                       cache_len=P + N)
    with pytest.raises(ValueError, match=r"cache_len=69 must hold the prompt \(70 tokens\)"):
        prefill_flops_per_token(cfg, P, cache_len=P - 1)
    with pytest.raises(ValueError, match=r"kernel='dense' names another"):
        prefill_flops_per_token(cfg, P, kernel="dense", cache_len=P + N)


def test_decode_flops_of_a_window_that_reaches_the_cache():
    """A local layer keeps min(W, max_len) slots and scores them, the new token written into its slot first
    (models.transformer). From W = S - 1 to W = S XLA's count grows by about one key per local layer (with the
    mask's elementwise work); ours must too."""
    B, S = 2, 64
    flops = {}
    for W in (S - 1, S):
        cfg = dataclasses.replace(CONFIGS[0], scan_layers=False, attn_pattern="local", sliding_window=W)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0))))
        cache = jax.eval_shape(lambda cfg=cfg: KVCache.zeros(cfg, B, S))
        tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
        xla = xla_flops(lambda s, t, c, g=graphdef: nnx.merge(g, s)(t, cache=c), state, tok, cache)
        flops[W] = xla, decode_flops_per_token(cfg, 30, cache_len=S) * B
        assert flops[W][1] <= xla <= 1.1 * flops[W][1], xla / flops[W][1]
    key = 4 * CONFIGS[0].n_heads * CONFIGS[0].hd * B * CONFIGS[0].n_layers  # one more key in every layer
    assert (flops[S][1] - flops[S - 1][1]) / key == 1
    assert 1 <= (flops[S][0] - flops[S - 1][0]) / key < 2



def test_decode_flops_of_a_window_longer_than_the_context_count_every_cached_key():
    """The exact count (no cache_len) of a local layer whose window W is longer than the context: the new token sees
    the context + 1 keys (all of them, itself included), as a global layer does; from the window on, W. By hand:
    4·N·H per key, summed over the layers (alternating local / global; W = 8)."""
    cfg = dataclasses.replace(CONFIGS[0], attn_pattern="alternating", sliding_window=8)
    windows = lm_shape(cfg).windows
    assert None in windows and 8 in windows
    for context in (0, 3, 7, 8, 100):
        keys = sum(context + 1 if w is None else min(w, context + 1) for w in windows)
        got = decode_flops_per_token(cfg, context) - matmul_flops_per_token(cfg)
        assert got == 4 * cfg.n_heads * cfg.hd * keys, (context, got / (4 * cfg.n_heads * cfg.hd), keys)
        if context + 1 <= 64:  # a cache of just context + 1 slots scores them all (one bucket): the same count
            assert decode_flops_per_token(cfg, context) == decode_flops_per_token(cfg, context, cache_len=context + 1)


@pytest.mark.parametrize("pattern", [{}, {"attn_pattern": "alternating", "sliding_window": 8},
                                     {"attn_pattern": "local", "sliding_window": 64}],
                         ids=["global", "alternating", "window-reaches-cache"])
def test_decode_attention_flops_are_the_keys_each_layer_scores(pattern):
    """Exactly 4·N·H per key the model's attention is handed for one decoded token, summed over the layers (read
    from the keys each layer's attention call receives; the XLA comparisons above allow 10%, inside which a local
    layer counted with one key more or fewer than its attention receives passed)."""
    from unittest import mock

    import models.transformer as transformer

    cfg = dataclasses.replace(CONFIGS[0], scan_layers=False, **pattern)
    # shapes only (the key counts are static): traced, not run eagerly op by op (3-10 s a case on CPU)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    call = lambda st, tok, cache: nnx.merge(graphdef, st)(tok, cache=cache)  # noqa: E731
    per_key = 4 * cfg.n_heads * cfg.hd
    for S, context in ((64, 30), (256, 30), (256, 100), (256, 255)):  # buckets of a 256-slot cache: 64, 128, 256
        keys, attention = [], transformer.attention

        def counting(q, k, *args, **kw):
            keys.append(k.shape[1])
            return attention(q, k, *args, **kw)

        _, cache = jax.eval_shape(call, state, jnp.zeros((1, context), jnp.int32), KVCache.zeros(cfg, 1, S))
        # the length concrete, as after an eager prefill: the decode picks its bucket at trace time (a traced one
        # takes lax.switch over every bucket)
        with mock.patch.object(transformer, "attention", counting):
            jax.eval_shape(lambda st, c: call(st, jnp.zeros((1, 1), jnp.int32), c._replace(length=context)), state,
                           cache)
        assert len(keys) == cfg.n_layers
        got = decode_flops_per_token(cfg, context, cache_len=S) - matmul_flops_per_token(cfg)
        assert got == per_key * sum(keys), (S, context, got / per_key, keys)


def test_prefix_keys_are_the_models_prefix_buckets():
    """scaling.flops spells out models.transformer's bucket rule (it imports no jax): the two agree."""
    from models.transformer import PREFIX_MIN, prefix_buckets
    from scaling.flops import PREFIX_MIN as FLOPS_PREFIX_MIN, prefix_keys

    assert FLOPS_PREFIX_MIN == PREFIX_MIN
    for S in (1, 63, 64, 65, 128, 129, 1010, 4096):
        for used in sorted({1, 2, 63, 64, 65, 127, 128, 129, 500, 513, S // 2 + 1, S - 1, S} & set(range(1, S + 1))):
            assert prefix_keys(used, S) == next(n for n in prefix_buckets(S) if n >= used), (S, used)

WINDOWS = dict(spatial_window=3, temporal_window=2)


@pytest.mark.parametrize("attention,latent,windows", [("factorized", (3, 8, 8), {}), ("full", (2, 8, 8), {}),
                                                      ("factorized", (1, 8, 8), {}), ("factorized", (5, 8, 8), WINDOWS),
                                                      ("full", (3, 8, 8), WINDOWS)])
def test_dit_accounting_matches_models_video(attention, latent, windows):
    """The video DiT (models/video): the real parameter tree and cost_analysis() of its forward. Windows cost what
    unwindowed attention does (dense masks; the temporal blocked kernel's one block spans all frames), as counted."""
    import models.video.dit as video
    from models.video.config import DiTConfig

    cfg = DiTConfig(latent_shape=latent, latent_channels=4, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                    attention=attention, text_dim=32, time_freq_dim=32, scan_layers=False, **windows)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: video.VideoDiT(cfg, rngs=nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(state)) == dit_param_count(cfg)
    B, L = 2, 8
    sds = jax.ShapeDtypeStruct
    xla = xla_flops(lambda s, x, t, txt, valid, pooled: nnx.merge(graphdef, s)(x, t, txt, valid, pooled), state,
                    sds((B, *latent, 4), jnp.float32), sds((B,), jnp.float32), sds((B, L, 32), jnp.float32),
                    sds((B, L), jnp.bool_), sds((B, 32), jnp.float32))
    ours = dit_forward_flops(cfg, L, batch=B)
    assert ours <= xla <= 1.15 * ours, xla / ours  # + norms, QK-norm, RoPE, softmax, modulation
    assert dit_train_flops(cfg, L) == 3 * ours / B
    assert dit_sampling_flops(cfg, L, steps=50) == 100 * dit_forward_flops(cfg, L)


def test_dit_patch_terms_match_cost_analysis_by_difference():
    """Patchify and unpatchify (2·P·D FLOPs per token each, P = the patch's latent values) are too small a share of
    a forward for the bound above to see one dropped: compiled FLOPs differenced over the latent channels isolate
    them (XLA: 1.004x ours, the output projection's bias)."""
    import models.video.dit as video
    from models.video.config import DiTConfig

    B, sds = 2, jax.ShapeDtypeStruct

    def flops(C):
        cfg = DiTConfig(latent_shape=(3, 8, 8), latent_channels=C, d_model=64, n_layers=1, n_heads=4, mlp_dim=128,
                        text_dim=32, time_freq_dim=32, scan_layers=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: video.VideoDiT(cfg, rngs=nnx.Rngs(0))))
        xla = xla_flops(lambda s, x, t, txt, valid, pooled: nnx.merge(graphdef, s)(x, t, txt, valid, pooled), state,
                        sds((B, 3, 8, 8, C), jnp.float32), sds((B,), jnp.float32), sds((B, 8, 32), jnp.float32),
                        sds((B, 8), jnp.bool_), sds((B, 32), jnp.float32))
        return xla, dit_forward_flops(cfg, 8, batch=B)

    (x4, o4), (x36, o36) = flops(4), flops(36)
    assert 1.0 <= (x36 - x4) / (o36 - o4) <= 1.01, (x36 - x4) / (o36 - o4)


@pytest.mark.parametrize("attention,latent", [("factorized", (3, 8, 8)), ("full", (2, 8, 8)),
                                              ("factorized", (1, 8, 8))])
def test_dit_forward_flops_are_exactly_the_dots_of_its_traced_forward(attention, latent):
    """2·M·N·K summed over every dot_general of VideoDiT's traced forward equals dit_forward_flops exactly: per-clip
    terms (timestep MLP, final adaLN, caption K/V) are too small a share of a forward for cost_analysis' 15% bound,
    and dropping half of the final adaLN (2·D·2D per clip) passed it."""
    import models.video.dit as video
    from models.video.config import DiTConfig
    from tests.test_sliding_window import jaxpr_dots

    cfg = DiTConfig(latent_shape=latent, latent_channels=4, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                    attention=attention, text_dim=32, time_freq_dim=32, scan_layers=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: video.VideoDiT(cfg, rngs=nnx.Rngs(0))))
    B, L, sds = 2, 8, jax.ShapeDtypeStruct
    jaxpr = jax.make_jaxpr(lambda s, x, t, txt, valid, pooled: nnx.merge(graphdef, s)(x, t, txt, valid, pooled))(
        state, sds((B, *latent, 4), jnp.float32), sds((B,), jnp.float32), sds((B, L, 32), jnp.float32),
        sds((B, L), jnp.bool_), sds((B, 32), jnp.float32)).jaxpr
    dots = 0
    for e in jaxpr_dots(jaxpr):
        (contract, _), _ = e.params["dimension_numbers"]
        lhs = e.invars[0].aval.shape
        dots += 2 * np.prod(e.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
    assert dots == dit_forward_flops(cfg, L, batch=B)


def test_dit_caption_terms_match_cost_analysis_by_difference():
    """The caption's keys and values (2 projections of L x text_dim per block and clip: 2·2·L·E·NH FLOPs) and the
    pooled caption's projection (2·E·D per clip) are the only work that grows with text_dim: compiled FLOPs
    differenced over text_dim isolate them (XLA: 1.000x ours). The 15% bound of the whole-forward comparison above
    let half of the K/V term go missing."""
    import models.video.dit as video
    from models.video.config import DiTConfig

    B, L, sds = 2, 8, jax.ShapeDtypeStruct

    def flops(E):
        cfg = DiTConfig(latent_shape=(3, 8, 8), latent_channels=4, d_model=64, n_layers=1, n_heads=4, mlp_dim=128,
                        text_dim=E, time_freq_dim=32, scan_layers=False)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: video.VideoDiT(cfg, rngs=nnx.Rngs(0))))
        xla = xla_flops(lambda s, x, t, txt, valid, pooled: nnx.merge(graphdef, s)(x, t, txt, valid, pooled), state,
                        sds((B, 3, 8, 8, 4), jnp.float32), sds((B,), jnp.float32), sds((B, L, E), jnp.float32),
                        sds((B, L), jnp.bool_), sds((B, E), jnp.float32))
        return xla, dit_forward_flops(cfg, L, batch=B)

    (x32, o32), (x288, o288) = flops(32), flops(288)
    by_hand = B * (2 * 2 * L * 256 * 64 + 2 * 256 * 64)  # 1 block's caption K/V + the pooled projection
    assert o288 - o32 == by_hand
    assert 1.0 <= (x288 - x32) / (o288 - o32) <= 1.01, (x288 - x32) / (o288 - o32)


def test_dit_accounting_refuses_nonsense_naming_the_field_and_takes_numpy_ints():
    """scaling.dit counted a negative or fractional caption length, batch or step count (-5 caption tokens: fewer
    FLOPs; batch=-1: a negative count), cfg_guidance='no' as guided, a duck-typed shape with d_model=0 (16
    parameters), n_layers=-1 (a negative count) or d_model % n_heads != 0 (head_dim floored), and n_heads=0 raised
    a bare ZeroDivisionError; a sweep's numpy-int patch was refused."""
    from scaling.dit import DiTShape, dit_saved_bytes_per_token

    base = dict(latent_shape=(3, 8, 8), latent_channels=4, d_model=64, n_layers=2, n_heads=4, mlp_dim=96, text_dim=32,
                time_freq_dim=32)
    s = DiTShape(**base)
    for call, match in [(lambda: dit_forward_flops(s, -5), "text_len must be an int >= 0, got -5"),
                        (lambda: dit_forward_flops(s, 2.5), "text_len must be an int >= 0, got 2.5"),
                        (lambda: dit_train_flops(s, 8, batch=-1), "batch must be an int >= 1, got -1"),
                        (lambda: dit_sampling_flops(s, 8, steps=0), "steps must be an int >= 1, got 0"),
                        (lambda: dit_sampling_flops(s, 8, steps=2.5), "steps must be an int >= 1"),
                        (lambda: dit_sampling_flops(s, 8, steps=2, cfg_guidance="no"), "cfg_guidance must be True"),
                        (lambda: dit_saved_bytes_per_token(s, "none", -8), "text_len must be an int >= 0"),
                        (lambda: DiTShape(**{**base, "d_model": 0}), "DiTShape.d_model must be an int >= 1, got 0"),
                        (lambda: DiTShape(**{**base, "n_layers": -1}), "DiTShape.n_layers must be an int >= 1"),
                        (lambda: DiTShape(**{**base, "n_heads": 0}), "DiTShape.n_heads must be an int >= 1"),
                        (lambda: DiTShape(**{**base, "d_model": 50}), "DiTShape.head_dim: d_model=50 is not divisible"),
                        (lambda: DiTShape(**{**base, "latent_shape": (0, 8, 8)}), "DiTShape.latent_shape"),
                        (lambda: DiTShape(**{**base, "qk_norm": "no"}), "DiTShape.qk_norm must be True or False"),
                        # an odd width (no VideoDiT builds one: DiTConfig refuses it) was counted
                        (lambda: DiTShape(**{**base, "time_freq_dim": 33}), "DiTShape.time_freq_dim must be even")]:
        with pytest.raises(ValueError, match=match):
            call()
    i = np.int64
    sweep = DiTShape(**{**base, "patch": (i(1), i(2), i(2)), "d_model": i(64), "latent_shape": (i(3), 8, 8)})
    assert sweep == s and type(sweep.d_model) is int and type(sweep.patch[1]) is int
    assert dit_forward_flops(s, i(8), batch=i(2)) == 2 * dit_forward_flops(s, 8)
    assert dit_sampling_flops(s, 0, steps=i(3), cfg_guidance=np.bool_(False)) == 3 * dit_forward_flops(s, 0)

def test_mfu():
    assert mfu(1e5, 6e9, 8, 1e15) == pytest.approx(0.075)
    cfg = CONFIGS[0]
    # a step of 4096 tokens taking 0.5 s on 2 devices of 1 TFLOP/s
    assert mfu(4096 / 0.5, train_flops_per_token(cfg, 128), 2, 1e12) == pytest.approx(
        4096 * train_flops_per_token(cfg, 128) / 0.5 / 2e12)
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        mfu(1.0, 1.0, 1, 0.0)
    with pytest.raises(ValueError, match="n_devices"):
        mfu(1.0, 1.0, 0, 1.0)
    with pytest.raises(ValueError, match=r"mfu: 1.26e\+10 > 1, above the devices' peak; .* in FLOP/s"):
        mfu(1e5, 1e9, 8, 989.4)  # the peak in TFLOP/s
    with pytest.raises(ValueError, match=r"mfu: 1.5 > 1, above the devices' peak; .* counts all 1 device"):
        mfu(1e5, 6e9, 1, 4e14)  # a global throughput over one device's peak: 1.5x, not a unit slip's 1e10x
    assert mfu(1e6, 1e9, 1, 1e15) == 1.0  # at the peak exactly


def test_palms_published_mfu_counts_every_key_which_kernel_dense_gives():
    # PaLM 540B (Chowdhery et al. 2022, App. B): 6N + 12·L·H·Q·T, 238.3K tokens/s on 6144 TPU v4 chips = 46.2% MFU;
    # the docs had called the attended-keys count (T + 1)/2 PaLM's convention: that reads 46.0%
    from scaling.hardware import peak_flops

    s = LMShape(vocab_size=256_000, d_model=18432, n_layers=118, n_heads=48, kv_heads=1, head_dim=256, mlp_dim=73728)
    fpt = {k: 6 * 540.35e9 + 3 * attention_flops_per_token(s, 2048, kernel=k) for k in ("dense", "ideal")}
    assert fpt["dense"] - 6 * 540.35e9 == 12 * 118 * 48 * 256 * 2048
    assert round(mfu(238.3e3, fpt["dense"], 6144, peak_flops("tpu-v4")), 3) == 0.462
    assert round(mfu(238.3e3, fpt["ideal"], 6144, peak_flops("tpu-v4")), 3) == 0.460


def test_nonsense_shapes_and_lengths_are_refused_naming_the_field():
    """They used to return negative parameter counts and key counts, or a bare ZeroDivisionError."""
    from types import SimpleNamespace

    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
    for field, value, match in [("d_model", -5, "d_model must be an int >= 1"), ("n_heads", 0, "n_heads"),
                                ("n_kv_heads", 3, "not a multiple of kv_heads=3"), ("head_dim", 0, "head_dim")]:
        with pytest.raises(ValueError, match=match):
            param_counts(SimpleNamespace(**{**base, field: value}))
    with pytest.raises(ValueError, match="window must be >= 1"):
        attended_keys(10, window=-3)
    with pytest.raises(ValueError, match="seq_len"):
        executed_keys(0, kernel="blocked")
    with pytest.raises(ValueError, match=r"seq_len=16.7 must be a whole number"):  # int() counted it as 16
        executed_keys(16.7, kernel="causal_blocked")
    with pytest.raises(ValueError, match="context_len=-5"):
        decode_flops_per_token(SimpleNamespace(**base), -5)
    assert param_counts(SimpleNamespace(**base)).total > 0  # the same config, well formed, is counted


def test_fractional_lengths_and_counts_are_refused_everywhere():
    """attended_keys(16.7) counted T = 16 (int()) while executed_keys refused 16.7; decode, MoE slots and mfu took
    fractions, a bool or 0 (a ZeroDivisionError) the same way."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
    moe = MoESpec(n_experts=4, top_k=2, expert_mlp_dim=32)
    for call, match in [(lambda: attended_keys(16.7), r"seq_len=16.7 must be a whole number >= 1"),
                        (lambda: attended_keys(16.7, causal=False), "seq_len=16.7"),
                        (lambda: attended_keys(True), "seq_len=True"),
                        (lambda: attended_keys(16, 2.5), r"window must be >= 1 or None \(a whole number of keys\)"),
                        (lambda: executed_keys(16, 2.5, "blocked", 4), "window must be >= 1"),
                        (lambda: executed_keys(16, True, "flash"), "window must be >= 1"),
                        (lambda: executed_keys(16, None, "blocked", 2.5), "block=2.5"),
                        (lambda: train_flops_per_token(cfg, 16, windows=(2.5, None)), "window must be >= 1"),
                        (lambda: param_counts(SimpleNamespace(**vars(cfg), sliding_window=4.5)), "got 4.5"),
                        (lambda: decode_flops_per_token(cfg, 2.5), "context_len=2.5"),
                        (lambda: decode_flops_per_token(cfg, 2, cache_len=10.5), "cache_len=10.5"),
                        (lambda: matmul_flops_per_token(cfg, executed=True, seq_len=0, moe=moe), "seq_len=0"),
                        (lambda: matmul_flops_per_token(cfg, executed=True, seq_len=-4, moe=moe), "seq_len=-4"),
                        (lambda: matmul_flops_per_token(cfg, executed=True, seq_len=16.7, moe=moe), "seq_len=16.7"),
                        (lambda: capacity_slots(2, 16.7, 1.0, 4), "tokens=16.7"),
                        (lambda: capacity_slots(2.5, 16, 1.0, 4), "top_k=2.5"),
                        (lambda: capacity_slots(2, 16, 1.0, 0), "n_experts=0"),
                        (lambda: mfu(1.0, 1.0, 2.5, 1e12), "n_devices=2.5")]:
        with pytest.raises(ValueError, match=match):
            call()
    # whole numbers of any type are counted as before
    assert attended_keys(16.0) == attended_keys(np.int64(16)) == 8.5
    assert decode_flops_per_token(cfg, 2.0) == decode_flops_per_token(cfg, 2)


def test_mfu_chinchilla_and_moe_spec_refuse_nonsense_naming_the_field():
    """mfu with an infinite peak returned 0.0; chinchilla_flops(-1e9, D) a negative compute; MoESpec took experts of
    width 0 or -4 (0 or negative FLOPs) and 8.5 experts, and a string count raised a bare TypeError ('<' between
    str and int)."""
    from scaling.flops import chinchilla_flops

    for call, match in [(lambda: mfu(1e5, 1e9, 8, float("inf")), "peak_flops_per_device must be finite and > 0"),
                        (lambda: mfu(float("inf"), 1e9, 8, 1e15), "tokens_per_s must be finite and >= 0"),
                        (lambda: chinchilla_flops(-1e9, 1e12), "n_params must be finite and > 0"),
                        (lambda: chinchilla_flops(1e9, float("nan")), "n_tokens must be finite and > 0"),
                        (lambda: chinchilla_flops(np.array([1e9, -1.0]), 1e12), "n_params must be finite"),
                        (lambda: MoESpec(8, 2, 0), "MoESpec.expert_mlp_dim=0 must be a whole number >= 1"),
                        (lambda: MoESpec(8, 2, -4), "MoESpec.expert_mlp_dim=-4"),
                        (lambda: MoESpec("8", 2, 64), "MoESpec.n_experts='8' must be a whole number >= 1"),
                        (lambda: MoESpec(8.5, 2, 64), "MoESpec.n_experts=8.5"),
                        (lambda: MoESpec(8, "2", 64), "MoESpec.top_k='2'"),
                        (lambda: MoESpec(8, 2, 64, n_shared_experts=-1), "MoESpec.n_shared_experts=-1"),
                        (lambda: MoESpec(8, 2, 64, shared_mlp_dim=-8), "MoESpec.shared_mlp_dim=-8"),
                        (lambda: MoESpec(8, 2, 64, moe_every="2"), "MoESpec.moe_every='2'"),
                        (lambda: MoESpec(8, 2, 64, capacity_factor="1.25"), "MoESpec.capacity_factor must be")]:
        with pytest.raises(ValueError, match=match):
            call()
    # whole numbers of any type, no shared experts (width 0) and array budgets are taken as before
    assert MoESpec(np.int64(8), 2.0, 64, shared_mlp_dim=0) == MoESpec(8, 2, 64, shared_mlp_dim=0)
    np.testing.assert_array_equal(chinchilla_flops(np.array([1e9, 2e9]), 1e12), [6e21, 1.2e22])



def test_non_numbers_are_named_not_a_bare_type_error():
    """mfu('1e5', ...) raised "'>=' not supported between 'str' and 'int'", chinchilla_flops('1e9', D) "can't multiply
    sequence by non-int" (its check read the string as a number), a duck-typed n_layers=2.0 "can't multiply sequence"
    and a fractional mlp_dim gave float parameter counts (1504.0)."""
    import jax.numpy as jnp

    from scaling.flops import chinchilla_flops

    cfg = dict(vocab_size=10, d_model=8, n_layers=2, n_heads=2, mlp_dim=16)
    for call, match in [(lambda: mfu("1e5", 6e9, 8, 1e15), "mfu: tokens_per_s must be finite and >= 0, got '1e5'"),
                        (lambda: mfu(1e5, None, 8, 1e15), "mfu: flops_per_token must be finite and >= 0, got None"),
                        (lambda: mfu(np.ones(2), 6e9, 8, 1e15), "mfu: tokens_per_s"),
                        (lambda: mfu(1e5, 6e9, 8, "1e15"), "mfu: peak_flops_per_device must be finite and > 0"),
                        (lambda: chinchilla_flops("1e9", 1e10), "chinchilla_flops: n_params must be a number"),
                        (lambda: chinchilla_flops(1e9, "2e10"), "chinchilla_flops: n_tokens must be a number"),
                        (lambda: param_counts(SimpleNamespace(**{**cfg, "n_layers": 2.0})),
                         "LM shape: n_layers must be an int >= 1, got 2.0"),
                        (lambda: param_counts(SimpleNamespace(**{**cfg, "mlp_dim": 16.5})),
                         "LM shape: mlp_dim must be an int >= 0, got 16.5")]:
        with pytest.raises(ValueError, match=match):
            call()
    # numbers of any kind are taken as before: numpy and jax scalars, 0-d arrays
    assert mfu(np.array(1e5), jnp.float32(6e9), np.int64(8), np.float64(1e15)) == pytest.approx(0.075)
    assert param_counts(SimpleNamespace(**{**cfg, "mlp_dim": np.int64(16), "n_layers": np.int32(2)})).total == \
        param_counts(SimpleNamespace(**cfg)).total

def test_dropless_moe_on_an_expert_sharded_mesh_counts_the_rows_it_runs():
    """With experts sharded, dropless runs as capacity buffers with C = T (models.moe): E rows per token, not K.
    Without `expert_shards` the executed count was 1/3 of XLA's here."""
    from parallel import batch_sharding, logical_shardings, make_mesh

    B, T = 8, 64
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, scan_layers=False,
                            moe=MoEConfig(8, 2, 128))
    mesh = make_mesh({"data": 2, "expert": 4})
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                         logical_shardings(abstract, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding(mesh, 2))
    loss = jax.value_and_grad(lambda s, t: lm_loss(graphdef, s, {"inputs": t, "targets": t}))
    with jax.set_mesh(mesh):
        xla = xla_flops(loss, state, tok) * mesh.size  # the partitioned program: one device's share
    ours = train_flops_per_token(cfg, T, kernel="executed", expert_shards=4) * B * T
    assert ours <= xla <= 1.1 * ours, xla / ours
    # sorted dropless: K rows per token (this compared a per-token count with the batch's, so it could not fail)
    assert train_flops_per_token(cfg, T, kernel="executed") * B * T < 0.5 * ours



def test_a_misspelt_moe_dispatch_or_dropless_impl_is_named_not_counted_as_another():
    """MoESpec took any dropless_impl: 'capcity' was read as an explicit sorted kernel, K rows per token where the C = T
    buffers run E on an expert mesh (0.37x the executed FLOPs here) and every expert counted as gathered onto each
    device; a duck-typed config's dispatch='capcity' was read as dropless, its capacity factor dropped."""
    from types import SimpleNamespace

    from models.moe_dispatch import DROPLESS_IMPLS
    from scaling.flops import DROPLESS_IMPLS as COUNTED

    assert COUNTED == DROPLESS_IMPLS  # every kernel models.moe runs is counted, and nothing else
    for impl in DROPLESS_IMPLS:
        MoESpec(8, 2, 64, dispatch="dropless", dropless_impl=impl)
    for impl in ("capcity", "Auto", None):
        with pytest.raises(ValueError, match=f"MoESpec.dropless_impl must be one of .*, got {impl!r}"):
            MoESpec(8, 2, 64, dispatch="dropless", dropless_impl=impl)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, n_experts=8, top_k=2)
    with pytest.raises(ValueError, match="MoESpec.dispatch must be 'capacity' or 'dropless', got 'capcity'"):
        lm_shape(SimpleNamespace(**base, dispatch="capcity", capacity_factor=1.25))
    # spelt right, a duck-typed config is read as before (no dispatch: capacity)
    assert lm_shape(SimpleNamespace(**base, capacity_factor=1.25)).moe.capacity_factor == 1.25
    got = lm_shape(SimpleNamespace(**base, dispatch="dropless", dropless_impl="dense")).moe
    assert (got.dispatch, got.dropless_impl, got.capacity_factor) == ("dropless", "dense", 1.0)

def test_accounting_inputs_are_checked():
    """A user study's list: a string seq_len was taken, seq_len 0 blamed an internal function's `block`, an int dtype
    other than 1 / 2 / 4 raised a bare KeyError, numpy mesh sizes were refused, and scaling's kv_cache_bytes
    defaulted to bfloat16 where the config's (and the cache's) dtype is float32."""
    import numpy as np

    from scaling.memory import kv_cache_bytes, memory_per_device

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
    for bad in ("4096", 0):
        with pytest.raises(ValueError, match=rf"seq_len={bad!r}: the sequence length must be a number of tokens"):
            cfg.flops_per_token(bad)
    # float64 is stored as float32 unless jax_enable_x64 (as KVCache.zeros builds it)
    assert cfg.kv_cache_bytes(1, 16, 8) == (2 if jax.config.jax_enable_x64 else 1) * cfg.kv_cache_bytes(1, 16, 4)
    with pytest.raises(ValueError, match=r"kv_cache_bytes\(dtype=3\): an int is bytes per element, one of"):
        cfg.kv_cache_bytes(1, 16, 3)
    assert kv_cache_bytes(cfg, 1, 16) == cfg.kv_cache_bytes(1, 16) == cfg.kv_cache_bytes(1, 16, "float32")
    assert memory_per_device(cfg, {"fsdp": np.int64(2)}, 2, 16) == memory_per_device(cfg, {"fsdp": 2}, 2, 16)


def test_config_kv_cache_bytes_counts_only_caches_kv_cache_zeros_builds():
    """TransformerConfig.kv_cache_bytes says it is the bytes of KVCache.zeros(cfg, ...): dtype=1 was read as int8 and
    counted 2048 bytes for a cache KVCache.zeros refuses (int8, int32, float8 likewise); float64 counted 16384 where
    jnp.zeros stores 8192 (float32, x64 off). scaling.memory.kv_cache_bytes still plans any dtype (int8 / fp8
    caches of other systems)."""
    from scaling.memory import kv_cache_bytes

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match=r"kv_cache_bytes\(dtype=1\): an int is bytes per element, one of \[2, 4, 8\]"):
        cfg.kv_cache_bytes(1, 16, 1)
    for bad in ("int8", "fp8", "float8_e4m3fn", "int32", jnp.int8):
        with pytest.raises(ValueError, match=r"kv_cache_bytes\(dtype=.*\): KVCache.zeros builds no such cache"):
            cfg.kv_cache_bytes(1, 16, bad)
        assert kv_cache_bytes(cfg, 1, 16, dtype=bad) > 0
    for ok in (2, 4, 8, "bf16", "float16", "float32", "float64", jnp.bfloat16, None):
        cache = KVCache.zeros(cfg, 1, 16, dtype=None if ok is None else jnp.dtype(
            {2: "bfloat16", 4: "float32", 8: "float64", "bf16": "bfloat16"}.get(ok, ok)))
        assert cfg.kv_cache_bytes(1, 16, ok) == sum(x.nbytes for x in cache.k + cache.v), ok


def test_capacity_slots_and_chinchilla_flops_are_the_documented_formulas():
    """capacity_slots = ceil(K·T·CF / E) clamped to [1, T], worked by hand where K·T·CF / E is not whole (every
    cross-check with models.moe shares this function, so a floor passed them all); C = 6·N·D."""
    from scaling.flops import chinchilla_flops

    assert capacity_slots(2, 30, 1.25, 8) == 10  # 9.375 -> 10
    assert capacity_slots(1, 30, 1.0, 7) == 5  # 4.29 -> 5
    assert capacity_slots(1, 100, 1.1, 1) == 100  # 110 clamped to T
    assert capacity_slots(1, 100, 1.1, 2) == 55  # exactly 55 (100 x 1.1 / 2 = 55.00000000000001 in floats)
    assert capacity_slots(1, 4, 0.1, 8) == 1  # 0.05 -> at least one slot
    assert chinchilla_flops(7e9, 1.4e11) == 6 * 7e9 * 1.4e11
    # without seq_len, the large-T limit K·CF rows per token, at most E (every test's K·CF was under E: unclamped,
    # K = 2 at CF = 4 over 4 experts counted 8 rows a token)
    from scaling.flops import MoESpec, executed_slots

    assert executed_slots(MoESpec(n_experts=8, top_k=2, expert_mlp_dim=4, capacity_factor=1.25), None) == 2.5
    assert executed_slots(MoESpec(n_experts=4, top_k=2, expert_mlp_dim=4, capacity_factor=4.0), None) == 4
    # a fused ('flash') kernel skips the fully masked blocks: it executes the attended keys, (T + 1) / 2 for causal
    # rows, min(W, p + 1) per query with a window; a dense masked kernel all T
    assert executed_keys(128, None, "flash") == 64.5 and executed_keys(128, None, "dense") == 128
    assert executed_keys(10, 4, "flash") == attended_keys(10, 4) == (1 + 2 + 3 + 4 * 7) / 10


def test_the_dense_dropless_kernel_runs_every_expert_for_every_token():
    """dropless_impl='dense' runs all E experts on every token (E rows per token, not top_k): XLA's count of the
    layer's forward lies in [ours, 1.07 x ours] (the mutation counting K rows for it was not caught)."""
    import models.moe as moe

    d, T, E, K, F = 32, 32, 8, 2, 48
    mc = moe.MoEConfig(n_experts=E, top_k=K, expert_mlp_dim=F, dispatch="dropless", dropless_impl="dense")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoE(d, mc, rngs=nnx.Rngs(0))))
    cfg = dataclasses.make_dataclass("Cfg", ["vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "moe"])(
        64, d, 1, 4, F, mc)
    extra = matmul_flops_per_token(cfg, executed=True, seq_len=T) - matmul_flops_per_token(cfg)
    assert extra == 2 * 3 * d * F * (E - K)
    executed = (2 * param_counts(cfg).mlp_active + extra) * 2 * T
    xla = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, jax.ShapeDtypeStruct((2, T, d), jnp.float32))
    assert executed <= xla <= 1.07 * executed, xla / executed



def test_counts_are_per_kind_of_layer_and_equal_the_per_layer_sums():
    """flops_per_token / param_count ran kernel models and parameter counts once per layer (3.4 s / 0.87 s at
    n_layers=10**6): each distinct window's keys and each kind of MLP are now counted once, and the results are
    the per-layer sums exactly (the same floats added in the same order; integers)."""
    import itertools

    import scaling.flops as F

    def per_layer(cfg, T, kernel):  # the loops this replaced
        s = F.lm_shape(cfg)
        block = s.swa_block
        kern = (lambda w: F.model_kernel(s, w, block)) if kernel == "executed" else (lambda w: (kernel, block))
        keys = sum(F.executed_keys(T, w, *kern(w)) for w in (F.model_window(w, T) for w in s.windows))
        mlp = [F._mlp_params(s, i) for i in range(s.n_layers)]
        return (4.0 * s.n_heads * s.head_dim * keys, sum(t for t, _ in mlp), sum(a for _, a in mlp),
                sum(s.is_moe_layer(i) for i in range(s.n_layers)))

    n = 0
    for L, pattern, moe, every, kernel, T in itertools.product(
            (1, 5, 12), ("global", "alternating", "3:1", "LGGL" * 3), (None, MoEConfig(8, 2, 16, n_shared_experts=1)),
            (1, 3), ("ideal", "executed", "blocked"), (7, 1000)):
        if ((pattern == "alternating" and L < 2) or (pattern == "3:1" and L < 4) or (pattern[0] == "L" and L != 12)
                or every > L):
            continue
        windows = None if pattern == "global" else (3, 300)[L % 2]
        cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=L, n_heads=4, n_kv_heads=2, attn_pattern=pattern,
                                sliding_window=windows, moe=moe, moe_every=every)
        attn, mlp_total, mlp_active, n_moe = per_layer(cfg, T, kernel)
        counts = F.param_counts(cfg)
        assert F.attention_flops_per_token(cfg, T, kernel=kernel) == attn, (L, pattern, kernel, T)
        assert (counts.mlp_total, counts.mlp_active, F.lm_shape(cfg).n_moe_layers) == (mlp_total, mlp_active, n_moe)
        n += 1
    assert n > 50
    calls = []
    real = F.executed_keys
    F_keys = lambda *a: calls.append(a) or real(*a)  # noqa: E731
    big = TransformerConfig(vocab_size=64, d_model=32, n_layers=10**5, n_heads=4, attn_pattern="3:1",
                            sliding_window=8, moe=MoEConfig(4, 2, 16), moe_every=3)
    try:
        F.executed_keys = F_keys
        big.flops_per_token(128)
    finally:
        F.executed_keys = real
    assert len(calls) == 2  # one per distinct window (8 and global), not one per layer


@pytest.mark.parametrize("bad", [[16], np.array([16]), np.array(16), {}])
def test_an_unhashable_window_given_by_hand_is_named_not_a_bare_type_error(bad):
    """Windows checked once per distinct value (a dict keyed by them) turned a list / array entry into a bare
    "TypeError: unhashable type: 'list'" naming nothing; it is the window's ValueError again, as before."""
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
    with pytest.raises(ValueError, match="attention window must be >= 1 or None"):
        lm_shape(cfg, windows=[None, bad])
    assert lm_shape(cfg, windows=[None, np.int64(16)]).windows == (None, 16)


def test_numpy_int32_shapes_count_like_python_ints():
    """LMShape checked its sizes as ints but kept numpy ones as given: a sweep's np.int32 fields (int32 arrays, a
    .npy grid) made every product numpy int32, wrapping silently past 2**31. Llama 3 70B counted 1.83e9
    parameters (a 410B shape, d 16384, V 256000: 2.0e9 with a negative embedding), its train FLOPs per token at 8K
    were 12x low and its KV cache 0 bytes.
    The fields are now stored as Python ints, as TransformerConfig, MoESpec and DiTShape store them."""
    from scaling.memory import kv_cache_bytes, memory_per_device

    i = np.int32
    dims = dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, kv_heads=8, head_dim=128, mlp_dim=28672)
    ref = LMShape(**dims, windows=(None,) * 80)
    sweep = LMShape(**{k: i(v) for k, v in dims.items()}, windows=(None,) * 80, attn_block=i(64), swa_block=i(256))
    assert sweep == dataclasses.replace(ref, attn_block=64)
    assert all(type(getattr(sweep, f)) is int for f in (*dims, "attn_block", "swa_block"))
    assert param_counts(sweep) == param_counts(ref) and param_counts(ref).total == 70_553_706_496  # Llama 3 70B
    assert train_flops_per_token(sweep, 8192) == train_flops_per_token(dataclasses.replace(ref, attn_block=64), 8192)
    assert kv_cache_bytes(sweep, 8, 131072) == 2 * 80 * 8 * 131072 * 8 * 128 * 2  # K and V [L, B, T, K, H] bf16
    assert memory_per_device(sweep, {"fsdp": 64}, 64, 8192) == memory_per_device(
        dataclasses.replace(ref, attn_block=64), {"fsdp": 64}, 64, 8192)
    # a duck-typed config of numpy ints (lm_shape passes its fields to LMShape) counts the same too
    duck = SimpleNamespace(**{k: i(v) for k, v in dims.items() if k != "kv_heads"}, n_kv_heads=i(8))
    assert param_counts(duck) == param_counts(ref)


def test_kv_cache_bytes_of_numpy_int32_lengths_do_not_wrap():
    """kv_cache_bytes multiplied a numpy int32 batch / seq_len through the layers' slots: Llama 3 70B's bfloat16
    cache of 8 x 128K tokens (2 x 8 x 80 x 131072 x 8 x 128 x 2 bytes, 344 GB) came back 0."""
    cfg = TransformerConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=28672,
                            max_seq_len=131072, dtype="bfloat16")
    want = 2 * 8 * 80 * 131072 * 8 * 128 * 2  # K and V, [B, L, T, K, H], 2 bytes
    assert cfg.kv_cache_bytes(8, 131072) == want
    assert cfg.kv_cache_bytes(np.int32(8), np.int32(131072)) == want


def test_an_lm_shape_without_windows_attends_globally_and_a_wrong_count_is_refused():
    """LMShape's `windows` defaults to (), read as zero layers of attention: a shape built without it (as a planner
    builds one for suggest_mesh) counted no attention FLOPs (7B at 4K: 3.96e10 per token, not 4.29e10), a 0-byte KV
    cache, and memory_per_device raised a bare StopIteration. A missing tuple now means every layer global, and one
    whose length is not n_layers (3 windows for 32 layers counted 3 layers' attention) is refused, naming the field."""
    from scaling.memory import kv_cache_bytes, memory_per_device

    dims = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, kv_heads=32, head_dim=128, mlp_dim=11008)
    bare, ref = LMShape(**dims), LMShape(**dims, windows=(None,) * 32)
    assert bare.windows == (None,) * 32 and bare == ref
    assert train_flops_per_token(bare, 4096) == train_flops_per_token(ref, 4096)
    assert kv_cache_bytes(bare, 1, 4096) == 2 * 32 * 4096 * 32 * 128 * 2
    assert memory_per_device(bare, {"fsdp": 8}, 8, 4096) == memory_per_device(ref, {"fsdp": 8}, 8, 4096)
    with pytest.raises(ValueError, match=r"windows has 3 entries for n_layers=32"):
        LMShape(**dims, windows=(None,) * 3)
