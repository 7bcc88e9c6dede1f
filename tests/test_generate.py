"""KV-cache generation: greedy equals recomputation; sampling honours top-k / top-p."""

import dataclasses
import importlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import KVCache, Transformer, TransformerConfig, generate, left_pad
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
    assert_greedy_continuation(model, prompt, out)


def assert_greedy_continuation(model, prompt_BP, out_BS):
    """out [B, S] is prompt [B, P] then greedy decoding: each new token is the argmax of a full forward over
    the tokens before it. The model is causal, so one forward of out[:, :-1] holds every such prefix's last logits
    (the first wrong token is the first mismatch, its prefix being the recompute's): one compile, not S - P."""
    P = prompt_BP.shape[1]
    np.testing.assert_array_equal(out_BS[:, :P], prompt_BP)
    logits_BTV = jax.jit(lambda t: model(t))(out_BS[:, :-1])
    np.testing.assert_array_equal(out_BS[:, P:], jnp.argmax(logits_BTV[:, P - 1:], -1))


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
    # greedy decoding ignores the filters: said, as transformers does (it was silent)
    for kw in (dict(top_k=5), dict(top_p=0.5)):
        with pytest.warns(UserWarning, match=r"temperature=0 is greedy decoding, so top_k=.* change nothing"):
            got = generate(model, prompt, 4, **kw)
        np.testing.assert_array_equal(got, generate(model, prompt, 4))



def test_top_p_one_is_off_as_in_hf(model):
    """top_p=1.0 dropped the tail where float32's cumulative sum reaches 1 before the last token (336 of 32000
    tokens of a random row; HF skips the filter): now the same program as top_p=None."""
    logits = jax.random.normal(jax.random.key(0), (2, 32000)) * 4
    key = jax.random.key(2)
    program = lambda top_p: str(jax.make_jaxpr(lambda x: sample_logits(x, key, 1.0, None, top_p))(logits))  # noqa
    assert program(1.0) == program(None) != program(0.999)
    prompt = jnp.zeros((1, 3), jnp.int32)
    for bad in (True, 0.0, 1.5, "0.9"):  # True was taken as 1.0, and temperature=True as 1.0
        with pytest.raises(ValueError, match="top_p must be None or a number in"):
            generate(model, prompt, 2, temperature=1.0, top_p=bad, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        generate(model, prompt, 2, temperature=True, rng=jax.random.key(0))


def test_top_p_keeps_no_token_past_a_prefix_that_reaches_it_exactly():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32), top_p 0.5: the first token alone reaches it, so it alone
    is kept, as Hugging Face's TopPLogitsWarper keeps it (a `<=` on the mass before a token also kept the 1/4)."""
    l2 = float(np.log(2))
    logits = jnp.array([[0.0, -l2, -2 * l2, -2 * l2]], jnp.float32)
    assert np.asarray(jax.nn.softmax(logits)).tolist() == [[0.5, 0.25, 0.125, 0.125]]
    keys = jax.random.split(jax.random.key(0), 500)
    toks = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, None, 0.5))(keys))
    assert (toks == 0).all()
    toks = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, None, 0.75))(keys))
    assert set(np.unique(toks)) == {0, 1}  # 1/2 + 1/4 reach 0.75: the two 1/8 are out


def test_sampled_generate_is_seeded(model):
    prompt = jnp.zeros((1, 3), jnp.int32)
    a = generate(model, prompt, 6, temperature=1.0, top_k=8, rng=jax.random.key(7))
    b = generate(model, prompt, 6, temperature=1.0, top_k=8, rng=jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)
    for kw, words in [(dict(rng=7, temperature=1.0), "jax.random.key"), (dict(temperature=float("nan")), "finite"),
                      # a batch of keys, a 0-d numpy int: errors from inside jax.random before
                      (dict(rng=jax.random.split(jax.random.key(0), 2), temperature=1.0), r"one key, .* got key<"),
                      (dict(rng=np.array(3), temperature=1.0), r"rng must be one key"),
                      (dict(max_new_tokens=3.5), "max_new_tokens"), (dict(prompt_tokens=prompt[:, :0]), "length >= 1"),
                      # no rows: "KVCache.zeros(batch=0)", naming no argument of generate
                      (dict(prompt_tokens=prompt[:0]), r"^prompt_tokens must hold at least one prompt, got shape \(0,"),
                      (dict(prompt_tokens=prompt + model.cfg.vocab_size), "vocab_size")]:
        args = {"prompt_tokens": prompt, "max_new_tokens": 2, **kw}
        with pytest.raises(ValueError, match=words):
            generate(model, **args)


def _reference_filter(logits_BV, temperature, top_k, top_p):
    """Independent numpy filter: logits / T, keep the top_k largest, then the smallest set of the most likely
    survivors whose (renormalised) mass reaches top_p; the rest -inf."""
    z = np.asarray(logits_BV, np.float64) / temperature
    out = np.full_like(z, -np.inf)
    for b, row in enumerate(z):
        order = np.argsort(-row)[: top_k or len(row)]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        n_keep = len(order) if top_p is None else int(np.searchsorted(np.cumsum(p), top_p) + 1)
        keep = order[:n_keep]
        out[b, keep] = row[keep]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, None, None), (0.7, 12, 0.9)])
def test_sampled_generate_equals_full_recompute_with_reference_sampler(temperature, top_k, top_p):
    """generate with temperature / top-k / top-p equals a loop of full forward passes, sampled by an independent
    filter + jax.random.categorical with _generate's key schedule: split once for the prefill's token, then once
    per decode step, sampling from the second half. init_std 0.2 spreads the logits (std ~1 rather than ~0.1),
    so that the temperature changes which token the Gumbel noise picks."""
    model = Transformer(dataclasses.replace(CFG, init_std=0.2), rngs=nnx.Rngs(1))
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, CFG.vocab_size)
    n_new = 6
    out = generate(model, prompt, n_new, temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(11))
    assert out.shape == (2, 5 + n_new)
    np.testing.assert_array_equal(out[:, :5], prompt)
    # causal: one forward of out's tokens holds the logits each step's recompute saw (up to the first wrong token)
    logits_BTV = jax.jit(lambda t: model(t))(out[:, :-1])
    rng = jax.random.key(11)
    for i in range(n_new):
        rng, sub = jax.random.split(rng)
        masked = _reference_filter(logits_BTV[:, 5 - 1 + i], temperature, top_k, top_p).astype(np.float32)
        # mode="high": exact for tokens below ~1e-7 probability, which the default noise draws too rarely or never
        tok = jax.random.categorical(sub, jnp.asarray(masked), axis=-1, mode="high").astype(out.dtype)
        np.testing.assert_array_equal(out[:, 5 + i], tok)
    greedy = generate(model, prompt, n_new)  # sampling at these temperatures is not the greedy continuation
    assert not np.array_equal(out, greedy)
    # eos_id runs another program (a while loop): with eos ids that never come it must sample the same tokens from
    # the same keys (a loop that drew every step from one key passed, every eos test being greedy)
    never = [t for t in range(CFG.vocab_size) if t not in np.asarray(out)][:2]
    np.testing.assert_array_equal(generate(model, prompt, n_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                           rng=jax.random.key(11), eos_id=never, trim=False), out)


# (2.0, None, 0.6): the tempered nucleus holds 3 tokens where T = 1's holds 2 (at (1.5, 0.8) both hold 4, so
# a nucleus computed before the temperature passed)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, None, None), (2.0, None, None), (0.5, 3, None),
                                                     (1.5, None, 0.8), (2.0, None, 0.6)])
def test_sample_frequencies_match_the_tempered_filtered_softmax(temperature, top_k, top_p):
    """Over N independent rows, each token's frequency is within 4σ (binomial) of softmax(logits / T) restricted
    to the top-k / top-p set: the probabilities come from _reference_filter, not from sample_logits."""
    n = 20000
    base = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    p = np.exp(_reference_filter(base[None], temperature, top_k, top_p)[0])
    p /= p.sum()
    toks = sample_logits(jnp.asarray(np.tile(base, (n, 1)), jnp.float32), jax.random.key(5), temperature, top_k, top_p)
    freq = np.bincount(np.asarray(toks), minlength=len(base)) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * sigma + 1e-12), (freq, p)
    # the test can tell T apart: at T=1 the same filter gives probabilities more than 10σ away
    p1 = np.exp(_reference_filter(base[None], 1.0, top_k, top_p)[0])
    p1 /= p1.sum()
    assert np.max(np.abs(p1 - p) / np.maximum(sigma, 1e-9)) > 10


@pytest.mark.parametrize("mesh_shape", [{"sequence": 2, "data": 4}, {"expert": 4, "data": 2}])
def test_generate_on_a_training_mesh_equals_one_device(model, mesh_shape):
    """Decoding feeds T = 1 (indivisible by 'sequence') and here one prompt (indivisible by the batch axes):
    those activations are replicated while decoding; the tokens equal one device's."""
    from parallel import make_mesh, shard_state

    prompt = jax.random.randint(jax.random.key(3), (1, 6), 0, CFG.vocab_size)
    ref = generate(model, prompt, 5)
    mesh = make_mesh(mesh_shape)
    graphdef, params = nnx.split(model)
    params = shard_state(params, mesh)  # the rules' placements, as create_sharded's (without compiling an init)
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(generate(nnx.merge(graphdef, params), prompt, 5), ref)
        with pytest.raises(ValueError, match="does not divide mesh axes"):  # training keeps the error
            nnx.merge(graphdef, params)(jnp.zeros((1, 6), jnp.int32))


