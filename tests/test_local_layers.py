"""Sliding-window (local) layers inside the Transformer: patterns, receptive field, rolling cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import KVCache, Transformer, TransformerConfig, generate
from models.losses import cross_entropy
from tests.test_generate import assert_greedy_continuation

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=48,
                        attn_pattern="alternating", sliding_window=3, swa_block=4)


def model_with(**kw):
    return Transformer(dataclasses.replace(CFG, **kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pattern,window", [("alternating", 3), ("local", (2, 3, 4, 5)), ("3:1", 5)])
def test_blocked_equals_dense_masked_in_the_model(pattern, window):
    tok = jax.random.randint(jax.random.key(0), (2, 21), 0, CFG.vocab_size)
    blocked, dense = model_with(attn_pattern=pattern, sliding_window=window), \
        model_with(attn_pattern=pattern, sliding_window=window, swa_impl="dense")

    def loss_grads(g):
        return jax.value_and_grad(lambda s: cross_entropy(nnx.merge(g, s)(tok[:, :-1]), tok[:, 1:])[0])

    # jitted (eagerly every op of the forward and backward compiles on its own), both kernels in one program; the
    # same parameters (the same seed, swa_impl changes no parameter)
    (g_blocked, state), (g_dense, state_dense) = nnx.split(blocked), nnx.split(dense)
    jax.tree.map(np.testing.assert_array_equal, state, state_dense)
    (l1, g1), (l2, g2) = jax.jit(lambda s: (loss_grads(g_blocked)(s), loss_grads(g_dense)(s)))(state)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_a_pattern_spelled_layer_by_layer_is_the_named_one():
    """attn_pattern 'LGLG' is 'alternating' and 'LLLG' is '3:1' (same windows, same layer groups, same logits and
    decode cache); 'GGLL' (Qwen2's sliding layers from max_window_layers on) has no name."""
    tok = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    for letters, named in (("LGLG", "alternating"), ("LLLG", "3:1")):
        a, b = model_with(attn_pattern=letters), model_with(attn_pattern=named)
        assert a.cfg.layer_windows() == b.cfg.layer_windows()
        np.testing.assert_array_equal(np.asarray(a(tok)), np.asarray(b(tok)))
    assert dataclasses.replace(CFG, attn_pattern="GGLL").layer_windows() == (None, None, 3, 3)
    with pytest.raises(ValueError, match=r"attn_pattern='GLL' names 3 layers for n_layers=4; give one letter"):
        dataclasses.replace(CFG, attn_pattern="GLL")
    with pytest.raises(ValueError, match=r"attn_pattern='G' names 1 layer for n_layers=4"):  # "1 layers"
        dataclasses.replace(CFG, attn_pattern="G")
    with pytest.raises(ValueError, match=r"unknown 'GLxL'.*one letter per layer"):
        dataclasses.replace(CFG, attn_pattern="GLxL")
    # the ratio form's near misses say why (they only listed the valid forms)
    with pytest.raises(ValueError, match=r"unknown '0:1' \(N:1 with N >= 1: .* 0 local layers is 'global'\)"):
        dataclasses.replace(CFG, attn_pattern="0:1")
    with pytest.raises(ValueError, match=r"unknown '2:2' \(the ratio form takes one global layer per period: .*'LLGG'"):
        dataclasses.replace(CFG, attn_pattern="2:2")
    # its spelled-out example is the asked-for period over this model's layers: '1:2' and '3:2' were told 'LLGG'
    # (two local then two global layers) whatever they asked for
    with pytest.raises(ValueError, match=r"for 1 local then 2 global layers .* e\.g\. 'LGGL' for n_layers=4"):
        dataclasses.replace(CFG, attn_pattern="1:2")
    with pytest.raises(ValueError, match=r"for 3 local then 2 global layers .* e\.g\. 'LLLGG' for n_layers=5"):
        dataclasses.replace(CFG, attn_pattern="3:2", n_layers=5)


def test_receptive_field_is_layers_times_window():
    m = model_with(attn_pattern="local", sliding_window=3, n_layers=2)  # sees back 2·(3-1) = 4 tokens
    tok = jax.random.randint(jax.random.key(1), (1, 16), 0, CFG.vocab_size)
    # both rows in one jitted forward (rows never mix): eagerly each call compiled its layer scan
    base, changed = jnp.split(jax.jit(m)(jnp.concatenate([tok, tok.at[0, 3].set((tok[0, 3] + 1) % CFG.vocab_size)])), 2)
    moved = np.asarray(jnp.abs(changed - base).max(-1)[0] > 0)
    assert not moved[:3].any() and moved[3:8].all() and not moved[8:].any(), moved


def test_rolling_cache_decode_equals_recompute():
    m = model_with()
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG.vocab_size)
    out = generate(m, prompt, 17)  # the 3-slot local buffers wrap around several times
    assert out.shape == (2, 22)
    assert_greedy_continuation(m, prompt, out)


