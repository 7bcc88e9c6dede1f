"""KV-cache generation: greedy equals recomputation; sampling honours top-k / top-p."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, TransformerConfig, generate
from models.generate import sample_logits

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, mlp_dim=48)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_unroll", [1, True])  # True: the prefill / decode layer scans fully unrolled
def test_greedy_generate_equals_full_recompute(model, scan_unroll):
    if scan_unroll is True:
        model = Transformer(dataclasses.replace(CFG, scan_unroll=True), rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, CFG.vocab_size)
    out = generate(model, prompt, 8)
    assert out.shape == (2, 13)
    seq = prompt
    fwd = jax.jit(lambda t: model(t))
    for _ in range(8):
        seq = jnp.concatenate([seq, jnp.argmax(fwd(seq)[:, -1], -1)[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_sampling_stays_in_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 512))
    keys = jax.random.split(jax.random.key(1), 4)
    k2 = sample_logits(logits, keys[0], 1.0, 2, None)
    assert set(np.unique(k2)) == {0, 1}
    p = sample_logits(logits, keys[1], 1.0, None, 0.75)  # 0.5 + 0.3 reaches 0.75: tokens 0 and 1
    assert set(np.unique(p)) == {0, 1}
    p_small = sample_logits(logits, keys[2], 1.0, None, 0.1)
    assert set(np.unique(p_small)) == {0}
    free = sample_logits(logits, keys[3], 1.0, None, None)
    assert set(np.unique(free)) == {0, 1, 2, 3, 4}
    freq = np.bincount(np.asarray(free), minlength=5) / 512
    assert abs(freq[0] - 0.5) < 0.08



def test_top_k_off_and_clamped_as_in_hf(model):
    """top_k 0 is off and top_k > V keeps every token (HF's TopKLogitsWarper): both sample exactly like no top-k;
    a negative or non-integer top_k is refused by name."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 256))
    key = jax.random.key(2)
    free = sample_logits(logits, key, 1.0, None, None)
    for k in (0, 5, 9):
        np.testing.assert_array_equal(sample_logits(logits, key, 1.0, k, None), free)
    prompt = jnp.zeros((1, 3), jnp.int32)
    off = generate(model, prompt, 4, temperature=1.0, rng=jax.random.key(7))
    for k in (0, CFG.vocab_size + 1, np.int64(CFG.vocab_size)):
        np.testing.assert_array_equal(generate(model, prompt, 4, temperature=1.0, top_k=k, rng=jax.random.key(7)), off)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            generate(model, prompt, 2, temperature=1.0, top_k=bad, rng=jax.random.key(0))


def test_sampled_generate_is_seeded(model):
    prompt = jnp.zeros((1, 3), jnp.int32)
    a = generate(model, prompt, 6, temperature=1.0, top_k=8, rng=jax.random.key(7))
    b = generate(model, prompt, 6, temperature=1.0, top_k=8, rng=jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)