def test_generate_takes_prompts_keys_and_masks_on_other_devices_than_the_model(model):
    """A prompt (mask, key) on other devices than a committed model (load_model's, a sharded one), e.g. another
    model's output, failed with jax's "Received incompatible devices" (naming generate's internal prompt_BP), where
    the same ids as numpy ran: each placement now gives the numpy prompt's tokens."""
    from parallel import make_mesh, shard_state

    graphdef, params = nnx.split(model)
    one = nnx.merge(graphdef, jax.device_put(params, jax.devices()[0]))  # committed to one device, as load_model's
    on_mesh = nnx.merge(graphdef, shard_state(params, make_mesh({"data": 2, "fsdp": 4})))
    prompt, mask = left_pad([[5, 9, 2], [7, 1]])
    prompt, mask = np.asarray(prompt), np.asarray(mask)
    kw = dict(temperature=0.9, top_k=8)
    ref = generate(one, prompt, 5, prompt_mask=mask, rng=jax.random.key(1), **kw)
    elsewhere = lambda x, d=7: jax.device_put(x, jax.devices()[d])  # noqa: E731
    got = generate(on_mesh, elsewhere(prompt), 5, prompt_mask=elsewhere(mask, 6), rng=elsewhere(jax.random.key(1), 5),
                   **kw)
    np.testing.assert_array_equal(got, ref)
    # and back: the mesh model's output, continued by the one-device model, as the numpy ids are
    out = generate(on_mesh, prompt, 3)
    np.testing.assert_array_equal(generate(one, out, 2), generate(one, np.asarray(out), 2))


def test_generate_takes_prompts_placed_elsewhere_inside_set_mesh_and_on_reordered_meshes(model):
    """Inside jax.set_mesh a prompt or mask committed to one device failed generate's own checks (jax's "Received
    incompatible devices ... _reduce_min", naming no argument), and a prompt on a mesh of the model's devices in
    another order failed in the program (the device sets were equal, so it was not moved): both give the numpy
    prompt's tokens now."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from parallel import make_mesh, shard_state

    mesh = make_mesh({"data": 2, "tensor": 4})
    graphdef, params = nnx.split(model)
    on_mesh = nnx.merge(graphdef, shard_state(params, mesh))
    prompt, mask = (np.asarray(a) for a in left_pad([[5, 9, 2], [7, 1]]))
    ref = generate(on_mesh, prompt, 4, prompt_mask=mask)
    one = lambda x: jax.device_put(x, jax.devices()[7])  # noqa: E731
    reordered = lambda x: jax.device_put(x, NamedSharding(Mesh(np.array(jax.devices()[::-1]), ("x",)), P()))  # noqa: E731
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(generate(on_mesh, one(prompt), 4, prompt_mask=one(mask)), ref)
        np.testing.assert_array_equal(generate(on_mesh, reordered(prompt), 4, prompt_mask=reordered(mask)), ref)
    np.testing.assert_array_equal(generate(on_mesh, reordered(prompt), 4, prompt_mask=reordered(mask)), ref)


def test_a_cache_made_under_a_mesh_is_placed_by_the_rules():
    """KVCache.zeros inside jax.set_mesh made every k / v stack whole on every device (P()): a hand-written decode
    loop (generate makes its cache inside its program) held the full [L/P, B, K, S, H] cache on each device before
    its first step sharded it. Rows go over the batch axes, kv heads over 'tensor' (each replicated where it does
    not divide), as the rules place a decode step's activations."""
    from jax.sharding import PartitionSpec as P

    from parallel import make_mesh

    mesh = make_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        cache = KVCache.zeros(dataclasses.replace(CFG, n_kv_heads=4), 4, 16)
        odd = KVCache.zeros(CFG, 3, 16)  # 3 rows, 1 kv head: neither divides its axes
    for k in cache.k + cache.v:
        assert k.sharding.mesh == mesh and k.sharding.spec == P(None, "data", "tensor"), k.sharding
        assert k.sharding.shard_shape(k.shape) == (2, 2, 1, 16, 8)
    for k in odd.k + odd.v:
        assert k.sharding.mesh == mesh and k.sharding.shard_shape(k.shape) == k.shape
    assert not isinstance(KVCache.zeros(CFG, 4, 16).k[0].sharding, jax.sharding.NamedSharding)  # no mesh: as before


def test_a_cache_made_under_a_mesh_places_its_start_with_its_rows():
    """KVCache.zeros(start=...) inside jax.set_mesh left start on one device beside a mesh-placed k / v: a start
    committed to a device failed its own range check (jax's "Received incompatible devices ... _reduce_min", naming
    no argument), and such a cache was refused by a jitted decode step (its arrays on two device sets)."""
    from jax.sharding import PartitionSpec as P

    from parallel import make_mesh

    mesh = make_mesh({"data": 2, "tensor": 4})
    start = jax.device_put(np.array([1, 0, 2, 0], np.int32), jax.devices()[0])  # committed, as device_put makes it
    with jax.set_mesh(mesh):
        cache = KVCache.zeros(CFG, 4, 16, start=start)
        with pytest.raises(ValueError, match="first real slot"):  # the check still reads it
            KVCache.zeros(CFG, 4, 16, start=jax.device_put(np.array([1, 0, 16, 0], np.int32), jax.devices()[0]))
    assert cache.start.sharding.mesh == mesh and cache.start.sharding.spec == P("data"), cache.start.sharding
    np.testing.assert_array_equal(cache.start, [1, 0, 2, 0])


def test_capacity_moe_decodes_dropless_whatever_the_chunking():
    """Capacity dispatch with a KV cache runs dropless (C = T): a one-call prefill, token-by-token decoding and
    the dropless model agree (per-call capacities dropped in the prefill, never at C = 1 in decode)."""
    from models import KVCache
    from models.moe import MoEConfig

    moe = MoEConfig(4, 2, 32, dispatch="capacity", capacity_factor=0.5)  # the full forward drops half
    cfg = dataclasses.replace(CFG, moe=moe, max_seq_len=32)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    whole, _ = model(tok, cache=KVCache.zeros(cfg, 2, 16))
    cache, steps = KVCache.zeros(cfg, 2, 16), []
    step = jax.jit(lambda t, c: model(t, cache=c))  # one compile for the 12 steps (eager calls trace each one)
    for t in range(12):
        out, cache = step(tok[:, t:t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), whole, atol=1e-4)
    graphdef, state = nnx.split(model)
    dropless = nnx.merge(nnx.split(Transformer(dataclasses.replace(
        cfg, moe=dataclasses.replace(moe, dispatch="dropless")), rngs=nnx.Rngs(3)))[0], state)
    np.testing.assert_allclose(dropless(tok), whole, atol=1e-4)
    # scoring without a cache as generation computed: dropless=True (the capacity forward drops half: other logits)
    np.testing.assert_allclose(model(tok, dropless=True), whole, atol=1e-4)
    assert np.abs(np.asarray(model(tok)) - np.asarray(whole)).max() > 1e-3


def test_a_tiny_temperature_samples_the_argmax():
    """Logits / 1e-38 overflowed or made 0/0 in float32 and sampled an arbitrary token."""
    logits = jnp.asarray([[0.5, 2.0, 1.0, 0.0, -1.0]] * 64)
    for t in (1e-30, 1e-38, 1e-300):
        got = sample_logits(logits, jax.random.key(0), t, None, None)
        assert (got == 1).all(), (t, got)


def test_a_huge_temperature_never_samples_a_masked_token():
    """Past ~8.5e37, 1 / temperature flushed to 0 and -inf logits became NaN, which categorical always picked."""
    logits = jnp.asarray([[0.0, -jnp.inf, 1.0, -jnp.inf]] * 256)
    traced = jax.jit(lambda x, t: sample_logits(x, jax.random.key(0), t, None, None))
    for t in (1e38, 1e300):
        for got in (sample_logits(logits, jax.random.key(0), t, 3, 0.9), traced(logits, t)):
            assert set(np.unique(got)) == {0, 2}, (t, np.bincount(got))


def test_a_tiny_top_p_keeps_the_top_token(model):
    """top_p in (0, 1] is valid, but one below float32's normal range (~1.2e-38) flushed to 0: no token was kept,
    and every row sampled token 0 whatever its logits. The top token is always kept: greedy's tokens."""
    logits = jnp.asarray([[0.5, 2.0, 1.0, 0.0, -1.0]] * 64)
    for p in (1e-3, 1e-39, 1e-50):
        got = sample_logits(logits, jax.random.key(0), 1.0, None, p)
        assert (got == 1).all(), (p, got)
        traced = jax.jit(lambda t, q: sample_logits(logits, jax.random.key(0), t, None, q))(1.0, p)
        assert (traced == 1).all(), (p, traced)
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    np.testing.assert_array_equal(generate(model, prompt, 6, temperature=1.0, top_p=1e-40, rng=jax.random.key(1)),
                                  generate(model, prompt, 6))


def test_new_sampling_values_do_not_compile_generate_again(model):
    """temperature, top_p, eos_id and pad_id were static arguments of the jitted decoder: each new value compiled
    it again (here 7: 3 temperature / top_p pairs with and without eos, and greedy with a top_k). Traced now; greedy
    ignores top_k / top_p, so they do not make another greedy program either. A raw jax.random.PRNGKey made a
    program of its own beside a typed key's (the same samples)."""
    gen = importlib.import_module("models.generate")
    compiled = lambda: (gen._generate._cache_size(), gen._generate_until._cache_size())  # noqa: E731
    prompt = jnp.zeros((3, 7), jnp.int32)
    generate(model, prompt, 3, temperature=0.5, top_p=0.9, rng=jax.random.key(0))
    generate(model, prompt, 3, temperature=0.5, top_p=0.9, rng=jax.random.key(0), eos_id=1)
    generate(model, prompt, 3)
    before = compiled()
    for t, p in ((0.7, 0.8), (1.3, 0.95), (2.0, 0.5)):
        typed = generate(model, prompt, 3, temperature=t, top_p=p, rng=jax.random.key(1))
        generate(model, prompt, 3, temperature=t, top_p=p, rng=jax.random.key(1), eos_id=2, pad_id=5)
        raw = generate(model, prompt, 3, temperature=t, top_p=p, rng=jax.random.PRNGKey(1))  # compiled its own
        np.testing.assert_array_equal(raw, typed)
    with pytest.warns(UserWarning, match="temperature=0 is greedy decoding"):
        generate(model, prompt, 3, top_k=4, top_p=0.5)
    assert compiled() == before