def test_local_cache_memory_does_not_grow_with_length():
    short, long = KVCache.zeros(CFG, 1, 64), KVCache.zeros(CFG, 1, 4096)
    windows = CFG.layer_windows()[:2]  # (3, None): period 2
    assert windows == (3, None)
    assert short.k[0].shape == long.k[0].shape == (2, 1, 2, 3, 8)  # local: W slots, whatever the length
    assert (short.k[1].shape[3], long.k[1].shape[3]) == (64, 4096)  # global: grows
    for cfg in (CFG, dataclasses.replace(CFG, dtype="bfloat16")):  # the config's own count: slots and dtype
        for max_len in (64, 2):  # 2 < the window: a local layer keeps max_len slots, not W
            cache = KVCache.zeros(cfg, 3, max_len)
            assert cfg.kv_cache_bytes(3, max_len) == sum(x.nbytes for x in cache.k + cache.v)


def test_a_cache_allocated_for_another_window_is_refused():
    """KVCache.zeros of a window-5 config fed to a window-3 model gave a 12-token prompt logits 0.26 off the full
    forward (its 5-slot ring was read as a global layer); a window-2 one said its 'full-attention layers hold 2
    tokens' though max_len was 20. Caches of this config, also for a max_len shorter than the window, still decode."""
    m = model_with()
    tok = jax.random.randint(jax.random.key(1), (2, 6), 0, CFG.vocab_size)
    for w in (5, 2):
        with pytest.raises(ValueError, match=r"slots per pattern position.*another sliding_window"):
            m(tok, cache=KVCache.zeros(dataclasses.replace(CFG, sliding_window=w), 2, 20))
    per_layer = dataclasses.replace(CFG, attn_pattern="local", sliding_window=(2, 3, 4, 5))
    for cfg, lens in ((CFG, (6, 2)), (per_layer, (4, 6))):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        # cached and full logits in one program (eagerly each call compiled its layer scan); max_len < 64 slots:
        # one prefix bucket, so the traced length runs the eager call's attention
        both = jax.jit(lambda s, t, c: (lambda m: (m(t, cache=c)[0], m(t)))(nnx.merge(graphdef, s)))  # noqa: B023
        for max_len in lens:
            logits, full = both(state, tok[:, :max_len], KVCache.zeros(cfg, 2, max_len))
            np.testing.assert_allclose(logits, full, atol=1e-5)


def test_per_layer_windows_go_to_the_local_layers_in_order():
    """A tuple of windows is read in layer order (reversed, every test still passed: both sides of each comparison
    used the same mapping)."""
    cfg = dataclasses.replace(CFG, attn_pattern="alternating", sliding_window=(3, 5))
    assert cfg.layer_windows() == (3, None, 5, None)
    assert dataclasses.replace(CFG, attn_pattern="3:1", sliding_window=(2, 3, 4), n_layers=4).layer_windows() == (
        2, 3, 4, None)
    with pytest.raises(ValueError, match="attn_pattern='4:1' with n_layers=4 has no global layer"):  # was all local
        dataclasses.replace(CFG, attn_pattern="4:1", sliding_window=4, n_layers=4)
    with pytest.raises(ValueError, match="attn_pattern='alternating' with n_layers=1 has no global layer"):  # as '1:1'
        dataclasses.replace(CFG, n_layers=1, attn_pattern="alternating", sliding_window=4)


@pytest.mark.parametrize("cuts", [(0, 8, 9, 19), (0, 2, 8, 9, 10, 19)], ids=["empty_full", "part_filled"])
def test_chunked_prefill_longer_than_the_window(cuts):
    """Chunks longer than the 3-slot buffer run the blocked kernel over the buffer (position-ordered) + the chunk:
    after an empty, a part-filled (2 of 3 slots) and a wrapped buffer."""
    m = model_with()
    tok = jax.random.randint(jax.random.key(3), (2, 19), 0, CFG.vocab_size)
    cache, outs = KVCache.zeros(CFG, 2, 24), []
    step = jax.jit(lambda t, c: m(t, cache=c))  # eagerly every op compiles on its own
    for lo, hi in zip(cuts, cuts[1:]):
        logits, cache = step(tok[:, lo:hi], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), jax.jit(m)(tok), atol=1e-5)


