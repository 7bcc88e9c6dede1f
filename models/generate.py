"""Autoregressive generation: a prefill over the prompt (logits of its last token only), then one-token decode
steps in a scan."""

from __future__ import annotations

import functools
import math
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.keys import key_error
from models.transformer import KVCache, check_token_ids
from parallel.sharding import replicated


def _check_top_k(top_k):
    """top_k as given, a concrete 0-d integer array as its int (jnp.int32(8) was refused as not 'a positive int', as
    max_new_tokens once was); else a ValueError naming it."""
    if isinstance(top_k, jax.core.Tracer):
        raise ValueError("top_k must be a Python int (it fixes the program's shapes), not a traced value: pass it from "
                         "outside jax.jit (a static argument)")
    if (getattr(top_k, "ndim", None) == 0 and not isinstance(top_k, numbers.Number)
            and jnp.issubdtype(top_k.dtype, jnp.integer)):
        top_k = int(top_k)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be None or 0 (off) or a positive int, got {top_k!r}")
    return top_k


def sample_logits(logits_BV, rng, temperature: float, top_k: int | None, top_p: float | None):
    """logits [..., V] ([B, V] in a decode loop, [V] for one row) → tokens [...] int32, each row over its own V.
    Greedy when temperature == 0; otherwise temperature, then top-k, then nucleus (top-p). As in Hugging Face,
    top_k None or 0 is off, top_k > V keeps all V and top_p 1 is off (a float32 cumulative sum reaches 1 before the
    tail: 336 of 32000 tokens would go). Unlike Hugging Face, the top-p cutoff is a logit value: every token tied
    with the last one kept stays (order-independent). Draws use JAX's high-dynamic-range Gumbel noise
    (`jax.random.categorical(..., mode="high")`): tokens below ~1e-7 probability come as often as they should.
    temperature and top_p may be traced scalars (one compiled program for all their values; a traced temperature
    always samples, 0 as the smallest one); top_k fixes the program's shapes, so it is a Python int."""
    top_k = _check_top_k(top_k)
    traced_t, traced_p = isinstance(temperature, jax.core.Tracer), isinstance(top_p, jax.core.Tracer)
    # checked here too, for decoding loops that call this directly: top_p <= 0 or a NaN temperature masked every
    # token, and categorical then returned token 0 whatever the logits (a negative temperature sampled the argmax)
    # (None or a string failed in float() or a comparison, naming neither)
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if not traced_t and not (real(t := _real_scalar(temperature)) and math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not None and not traced_p and not (real(p := _real_scalar(top_p)) and 0 < p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if not traced_t and temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    # shifted by the row max first: the distribution is the same, and a tiny temperature cannot overflow to inf or
    # make 0/0 (which picked an arbitrary token below 1e-38). Capped at 1e30 too (uniform over the finite logits
    # either way): XLA divides by multiplying with 1 / scale, which flushes to 0 past ~8.5e37, and -inf · 0 = NaN
    # then sampled a masked (-inf) token with certainty
    scale = jnp.clip(temperature, 1e-30, 1e30) if traced_t else min(max(float(temperature), 1e-30), 1e30)
    # in float32 (as Hugging Face's generate upcasts the scores): bfloat16 logits summed the nucleus in bfloat16,
    # whose cumulative sum stalls (128256 tokens, top_p 0.9: 28223 kept of 30223, mass 0.891 < top_p)
    # the filters compare the float32 logits themselves (raw_BV), not the shifted, tempered ones: the shift rounds
    # (-3 - 10 and -3.0000002 - 10 are both -13 in float32), which tied distinct logits at the k-th or the top-p
    # cutoff: top_k=2 kept 3 tokens where Hugging Face keeps 2
    raw_BV = logits_BV.astype(jnp.float32)
    logits_BV = (raw_BV - raw_BV.max(-1, keepdims=True)) / scale
    if top_k:
        kth_B1 = jax.lax.top_k(raw_BV, min(top_k, raw_BV.shape[-1]))[0][..., -1:]
        raw_BV = jnp.where(raw_BV < kth_B1, -jnp.inf, raw_BV)
        logits_BV = jnp.where(raw_BV == -jnp.inf, -jnp.inf, logits_BV)
    if top_p is not None and (traced_p or top_p < 1.0):
        # [..., ::-1], not [:, ::-1]: the latter reversed the rows of [B, T, V] logits, not the vocabulary (top_p
        # then filtered nothing), and refused [V] ones
        # sorted by the raw logits, the tempered ones alongside (in the same order: the shift and scale are monotone)
        neg_raw_BV, sorted_BV = jax.lax.sort((-raw_BV, logits_BV), dimension=raw_BV.ndim - 1, num_keys=1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
        # and the top token always (Hugging Face's min_tokens_to_keep=1): a top_p below float32's normal range was
        # flushed to 0, every token masked, and categorical returned token 0 whatever the logits
        keep_BV = keep_BV.at[..., 0].set(True)
        cutoff_B1 = jnp.min(jnp.where(keep_BV, -neg_raw_BV, jnp.inf), axis=-1, keepdims=True)
        if traced_p:  # a traced 1 is off too
            cutoff_B1 = jnp.where(top_p < 1.0, cutoff_B1, -jnp.inf)
        logits_BV = jnp.where(raw_BV < cutoff_B1, -jnp.inf, logits_BV)
    # mode="high": the default Gumbel noise (one float32 uniform) caps how far a token can trail and still be drawn:
    # a token 17 logits below the top came 0.17x as often as it should, 18 below 0.003x, 19 below never (exact over
    # all 2^23 uniforms); 128k-vocabulary tails lose ~1e-4-1e-3 of their mass per step. High mode is exact to ~1e-14
    # for ~2x the noise's cost (CPU, 8 x 128256 logits: 42 ms against 22 ms, far below a decode step's forward)
    return jax.random.categorical(rng, logits_BV, axis=-1, mode="high").astype(jnp.int32)


def _prefill(model, prompt_BP, start_B, rng, max_new_tokens, temperature, top_k, top_p):
    """The prompt through a fresh cache of P + max_new_tokens slots → (first new token [B], cache, rng).
    start_B: each row's left padding, or None."""
    B, P = prompt_BP.shape
    cache = KVCache.zeros(model.cfg, B, P + max_new_tokens, start=start_B)
    if P > 1:  # all but the last token fill the cache, their logits unused (so not computed): one call over the
        # prompt made [B, P, V] float32 logits for the last row's sake (B 4, P 512, V 32000: 263 MB of temporaries,
        # now 37 MB; HF's generate keeps the last position only too, logits_to_keep=1)
        _, cache = model(prompt_BP[:, :-1], cache=cache)
    logits_B1V, cache = model(prompt_BP[:, -1:], cache=cache)
    rng, sub = jax.random.split(rng)
    return sample_logits(logits_B1V[:, 0], sub, temperature, top_k, top_p), cache, rng


# max_new_tokens, greedy (temperature == 0) and top_k are static: they fix the program's shapes; the temperature,
# top_p and the eos / pad ids are traced, so a new value of one does not compile it again
@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate(graphdef, state, prompt_BP, start_B, rng, max_new_tokens, greedy, top_k, temperature, top_p):
    model = nnx.merge(graphdef, state)
    temperature = 0.0 if greedy else temperature
    first_B, cache, rng = _prefill(model, prompt_BP, start_B, rng, max_new_tokens, temperature, top_k, top_p)

    def step(carry, _):
        tok_B, cache, rng = carry
        logits_B1V, cache = model(tok_B[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        nxt_B = sample_logits(logits_B1V[:, 0], sub, temperature, top_k, top_p)
        return (nxt_B, cache, rng), tok_B

    (last_B, _, _), toks_NB = jax.lax.scan(step, (first_B, cache, rng), None, length=max_new_tokens - 1)
    return jnp.concatenate([toks_NB.T, last_B[:, None]], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate_until(graphdef, state, prompt_BP, start_B, rng, max_new_tokens, greedy, top_k, temperature, top_p,
                    eos_ids, pad_id):
    """As `_generate`, stopping once every row has produced one of `eos_ids` [n_eos]: → (tokens [B,
    max_new_tokens], how many columns were generated). A finished row continues with `pad_id` (as Hugging Face
    pads)."""
    model = nnx.merge(graphdef, state)
    temperature = 0.0 if greedy else temperature
    tok_B, cache, rng = _prefill(model, prompt_BP, start_B, rng, max_new_tokens, temperature, top_k, top_p)
    eos = jnp.asarray(eos_ids, jnp.int32)
    toks_BN = jnp.full((prompt_BP.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)

    def step(carry):
        i, tok_B, done_B, cache, rng, toks_BN = carry
        logits_B1V, cache = model(tok_B[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        nxt_B = jnp.where(done_B, pad_id, sample_logits(logits_B1V[:, 0], sub, temperature, top_k, top_p))
        toks_BN = jax.lax.dynamic_update_slice(toks_BN, nxt_B[:, None], (jnp.int32(0), i))  # x64: 0 is int64
        return i + 1, nxt_B, done_B | jnp.isin(nxt_B, eos), cache, rng, toks_BN

    carry = (jnp.int32(1), tok_B, jnp.isin(tok_B, eos), cache, rng, toks_BN)
    n, *_, toks_BN = jax.lax.while_loop(lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[2]), step, carry)
    return toks_BN, n


def left_pad(prompts, pad_id: int = 0, length: int | None = None):
    """Prompts of different lengths (a list of token-id lists) → (tokens int32 [B, P], mask bool [B, P]), each row
    left-padded with `pad_id` to the longest, mask True on real tokens: `generate(model, tokens, n,
    prompt_mask=mask)`, as a Hugging Face tokenizer with padding_side='left' gives input_ids and attention_mask.
    length: pad to P = length instead (at least the longest): every batch then runs generate's one compiled program
    (each new prompt length compiles it again)."""
    arrays = [np.asarray(p) for p in prompts]
    for b, a in enumerate(arrays):  # one prompt's ids (left_pad([5, 9, 2])) made one-token prompts, a [2, n] entry one
        if a.ndim == 0 or a.shape[:-1] != (1,) * (a.ndim - 1):  # prompt of both rows; [1, n] is one prompt
            raise ValueError(f"left_pad: prompt {b} has shape {list(a.shape)}, not one token-id list; pass a list of "
                             "prompts, e.g. left_pad([ids]) for one")
    rows = [a.reshape(-1) for a in arrays]
    if not rows or any(not r.size for r in rows):
        raise ValueError("left_pad: prompts must be a non-empty list of non-empty token-id lists")
    top = np.iinfo(np.int32).max  # the int32 tokens below wrapped larger ids: 2**32 + 5 became a valid 5
    for b, r in enumerate(rows):  # a float id was truncated (1.7 -> 1) without a word
        if not np.issubdtype(r.dtype, np.integer) or (r < 0).any() or (r > top).any():
            span = f" (min {r.min()}, max {r.max()})" if np.issubdtype(r.dtype, np.integer) else ""
            raise ValueError(f"left_pad: prompt {b} must hold token ids (ints in [0, 2**31)), got {r.dtype} "
                             f"{r[:8].tolist()}{span}")
    # a concrete integer scalar array is its int, as generate's pad_id takes one (jnp.int32(2) was refused here)
    pad_id, length = _int_scalar(pad_id), _int_scalar(length)
    if not isinstance(pad_id, numbers.Integral) or isinstance(pad_id, bool) or not 0 <= pad_id <= top:
        raise ValueError(f"left_pad: pad_id={pad_id!r} must be a token id (an int in [0, 2**31))")
    P = max(map(len, rows))
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < P:
            raise ValueError(f"left_pad: length={length!r} must be an int >= the longest prompt "
                             f"({P} token{'s' * (P != 1)})")
        P = int(length)
    tokens = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), bool)
    for b, r in enumerate(rows):
        tokens[b, P - len(r):], mask[b, P - len(r):] = r, True
    return jnp.asarray(tokens), jnp.asarray(mask)


def _left_padding(prompt_mask, shape) -> jax.Array:
    """A left-padding mask [B, P] (bool or 0/1; True on real tokens) → each row's padding length [B] int32."""
    given = getattr(prompt_mask, "dtype", None)  # a float64 mask reads as float32 after jnp.asarray with x64 off
    mask = jnp.asarray(prompt_mask)
    if mask.shape != shape or not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"prompt_mask must be bool or 0/1 ints of the prompt's shape {shape}, got "
                         f"{mask.dtype if given is None else given}{list(mask.shape)}")
    mask = mask.astype(jnp.bool_)  # (mask != 0 compared a bool mask with an int: refused under strict promotion)
    start_B = (shape[1] - mask.sum(1)).astype(jnp.int32)
    if not isinstance(mask, jax.core.Tracer):  # concrete: check the layout generate relies on
        m = np.asarray(mask)
        lefty = m == (np.arange(shape[1])[None, :] >= np.asarray(start_B)[:, None])
        if not lefty.all():
            raise ValueError(f"prompt_mask row {int(np.argmin(lefty.all(1)))} is not left padding (zeros, then "
                             "ones): generation continues each prompt from the last column, so pad on the left "
                             "(models.left_pad, or a tokenizer's padding_side='left')")
        if not m.any(1).all():
            raise ValueError(f"prompt_mask row {int(np.argmin(m.any(1)))} has no real token; give every row one")
    return start_B


def generate(model, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng=None, eos_id: int | tuple[int, ...] | None = None,
             pad_id: int | None = None, trim: bool = True, prompt_mask=None):
    """Continue `prompt_tokens` [B, P] by `max_new_tokens` tokens.

    Returns int32 [B, P + max_new_tokens]: the prompt followed by the generated tokens.
    prompt_mask: for prompts of different lengths, [B, P] True (or 1) on real tokens, each row left-padded
    (`left_pad` makes both): padding is never attended and positions count from each row's first real token, so a
    row generates what it would alone (Hugging Face's generate with attention_mask). None: no padding.
    Greedy when `temperature == 0`; sampling otherwise needs `rng` (a `jax.random.key`).
    top_k: None or 0 off, larger than the vocabulary keeps it all (as in Hugging Face); top_p in (0, 1] or None.
    eos_id: an end token (or several; ints, numpy or jax integer arrays): a row that emits one continues with `pad_id`
    (one id, an int or an integer scalar array; default: the first eos_id),
    and generation stops once every row has, so the result may be shorter, [B, P + n] with n <= max_new_tokens
    (Hugging Face's `generate(eos_token_id=..., pad_token_id=...)`). trim=False keeps [B, P + max_new_tokens] (the
    columns after the stop are pad_id): one shape, for calling it inside your own `jax.jit`.
    Compiles once per prompt shape, max_new_tokens, top_k, greedy or not (`left_pad(length=...)` fixes the
    prompt's) and whether top_p (< 1), prompt_mask and eos_id are given at all (each turns on a part of the
    program): other temperatures, top_p values, pad ids, eos ids (as many of them), keys and prompts reuse it.
    MoE layers with capacity dispatch decode dropless (with a KV cache every routed token is kept): the logits equal
    an uncached `model(tokens, dropless=True)`, not the training capacity's forward, which drops overflow tokens.
    """
    # onto the model's devices first: inside jax.set_mesh the checks' eager reads (the ids' range, the mask's sums) of
    # a prompt or mask committed elsewhere (one device, another mesh) failed with jax's "incompatible devices"
    prompt_tokens, prompt_mask = _on_devices_of(nnx.state(model), prompt_tokens, prompt_mask)
    prompt_BP = check_token_ids(prompt_tokens, model.cfg.vocab_size, "prompt_tokens").astype(jnp.int32)  # in [0, V)
    if prompt_BP.ndim == 2 and not isinstance(prompt_BP.shape[1], int):  # else an "inconclusive comparison" error
        # from the max_seq_len check below, or deep in the cache: its size and the prompt's writes are static
        raise ValueError(f"generate's prompt_tokens: a symbolic length {prompt_BP.shape[1]} (jax.export) is not "
                         "supported; the KV cache needs a concrete prompt length: export one program per bucket "
                         "length, prompts left-padded to it (left_pad(prompts, length=...) with prompt_mask); the "
                         "batch may stay symbolic")
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be [batch, length >= 1], got shape {prompt_BP.shape}")
    if isinstance(prompt_BP.shape[0], int) and prompt_BP.shape[0] < 1:  # (symbolic batches pass) it failed in
        # KVCache.zeros, as "batch=0 ... (max_len: the prompt's tokens ...)", naming no argument of generate
        raise ValueError(f"prompt_tokens must hold at least one prompt, got shape {prompt_BP.shape} (batch 0)")
    if isinstance(max_new_tokens, jax.core.Tracer):  # (it read as 'must be an int >= 1, got JitTracer(~int32[])')
        raise ValueError("generate's max_new_tokens must be a Python int (it fixes the output's shape), not a traced "
                         "value: pass it from outside jax.jit (a static argument)")
    if (getattr(max_new_tokens, "ndim", None) == 0 and not isinstance(max_new_tokens, numbers.Number)
            and jnp.issubdtype(max_new_tokens.dtype, jnp.integer)):  # a concrete jnp.int32(16) is that int
        max_new_tokens = int(max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, jax.core.Tracer):  # (it read as not a finite number)
        raise ValueError("generate's temperature must be a Python number (it chooses greedy or sampling, and the "
                         "program, when called), not a traced value: call generate outside jax.jit, or decode with "
                         "sample_logits, which takes a traced temperature")
    # a concrete 0-d float array (jnp.float32(0.7), a value from jnp.linspace) is that number: it was refused as
    # 'must be a finite number >= 0', which it is (sample_logits, pad_id and eos_id take scalar arrays)
    temperature, top_p = _real_scalar(temperature), _real_scalar(top_p)
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
    if isinstance(rng, numbers.Number):
        raise ValueError(f"rng must be a key, jax.random.key({rng!r}), not a bare {type(rng).__name__}")
    if rng is not None and (why := key_error(rng)) is not None:  # raw keys: those of the default PRNG (rbg: [4])
        raise ValueError(f"rng must be one key, jax.random.key(seed) (one for the whole batch), {why}")
    top_k = _check_top_k(top_k)
    if not isinstance(trim, bool | np.bool_):  # read by truthiness, trim="no" trimmed
        raise ValueError(f"generate: trim must be True or False, got {trim!r}")
    if isinstance(top_p, jax.core.Tracer):  # (it read as 'must be a number in (0, 1], got JitTracer(~float32[])')
        raise ValueError("generate's top_p must be a Python number (it chooses whether the program sorts), not a "
                         "traced value: call generate outside jax.jit (a new top_p does not compile it again), or "
                         "decode with sample_logits, which takes a traced top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):  # as transformers' generate warns
        warnings.warn(f"generate: temperature=0 is greedy decoding, so top_k={top_k} / top_p={top_p} change nothing; "
                      "pass temperature > 0 (and rng) to sample with them", stacklevel=2)
    start_B = None if prompt_mask is None else _left_padding(prompt_mask, prompt_BP.shape)
    longest = prompt_BP.shape[1]  # left padding takes no position: the longest real prompt counts (traced: all P)
    if start_B is not None and not isinstance(start_B, jax.core.Tracer):
        longest -= int(start_B.min())
    # the last new token is sampled, never fed back: positions 0 .. longest + max_new_tokens - 2 run through the
    # model (a prompt of max_seq_len and one new token stays in the trained context, as training's last target)
    if (last := longest + max_new_tokens - 2) >= model.cfg.max_seq_len:
        warnings.warn(f"generate: prompt {longest} + {max_new_tokens} new tokens run positions up to {last}, past the "
                      f"model's max_seq_len={model.cfg.max_seq_len}, the context it was trained for; positions past "
                      "it are extrapolated", stacklevel=2)
    eos_ids = _token_ids("eos_id", eos_id, model.cfg.vocab_size)
    if pad_id is not None:
        if not eos_ids:
            raise ValueError("pad_id fills the rows that have ended: it needs eos_id")
        if isinstance(pad_id, list | tuple) or getattr(pad_id, "ndim", 0) != 0:  # a jax / numpy scalar is one id
            raise ValueError(f"pad_id must be one token id, got {pad_id!r}")
        pad_id, = _token_ids("pad_id", pad_id, model.cfg.vocab_size)
    if rng is None:
        rng = jax.random.key(0)
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw PRNGKey: the typed key of the same bits (the
        rng = jax.random.wrap_key_data(rng)  # same samples), so both kinds share one compiled program
    graphdef, state = nnx.split(model)
    # a prompt, mask or key already on other devices than the model (another model's output, a device_put) failed in
    # the program with jax's "incompatible devices", naming its internal prompt_BP; numpy ids and lists ran wherever
    # the model lives, so these go there too (replicated: small, and the rules place them inside)
    prompt_BP, start_B, rng = _on_devices_of(state, prompt_BP, start_B, rng)
    # top_k / top_p change nothing then (warned above): not in the program either. A Python bool: a numpy scalar
    # temperature (np.float32(0.9)) made it np.False_, another static cache key, so the program compiled again
    greedy = bool(temperature == 0)
    sampling = (int(max_new_tokens), greedy, None if greedy else int(top_k or 0) or None, np.float32(temperature),
                None if greedy or top_p is None or top_p >= 1 else np.float32(top_p))  # top_p 1 is off: no sort
    if not eos_ids:
        new = _generate(graphdef, state, prompt_BP, start_B, rng, *sampling)
    else:
        new, n = _generate_until(graphdef, state, prompt_BP, start_B, rng, *sampling, np.asarray(eos_ids, np.int32),
                                 np.int32(eos_ids[0] if pad_id is None else pad_id))
        if trim:
            if isinstance(n, jax.core.Tracer):
                raise ValueError("generate(eos_id=...) under jax.jit: the trimmed length depends on the tokens; pass "
                                 "trim=False for [B, P + max_new_tokens] (pad_id after the stop)")
            new = new[:, :int(n)]
    return jnp.concatenate([prompt_BP, new], axis=1)


def _on_devices_of(state, *xs):
    """Each concrete jax array of `xs` that lies on other devices than the arrays of `state` (a model's), replicated
    onto them (its whole mesh, or its one device); the others (numpy, None, tracers, ones already there) as given."""
    leaf = next((v for v in jax.tree.leaves(state) if isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)),
                None)
    if leaf is None:  # traced (generate inside jax.jit): the caller's program places them
        return xs
    where = leaf.sharding
    if isinstance(where, jax.sharding.NamedSharding):
        where = replicated(where.mesh)
    elif len(where.device_set) != 1:
        return xs
    return tuple(jax.device_put(x, where) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                 and not _same_devices(x.sharding, where) else x for x in xs)


def _same_devices(sharding, where) -> bool:
    """Whether a jitted program takes an array placed by `sharding` beside the model's (`where`): the same devices in
    the same order (a mesh of the model's devices in another order failed as "incompatible devices" too)."""
    if isinstance(where, jax.sharding.NamedSharding):
        return (isinstance(sharding, jax.sharding.NamedSharding)
                and tuple(sharding.mesh.devices.flat) == tuple(where.mesh.devices.flat))
    return sharding.device_set == where.device_set


def _int_scalar(v):
    """A concrete 0-d numpy / jax array of an integer (not bool) dtype → its Python int; anything else as given (for
    the caller's check to name)."""
    if (getattr(v, "ndim", None) == 0 and not isinstance(v, jax.core.Tracer | numbers.Number)
            and jnp.issubdtype(v.dtype, jnp.integer)):
        return int(v)
    return v


def _real_scalar(v):
    """A concrete 0-d numpy / jax array of a real (not bool) dtype → its Python float; anything else as given (for
    the caller's check to name)."""
    dtype = getattr(v, "dtype", None)
    if (getattr(v, "ndim", None) == 0 and not isinstance(v, jax.core.Tracer | numbers.Number) and dtype is not None
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))):
        return float(v)
    return v


def _token_ids(name: str, v, vocab_size: int) -> tuple[int, ...]:
    """None → (); an int or a sequence of ints in [0, vocab_size) → a tuple; else a ValueError naming `name`."""
    if v is None:
        return ()
    if isinstance(v, jax.core.Tracer):  # (.item() failed with jax's ConcretizationTypeError)
        raise ValueError(f"{name} must be concrete token ids (ints, or numpy / jax arrays made outside jax.jit), not a "
                         "traced value; pass it from outside the jitted function (it is an argument of generate's "
                         "compiled program: a new value does not compile it again)")
    if hasattr(v, "ndim") and getattr(v, "ndim", None) in (0, 1):  # numpy / jax arrays of ids
        v = v.tolist() if v.ndim else v.item()
    ids = (v,) if isinstance(v, numbers.Integral) else tuple(v) if isinstance(v, list | tuple) else None
    if not ids or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size
                      for t in ids):
        raise ValueError(f"{name} must be a token id (or a list of them) in [0, vocab_size={vocab_size}), got {v!r}")
    return tuple(int(t) for t in ids)