def test_numpy_scalar_temperatures_reuse_the_python_float_programs(model):
    """A numpy scalar temperature (np.float32(0.9), an entry of np.linspace) made `temperature == 0` a numpy bool,
    and generate's static `greedy` flag np.False_ is another jit cache key than False: the decoder compiled once more,
    though the docstring promises other temperatures reuse the program (and a greedy np.float32(0) once more too)."""
    gen = importlib.import_module("models.generate")
    compiled = lambda: (gen._generate._cache_size(), gen._generate_until._cache_size())  # noqa: E731
    prompt = jnp.zeros((2, 5), jnp.int32)
    sampled = generate(model, prompt, 3, temperature=0.9, rng=jax.random.key(2))
    greedy = generate(model, prompt, 3, temperature=0.0, eos_id=1)
    before = compiled()
    for t in (np.float32(0.9), np.float64(0.9)):
        np.testing.assert_array_equal(generate(model, prompt, 3, temperature=t, rng=jax.random.key(2)), sampled)
    for t in (np.float32(0), np.int64(0)):
        np.testing.assert_array_equal(generate(model, prompt, 3, temperature=t, eos_id=1), greedy)
    assert compiled() == before


def test_scan_unroll_true_and_1_each_compile_their_own_generate_program(model):
    """scan_unroll=True (every layer unrolled) and 1 (a rolled layer scan) built configs that compared and hashed
    equal (True == 1 in Python), so generate's compiled program, keyed on the model's graphdef, was shared: a model
    with scan_unroll=True decoded with the rolled loop of an earlier scan_unroll=1 model (and the other way round),
    and the unrolled case of test_greedy_generate_equals_full_recompute ran the rolled program again."""
    gen = importlib.import_module("models.generate")
    unrolled = Transformer(dataclasses.replace(CFG, scan_unroll=True), rngs=nnx.Rngs(0))
    assert unrolled.cfg != model.cfg and hash(unrolled.cfg) != hash(model.cfg)
    prompt = jax.random.randint(jax.random.key(3), (2, 11), 0, CFG.vocab_size)
    rolled_out = generate(model, prompt, 5)
    before = gen._generate._cache_size()
    np.testing.assert_array_equal(generate(unrolled, prompt, 5), rolled_out)  # the same weights (Rngs(0))
    assert gen._generate._cache_size() == before + 1


def test_sample_logits_filters_each_row_of_any_leading_shape_over_its_vocabulary():
    """logits [B, T, V] (every position of a forward pass) are sampled as their [B·T, V] rows: top_p reversed the T
    axis instead of sorting the vocabulary, so it filtered nothing (top_p 0.7 sampled tokens of 10 % mass), and
    top_k compared each row with the last row's k-th logit; one row [V] raised 'Too many indices' with either."""
    probs = np.array([[0.5, 0.3, 0.1, 0.06, 0.04], [0.04, 0.06, 0.1, 0.3, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits_BTV = jnp.asarray(np.tile(np.log(probs)[None], (2000, 1, 1)), jnp.float32)  # [2000, 3, 5]
    key = jax.random.key(4)
    for top_k, top_p in ((None, 0.7), (2, None), (2, 0.7), (None, None)):
        got = np.asarray(sample_logits(logits_BTV, key, 1.0, top_k, top_p))
        assert got.shape == (2000, 3)
        np.testing.assert_array_equal(got, sample_logits(logits_BTV.reshape(-1, 5), key, 1.0, top_k, top_p)
                                      .reshape(2000, 3))
        if top_k or top_p:  # rows 0 and 1: the two most likely tokens only, each row its own
            assert set(np.unique(got[:, 0])) == {0, 1} and set(np.unique(got[:, 1])) == {3, 4}
        row = logits_BTV[0, 1]  # one row [V]: a scalar token, as the same row in a batch of one
        assert sample_logits(row, key, 1.0, top_k, top_p).shape == ()
        assert sample_logits(row, key, 1.0, top_k, top_p) == sample_logits(row[None], key, 1.0, top_k, top_p)[0]


def test_filters_compare_the_logits_not_their_rounded_shift(monkeypatch):
    """top_k and top_p compare the float32 logits themselves: the shift by the row max rounds (10 - (-3) and
    10 - (-3 - 2.4e-7) are both 13 in float32), which made two distinct logits a tie at the k-th logit or the top-p
    cutoff, and a third token was kept where Hugging Face's warpers (and exact arithmetic) keep two."""
    monkeypatch.setattr(jax.random, "categorical",  # the filtered logits, bit-cast to the sampler's int32 and back
                        lambda key, x, axis, mode: jax.lax.bitcast_convert_type(x, jnp.int32))
    below = np.nextafter(np.float32(-3), np.float32(-10))  # the float32 just below -3
    logits_V = jnp.asarray([10.0, -3.0, below, -100.0], jnp.float32)
    # top_k=2, and top_p 0.7 at temperature 13 (probabilities ~0.58, 0.21, 0.21: the first two reach it)
    for temperature, top_k, top_p in ((1.0, 2, None), (0.5, 2, None), (13.0, None, 0.7), (13.0, 3, 0.7)):
        got_V = jax.lax.bitcast_convert_type(sample_logits(logits_V, jax.random.key(0), temperature, top_k, top_p),
                                             jnp.float32)
        np.testing.assert_array_equal(np.isfinite(np.asarray(got_V)), [True, True, False, False],
                                      err_msg=f"temperature {temperature}, top_k {top_k}, top_p {top_p}")


def test_prefill_runs_the_lm_head_on_the_last_prompt_token_only(model):
    """The prefill ran the prompt in one call and sampled from its last row of logits: the [B, P, V] float32 logits
    of every prompt token were computed for nothing, nearly all of generate's temporary memory (B 2, P 256,
    V 8192: 16.8 of 16.9 MB, now 4.5 MB in all; Llama 3's V 128256, B 8, P 4096: 16.8 GB). HF's generate keeps the
    last position only (logits_to_keep=1); so does this prefill now, with the same tokens (the other tests here)."""
    gen = importlib.import_module("models.generate")
    B, P, V = 2, 256, 8192
    m = Transformer(dataclasses.replace(CFG, vocab_size=V, max_seq_len=P + 2), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    compiled = gen._generate.lower(graphdef, state, jnp.zeros((B, P), jnp.int32), None, jax.random.key(0), 2, True,
                                   None, np.float32(0), None).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < B * P * V * 4 / 2  # half of those logits alone
    seq = jnp.asarray([[5], [9]], jnp.int32)  # a one-token prompt: no prefix to prefill, its logits only
    assert_greedy_continuation(model, seq, generate(model, seq, 4))


def test_sample_logits_takes_a_traced_temperature_and_top_p():
    """A decoding loop's own jax.jit over sample_logits with the temperature / top_p as arguments (one program for
    every value) failed on float(tracer)."""
    logits = jax.random.normal(jax.random.key(0), (4, 500)) * 3
    key = jax.random.key(1)
    traced = jax.jit(lambda t, p: sample_logits(logits, key, t, 5, p))
    for t, p in ((0.7, 0.9), (1.5, 0.3)):
        np.testing.assert_array_equal(traced(t, p), sample_logits(logits, key, t, 5, p))


def test_generating_past_max_seq_len_warns_and_runs(model):
    """max_seq_len is the trained context: RoPE runs past it (extrapolation is an experiment), but silently it
    looked like a limit that held."""
    import warnings

    prompt = jnp.zeros((1, 4), jnp.int32)
    short = dataclasses.replace(CFG, max_seq_len=8)
    m = Transformer(short, rngs=nnx.Rngs(0))
    nnx.update(m, nnx.state(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the last new token is sampled, never fed: 4 + 5 tokens run positions 0..7, all within max_seq_len=8
        assert generate(m, prompt, 5).shape == (1, 9)
    with pytest.warns(UserWarning, match=r"prompt 4 \+ 6 new tokens run positions up to 8, past the model's "
                                         r"max_seq_len=8"):
        assert generate(m, prompt, 6).shape == (1, 10)


def test_a_prompt_of_max_seq_len_scores_its_next_token_without_a_warning(model):
    """A prompt of exactly max_seq_len tokens and max_new_tokens=1 runs positions 0..max_seq_len-1 only (training's
    last target is that token too): the warning said 'positions past it are extrapolated' where none was."""
    import warnings

    m = Transformer(dataclasses.replace(CFG, max_seq_len=8), rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(m, jnp.zeros((1, 8), jnp.int32), 1).shape == (1, 9)


def test_eos_generation_inside_your_own_jit(model):
    """trim=False: one shape [B, P + N], the trimmed result then pad_id, so `generate(eos_id=...)` runs inside a
    caller's jax.jit (trimming there was a bare ConcretizationTypeError); eos ids as an array are taken."""
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 4)), jnp.int32)
    free = np.asarray(generate(model, prompt, 10))
    eos = int(free[0, 4 + 3])  # row 0 stops at its 4th new token
    trimmed = np.asarray(generate(model, prompt, 10, eos_id=np.array([eos]), pad_id=0))
    full = np.asarray(generate(model, prompt, 10, eos_id=eos, pad_id=0, trim=False))
    assert full.shape == free.shape and np.array_equal(full[:, :trimmed.shape[1]], trimmed)
    assert not full[:, trimmed.shape[1]:].any() and (trimmed[0, 8:] == 0).all()  # pad after the stop
    # no pad_id: the first eos id pads, as transformers does (every other test passed one: a default of 0 passed)
    assert (np.asarray(generate(model, prompt, 10, eos_id=eos, trim=False))[0, 8:] == eos).all()
    # an eos as a row's first new token ends it there
    first = int(free[1, 4])
    out = np.asarray(generate(model, prompt, 10, eos_id=first, pad_id=0, trim=False))
    assert out[1, 4] == first and not out[1, 5:].any()
    graphdef, state = nnx.split(model)
    run = lambda trim: jax.jit(lambda s, p: generate(nnx.merge(graphdef, s), p, 10, eos_id=eos, pad_id=0,  # noqa: E731
                                                     trim=trim))(state, prompt)
    np.testing.assert_array_equal(np.asarray(run(False)), full)
    with pytest.raises(ValueError, match="under jax.jit: the trimmed length depends on the tokens; pass trim=False"):
        run(True)


def test_trim_must_be_a_bool(model):
    """trim="no" (or 0.0, a string from a CLI flag) was read by truthiness: "no" trimmed. A numpy bool is a bool."""
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 4)), jnp.int32)
    eos = int(np.asarray(generate(model, prompt, 6))[0, 4 + 2])
    for bad in ("no", "False", 0, None):
        with pytest.raises(ValueError, match=f"trim must be True or False, got {re.escape(repr(bad))}"):
            generate(model, prompt, 6, eos_id=eos, trim=bad)
    np.testing.assert_array_equal(generate(model, prompt, 6, eos_id=eos, trim=np.bool_(False)),
                                  generate(model, prompt, 6, eos_id=eos, trim=False))


def test_pad_id_takes_integer_scalar_arrays_and_names_traced_ids(model):
    """eos_id took numpy / jax arrays but pad_id=jnp.int32(0) (e.g. a tokenizer's id kept as an array) was refused as
    'not one token id'; traced eos / pad ids failed with jax's bare ConcretizationTypeError."""
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 4)), jnp.int32)
    eos = int(np.asarray(generate(model, prompt, 6))[0, 4 + 2])
    want = np.asarray(generate(model, prompt, 6, eos_id=eos, pad_id=7, trim=False))
    for pad in (jnp.int32(7), np.int64(7), jnp.asarray(7, jnp.uint8)):
        np.testing.assert_array_equal(generate(model, prompt, 6, eos_id=jnp.int32(eos), pad_id=pad, trim=False), want)
    for bad in (jnp.float32(7), 7.0, jnp.asarray([7]), [7], jnp.bool_(True), CFG.vocab_size):
        with pytest.raises(ValueError, match="pad_id must be"):
            generate(model, prompt, 6, eos_id=eos, pad_id=bad)
    for kw in ({"eos_id": eos, "pad_id": None}, {"eos_id": None}):
        name = "eos_id" if kw["eos_id"] is None else "pad_id"
        with pytest.raises(ValueError, match=f"{name} must be concrete token ids .* not a traced value"):
            jax.jit(lambda i: generate(model, prompt, 6, trim=False, **{**kw, name: i}))(jnp.int32(7))  # noqa: B023