def test_prefill_of_a_local_layer_costs_o_t_w_not_t_squared():
    """The cached path scored every prompt token against the window's slots plus the whole prompt: T × (W + T)
    (a 32K prompt of a Mistral-style model: 32K × 36K scores per head). A local-only model's prefill now has no
    product as wide as the prompt (the LM head's excepted)."""
    from tests.test_sliding_window import jaxpr_dots

    cfg = dataclasses.replace(CFG, attn_pattern="local", sliding_window=4, swa_block=8)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    T = 56
    tok = jax.random.randint(jax.random.key(5), (1, T), 0, cfg.vocab_size)
    graphdef, state = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t, cache=KVCache.zeros(cfg, 1, 80)))(state, tok)
    widths = {int(e.outvars[0].aval.shape[-1]) for e in jaxpr_dots(jaxpr.jaxpr)}
    assert max(widths - {cfg.vocab_size}) < T, widths  # the scores were W + T = 60 wide
    logits, _ = m(tok, cache=KVCache.zeros(cfg, 1, 80))
    np.testing.assert_allclose(logits, m(tok), atol=1e-5)


def test_packed_documents_with_local_layers():
    m = model_with()
    a = jax.random.randint(jax.random.key(4), (1, 9), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(5), (1, 6), 0, CFG.vocab_size)
    seg = jnp.array([[1] * 9 + [2] * 6])
    pos = jnp.array([list(range(9)) + list(range(6))])
    # one program for the three forwards (eagerly each compiled its layer scan)
    out, out_a, out_b = jax.jit(lambda a, b: (m(jnp.concatenate([a, b], 1), positions_BT=pos, segment_ids_BT=seg),
                                              m(a), m(b)))(a, b)
    np.testing.assert_allclose(out[:, :9], out_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 9:], out_b, atol=1e-5)


def test_left_padding_is_never_attended_by_local_layers():
    """Padding inside a local layer's window is masked: a left-padded row gives the logits of its real tokens alone.
    The model's padding tests ran global layers only; local layers ignoring padding_mask_BT passed them all."""
    m = model_with()
    real = jax.random.randint(jax.random.key(6), (2, 8), 0, CFG.vocab_size)
    junk = jax.random.randint(jax.random.key(7), (2, 4), 0, CFG.vocab_size)
    valid = jnp.broadcast_to(jnp.arange(12) >= 4, (2, 12))
    pos = jnp.broadcast_to(jnp.maximum(jnp.arange(12) - 4, 0), (2, 12))
    out, alone = jax.jit(lambda junk, real: (m(jnp.concatenate([junk, real], 1), positions_BT=pos,
                                                padding_mask_BT=valid), m(real)))(junk, real)  # one program
    np.testing.assert_allclose(out[:, 4:], alone, atol=1e-5)


def test_left_padded_cache_decodes_each_row_as_alone():
    """KVCache start=: a row left-padded by 6 slots, through a prefill chunk longer than the 3-slot ring (the blocked
    kernel over buffer + chunk) and single-token steps (the ring itself), gives the logits of its real tokens alone.
    Only test_hf's Mistral generation (greedy tokens) saw local layers attend that padding; these tests passed it."""
    m = model_with()
    tok = jax.random.randint(jax.random.key(8), (2, 9), 0, CFG.vocab_size)  # row 1: 6 pad slots, then 3 real
    cache, outs = KVCache.zeros(CFG, 2, 9, start=jnp.array([0, 6])), []
    for lo, hi in ((0, 7), (7, 8), (8, 9)):  # at slot 7 the ring holds pad slot 5
        logits, cache = m(tok[:, lo:hi], cache=cache)
        outs.append(logits)
    outs = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(outs[0], m(tok[:1])[0], atol=1e-5)
    np.testing.assert_allclose(outs[1, 6:], m(tok[1:, 6:])[0], atol=1e-5)


@pytest.mark.parametrize("kw,words", [
    (dict(attn_pattern="local", sliding_window=None), "sliding_window"),
    (dict(attn_pattern="2:2"), "attn_pattern"),
    (dict(sliding_window=(3, 4, 5)), "2 local layers"),
    (dict(swa_impl="flash"), "swa_impl"),
])
def test_bad_patterns_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(CFG, **kw)


def test_overflow_of_a_window_longer_than_max_len_names_the_local_layers():
    """An all-local model whose window (3) exceeds the cache's max_len (2) is refused past 2 tokens, as it must be,
    but the error said its 'full-attention layers hold 2 tokens': it has none."""
    cfg = dataclasses.replace(CFG, attn_pattern="local", sliding_window=3)
    tok = jax.random.randint(jax.random.key(1), (1, 3), 0, cfg.vocab_size)
    with pytest.raises(ValueError, match="KVCache overflow") as e:
        Transformer(cfg, rngs=nnx.Rngs(0))(tok, cache=KVCache.zeros(cfg, 1, 2))
    assert "full-attention" not in str(e.value) and "window longer than max_len" in str(e.value)