def test_left_padded_rows_generate_what_they_would_alone(model):
    """A batch of prompts of different lengths (left_pad + prompt_mask) continues each row as that prompt alone:
    padding is never attended and positions count from each row's first token; with eos_id too."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, CFG.vocab_size, n) for n in (5, 2)]
    tokens, mask = left_pad(prompts, pad_id=7)
    assert tokens.shape == (2, 5) and (np.asarray(tokens[1, :3]) == 7).all() and mask.sum() == 7
    batch = np.asarray(generate(model, tokens, 6, prompt_mask=mask))
    alone = [np.asarray(generate(model, p[None], 6))[0, len(p):] for p in prompts]
    np.testing.assert_array_equal(batch[:, 5:], np.stack(alone))
    fixed, fixed_mask = left_pad(prompts, pad_id=7, length=8)  # one shape for every batch: one compiled program
    assert fixed.shape == (2, 8) and np.array_equal(fixed[:, 3:], tokens) and fixed_mask.sum() == 7
    np.testing.assert_array_equal(np.asarray(generate(model, fixed, 6, prompt_mask=fixed_mask))[:, 8:], batch[:, 5:])
    eos = int(alone[1][2])  # the short row ends at its third new token
    ended = np.asarray(generate(model, tokens, 6, prompt_mask=np.asarray(mask, np.int32), eos_id=eos, pad_id=0))
    assert (ended[1, 5:8] == alone[1][:3]).all() and (ended[1, 8:] == 0).all()


def test_decoding_across_the_prefix_buckets_equals_full_recompute():
    """A decode step scores only the cache slots written so far, rounded up to a bucket (64, 128, then all 150 of a
    global layer; 64, then the 80-slot ring of a local one) chosen at run time: crossing them, with local and global
    layers, soft-capped scores and left padding, every row continues as a full forward over its tokens alone."""
    cfg = dataclasses.replace(CFG, n_layers=4, attn_pattern="alternating", sliding_window=80, attn_logit_softcap=5.0,
                              max_seq_len=256)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (60, 45)]
    tokens, mask = left_pad(prompts)
    batch = np.asarray(generate(model, tokens, 90, prompt_mask=mask))
    # assert_greedy_continuation for both rows in one forward (one compile): row 1 alone, then filler tokens after
    # its last one, which a causal forward's logits at its own positions never see (row 0 is a prompt decoded alone)
    alone = np.stack([np.concatenate([p, batch[b, 60:], np.zeros(60 - len(p), batch.dtype)])
                      for b, p in enumerate(prompts)])
    logits_BTV = jax.jit(lambda t: model(t))(alone[:, :-1])
    for b, p in enumerate(prompts):
        P = len(p)
        np.testing.assert_array_equal(alone[b, P:P + 90], jnp.argmax(logits_BTV[b, P - 1:P - 1 + 90], -1))


def test_a_traced_chunk_compiles_no_bucket_smaller_than_itself():
    """A chunk of T tokens fills at least min(T, S) slots, so the buckets below that are never chosen: a jitted
    chunk step (the cache's length traced, as in a chunked prefill) compiled a dead [T, n] attention for each (T 512,
    S 8192: 24 dots where 18 do; T 1024, S 4096: 22 where 14 do)."""
    import models.transformer as transformer
    from models import KVCache

    model = Transformer(dataclasses.replace(CFG, max_seq_len=512), rngs=nnx.Rngs(0))
    scored, attention = [], transformer.attention

    def counting(q, k, *args, **kw):
        scored.append((q.shape[1], k.shape[1]))
        return attention(q, k, *args, **kw)

    step = jax.jit(lambda t, c: model(t, cache=c))
    with mock.patch.object(transformer, "attention", counting):
        for T in (300, 100, 1):
            step.lower(jnp.zeros((1, T), jnp.int32), KVCache.zeros(model.cfg, 1, 500))
    assert sorted(set(scored)) == [(1, 64), (1, 128), (1, 256), (1, 500), (100, 128), (100, 256), (100, 500),
                                   (300, 500)], scored


def test_prompt_mask_must_be_left_padding(model):
    tokens = jnp.zeros((2, 4), jnp.int32)
    right = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="prompt_mask row 1 is not left padding .* padding_side='left'"):
        generate(model, tokens, 2, prompt_mask=right)
    with pytest.raises(ValueError, match="prompt_mask row 0 has no real token"):
        generate(model, tokens, 2, prompt_mask=np.array([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"prompt_mask must be bool or 0/1 ints of the prompt's shape \(2, 4\)"):
        generate(model, tokens, 2, prompt_mask=np.ones((2, 3), bool))
    # the errors name the argument and dtype the caller passed: a float64 mask read "float32" (jnp.asarray, x64 off)
    # and a float prompt "tokens must be integer ids"
    with pytest.raises(ValueError, match=r"prompt_mask must be bool or 0/1 ints .*, got float64\[2, 4\]"):
        generate(model, tokens, 2, prompt_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^prompt_tokens must be integer ids, got dtype float64"):
        generate(model, np.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match=r"^prompt_tokens must hold token ids in \[0, vocab_size="):
        generate(model, -tokens - 1, 2)
    with pytest.raises(ValueError, match="non-empty list of non-empty token-id lists"):
        left_pad([[1, 2], []])
    with pytest.raises(ValueError, match=r"length=2 must be an int >= the longest prompt \(3 tokens\)"):
        left_pad([[1, 2, 3]], length=2)
    with pytest.raises(ValueError, match=r"length=0 must be an int >= the longest prompt \(1 token\)"):  # "1 tokens"
        left_pad([[7]], length=0)
    with pytest.raises(ValueError, match=r"prompt 0 must hold token ids \(ints in \[0, 2\*\*31\)\), got float64 \[1.7"):
        left_pad([[1.7, 2.2], [3]])  # truncated to [1, 2] without a word
    with pytest.raises(ValueError, match="prompt 1 must hold token ids"):
        left_pad([[1], [-3]])
    for bad in (0.5, True, -1):
        with pytest.raises(ValueError, match=f"pad_id={bad} must be a token id"):
            left_pad([[1], [2, 3]], pad_id=bad)
    assert left_pad([np.array([4, 5], np.int64), jnp.array([6])])[0].tolist() == [[4, 5], [0, 6]]


def test_sample_logits_refuses_the_settings_generate_refuses():
    """Called directly (a custom decoding loop), top_p=0 or a NaN temperature masked every token and
    categorical returned token 0, the least likely here, for every row; a negative temperature sampled the argmax."""
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]] * 8))
    for kw, words in [(dict(top_p=0.0), "top_p must be None or a number in"), (dict(top_p=-0.5), "top_p must be"),
                      (dict(top_p=float("nan")), "top_p must be"), (dict(temperature=float("nan")), "temperature must"),
                      (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
                      # a TypeError from float() or a comparison, naming neither
                      (dict(temperature=None), "temperature must be a finite number >= 0, got None"),
                      (dict(temperature="0.5"), "temperature must be"), (dict(top_p="0.5"), "top_p must be")]:
        with pytest.raises(ValueError, match=words):
            sample_logits(logits, jax.random.key(0), **(dict(temperature=1.0, top_k=None, top_p=None) | kw))


def test_left_padding_does_not_count_toward_max_seq_len(model):
    """left_pad(length=...) pads every batch to one shape: the padding takes no position, so 3 + 4 tokens within
    max_seq_len=16 are not 'past it' (the warning counted the 16 padded columns)."""
    import warnings

    m = Transformer(dataclasses.replace(CFG, max_seq_len=16), rngs=nnx.Rngs(0))
    tokens, mask = left_pad([[1, 2, 3], [4, 5]], length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(m, tokens, 4, prompt_mask=mask).shape == (2, 20)
    with pytest.warns(UserWarning, match=r"prompt 3 \+ 15 new tokens run positions up to 16, past the model's "
                                         r"max_seq_len=16"):
        generate(m, tokens, 15, prompt_mask=mask)


def test_left_pad_refuses_entries_that_are_not_one_prompt(model):
    """left_pad([5, 9, 2]) (one prompt, the outer list forgotten) gave three one-token prompts, and a [2, n] entry
    one prompt of both rows; a tokenizer's [1, n] row is one prompt."""
    import models

    for bad in ([5, 9, 2], [np.array([[1, 2], [3, 4]]), [7]]):
        with pytest.raises(ValueError, match=r"left_pad: prompt 0 has shape .* e.g. left_pad\(\[ids\]\)"):
            left_pad(bad)
    assert left_pad([np.array([[4, 5]]), [6]])[0].tolist() == [[4, 5], [0, 6]]
    # the fix the layout error names resolves ('models.generate' is the function: models.generate.left_pad failed)
    with pytest.raises(ValueError, match=r"\(models\.left_pad, or") as e:
        generate(model, jnp.zeros((2, 4), jnp.int32), 2, prompt_mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert callable(eval(re.search(r"\((models\.\w+),", str(e.value)).group(1), {"models": models}))


def test_cudnn_attention_off_a_gpu_names_the_setting():
    """attn_impl='cudnn' on the CPU surfaced jax's bare RuntimeError 'cuDNN is not detected.' from generate and the
    forward (swa_impl='cudnn' already named itself and the fix)."""
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN is there")
    m = Transformer(dataclasses.replace(CFG, dtype="bfloat16", attn_impl="cudnn"), rngs=nnx.Rngs(0))
    words = r"attn_impl='cudnn' is cuDNN's fused kernel for NVIDIA GPUs .* a cpu backend .* use attn_impl='xla'"
    for run in (lambda: generate(m, jnp.zeros((1, 4), jnp.int32), 3), lambda: m(jnp.zeros((1, 4), jnp.int32))):
        with pytest.raises(ValueError, match=words):
            run()


def test_cache_start_outside_the_cache_is_refused():
    """start=-2 shifted the row's RoPE positions by 2 and start=9 of 8 slots left a row nothing to attend, both
    without a word (finite logits)."""
    from models import KVCache

    for start in ([0, 9], [-2, 0], [0, 8]):
        with pytest.raises(ValueError, match=r"first real slot must lie in \[0, max_len=8\), got \[.*\]"):
            KVCache.zeros(CFG, 2, 8, start=jnp.asarray(start))
    assert KVCache.zeros(CFG, 2, 8, start=jnp.asarray([0, 7])).start.tolist() == [0, 7]


def test_a_cache_of_an_integer_dtype_is_refused_and_narrow_floats_decode_close(model):
    """KVCache.zeros(dtype=jnp.int8) stored keys and values truncated to integers (no quantisation scales) without a
    word: logits 0.25 off at |logits| 0.38. Now refused by name; float16 / bfloat16 caches stay within their
    rounding (3e-4 / 3e-3 here; measured 6e-5 / 6e-4)."""
    from models import KVCache

    for dt in (jnp.int8, "int32", jnp.bool_):
        with pytest.raises(ValueError, match=r"KVCache.zeros\(dtype=.*\): a floating dtype is needed.*no quantisation"):
            KVCache.zeros(CFG, 2, 16, dtype=dt)
    for dt in ("bf16", "fp16"):  # aliases numpy does not know: a bare "data type 'bf16' not understood" TypeError
        with pytest.raises(ValueError, match=rf"^KVCache.zeros\(dtype='{dt}'\): not a dtype; use 'bfloat16'"):
            KVCache.zeros(CFG, 2, 16, dtype=dt)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size)
    ref = model(tokens)
    for dt, tol in ((jnp.float16, 3e-4), ("bfloat16", 3e-3)):
        logits, cache = model(tokens, cache=KVCache.zeros(CFG, 2, 16, dtype=dt))
        assert cache.k[0].dtype == jnp.dtype(dt)
        np.testing.assert_allclose(logits, ref, atol=tol)


def test_half_precision_logits_sample_as_their_float32_values():
    """sample_logits on bfloat16 logits (a custom decoding loop) ran the top-p cumulative sum in bfloat16: it stalls,
    and the nucleus came out wrong (128256 tokens, top_p 0.9: 28223 kept of 30223, mass 0.891 < top_p). Now the
    filters run in float32: the samples of the float32 values of the same logits."""
    # 8 rows: filtering in bfloat16 samples another token in 8 / 5 / 8 of them for the three settings below
    logits = (jax.random.normal(jax.random.key(0), (8, 32000)) * 3).astype(jnp.bfloat16)
    key = jax.random.key(1)
    for t, k, p in ((1.0, None, 0.95), (0.7, 50, 0.9), (1.3, None, None)):
        np.testing.assert_array_equal(sample_logits(logits, key, t, k, p),
                                      sample_logits(logits.astype(jnp.float32), key, t, k, p))


def test_a_traced_temperature_in_generate_is_named_as_such(model):
    """generate under jax.jit with a traced temperature said 'temperature must be a finite number >= 0, got
    Traced<...>' (it is one); generate chooses greedy or sampling by it, so it names the Python number it needs
    and sample_logits, which takes a traced one."""
    prompt = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"generate's temperature must be a Python number .* sample_logits"):
        jax.jit(lambda t: generate(model, prompt, 2, temperature=t, rng=jax.random.key(0)))(0.5)
    # top_p likewise said 'top_p must be None or a number in (0, 1], got JitTracer(~float32[])'
    with pytest.raises(ValueError, match=r"generate's top_p must be a Python number .* sample_logits"):
        jax.jit(lambda p: generate(model, prompt, 2, temperature=1.0, top_p=p, rng=jax.random.key(0)))(0.9)


def test_generate_takes_raw_keys_of_the_default_prng_and_names_other_keys(model):
    """A raw key is read with the default PRNG implementation: jax.random.PRNGKey is uint32[4] under
    jax_default_prng_impl='rbg' (faster on TPU) and was refused as 'not one key', while a threefry uint32[2] there
    passed the check and failed inside jax; an rbg key's raw data under threefry was refused as not a key at all."""
    prompt = jnp.ones((2, 3), jnp.int32)
    with jax.default_prng_impl("rbg"):
        typed = generate(model, prompt, 3, temperature=1.0, rng=jax.random.key(3))
        np.testing.assert_array_equal(generate(model, prompt, 3, temperature=1.0, rng=jax.random.PRNGKey(3)), typed)
        raw_fry = jax.random.key_data(jax.random.key(3, impl="threefry2x32"))
        with pytest.raises(ValueError, match=r"rng .* uint32\[2\], .*wrap_key_data.*impl=\.\.\.\) .*'threefry2x32'"):
            generate(model, prompt, 3, temperature=1.0, rng=raw_fry)
    raw_rbg = jax.random.key_data(jax.random.key(3, impl="rbg"))
    with pytest.raises(ValueError, match=r"rng .* uint32\[4\], .*wrap_key_data\(data, impl=\.\.\.\) .*'rbg'"):
        generate(model, prompt, 3, temperature=1.0, rng=raw_rbg)
    wrapped = generate(model, prompt, 3, temperature=1.0, rng=jax.random.wrap_key_data(raw_rbg, impl="rbg"))
    typed = generate(model, prompt, 3, temperature=1.0, rng=jax.random.key(3, impl="rbg"))
    np.testing.assert_array_equal(wrapped, typed)
    with pytest.raises(ValueError, match=r"rng .*a batch of 2 raw keys"):
        generate(model, prompt, 3, temperature=1.0, rng=jax.random.key_data(jax.random.split(jax.random.key(0))))


def test_key_error_names_what_is_not_one_key():
    """key_error itself, on what generate's and t2v's tests do not pass: raw data of the default shape that is not
    uint32 (jax.random refuses it later with "expected key_data.dtype = uint32"), batches of 3 (the count is the
    leading dim, not a key's 2 words) and uint32 of no implementation's shape (the caller's hint kept)."""
    from models.keys import key_error

    assert key_error(jax.random.PRNGKey(0)) is None and key_error(jax.random.key(0)) is None
    for bad in (np.zeros(2, np.int32), np.zeros(2, np.float32)):
        assert key_error(bad, "; swapped?") == f"got {bad.dtype}[2]; swapped?"
    assert "a batch of 3 raw keys" in key_error(jax.random.key_data(jax.random.split(jax.random.key(0), 3)))
    assert "a batch of 3 keys" in key_error(jax.random.split(jax.random.key(0), 3))
    assert key_error(np.zeros(3, np.uint32), "; swapped?") == "got uint32[3]; swapped?"
    # a [2, 3] batch: keys[0] is still a batch of 3, the fix names one key
    grid = jax.random.split(jax.random.key(0), 6).reshape(2, 3)
    assert "a batch of 6 keys; pass one (keys[0, 0])" in key_error(grid)
    assert "a batch of 6 raw keys; pass one (keys[0, 0])" in key_error(jax.random.key_data(grid))
    # an empty batch has no keys[0] to pass (it raises IndexError): the fix makes one; one key reads "1 key"
    keys = jax.random.split(jax.random.key(0), 3)
    for empty in (keys[:0], jax.random.key_data(keys[:0]), grid[:, :0]):
        why = key_error(empty)
        assert "an empty batch of" in why and why.endswith("pass one key, e.g. jax.random.key(0)"), why
        assert "keys[" not in why, why
    assert key_error(keys[:1]).endswith("a batch of 1 key; pass it (keys[0])")
    assert key_error(jax.random.key_data(keys[:1])).endswith("a batch of 1 raw key; pass it (keys[0])")


def test_temperature_and_top_p_take_concrete_scalar_arrays(model):
    """temperature=jnp.float32(0.7) (or a value of jnp.linspace, np.array(0.7)) was refused as 'temperature must be a
    finite number >= 0, got Array(0.7)', which it is, and top_p likewise; sample_logits, pad_id and eos_id take such
    arrays. They sample as the Python numbers do; bool / non-scalar arrays are still refused by name."""
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    want = generate(model, prompt, 4, temperature=0.7, top_p=0.9, rng=jax.random.key(3))
    for t, p in ((jnp.float32(0.7), jnp.float32(0.9)), (np.array(0.7), np.array(0.9)), (jnp.asarray(0.7), 0.9)):
        np.testing.assert_array_equal(generate(model, prompt, 4, temperature=t, top_p=p, rng=jax.random.key(3)), want)
    np.testing.assert_array_equal(generate(model, prompt, 4, temperature=jnp.float32(0)), generate(model, prompt, 4))
    for kw, words in [(dict(temperature=jnp.asarray([0.7])), "temperature must be"),
                      (dict(temperature=jnp.bool_(True)), "temperature must be"),
                      (dict(temperature=jnp.float32(-1.0)), "temperature must be a finite number >= 0"),
                      (dict(temperature=1.0, top_p=jnp.float32(1.5)), "top_p must be None or a number in")]:
        with pytest.raises(ValueError, match=words):
            generate(model, prompt, 2, rng=jax.random.key(0), **kw)


def test_a_float8_cache_is_refused_by_name():
    """KVCache.zeros(dtype=jnp.float8_e4m3fn) stored keys and values as they are (no scales): on this model with its
    matrices scaled by 300 (|k| up to 3.5e4) 888 cache entries became NaN and greedy decoding emitted token 0 eight
    times of eight (0 of 8 agreeing with a float32 cache); even at |k| < 0.31, e4m3fn changed 1 token of 16 and
    e5m2 at |k| ~ 350 changed 5 of 8. Both are refused by name, with the dtypes to use."""
    from models import KVCache

    for dt in (jnp.float8_e4m3fn, "float8_e5m2"):
        with pytest.raises(ValueError, match=r"KVCache.zeros\(dtype=float8_e[45]m[23]\w*\): float8 caches are not "
                                             r"supported.*use 'bfloat16', 'float16' or 'float32'"):
            KVCache.zeros(CFG, 2, 16, dtype=dt)


def test_a_float16_cache_works_at_normal_scale_and_its_overflow_is_documented():
    """A float16 cache under float32 compute is kept (at normal scale it decodes as float32 does), but keys beyond
    float16's 65504 become inf and the logits NaN without an error (wk scaled by 3e5: |k| 1.1e5, greedy token 0
    where float32 gives 31): KVCache.zeros's docstring says so."""
    from models import KVCache

    prompt = jnp.asarray([[1, 5, 9, 3]])
    m = Transformer(CFG, rngs=nnx.Rngs(0))
    logits = {dt: m(prompt, cache=KVCache.zeros(CFG, 1, 8, dtype=dt))[0] for dt in (jnp.float32, jnp.float16)}
    assert int(jnp.argmax(logits[jnp.float16][0, -1])) == int(jnp.argmax(logits[jnp.float32][0, -1]))
    m.blocks.wk[...] = m.blocks.wk[...] * 3e5
    logits, cache = m(prompt, cache=KVCache.zeros(CFG, 1, 8, dtype=jnp.float16))
    assert bool(jnp.isinf(cache.k[0]).any()) and bool(jnp.isnan(logits).any())  # the documented failure
    assert "65504" in KVCache.zeros.__doc__ and "NaN" in KVCache.zeros.__doc__


def test_top_k_takes_concrete_integer_scalar_arrays_and_names_traced_ones(model):
    """A concrete jnp.int32(3) top_k was refused as not 'a positive int' (np.int32(3) passed): it is that int, in
    generate and sample_logits alike; a traced one is named as such, a bool / float array still refused."""
    prompt, key = jnp.zeros((1, 3), jnp.int32), jax.random.key(7)
    want = generate(model, prompt, 4, temperature=1.0, top_k=3, rng=key)
    for k in (jnp.int32(3), np.asarray(3)):
        np.testing.assert_array_equal(generate(model, prompt, 4, temperature=1.0, top_k=k, rng=key), want)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 64))
    np.testing.assert_array_equal(sample_logits(logits, key, 1.0, jnp.int32(2), None),
                                  sample_logits(logits, key, 1.0, 2, None))
    for bad in (jnp.float32(3), jnp.bool_(True), jnp.array([3])):
        with pytest.raises(ValueError, match="top_k must be None or 0"):
            sample_logits(logits, key, 1.0, bad, None)
    with pytest.raises(ValueError, match=r"top_k must be a Python int .* not a traced value"):
        jax.jit(lambda k: sample_logits(logits, key, 1.0, k, None))(2)


def test_max_new_tokens_takes_concrete_integer_scalar_arrays_and_names_traced_ones(model):
    """max_new_tokens=jnp.int32(4) (a count computed with jnp) was refused as 'must be an int >= 1, got Array(4)';
    numpy's int64 passed. A concrete integer scalar is that int; a traced one fixes no shape, and is named as such
    (it read 'must be an int >= 1, got JitTracer(~int32[])'); bool / float / non-scalar arrays stay refused."""
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    want = generate(model, prompt, 4)
    for n in (jnp.int32(4), jnp.asarray(4), np.array(4, np.int64), jnp.asarray(4, jnp.uint8)):
        np.testing.assert_array_equal(generate(model, prompt, n), want)
    for bad in (jnp.float32(4), jnp.asarray([4]), jnp.bool_(True), jnp.int32(0)):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            generate(model, prompt, bad)
    with pytest.raises(ValueError, match=r"generate's max_new_tokens must be a Python int .* not a traced value"):
        jax.jit(lambda n: generate(model, prompt, n))(4)


def test_int64_prompt_ids_beyond_int32_are_refused_not_wrapped(model):
    """With x64 off jnp.asarray wraps an int64 array to int32: a prompt id of 2**32 + 5 (a corrupt id, an offset
    gone wrong) was read as 5, a valid id, and generated from without a word (-2**32 + 5 likewise). Its range is now
    checked on the values given; uint8 / int64 ids within range generate as int32 ones do."""
    want = generate(model, jnp.asarray([[5, 3]], jnp.int32), 2)
    for ids in ([[2**32 + 5, 3]], [[-2**32 + 5, 3]]):
        with pytest.raises(ValueError, match=r"prompt_tokens must hold token ids in \[0, vocab_size=64\), got min"):
            generate(model, np.asarray(ids, np.int64), 2)
    for dt in (np.int64, np.uint8, np.uint64):
        np.testing.assert_array_equal(generate(model, np.asarray([[5, 3]], dt), 2), want)


def test_left_pad_refuses_ids_beyond_int32_instead_of_wrapping_them():
    """left_pad writes int32 tokens: an int64 / uint64 id of 2**32 + 5 (or pad_id) was stored as 5, a valid id, so
    generate's own range check never saw it. Now refused, naming the prompt and its range; int32's largest id passes."""
    for ids, span in ((np.array([2**32 + 5, 7], np.int64), "max 4294967301"),
                      (np.array([2**63], np.uint64), "max 9223372036854775808")):
        with pytest.raises(ValueError, match=rf"left_pad: prompt 1 must hold token ids \(ints in \[0, 2\*\*31\)\), "
                                             rf"got .*\(min .*{span}\)"):
            left_pad([[1], ids])
    for pad in (2**32, np.uint64(2**32 + 2)):
        with pytest.raises(ValueError, match=r"pad_id=.* must be a token id \(an int in \[0, 2\*\*31\)\)"):
            left_pad([[1], [2, 3]], pad_id=pad)
    top = np.iinfo(np.int32).max
    assert left_pad([np.array([top], np.int64), [3, 4]], pad_id=top)[0].tolist() == [[top, top], [3, 4]]


def test_left_pad_takes_integer_scalar_arrays_as_generate_does():
    """generate's pad_id takes an integer scalar array (jnp.int32(2), np.array(2)); left_pad refused the same value
    as 'must be a token id (an int ...)', so one pad id could not serve both. Now it is that int (length too); a bool
    array is still no id."""
    want = left_pad([[1], [2, 3]], pad_id=2, length=3)
    for pad, length in ((jnp.int32(2), jnp.int32(3)), (np.array(2), np.array(3, np.uint8))):
        got = left_pad([[1], [2, 3]], pad_id=pad, length=length)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"pad_id=.* must be a token id"):
        left_pad([[1], [2, 3]], pad_id=np.array(True))
    with pytest.raises(ValueError, match=r"length=.* must be an int >= the longest prompt"):
        left_pad([[1], [2, 3]], length=jnp.int32(1))


def test_list_prompt_ids_beyond_int32_get_the_named_range_error(model):
    """The same ids as a Python list raised jax's bare OverflowError ("Python integer 2147483648 out of bounds for
    int32"), naming neither the argument nor the vocabulary; a model call likewise. Lists within range still run."""
    from models.transformer import check_token_ids

    for ids, span in (([[2**31, 3]], "min 3, max 2147483648"), ([[-2**40, 3]], "min -1099511627776, max 3"),
                      ([[5, 2**64]], "min 5, max 18446744073709551616")):
        with pytest.raises(ValueError, match=rf"prompt_tokens must hold token ids in \[0, vocab_size=64\), got {span}"):
            generate(model, ids, 2)
        with pytest.raises(ValueError, match=r"^tokens must hold token ids in \[0, vocab_size=64\)"):
            model(ids)
    assert check_token_ids([[5, 3]], 64).dtype == jnp.int32
    np.testing.assert_array_equal(generate(model, [[5, 3]], 2), generate(model, jnp.asarray([[5, 3]], jnp.int32), 2))


def test_python_ids_are_checked_one_by_one_a_bool_an_empty_list_and_an_object_array_named(model):
    """jnp.asarray read a bool among ints as id 1 ([[True, 2]] ran as [[1, 2]]), an empty list as float32 (refused
    as 'dtype float32', which the caller never gave), and a numpy object array failed inside jax ('Error
    interpreting argument to stage'), naming nothing. Each is named now; an empty list reads as an empty int batch,
    and an object array of ints runs as the ints."""
    from models.transformer import check_token_ids

    for ids in ([[True, 2]], [[5, np.bool_(False)]], np.array([[True, 2]], dtype=object)):
        with pytest.raises(ValueError, match=r"^prompt_tokens must be integer ids, got (True|False) \(bool; a bool is"):
            generate(model, ids, 2)
        with pytest.raises(ValueError, match=r"^tokens must be integer ids, got (True|False) \(bool"):
            model(ids)
    with pytest.raises(ValueError, match=r"^prompt_tokens must be integer ids, got 'a' \(str"):
        generate(model, np.array([[1, "a"]], dtype=object), 2)
    with pytest.raises(ValueError, match=r"^prompt_tokens must be integer ids, got \[1, 2\] \(list; rows of one"):
        generate(model, [[1, 2], [3]], 2)
    empty = check_token_ids([[]], 64)
    assert (empty.shape, empty.dtype) == ((1, 0), jnp.int32)
    with pytest.raises(ValueError, match=r"prompt_tokens must be \[batch, length >= 1\], got shape \(1, 0\)"):
        generate(model, [[]], 2)
    want = generate(model, jnp.asarray([[5, 3]], jnp.int32), 2)
    np.testing.assert_array_equal(generate(model, np.array([[5, 3]], dtype=object), 2), want)
    np.testing.assert_array_equal(generate(model, [[np.int64(5), 3]], 2), want)
    np.testing.assert_array_equal(generate(model, [[jnp.int32(5), 3]], 2), want)  # jax scalars are ints too
    with pytest.raises(ValueError, match=r"got True \(bool"):
        generate(model, [[jnp.bool_(True), 3]], 2)


def test_python_lists_of_traced_rows_still_run_under_jit(model):
    """The per-element check of Python ids (a bool, an empty list) called np.asarray on the list, which a list of
    tracers refuses (TracerArrayConversionError): `model([row_a, row_b])` or a list of scalars inside a jitted
    function failed where jnp.asarray stacked them before. They are stacked as before."""
    from models.transformer import check_token_ids

    rows = jnp.asarray([[5, 3], [7, 1]], jnp.int32)
    stacked = jax.jit(lambda a, b: check_token_ids([a, b], 64))(rows[0], rows[1])
    np.testing.assert_array_equal(stacked, rows)
    scalars = jax.jit(lambda a, b: check_token_ids([[a, b]], 64))(rows[0, 0], rows[0, 1])
    np.testing.assert_array_equal(scalars, rows[:1])
    np.testing.assert_array_equal(jax.jit(lambda a, b: model([a, b]))(rows[0], rows[1]), model(rows))


def test_a_traced_top_p_of_one_is_off_as_a_concrete_one_is(monkeypatch):
    """A decoding loop's own jit with top_p as an argument: top_p=1 filters nothing, as top_p=1.0 and None do (a
    float32 cumulative sum reaches 1 before the tail: 2800 of row 0's 32000 tokens went when a traced 1 was not off)."""
    logits = jax.random.normal(jax.random.key(0), (2, 32000)) * 4
    # categorical replaced by the count of tokens it would choose from (the ones not filtered to -inf)
    monkeypatch.setattr(jax.random, "categorical", lambda key, x, axis, mode: jnp.isfinite(x).sum(axis))
    kept = jax.jit(lambda x, p: sample_logits(x, jax.random.key(0), 1.0, None, p))  # x an argument: not folded
    assert kept(logits, 1.0).tolist() == [32000, 32000]
    assert (kept(logits, 0.999) < 32000).all()  # (the count sees the filter)


def test_pad_defaults_to_the_first_of_several_eos_ids(model):
    """eos_id=(a, b) without pad_id pads ended rows with a, as transformers' generate sets pad_token_id to
    eos_token_id[0] (every other test passes one eos id, where first and last are the same); a row that has not
    ended keeps generating while another has."""
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 4)), jnp.int32)
    free = np.asarray(generate(model, prompt, 8))
    first = int(free[0, 4 + 4])  # row 0 ends at its fifth new token, row 1 not at all
    other = next(t for t in range(CFG.vocab_size) if t not in free)
    assert first not in free[1] and first not in free[0, 4:8]
    out = np.asarray(generate(model, prompt, 8, eos_id=(first, other), trim=False))
    np.testing.assert_array_equal(out[0], np.r_[free[0, :9], [first] * 3])
    np.testing.assert_array_equal(out[1], free[1])


def test_an_eos_that_never_comes_changes_nothing(model):
    """eos ids no row emits: the tokens of generate without them, every column (a while loop running one step past
    max_new_tokens wrote an extra token over the last column, clamped there)."""
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 4)), jnp.int32)
    free = np.asarray(generate(model, prompt, 8))
    never = [t for t in range(CFG.vocab_size) if t not in free][:2]
    np.testing.assert_array_equal(generate(model, prompt, 8, eos_id=never, trim=False), free)


def test_cached_query_blocks_tile_for_the_cpu_caches_elsewhere_for_memory_only():
    from models.transformer import CACHED_QUERY_BLOCK, cached_query_blocks

    assert CACHED_QUERY_BLOCK == 128
    assert [cached_query_blocks(4, T, 32, 8192, "cpu") for T in (1, 127, 128, 129, 512)] == [1, 1, 1, 2, 4]
    # on CPU, scores that fit in 8 MiB stay one kernel (the blocks cost 5-10% there)
    assert cached_query_blocks(1, 256, 4, 2048, "cpu") == 1 and cached_query_blocks(1, 1024, 4, 1024, "cpu") == 8
    # elsewhere a lax.map serialises the blocks: one kernel until its float32 scores pass 1 GiB (decode: always)
    assert cached_query_blocks(1, 512, 32, 8192, "gpu") == 1  # 512 MiB of scores
    assert cached_query_blocks(1, 4096, 32, 8192, "gpu") == 4  # 4 GiB
    assert cached_query_blocks(2, 4096, 32, 8192, "gpu") == 8 and cached_query_blocks(8, 2048, 32, 8192, "tpu") == 16
    assert cached_query_blocks(1, 1536, 32, 8192, "gpu") == 2  # 1.5 GiB: no block over 1 GiB
    assert cached_query_blocks(1, 2, 64, 1 << 23, "gpu") == 2  # 2 GiB a row: a row a block, no more blocks than rows
    assert cached_query_blocks(64, 1, 64, 1 << 20, "gpu") == cached_query_blocks(64, 1, 64, 1 << 20) == 1  # decode


def test_a_long_cached_chunk_holds_one_query_blocks_scores_not_the_chunks():
    """A T-token call with a cache (a prompt's prefill, a chunk of one) scored all T queries against the cache's
    slots at once: one [B, K, G, T, S] float32 tensor (B 8, 32 heads, T 2048, S 8192: 17 GB), which on CPU also fell
    out of the caches (T 1024 over 1024 slots: 3x slower). On CPU it now goes in 128-query blocks, with the one
    kernel's logits."""
    import models.transformer as transformer
    from models import KVCache

    cfg = dataclasses.replace(CFG, max_seq_len=1024)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    B, T, S = 1, 1024, 1024  # 16 MiB of scores
    tok = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
    step = jax.jit(lambda t, c: model(t, cache=c))
    scores = B * cfg.n_heads * T * S * 4
    temp = step.lower(tok, KVCache.zeros(cfg, B, S)).compile().memory_analysis().temp_size_in_bytes
    # the one kernel held the scores and their exponentials (2x scores); 128-query blocks, an eighth of that
    assert temp < scores, (temp, scores)
    tiled, _ = step(tok, KVCache.zeros(cfg, B, S))
    with mock.patch.object(transformer, "cached_query_blocks", lambda *a: 1):
        one, _ = jax.jit(lambda t, c: model(t, cache=c))(tok, KVCache.zeros(cfg, B, S))
    np.testing.assert_allclose(tiled, one, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tiled, model(tok), atol=1e-5)


# (no all-global float32 case: 'alternating' runs its global layers' cached attention in float32 through the same
# chunks, cache and tolerance, and 'bf16' an all-global model's layer stack)
@pytest.mark.parametrize("kw", [dict(attn_pattern="alternating", sliding_window=200),
                                dict(n_layers=3, attn_pattern="2:1", sliding_window=150, attn_logit_softcap=5.0),
                                dict(moe_every=2, scan_layers=False, attn_pattern="alternating", sliding_window=300),
                                dict(dtype="bfloat16")],
                         ids=["alternating", "period3_softcap", "moe_unscanned", "bf16"])
def test_chunks_around_the_query_block_equal_a_full_forward(kw, monkeypatch):
    """Chunks shorter than, equal to and longer than the 128-query block and not a multiple of it (the blocks
    balanced, the last padded), through a jitted step (the cache's length traced: the prefix buckets' lax.switch),
    past a wrapped rolling buffer, with a left-padded row: each row's logits are a full forward's over its tokens."""
    import models.transformer as transformer
    from models import KVCache

    monkeypatch.setattr(transformer, "CPU_CACHED_SCORE_BYTES", 0)  # blocks at this small model's scores too

    cfg = dataclasses.replace(CFG, max_seq_len=600, **kw)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    chunks, pad = (1, 128, 129, 200, 70), 37
    tok = jax.random.randint(jax.random.key(1), (2, sum(chunks)), 0, cfg.vocab_size)
    cache, outs, lo = KVCache.zeros(cfg, 2, 600, start=jnp.array([0, pad])), [], 0
    step = jax.jit(lambda t, c: model(t, cache=c))
    for T in chunks:
        logits, cache = step(tok[:, lo:lo + T], cache)
        outs.append(logits.astype(jnp.float32))
        lo += T
    outs = jnp.concatenate(outs, 1)
    # bf16: a few roundings of logits up to 0.5 (5e-2 passed with the tiled blocks' left-padding mask dropped)
    atol = 1e-2 if cfg.dtype == "bfloat16" else 1e-5
    # one full forward for both rows (one compile): row 1's tokens from its first real one, then its padding ids as
    # filler, whose slots come after every real token's, so a causal forward's logits there are its tokens' alone
    alone = jnp.stack([tok[0], jnp.roll(tok[1], -pad)])
    full = jax.jit(lambda t: model(t))(alone).astype(jnp.float32)  # (eagerly: each op compiled, most of the time)
    np.testing.assert_allclose(outs[0], full[0], atol=atol)
    np.testing.assert_allclose(outs[1, pad:], full[1, :-pad], atol=atol)


def test_generate_with_a_tiled_prefill_on_a_tensor_mesh_equals_one_device(monkeypatch):
    """A prompt longer than the 128-query block (its prefill's cached attention tiled by lax.map) with the heads
    split over 'tensor': the tokens equal one device's, and greedy decoding's."""
    import models.transformer as transformer
    from parallel import make_mesh, shard_state

    monkeypatch.setattr(transformer, "CPU_CACHED_SCORE_BYTES", 0)

    cfg = dataclasses.replace(CFG, n_kv_heads=2, max_seq_len=256)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(4), (4, 150), 0, cfg.vocab_size)
    ref = generate(model, prompt, 4)
    assert_greedy_continuation(model, prompt, ref)
    mesh = make_mesh({"tensor": 2, "data": 4})
    graphdef, params = nnx.split(model)
    params = shard_state(params, mesh)  # the rules' placements, as create_sharded's (without compiling an init)
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(generate(nnx.merge(graphdef, params), prompt, 4), ref)


@pytest.mark.parametrize("T,Q", [(7, 5), (7, 6), (255, 254), (129, 2), (300, 7)])
def test_cached_query_blocks_leave_no_block_all_padding(T, Q, monkeypatch):
    """Q blocks of C = ceil(T / Q) rows: where the rule's Q nears T (the non-CPU rule, rows of ~1 GiB of scores)
    whole blocks were padding (T 7, Q 5: 10 rows scored, T 255, Q 254: 508). Blocks stay at most C rows (the memory
    bound); padding is less than one block, and the rows are the one kernel's."""
    import models.transformer as transformer

    monkeypatch.setattr(transformer, "cached_query_blocks", lambda *a: Q)
    B, N, K, H, S = 2, 4, 2, 8, 40
    q_BTNH = jax.random.normal(jax.random.key(0), (B, T, N, H))
    kv = lambda: tuple(jax.random.normal(jax.random.key(i), (B, S, K, H)) for i in (1, 2))  # noqa: E731
    new_T, pos_S, start_B = 30 + jnp.arange(T), jnp.arange(S) - 3, jnp.array([0, 4])
    run = lambda q: transformer._cached_attention(q, kv, new_T, pos_S, None, start_B, {})  # noqa: E731
    scans = [e for e in jax.make_jaxpr(run)(q_BTNH).jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    blocks, C = scans[0].params["length"], -(-T // Q)
    assert scans[0].invars[-1].aval.shape[1] == C  # the new positions' block [Q, C]: the rows held at once
    assert 0 <= blocks * C - T < C, (blocks, C)
    tiled = jax.jit(run)(q_BTNH)  # jitted: eagerly each op of the blocks' loop compiles on its own
    monkeypatch.setattr(transformer, "cached_query_blocks", lambda *a: 1)
    np.testing.assert_allclose(tiled, jax.jit(lambda q: run(q))(q_BTNH), atol=1e-6)  # (a fresh trace: Q = 1)
    # one block is the one kernel, no loop around it (a decode step's program as before the blocks)
    assert not [e for e in jax.make_jaxpr(lambda q: run(q))(q_BTNH).jaxpr.eqns if e.primitive.name == "scan"]


def test_decoding_under_jax_enable_x64_matches_float32_decoding(model):
    """Scripts that turn on jax_enable_x64 (float64 references, scaling fits) then decode: Python ints and
    jnp.arange became int64 there, and the cache write's dynamic_update_slice refused them beside the int32 slot
    ('index arguments ... must be integers of the same type'), so every cached call and generate failed (with eos_id
    too: its column write). Under x64
    the cache keeps its dtypes (float32 keys, int32 positions and length) and the logits and tokens are x64-off's."""
    prompt = np.asarray(jax.random.randint(jax.random.key(3), (2, 5), 0, CFG.vocab_size))

    graphdef, state = nnx.split(model)

    def cached(state):
        m = nnx.merge(graphdef, state)
        logits, cache = m(prompt, cache=KVCache.zeros(CFG, 2, 9))
        return logits, *m(prompt[:, -1:], cache=cache)  # one token: the in-place write

    mask = np.ones(prompt.shape, bool)
    mask[1, :2] = False  # a left-padded row

    def decode():  # the eos loop writes each new column at a traced index too
        # (8 and 6 new tokens: x64 off, the programs test_greedy_generate_equals_full_recompute and
        # test_left_padded_rows_generate_what_they_would_alone compile for this model and these shapes)
        return (jax.jit(cached)(state), generate(model, prompt, 8),
                generate(model, prompt, 6, eos_id=int(prompt[0, 0]), prompt_mask=mask, trim=False))

    want = decode()
    with jax.enable_x64(True):
        got = decode()
    assert [(x.dtype, x.shape) for x in jax.tree.leaves(got)] == [(x.dtype, x.shape) for x in jax.tree.leaves(want)]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_cache_sizes_that_are_not_positive_ints_are_refused_by_name():
    """KVCache.zeros(cfg, 1, -3) failed inside jnp.zeros ("broadcast_in_dim shape must have every element be
    nonnegative"), max_len=4.0 as "Shapes must be 1D sequences of concrete values of integer type", naming neither
    argument, and max_len=0 made a cache every call overflows."""
    for batch, max_len, name in ((1, -3, "max_len"), (1, 4.0, "max_len"), (1, 0, "max_len"), (1, True, "max_len"),
                                 (-1, 4, "batch"), (2.0, 4, "batch"), (0, 4, "batch")):
        with pytest.raises(ValueError, match=rf"KVCache.zeros\({name}=.*must be an int >= 1"):
            KVCache.zeros(CFG, batch, max_len)
    cache = KVCache.zeros(CFG, np.int64(2), np.int32(5))  # numpy ints are sizes
    assert cache.k[0].shape[1] == 2 and cache.pos[0].shape == (5,)


def test_prompt_masks_read_under_strict_dtype_promotion(model):
    """Under jax_numpy_dtype_promotion='strict' a bool prompt_mask (left_pad's) failed generate with a
    TypePromotionError: the mask was compared with the int 0. Bool and 0/1 int masks give the same tokens."""
    batch, mask = left_pad([[5, 9, 2], [7]], pad_id=0)
    want = np.asarray(generate(model, batch, 3, prompt_mask=mask))
    with jax.numpy_dtype_promotion("strict"):
        for m in (mask, np.asarray(mask, np.int32)):
            np.testing.assert_array_equal(generate(model, batch, 3, prompt_mask=m), want)
