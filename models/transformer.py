"""Decoder-only Transformer (Llama / Mistral / Qwen2 / Gemma 2 family) in Flax NNX, used functionally.

Parameters carry logical axis names only; `parallel.rules` maps them to a mesh. Layers are stacked
on a leading `layers` axis. Layers may differ in attention window (local / global patterns) and in
feed-forward kind (dense MLP or MoE every `moe_every`-th layer): dense and MoE blocks live in two
stacks (`blocks`, `moe_blocks`), and the layers are scanned in groups of one pattern period P,
unrolling the P layers of a group, so every layer keeps a static window and kind. A mesh with a
`stage` axis runs the groups as a GPipe pipeline.
Shapes: B batch, T tokens, D d_model, N heads, K kv heads, H head dim, F mlp, V vocab, L layers,
P pattern period, S cache slots.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import attention, make_mask
from models.config import TransformerConfig, dtype_of
from models.embed import embed_lookup, gathered_head
from models.glu import glu_linear
from models.linear import add_bias, flat_rows, linear
from models.moe import MoE
from models.moe_dispatch import mesh_shards
from models.params import param
from models.residuals import bits_residuals
from models.rope import attention_scale, inv_frequencies, rope_tables, rotate
from models.sliding_window import dense_window_mask, local_attention
from parallel.autodiff import custom_vjp
from parallel.pipeline import gpipe, pipeline_problem
from parallel.rules import constrain, logical_to_spec, mesh_axis_for, replicate_indivisible, sharing_axis
from parallel.sharding import trimmed_spec


@functools.partial(custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps, offset: float = 0.0):
    """RMSNorm in float32 over x [..., D]; multiplies by (offset + scale [D]) (Gemma stores scale - 1 with
    offset 1). Its backward keeps x and the [..., 1] inverse RMS only (autodiff would also keep the float32
    normalised rows: one more [..., D] array per norm, two per layer of a scanned stack)."""
    return _rms_norm_fwd(x, scale, eps, offset)[0]


def _rms_norm_fwd(x, scale, eps, offset):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = jnp.broadcast_to(offset + scale.astype(jnp.float32), x.shape)  # explicit: jax_numpy_rank_promotion='raise'
    return (x32 * r * w).astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, offset, res, g):
    """y = x·r: dscale = Σ g∘y over rows; dx = r·(dy − y·mean(dy∘y)) with dy = g·(offset + scale)."""
    x, scale, r = res
    y, g32 = x.astype(jnp.float32) * r, g.astype(jnp.float32)
    dy = g32 * jnp.broadcast_to(offset + scale.astype(jnp.float32), g32.shape)
    dx = r * (dy - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    gy = g32 * y  # summed down to scale's shape (scale broadcasts: [D], a scalar, ...)
    gy = jnp.sum(gy, axis=tuple(range(gy.ndim - jnp.ndim(scale))))
    dscale = jnp.sum(gy, axis=tuple(i for i, n in enumerate(jnp.shape(scale)) if n == 1), keepdims=True)
    return dx.astype(x.dtype), dscale.reshape(jnp.shape(scale)).astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def norm_param(rngs, shape, axes, cfg) -> nnx.Param:
    """An RMSNorm scale w of `cfg`'s norms, which multiply by cfg.norm_offset + w (`rms_norm`), at 1 - norm_offset:
    a fresh norm multiplies by 1 whatever the offset (ones without one, zeros under Gemma's offset 1). Zeros under
    any offset made a fresh model's norms scale by it: 0.5 halved every norm's output, q and k's too."""
    return param(rngs, shape, axes, dtype_of(cfg.param_dtype), fill=1.0 - cfg.norm_offset)


def _listed_ids(ids, name: str):
    """Ids given as Python values (a nested list, or a numpy object array) checked one by one: jnp.asarray read a
    bool among ints as id 1 ([[True, 2]] ran as [[1, 2]]), an empty list as float32 (refused as 'dtype float32'),
    and an object array failed inside jax naming nothing. Returns a nested list of the ints, or an empty int32
    array of the list's shape (no ids: as an empty int array). Ids holding traced values (a list of rows under
    jit) are returned as given: numpy cannot read them, and jnp.asarray checks their dtype."""
    try:
        arr = np.asarray(ids, dtype=object)  # a ragged batch: a 1-d array of its rows, refused below as not ints
    except jax.errors.TracerArrayConversionError:  # [row_a, row_b] of tracers: stacked by jnp.asarray as before
        return ids
    if not arr.size:
        return np.zeros(arr.shape, np.int32)
    for x in arr.ravel():
        kind = getattr(getattr(x, "dtype", None), "kind", None)  # numpy / jax scalars and 0-d arrays: ints too
        if isinstance(x, bool | np.bool_) or kind == "b":
            raise ValueError(f"{name} must be integer ids, got {bool(x)} (bool; a bool is not a token id); pass a "
                             "[batch, length] int array, e.g. jnp.asarray(ids, jnp.int32)")
        if not (isinstance(x, numbers.Integral) or (kind in ("i", "u") and getattr(x, "ndim", None) == 0)):
            raise ValueError(f"{name} must be integer ids, got {x!r:.60} ({type(x).__name__}; rows of one length, of "
                             "ints); pass a [batch, length] int array, e.g. jnp.asarray(ids, jnp.int32)")
    return arr.tolist() if isinstance(ids, np.ndarray) else ids


def check_token_ids(tokens_BT, vocab_size: int, name: str = "tokens"):
    """tokens_BT as given, after checking it holds integer ids in [0, vocab_size) when its values are known
    (not under jit): out-of-range ids, negative ones too, gather NaN rows (`models.embed.embed_lookup`), the only
    sign of them under jit. `name`: the caller's argument, for the errors."""
    if isinstance(tokens_BT, list | tuple) or (isinstance(tokens_BT, np.ndarray) and tokens_BT.dtype == object):
        tokens_BT = _listed_ids(tokens_BT, name)
    given = getattr(tokens_BT, "dtype", None)  # a float64 array reads as float32 after jnp.asarray with x64 off
    span = None
    if isinstance(tokens_BT, np.ndarray | np.generic) and tokens_BT.dtype.kind in "iu" and tokens_BT.size:
        # read before jnp.asarray, which wraps int64 ids to int32 with x64 off: 2**32 + 5 became 5, a valid id
        span = int(tokens_BT.min()), int(tokens_BT.max())
    try:
        tokens_BT = jnp.asarray(tokens_BT)
    except OverflowError:  # a Python list with ids beyond int32: jax's bare "out of bounds for int32", naming nothing
        ids = np.asarray(tokens_BT, dtype=object).ravel()
        span = min(ids), max(ids)
    else:
        if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer ids, got dtype {tokens_BT.dtype if given is None else given}; "
                             "cast with .astype(jnp.int32)")
        if span is None and not isinstance(tokens_BT, jax.core.Tracer) and tokens_BT.size:
            with jax.ensure_compile_time_eval():  # a concrete batch closed over by a jitted function: still concrete
                span = int(tokens_BT.min()), int(tokens_BT.max())
    if span is not None:
        lo, hi = span
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must hold token ids in [0, vocab_size={vocab_size}), got min {lo}, max {hi} (an "
                             "ignore index such as -100 belongs in the targets' weights, not in the inputs)")
    return tokens_BT


def _check_shapes(cfg: TransformerConfig, tokens_BT, cache=None, **per_token):
    """Named errors, before tracing, for inputs whose shapes the model would trip over much later (an IndexError
    in RoPE, a reshape in the attention mask, a broadcast inside the cache's scan)."""
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens_BT.shape}; one sequence is tokens[None]")
    if tokens_BT.shape[1] == 0:  # failed inside attention as "zero-size array to reduction operation max"
        raise ValueError(f"tokens must hold at least one token per row, got shape {tokens_BT.shape} (length 0); "
                         "call the model only on non-empty sequences")
    for name, a in per_token.items():
        if a is not None and tuple(jnp.shape(a)) != tokens_BT.shape:
            raise ValueError(f"{name} must be [batch, length] = {tokens_BT.shape} like the tokens, got shape "
                             f"{tuple(jnp.shape(a))}")
    if cache is not None and not isinstance(tokens_BT.shape[1], int):  # else an "inconclusive comparison" deep in
        # the capacity check or the cache writes: the slots a chunk writes and the prefix buckets are static
        raise ValueError(f"tokens: a symbolic length {tokens_BT.shape[1]} (jax.export) with a KV cache is not "
                         "supported; export the cached prefill at concrete lengths (buckets: prompts left-padded to "
                         "one, each row's padding as KVCache.zeros(start=...)), the batch may stay symbolic; "
                         "without a cache the length may be symbolic")
    if cache is not None:
        P, B = pattern_period(cfg), tokens_BT.shape[0]
        want = (cfg.n_layers // P, B, cfg.kv_heads, cfg.hd)  # the slot count (dim 3) depends on max_len
        got = [tuple(k.shape) for k in cache.k]
        if len(got) != P or any(len(g) != 5 or g[:3] + g[4:] != want for g in got):
            raise ValueError(f"KVCache holds k {got} ([layers / period, batch, kv_heads, slots, head_dim] per "
                             f"pattern position) but this model and batch need {P} of [{cfg.n_layers // P}, {B}, "
                             f"{cfg.kv_heads}, slots, {cfg.hd}]; allocate KVCache.zeros(cfg, batch, max_len) for "
                             "this model and batch")
        # one max_len must explain every slot count: a cache allocated for other windows passed the check above and
        # gave wrong logits (a longer window's ring read as a global layer) or a misleading overflow error
        windows, slots = cfg.layer_windows()[:P], [g[3] for g in got]
        lens = {s for s, w in zip(slots, windows) if w is None or s < w}
        max_len = lens.pop() if len(lens) == 1 else None if lens else max(windows)
        if max_len is None or slots != [cache_slots(w, max_len) for w in windows]:
            raise ValueError(f"KVCache holds {slots} slots per pattern position, but this model's windows "
                             f"{list(windows)} need one max_len's slots (the window's ring for local layers, max_len "
                             "for the others): a cache allocated for another sliding_window; allocate "
                             "KVCache.zeros(cfg, batch, max_len) with this model's cfg")


def pattern_period(cfg: TransformerConfig) -> int:
    """Smallest P dividing n_layers such that layer i behaves like layer i mod P (window and MLP kind)."""
    kinds, L = tuple(zip(cfg.layer_windows(), cfg.moe_layers())), cfg.n_layers
    return next(p for p in range(1, L + 1) if L % p == 0 and all(kinds[i] == kinds[i % p] for i in range(L)))


def cache_slots(window: int | None, max_len: int) -> int:
    """KV slots a layer keeps: a rolling buffer of W for local layers, max_len for global ones."""
    return max_len if window is None or window >= max_len else window


def cache_capacity(cfg: TransformerConfig, cache: KVCache) -> int | None:
    """Tokens `cache` holds before a layer that must keep them all wraps around: the smallest S_j of the layers
    whose S_j is not a full window (global layers, or W > max_len). None when every layer is a W-slot rolling
    buffer, which never needs more."""
    windows = cfg.layer_windows()[:len(cache.pos)]
    caps = [p.shape[0] for p, w in zip(cache.pos, windows) if w is None or p.shape[0] < w]
    return min(caps) if caps else None


class KVCache(NamedTuple):
    """Per pattern position j < P: k[j], v[j] [L/P, B, K, S_j, H] and pos[j] [S_j], the absolute
    position held by each slot (-1: empty). Heads come before slots, so a decode step's attention reads each head's
    [S_j, H] keys and values as they lie (as [B, S_j, K, H] it copied them transposed, every layer, every step).
    Local layers keep S_j = W slots (a rolling buffer),
    so their memory does not grow with the generated length. `length`: tokens seen so far (slots, padding included).
    `start` [B] or None: each row's first real slot, for left-padded prompts of different lengths: row b's slots
    before start[b] are padding (never attended, not routed to MoE experts nor counted in their aux values) and its
    RoPE positions count from start[b] (position = slot - start[b], as Hugging Face's position_ids =
    cumsum(attention_mask) - 1).

    Capacity: every other layer (global, or a window longer than max_len) holds max_len tokens. A call that would
    go past them raises ValueError when that is known at trace time (the chunk length T, or a concrete `length`);
    with a traced `length` (a jitted decode loop) the logits of the positions past them come back NaN. Either way
    full attention never silently wraps into a sliding window."""

    k: tuple
    v: tuple
    pos: tuple
    length: jax.Array
    start: jax.Array | None = None

    @classmethod
    def zeros(cls, cfg: TransformerConfig, batch: int, max_len: int, dtype=None, start=None):
        """An empty cache for `batch` rows of up to `max_len` tokens: per pattern slot j, k / v [L/P, B, K, S_j, H]
        zeros (S_j = max_len for global layers, the window's ring for local ones), pos [S_j] = -1 (empty), length 0.
        dtype: the cache's storage dtype (None: cfg.dtype). Keys and values are cast to it unscaled, so a float16
        cache under float32 (or bfloat16) compute holds only |x| <= 65504: a key beyond becomes inf and the logits
        NaN, with no error (keys of 1.1e5 gave greedy token 0 where float32 gave 31); bfloat16 has float32's range.
        float64 is stored as float64 only under jax_enable_x64: without it jnp.zeros stores float32 (jax warns
        "will be truncated to dtype float32"), as cfg.kv_cache_bytes counts it.
        start: [batch] ints, each row's left padding (its first real slot; max_len counts the padding), or None
        for none. Inside `jax.set_mesh` (eagerly) k / v are placed by the rules: rows as the batch, kv heads as
        the act_kv_heads logical axis, each replicated where it does not divide (`_cache_placement`); start as
        the rows."""
        for name, n in (("batch", batch), ("max_len", max_len)):  # else jnp.zeros' shape errors, naming neither
            if name == "batch" and jax.export.is_symbolic_dim(n):  # jax.export's symbolic batch: >= 1 by definition
                continue
            if jax.export.is_symbolic_dim(n):  # (it read as "must be an int >= 1", which t + 8 is, when called)
                raise ValueError(f"KVCache.zeros(max_len={n}): a symbolic max_len (jax.export) is not supported; the "
                                 "cache's slots are static: export at a concrete max_len (prompts left-padded to a "
                                 "bucket length, each row's padding as start=...); the batch may stay symbolic")
            if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral) or n < 1:  # (0: all overflow)
                raise ValueError(f"KVCache.zeros({name}={n!r}): must be an int >= 1 (max_len: the prompt's tokens, "
                                 "padding included, plus those to generate)")
        batch, max_len = batch if jax.export.is_symbolic_dim(batch) else int(batch), int(max_len)
        dtype = dtype or dtype_of(cfg.dtype)
        try:  # a name numpy does not know ('bf16', the alias scaling.memory takes): a bare "not understood" TypeError
            dtype = jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"KVCache.zeros(dtype={dtype!r}): not a dtype; use 'bfloat16', 'float16' or 'float32' "
                             "(or jnp.bfloat16; None: the compute dtype)") from None
        if not jnp.issubdtype(dtype, jnp.floating):  # writes cast keys / values to it: an int8 cache truncated them
            raise ValueError(f"KVCache.zeros(dtype={jnp.dtype(dtype).name}): a floating dtype is needed; the cache "
                             "stores keys and values as they are (no quantisation scales), so integers truncate them; "
                             "use 'bfloat16', 'float16' or 'float32' (None: the compute dtype)")
        if jnp.finfo(dtype).bits < 16:  # unscaled float8: e4m3fn turned keys beyond 448 into NaN (greedy tokens all 0)
            raise ValueError(f"KVCache.zeros(dtype={jnp.dtype(dtype).name}): float8 caches are not supported; the "
                             "cache stores keys and values as they are (no scales), so float8_e4m3fn makes NaN of "
                             "those beyond 448 and 2-3 mantissa bits change greedy tokens; use 'bfloat16', 'float16' "
                             "or 'float32' (None: the compute dtype)")
        P = pattern_period(cfg)
        slots = [cache_slots(w, max_len) for w in cfg.layer_windows()[:P]]
        shape = lambda s: (cfg.n_layers // P, batch, cfg.kv_heads, s, cfg.hd)
        if start is not None:
            start = jnp.asarray(start)
            if start.shape != (batch,) or not jnp.issubdtype(start.dtype, jnp.integer):
                raise ValueError(f"KVCache.zeros(start=...) must be [batch] = [{batch}] ints (each row's first real "
                                 f"slot), got {start.dtype}{list(start.shape)}")
            if not isinstance(start, jax.core.Tracer):  # read on the host: an eager start.min() of an array
                # committed to one device failed inside jax.set_mesh ("Received incompatible devices ... _reduce_min")
                if start.size and not (0 <= int(np.min(s := np.asarray(start))) and int(s.max()) < max_len):
                    raise ValueError(f"KVCache.zeros(start=...): each row's first real slot must lie in [0, "
                                     f"max_len={max_len}), got {s.tolist()}")  # else silently shifted / empty rows
                if (rows := _cache_placement((batch,), ("batch",))) is not None:  # with its rows' k / v: left on
                    start = jax.device_put(start, rows)  # one device, a jitted step refused the cache (two devices)
            start = start.astype(jnp.int32)
        kv = lambda s: jnp.zeros(shape(s), dtype, device=_cache_placement(shape(s)))  # noqa: E731
        return cls(tuple(kv(s) for s in slots), tuple(kv(s) for s in slots),
                   tuple(jnp.full((s,), -1, jnp.int32) for s in slots), jnp.zeros((), jnp.int32), start)


# serializable in jax.export's programs (a prefill returning the cache, a decode step taking it): unregistered, a
# NamedTuple is refused. Reading one back needs this module imported; serving without it: flatten the cache
jax.export.register_namedtuple_serialization(KVCache, serialized_name="jaxscale.models.KVCache")


def _cache_placement(shape_GBKSH, names=(None, "batch", "act_kv_heads", None, None)):
    """Where an eager `KVCache.zeros` inside `jax.set_mesh` puts a k / v stack (`names`: ("batch",) for start [B]):
    rows over the batch axes, kv heads over act_kv_heads' axes (each replicated where it does not divide), as the
    rules place a decode step's activations; None outside a mesh or inside jax.jit (whose propagation places it, as
    generate's). Eager zeros under the mesh were whole on every device (P()) until a decode step's output sharded
    them."""
    try:
        mesh = jax.sharding.get_mesh()  # raises inside jax.jit
    except ValueError:
        return None
    if mesh.empty:
        return None
    try:
        spec = logical_to_spec(names, mesh, shape_GBKSH, replicate_indivisible=True)
    except ValueError:  # a mesh the rules cannot place on (axes outside parallel.AXES, Explicit ones): as before
        return None
    return jax.sharding.NamedSharding(mesh, trimmed_spec(spec))  # as jax.jit spells it: one cache key for both


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Per-call values every layer shares (not parameters). Arrays are [B, T]."""

    cfg: TransformerConfig
    positions: jax.Array
    segment_ids: jax.Array | None
    padding_mask: jax.Array | None
    inv_freq: object
    length: jax.Array | int = 0  # tokens already in the cache
    rope_cs: tuple | None = None  # constant (cos, sin) [1, T, 1, F] for positions 0..T-1; None: from positions
    flat_rows: bool = True  # models.linear's `flatten`: False when the mesh shards the sequence (`flat_rows`)
    dropless: bool = False  # capacity MoE runs dropless (C = T), as it always does with a cache
    start: jax.Array | None = None  # [B] each row's first real cache slot (left padding), or None
    rope_scale: float = 1.0  # YaRN's attention factor on cos / sin (models.rope.attention_scale)
    local_inv_freq: object = None  # local layers' own frequencies (cfg.local_rope_theta), or None: inv_freq
    local_rope_cs: tuple | None = None  # their constant tables, as rope_cs

    def arrays(self):
        return dict(positions=self.positions, segment_ids=self.segment_ids, padding_mask=self.padding_mask)

    def rope(self, x_BTNH, local: bool = False):
        """x rotated by its positions; `local`: a sliding-window layer's (with local_rope_theta if set)."""
        if local and self.local_inv_freq is not None:
            cs = self.local_rope_cs
            return rotate(x_BTNH, *(rope_tables(self.positions, self.local_inv_freq) if cs is None else cs))
        cos, sin = rope_tables(self.positions, self.inv_freq) if self.rope_cs is None else self.rope_cs
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return rotate(x_BTNH, cos, sin)

    def with_arrays(self, a):
        return dataclasses.replace(self, **a)


class Block(nnx.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)); optional post-norms (Gemma 2), no pre-norms
    (`pre_norms=False`, OLMo 2: x + RMSNorm(Attn(x)); x + RMSNorm(MLP(x))) and q / k norms (Qwen 3 per head, OLMo 2
    over all heads).
    With `moe=True` the MLP is a `models.moe.MoE` (router + experts) configured by `cfg.moe`."""

    def __init__(self, cfg: TransformerConfig, *, moe: bool = False, rngs: nnx.Rngs):
        d, n, k, h, f, pd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.mlp_dim, dtype_of(cfg.param_dtype)
        std = cfg.init_std / cfg.width_mult ** 0.5  # μP: hidden weights' variance ∝ 1 / fan_in
        norm = lambda: norm_param(rngs, (d,), ("norm",), cfg)  # noqa: E731
        if cfg.pre_norms:
            self.attn_norm = norm()
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, std)
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, std)
        if cfg.qkv_bias:
            self.bq = param(rngs, (n, h), ("heads", "head_dim"), pd, 0.0)
            self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0.0)
            self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, 0.0)
        if cfg.qk_norm and cfg.qk_norm_scope == "head":  # one [H] scale shared by the heads, as Qwen 3's
            self.q_norm = norm_param(rngs, (h,), ("head_dim",), cfg)
            self.k_norm = norm_param(rngs, (h,), ("head_dim",), cfg)
        elif cfg.qk_norm:  # OLMo 2's scale over the whole projection: split over `tensor` with the heads it scales
            self.q_norm = norm_param(rngs, (n, h), ("heads", "head_dim"), cfg)
            self.k_norm = norm_param(rngs, (k, h), ("kv_heads", "head_dim"), cfg)
        if cfg.pre_norms:
            self.mlp_norm = norm()
        if cfg.post_norms:
            self.post_attn_norm = norm()
            self.post_mlp_norm = norm()
        if moe:
            # μP: the router is output-like (fan-out E fixed): variance ∝ 1 / fan_in² (Tensor Programs V, Table 3)
            self.moe = MoE(d, cfg.moe, param_dtype=pd, init_std=std, router_std=cfg.init_std / cfg.width_mult,
                           rngs=rngs)
        else:
            self.w_gate = param(rngs, (d, f), ("embed", "mlp"), pd, std)
            self.w_up = param(rngs, (d, f), ("embed", "mlp"), pd, std)
            self.w_down = param(rngs, (f, d), ("mlp", "embed"), pd, std)

    def __call__(self, x_BTD, ctx: _Ctx, window: int | None, cache=None, rng=None):
        """x [B, T, D] → (x [B, T, D], new cache, MoE aux dict or None).

        `cache` = (k [L/P, B, K, S, H], v, pos [S], g) or None: this layer's pattern slot's whole stacks and its
        index g in them (only the new tokens' slots of layer g are written, in place in a decode loop); `rng`: router
        jitter key (MoE blocks only).
        """
        cfg, cd = ctx.cfg, dtype_of(ctx.cfg.dtype)
        B, T, D = x_BTD.shape
        N, K, H, F = cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.mlp_dim
        mm = lambda x, wt, contract=1: linear(x, wt, cfg.matmul_impl,  # noqa: E731
                                              flatten=ctx.flat_rows, contract=contract)
        wc = lambda p: p[...].astype(cd)  # noqa: E731  (q / k / v / o in their own shapes: see models.linear)
        norm = lambda x, p: rms_norm(x, p[...], cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        # Projections go through models.linear: on CPU, as 2-D [M = B·T, D] matmuls whose weight gradients are plain
        # `x_MD^T @ g_MF` dots (3-D einsums make XLA:CPU transpose g inside slow loop fusions)
        # flattened once: the products sharing an input then share its residual (per-product reshapes would
        # each be saved for the backward: in a scanned stack, 3 + 2 copies of the normed rows per layer)
        rows = lambda x: x.reshape(B * T, D) if ctx.flat_rows else x  # noqa: E731
        h_MD = rows(norm(x_BTD, self.attn_norm) if cfg.pre_norms else x_BTD)
        q_BTNH = mm(h_MD, wc(self.wq)).reshape(B, T, N, H)
        k_BTKH = mm(h_MD, wc(self.wk)).reshape(B, T, K, H)
        v_BTKH = mm(h_MD, wc(self.wv)).reshape(B, T, K, H)
        if cfg.qkv_bias:
            # in float32: their gradients sum the cotangent over all B·T tokens (models.linear.add_bias)
            q_BTNH, k_BTKH, v_BTKH = (add_bias(x, p[...].reshape(n, H)) for x, p, n in
                                      ((q_BTNH, self.bq, N), (k_BTKH, self.bk, K), (v_BTKH, self.bv, K)))
        # q / k norms before RoPE (their scales do not commute with the rotation): over each head's H, or over all
        # heads' N·H together (OLMo 2; with the heads split over `tensor`, the mean of squares spans the shards)
        if cfg.qk_norm and cfg.qk_norm_scope == "head":
            q_BTNH, k_BTKH = norm(q_BTNH, self.q_norm), norm(k_BTKH, self.k_norm)
        elif cfg.qk_norm:
            q_BTNH, k_BTKH = (rms_norm(x.reshape(B, T, n * H), p[...].reshape(n * H), cfg.norm_eps,
                                       cfg.norm_offset).reshape(B, T, n, H)
                              for x, p, n in ((q_BTNH, self.q_norm, N), (k_BTKH, self.k_norm, K)))
        q_BTNH = constrain(ctx.rope(q_BTNH, window is not None), ("batch", "act_seq", "act_heads", None))
        k_BTKH = ctx.rope(k_BTKH, window is not None)
        o_BTNH, cache = self._attend(q_BTNH, k_BTKH, v_BTKH, ctx, window, cache)
        a_BTD = mm(o_BTNH.reshape(B * T, N, H) if ctx.flat_rows else o_BTNH, wc(self.wo), contract=2)
        a_BTD = a_BTD.reshape(B, T, D)
        x_BTD = constrain(x_BTD + (norm(a_BTD, self.post_attn_norm) if cfg.post_norms else a_BTD),
                          ("batch", "act_seq", "act_embed"))

        h_BTD, aux = norm(x_BTD, self.mlp_norm) if cfg.pre_norms else x_BTD, None
        if hasattr(self, "moe"):
            m_BTD, aux = self.moe(h_BTD, compute_dtype=cd, rng=rng, valid_BT=ctx.padding_mask,
                                  inference=cache is not None or ctx.dropless)  # decode-chunking-invariant
        else:
            h_MD = rows(h_BTD)
            mlp = lambda a: constrain(a.reshape(B, T, F), ("batch", "act_seq", "act_mlp"))  # noqa: E731
            # the down projection with the gated activation: its backward recomputes act(gate)·up (models.glu)
            m_BTD = glu_linear(mlp(mm(h_MD, wc(self.w_gate))), mlp(mm(h_MD, wc(self.w_up))), wc(self.w_down),
                               cfg.mlp_act, cfg.matmul_impl, flatten=ctx.flat_rows)
        x_BTD = x_BTD + (norm(m_BTD, self.post_mlp_norm) if cfg.post_norms else m_BTD)
        return constrain(x_BTD, ("batch", "act_seq", "act_embed")), cache, aux

    def _attend(self, q_BTNH, k_BTKH, v_BTKH, ctx: _Ctx, window, cache):
        cfg = ctx.cfg
        B, T = q_BTNH.shape[:2]
        scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        kw = dict(impl=cfg.attn_impl, scale=scale, logit_softcap=cfg.attn_logit_softcap)
        if cache is None:
            if window is not None and not isinstance(T, int):  # a symbolic T (jax.export) has no static block
                # count for the blocked kernel (nor is `window < T` decidable): the masked dense form, O(T²) scores
                mask = dense_window_mask(T, window, ctx.segment_ids, ctx.padding_mask)
                return attention(q_BTNH, k_BTKH, v_BTKH, mask, **dict(kw, impl="xla")), None
            if window is not None and window < T:
                return local_attention(q_BTNH, k_BTKH, v_BTKH, window, segment_ids_BT=ctx.segment_ids,
                                       valid_BT=ctx.padding_mask, impl=cfg.swa_impl, block=cfg.swa_block,
                                       scale=scale, logit_softcap=cfg.attn_logit_softcap), None
            slots_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            mask = make_mask(slots_BT, slots_BT, ctx.segment_ids, ctx.segment_ids, ctx.padding_mask)
            pure_causal = ctx.segment_ids is None and ctx.padding_mask is None
            return attention(q_BTNH, k_BTKH, v_BTKH, mask, causal_block=cfg.attn_block, is_causal=pure_causal,
                             **kw), None

        # Cached decoding: masks come from the absolute position stored in each slot.
        k_GBKSH, v_GBKSH, pos_S, g = cache
        S = pos_S.shape[0]
        new_T = ctx.length + jnp.arange(T, dtype=jnp.int32)
        keep = min(T, S)  # a chunk longer than a rolling buffer leaves only its last S tokens
        slots = new_T[T - keep:] % S
        # layer g as attention takes it; the transpose cancels the kernel's own to [B, K, S, H] (no copy of it)
        layer = lambda buf: jax.lax.dynamic_index_in_dim(buf, g, 0, keepdims=False).transpose(0, 2, 1, 3)  # noqa: E731

        def write(buf_GBKSH, new_BTKH):
            """Only the new tokens' slots of layer g: a whole-layer write made every decode step copy the cache."""
            new_1BKTH = new_BTKH[:, T - keep:].astype(buf_GBKSH.dtype).transpose(0, 2, 1, 3)[None]
            if keep == 1:  # one slot: in place; indices of one dtype (x64: Python ints and g are int64, slots int32)
                return jax.lax.dynamic_update_slice(buf_GBKSH, new_1BKTH,
                                                    tuple(jnp.asarray(i, jnp.int32) for i in (g, 0, 0, slots[0], 0)))
            rows = jax.lax.dynamic_index_in_dim(buf_GBKSH, g, 0).at[:, :, :, slots].set(new_1BKTH)  # may wrap around
            return jax.lax.dynamic_update_slice(buf_GBKSH, rows, (g, 0, 0, 0, 0))

        new_cache = (write(k_GBKSH, k_BTKH), write(v_GBKSH, v_BTKH), pos_S.at[slots].set(new_T[T - keep:]))
        # global layer (S = max_len), or one token: attend over the written cache. The slot a token overwrites held
        # position p - S, outside its window (S = W) or past the capacity (S = max_len < W); reading a rolling
        # buffer's old slots before the in-place write made XLA copy the layer stack every step (all-local: 1.6x)
        if window is None or S > window or T == 1:
            return self._attend_prefix(q_BTNH, new_cache, g, new_T, ctx, window, kw), new_cache
        elif T > S:  # a chunk longer than the window (a prompt's prefill): the O(T·W) kernel, not T × (S + T) scores
            return self._attend_long_chunk(q_BTNH, k_BTKH, v_BTKH, (layer(k_GBKSH), layer(v_GBKSH), pos_S),
                                           ctx.length, window, cfg, scale, ctx.start), new_cache
        else:  # rolling buffer: attend over the old slots plus this chunk, before overwriting
            k_BSKH, v_BSKH = layer(k_GBKSH), layer(v_GBKSH)
            k_att, v_att = (jnp.concatenate([c, n.astype(c.dtype)], 1) for c, n in ((k_BSKH, k_BTKH), (v_BSKH, v_BTKH)))
            pos_att = jnp.concatenate([pos_S, new_T])
        cd = q_BTNH.dtype
        return _cached_attention(q_BTNH, lambda: (k_att.astype(cd), v_att.astype(cd)), new_T, pos_att, window,
                                 ctx.start, kw), new_cache

    @staticmethod
    def _attend_prefix(q_BTNH, cache, g, new_T, ctx: _Ctx, window, kw):
        """Attention over the slots written so far only: the first min(length + T, S) of layer g's cache (slots fill
        in order; a rolling buffer wraps once full), rounded up to a static bucket (`prefix_buckets`), the bucket
        chosen at run time by lax.switch when the length is traced. Scoring every allocated slot, masked, made a
        decode step early in a long generation read and score the whole cache (B 8, 10 of 1010 slots used)."""
        k_GBKSH, v_GBKSH, pos_S = cache
        T = q_BTNH.shape[1]
        S, cd = pos_S.shape[0], q_BTNH.dtype
        # T new tokens fill at least min(T, S) slots: a smaller bucket is never chosen (a jitted chunk step, the
        # cache's length passed in, compiled a dead [T, n] attention for each)
        sizes = [n for n in prefix_buckets(S) if n >= min(T, S)]

        def first(n):
            def run(q_BTNH, k_GBKSH, v_GBKSH, pos_S, g, new_T, start_B):
                # layer g's first n slots as attention takes them; the transpose cancels the kernel's own
                part = lambda buf: jax.lax.dynamic_slice(  # noqa: E731
                    buf, (g, 0, 0, 0, 0), (1,) + buf.shape[1:3] + (n, buf.shape[4]))[0].transpose(0, 2, 1, 3)
                return _cached_attention(q_BTNH, lambda: (part(k_GBKSH).astype(cd), part(v_GBKSH).astype(cd)), new_T,
                                         pos_S[:n], window, start_B, kw)
            return run

        args = (q_BTNH, k_GBKSH, v_GBKSH, pos_S, g, new_T, ctx.start)
        if len(sizes) == 1:
            return first(S)(*args)
        if not isinstance(ctx.length, jax.core.Tracer):  # a concrete length (an eager call): the bucket is known now
            return first(next(n for n in sizes if n >= min(int(ctx.length) + T, S)))(*args)
        used = jnp.minimum(ctx.length + T, S)
        which = jnp.sum(used > jnp.asarray(sizes[:-1], jnp.int32))
        return jax.lax.switch(which, [first(n) for n in sizes], *args)

    @staticmethod
    def _attend_long_chunk(q_BTNH, k_BTKH, v_BTKH, cache, length, window, cfg, scale, start_B=None):
        """A local layer's chunk of T > S tokens after `length` cached ones: the ring buffer's S slots put back in
        position order (slot of position p: p mod S; empty or stale slots masked) ahead of the chunk, then the
        blocked sliding-window kernel over those S + T keys, whose index differences are position differences.
        start_B: each row's first real slot (left padding masked), or None."""
        k_BSKH, v_BSKH, pos_S = cache
        B, T, N, H = q_BTNH.shape
        S, cd = pos_S.shape[0], q_BTNH.dtype
        want_S = length - S + jnp.arange(S, dtype=jnp.int32)  # the positions the buffer holds, oldest first
        order_S = jnp.remainder(want_S, S)
        held_S = (pos_S[order_S] == want_S) & (want_S >= 0)  # an empty slot holds -1
        k, v = (jnp.concatenate([c[:, order_S].astype(cd), n.astype(cd)], 1) for c, n in ((k_BSKH, k_BTKH),
                                                                                         (v_BSKH, v_BTKH)))
        valid_BT = jnp.broadcast_to(jnp.concatenate([held_S, jnp.ones((T,), bool)]), (B, S + T))
        if start_B is not None:
            slot_K = jnp.concatenate([want_S, length + jnp.arange(T, dtype=jnp.int32)])
            valid_BT = valid_BT & (slot_K[None, :] >= start_B[:, None])
        q = jnp.concatenate([jnp.zeros((B, S, N, H), cd), q_BTNH], 1)  # rows for the old slots: dropped below
        out = local_attention(q, k, v, window, valid_BT=valid_BT, impl="blocked", block=cfg.swa_block, scale=scale,
                              logit_softcap=cfg.attn_logit_softcap)
        return out[:, S:]


CACHED_QUERY_BLOCK = 128  # CPU: query rows per block of a multi-token cached attention
CPU_CACHED_SCORE_BYTES = 8 << 20  # the float32 scores one cached attention may hold before it is tiled: CPU
CACHED_SCORE_BYTES = 1 << 30  # other backends


def cached_query_blocks(B: int, T: int, N: int, S: int, backend: str | None = None) -> int:
    """How many query blocks, run in sequence, a T-token cached attention over S keys (N heads) is split into; 1 is
    one kernel. On CPU, one [B, K, G, T, S] float32 score tensor (its exponentials too) past 8 MiB fell out of the
    caches: T 1024 over S 1024 ran 3x slower than in 128-query blocks, a 512-token chunk over 4096 slots 2-3x
    (generate, prompts of 2048-4096 tokens: 0.65-0.76x the CPU time in blocks); at 1-4 MiB the blocks cost 5-10%. A
    GPU or TPU runs a block faster the larger it is, and a lax.map serialises the blocks, so there they only bound the
    scores' memory (B 8, 32 heads, T 2048, S 8192: 17 GB), each at most 1 GiB. backend: None is jax's default."""
    cpu = (backend or jax.default_backend()) == "cpu"
    limit, scores = CPU_CACHED_SCORE_BYTES if cpu else CACHED_SCORE_BYTES, B * N * T * S * 4
    if T == 1 or not isinstance(scores, int) or scores <= limit:  # symbolic B or T (jax.export): no static block
        return 1  # count; one kernel, the same output without the memory bound
    return -(-T // CACHED_QUERY_BLOCK) if cpu else min(T, -(-scores // limit))


def _cached_attention(q_BTNH, kv, new_T, pos_S, window, start_B, kw):
    """A cached attention (`_cache_mask`'s mask over slot positions pos_S [S], the new tokens at new_T [T]; kv() →
    k, v [B, S, K, H]) in query blocks of equal size C = ceil(T / Q) (Q: `cached_query_blocks`), ceil(T / C) of them,
    the last padded (its extra rows dropped): the scores held at once are [B, K, G, C, S]. Each row's keys, mask and
    arithmetic are those of the one kernel. → [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    Q = cached_query_blocks(B, T, N, pos_S.shape[0])
    if Q == 1:  # one-token decode always: its program as before the blocks (the mask built first)
        mask = _cache_mask(new_T, pos_S, window, start_B, B)
        return attention(q_BTNH, *kv(), mask, **kw)
    k_BSKH, v_BSKH = kv()
    C = -(-T // Q)
    Q = -(-T // C)  # no block all padding: Q 5 of T 7 (C 2) ran 10 rows, Q 6 of 7 ran 12 (the non-CPU rule's Q ~ T)
    pad = Q * C - T
    q_QBCNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, Q, C, N, H).transpose(1, 0, 2, 3, 4)
    t_QC = jnp.pad(new_T, (0, pad), mode="edge").reshape(Q, C)  # a padding row: the last token's mask (no NaN)
    o_QBCNH = jax.lax.map(lambda a: attention(a[0], k_BSKH, v_BSKH, _cache_mask(a[1], pos_S, window, start_B, B),
                                              **kw), (q_QBCNH, t_QC))
    return o_QBCNH.transpose(1, 0, 2, 3, 4).reshape(B, Q * C, N, H)[:, :T]


def _cache_mask(new_T, pos_S, window, start_B, B: int):
    """Which cached slots the new tokens attend: new positions [T], slot positions [S] (-1: empty), a row's first
    real position [B] or None → mask [B, 1, T, S]: causal, within the window, a row never before its first real
    slot (left padding)."""
    w_max = jnp.iinfo(jnp.int32).max  # a window >= 2**31 (the int32 positions' range) overflowed the compare
    diff_TS = new_T[:, None] - pos_S[None, :]
    mask_TS = (pos_S[None, :] >= 0) & (diff_TS >= 0) & (diff_TS < min(window or w_max, w_max))
    if start_B is None:
        return jnp.broadcast_to(mask_TS, (B, 1) + mask_TS.shape)
    return (mask_TS[None] & (pos_S[None, None, :] >= start_B[:, None, None]))[:, None]


PREFIX_MIN = 64  # the smallest bucket of cache slots a cached attention scores


def prefix_buckets(S: int) -> list[int]:
    """The static key counts a cached attention over S slots may score: PREFIX_MIN doubling below S, then S."""
    sizes = [n for n in (PREFIX_MIN << i for i in range(max(S, 1).bit_length())) if n < S]
    return sizes + [S]


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """`logits_BTV = model(tokens_BT)`; with a `KVCache`, returns `(logits, new_cache)`; with
    `return_aux=True`, the MoE auxiliary outputs are appended: `(logits[, cache], aux)`.
    `model.hidden_states(tokens_BT)`: the final normed hidden states [B, T, D] (every layer's with all_layers=True),
    whose `model.unembed` is the logits."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, d, v = dtype_of(cfg.param_dtype), cfg.d_model, cfg.vocab_size
        n_moe = sum(cfg.moe_layers())
        # Logical names are not mesh axes, so variables must not try to shard themselves eagerly;
        # parallel.sharding places them on a mesh after an abstract init.
        with nnx.use_eager_sharding(False):
            self.embed = param(rngs, (v, d), ("vocab", "embed"), pd, cfg.init_std)

            def stack(n, moe):
                @nnx.split_rngs(splits=n)
                @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
                def make(r):
                    return Block(cfg, moe=moe, rngs=r)

                return make(rngs)

            if n_moe < cfg.n_layers:
                self.blocks = stack(cfg.n_layers - n_moe, False)
            if n_moe:
                self.moe_blocks = stack(n_moe, True)
            self.final_norm = norm_param(rngs, (d,), ("norm",), cfg)
            if not cfg.tie_embeddings:  # μP: zero readout (Yang et al. 2022, App. D.2)
                self.lm_head = param(rngs, (d, v), ("embed", "vocab"), pd,
                                     0.0 if cfg.mup_base_width else cfg.init_std)

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, padding_mask_BT=None,
                 cache: KVCache | None = None, return_aux: bool = False, rng=None, dropless: bool = False):
        """tokens [B, T] int → logits [B, T, V] float32. Ids outside [0, V) raise a ValueError when their values are
        known; under jit (where they are not) their logits, and those of the positions attending to them, are NaN.

        positions_BT: RoPE positions [B, T] (default: arange, offset by the cache length when decoding).
        segment_ids_BT: packed documents attend only within their own id. padding_mask_BT: True for real
        tokens; padded keys are never attended, and padded tokens are not routed to MoE experts (no
        capacity slot, left out of the aux values). Causality is by slot (index in the row / cache).
        cache: see `KVCache` for what happens past its capacity (ValueError, or NaN logits when traced).
        return_aux: also return the MoE aux dict ({} for a dense model): 'lb_loss', 'z_loss',
        'dropped_frac' (means over MoE layers, unweighted: the trainer multiplies by cfg.moe's
        weights) and 'load' [L_moe, E] (fraction of routed assignments per expert, per MoE layer).
        rng: a key for MoE router jitter (training only); None disables jitter.
        dropless: capacity-dispatch MoE layers drop no token (C = T), as they always run with a cache: scoring
        generated text without a cache then gives the logits `generate` sampled from.
        With a cache, activation dimensions that do not divide their mesh axes (T = 1 under 'sequence', one
        prompt under 'data') are replicated, so decoding works on the training mesh.
        Speed: called eagerly, the layer scan compiles again on every call (~0.5 CPU-s even for a 2-layer toy
        model); a loop of calls, e.g. a hand-written decode loop with a KVCache, belongs under `jax.jit` over
        `nnx.split` state (as `generate` and the trainers do), where it compiles once per shape.
        """
        with replicate_indivisible(cache is not None):
            return self._forward(tokens_BT, positions_BT, segment_ids_BT, padding_mask_BT, cache, return_aux, rng,
                                 dropless)

    def hidden_states(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, padding_mask_BT=None,
                      all_layers: bool = False, return_aux: bool = False, rng=None, dropless: bool = False,
                      cache=None):
        """tokens [B, T] int → the final hidden states [B, T, D] (after the final RMSNorm) in cfg.dtype, without the
        LM head: for probes, reward / value heads, embeddings. `unembed` of them is `__call__`'s logits.

        all_layers=True: [L + 1, B, T, D], laid out as Hugging Face's `output_hidden_states=True` tuple: entry 0 the
        embeddings' output (Gemma's sqrt(D) scaling included), entry i the output of layer i (1-based), the last entry
        after the final norm (HF replaces layer L's raw output with it). The layers' outputs come out of the layer
        scan as its ys ([L, B, T, D] in cfg.dtype, kept whatever cfg.remat), copied into the result with the final
        entry: about 2·L·B·T·D more memory than the final states at the end (measured: temp + output bytes). Not
        under pipeline parallelism (a mesh with a 'stage' axis), whose stages keep their layers' outputs: the final
        hidden states only there.
        return_aux: `(states, aux)`, the MoE aux dict as `__call__` returns it (for a head trained jointly with an
        MoE backbone). The other arguments are `__call__`'s. No KV cache: a decode step's states are those of the
        full forward of the tokens so far."""
        if cache is not None:
            raise ValueError("hidden_states takes no KV cache: call it on the whole sequence (it runs as the full "
                             "forward does), or decode with the model's __call__")
        with replicate_indivisible(False):
            return self._forward(tokens_BT, positions_BT, segment_ids_BT, padding_mask_BT, None, return_aux, rng,
                                 dropless, hidden="all" if all_layers else "final")

    def unembed(self, h_BTD):
        """Final hidden states [..., B, T, D] (`hidden_states`) → logits [..., B, T, V] float32: the LM head, μP's
        readout multiplier and the final soft-cap, as `__call__` applies them (for the logit lens, put a layer's
        output through `rms_norm(h, model.final_norm[...], cfg.norm_eps, cfg.norm_offset)` first)."""
        h_BTD = jnp.asarray(h_BTD)
        if h_BTD.ndim < 3 or h_BTD.shape[-1] != self.cfg.d_model:
            raise ValueError(f"unembed takes hidden states [batch, length, d_model={self.cfg.d_model}] (any leading "
                             f"dims before), got shape {h_BTD.shape}")
        lead = (None,) * (h_BTD.ndim - 3)
        return constrain(self._unembed(h_BTD, flat_rows()), lead + ("batch", "act_seq", "act_vocab"))

    def _unembed(self, x_BTD, flat: bool):
        cfg, cd = self.cfg, dtype_of(self.cfg.dtype)
        head_DV = gathered_head(self.embed[...].T if cfg.tie_embeddings else self.lm_head[...], cd)  # one gather
        # float32 accumulation and output: bf16 logits would be quantised to 8 mantissa bits (config: dtype)
        logits_BTV = linear(x_BTD, head_DV, cfg.matmul_impl, out_dtype=jnp.float32, flatten=flat)
        if cfg.mup_base_width:  # μP readout multiplier 1 / m: logits stay O(1) as the width grows
            logits_BTV = logits_BTV / cfg.width_mult
        if cfg.final_logit_softcap is not None:
            logits_BTV = cfg.final_logit_softcap * jnp.tanh(logits_BTV / cfg.final_logit_softcap)
        return logits_BTV

    def _forward(self, tokens_BT, positions_BT, segment_ids_BT, padding_mask_BT, cache, return_aux, rng,
                 dropless=False, hidden: str | None = None):
        """hidden: None for the logits (`__call__`), 'final' / 'all' for `hidden_states`."""
        cfg = self.cfg
        tokens_BT = check_token_ids(tokens_BT, cfg.vocab_size)
        # lists read as arrays, as the tokens and the padding mask are: they failed deep in the layer scan ("list
        # indices must be integers or slices, not tuple", in RoPE / the attention mask), naming neither argument
        positions_BT, segment_ids_BT = (jnp.asarray(a) if isinstance(a, list | tuple) else a
                                        for a in (positions_BT, segment_ids_BT))
        _check_shapes(cfg, tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                      padding_mask_BT=padding_mask_BT, cache=cache)
        B, T = tokens_BT.shape
        if padding_mask_BT is not None:
            padding_mask_BT = jnp.asarray(padding_mask_BT)
            if padding_mask_BT.dtype != jnp.bool_:  # a tokenizer's 0/1 attention_mask is fine
                if not jnp.issubdtype(padding_mask_BT.dtype, jnp.integer):
                    raise ValueError(f"padding_mask_BT must be bool (True = real token) or 0/1 ints, got "
                                     f"{padding_mask_BT.dtype}")
                padding_mask_BT = padding_mask_BT != 0
        length = cache.length if cache is not None else 0
        inv_freq = inv_frequencies(cfg.hd, cfg.rope_theta, cfg.rope_scaling)
        local_inv = None if cfg.local_rope_theta is None else inv_frequencies(cfg.hd, cfg.local_rope_theta)
        rope_cs = local_cs = None
        start = None if cache is None else cache.start
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(length + jnp.arange(T, dtype=jnp.int32), (B, T))
            if start is not None:  # left-padded rows count positions from their first real token
                positions_BT = positions_BT - start[:, None]
            # positions 0..T-1: tables of at most 4 MB each; a symbolic T (jax.export) has no numpy arange
            if cache is None and isinstance(T, int) and T * cfg.hd <= 1 << 21:
                rope_cs = rope_tables(np.arange(T, dtype=np.int32)[None], inv_freq)
                local_cs = None if local_inv is None else rope_tables(np.arange(T, dtype=np.int32)[None], local_inv)
        if cache is not None and (segment_ids_BT is not None or padding_mask_BT is not None):
            raise ValueError("segment_ids / padding_mask are not supported with a KV cache; decode one document per "
                             "row, left-padded prompts through KVCache.zeros(cfg, batch, max_len, start=...)")
        if start is not None and start.shape != (B,):
            raise ValueError(f"KVCache.start is [{start.shape[0]}] but the batch has {B} rows")
        if start is not None and cfg.moe is not None:  # left padding is padding to the MoE layers too: not routed,
            # out of the aux values (a cached prefill's `load` counted the pads); attention masks it by cache.start
            padding_mask_BT = (length + jnp.arange(T, dtype=jnp.int32))[None, :] >= start[:, None]
        capacity = None if cache is None else cache_capacity(cfg, cache)
        length_traced = isinstance(length, jax.core.Tracer)
        if capacity is not None and (T > capacity or (not length_traced and int(length) + T > capacity)):
            seen = "?" if length_traced else int(length)
            # (an all-local model with a window longer than max_len has no full-attention layer to name)
            who = ("full-attention layers" if None in cfg.layer_windows()
                   else "local layers (a window longer than max_len)")
            raise ValueError(f"KVCache overflow: its {who} hold {capacity} "
                             f"token{'s' * (capacity != 1)} (the max_len of KVCache.zeros), but this call of {T} "
                             f"token{'s' * (T != 1)} after {seen} would go past them and wrap into a sliding window; "
                             "allocate KVCache.zeros(cfg, batch, max_len) with max_len >= prompt + generated tokens")
        ctx = _Ctx(cfg, positions_BT, segment_ids_BT, padding_mask_BT, inv_freq, length, rope_cs, flat_rows(),
                   bool(dropless), start, attention_scale(cfg.rope_scaling), local_inv, local_cs)

        cd = dtype_of(cfg.dtype)
        x_BTD = embed_lookup(self.embed[...], tokens_BT, cd)  # all-gathered in cd, gradient in param dtype
        if cfg.embed_scale:
            x_BTD = x_BTD * jnp.asarray(cfg.d_model ** 0.5, cd)
        x_BTD = constrain(x_BTD, ("batch", "act_seq", "act_embed"))
        x_BTD, new_cache, moe_aux, inputs_LBTD = self._run_blocks(x_BTD, ctx, cache, rng, hidden == "all")

        x_BTD = rms_norm(x_BTD, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        if hidden is not None:  # layer l's input is layer l - 1's output; the final norm's output replaces layer L's
            h = jnp.concatenate([inputs_LBTD, x_BTD[None]]) if hidden == "all" else x_BTD
            out = (constrain(h, (None,) * (h.ndim - 3) + ("batch", "act_seq", "act_embed")),)
        else:
            logits_BTV = self._unembed(x_BTD, ctx.flat_rows)
            if capacity is not None and length_traced:  # unknown until run time: poison the wrapped positions
                fits_T = length + jnp.arange(T) < capacity
                logits_BTV = jnp.where(fits_T[None, :, None], logits_BTV, jnp.nan)
            logits_BTV = constrain(logits_BTV, ("batch", "act_seq", "act_vocab"))
            out = (logits_BTV,) if cache is None else (logits_BTV, KVCache(*new_cache, length + T, start))
        if return_aux:
            aux = {} if moe_aux is None else {
                "lb_loss": moe_aux["lb_loss"].mean(), "z_loss": moe_aux["z_loss"].mean(),
                "dropped_frac": moe_aux["dropped_frac"].mean(), "load": moe_aux["load"]}
            out = out + (aux,)
        return out[0] if len(out) == 1 else out

    def _run_blocks(self, x_BTD, ctx: _Ctx, cache: KVCache | None, rng=None, keep_inputs: bool = False):
        """Run the L layers; returns (x, (k, v, pos) tuples of the new cache or None, MoE aux stacked
        over the MoE layers [L_moe, ...] or None, each layer's input [L, B, T, D] when `keep_inputs` else None)."""
        cfg = self.cfg
        L, P = cfg.n_layers, pattern_period(cfg)
        windows, kinds = cfg.layer_windows()[:P], cfg.moe_layers()[:P]
        n_kind = {k: sum(x == k for x in kinds) for k in (False, True)}  # layers of each kind per group
        slot = [sum(kinds[i] == kinds[j] for i in range(j)) for j in range(P)]  # index in its stack's group
        graphdefs, states = {}, {}
        for k, name in ((False, "blocks"), (True, "moe_blocks")):
            if n_kind[k]:
                graphdefs[k], states[k] = nnx.split(getattr(self, name))
        # [L/P, layers of this kind per group, ...], or [L/P, ...] for a kind with one layer per group: each scan
        # step then hands the layer its parameters as they are, and the backward reads them from the stacked
        # arrays (a per-step slice would be a new array, which the scan saves for the backward: a copy of them all)
        per = lambda k: (L // P,) if n_kind[k] == 1 else (L // P, n_kind[k])  # noqa: E731
        grouped = {k: jax.tree.map(lambda a, k=k: a.reshape(per(k) + a.shape[1:]), st) for k, st in states.items()}
        keys = None if rng is None or not n_kind[True] else jax.random.split(rng, L // P)

        def one_layer(j, st, x, arrays, c, key):
            if n_kind[kinds[j]] > 1:  # layer j's slice of its kind's group (inside the checkpoint below)
                st = jax.tree.map(lambda a: a[slot[j]], st)
            key = None if key is None else jax.random.fold_in(key, j)
            return nnx.merge(graphdefs[kinds[j]], st)(x, ctx.with_arrays(arrays), windows[j], c, key)

        # A layer's parameter slice is a new array, which a scanned stack saves for the backward: a copy of those
        # layers' parameters. Sliced inside the checkpoint, the backward slices again instead (no remat policy saves
        # a slice). Under 'none' the copy stays: a policy saving all but the slices made that step 4-5% slower.
        if cfg.remat != "none":  # prevent_cse unless a rolled loop keeps XLA from merging the recompute away
            unrolled = not cfg.scan_layers or cfg.scan_unroll is True or cfg.scan_unroll > 1
            one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,),
                                       prevent_cse=unrolled)

        def group(gst, x, arrays, cs=None, key=None):
            """The P layers of one group: gst[kind] holds [layers of that kind per group, ...] (that axis absent
            for a kind with one layer per group). Also returns the layers' inputs [P, B, T, D] if `keep_inputs`."""
            caches, auxes, ins = [], [], []
            for j in range(P):
                ins.append(x)
                x, c, aux = one_layer(j, gst[kinds[j]], x, arrays, None if cs is None else cs[j], key)
                caches.append(c)
                if aux is not None:
                    auxes.append(aux)
            return (x, caches, (jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None),
                    jnp.stack(ins) if keep_inputs else None)

        flat_aux = lambda a: None if a is None else jax.tree.map(  # noqa: E731  [L/P, Pm, ...] -> [L_moe, ...]
            lambda t: t.reshape((-1,) + t.shape[2:]), a)

        stage_axis, n_stages = mesh_axis_for("layers")
        if n_stages > 1 and (users := sharing_axis("layers", stage_axis)):  # else a traceback from inside shard_map
            raise ValueError(f"logical axis 'layers' maps to mesh axis {stage_axis!r}, which {users} use too: the "
                             "layer stack runs as a pipeline over the axis 'layers' maps to, so it needs one of its "
                             "own; map 'layers' to 'stage' (the table's) or None")
        if not cfg.scan_layers:  # the same stacked parameters, one group at a time
            if n_stages > 1:
                raise ValueError(pipeline_problem(L, P, n_stages, x_BTD.shape[0], cfg.pipeline_microbatches,
                                                  mesh_shards("batch"), n_kind[True], scan_layers=False))
            ks, vs, auxes = (None, None, []) if cache is None else (cache.k, cache.v, [])
            ins = []
            for g in range(L // P):
                cs = None if cache is None else [(ks[j], vs[j], cache.pos[j], g) for j in range(P)]
                x_BTD, cg, aux, ins_g = group(jax.tree.map(lambda a, g=g: a[g], grouped), x_BTD, ctx.arrays(), cs,
                                              None if keys is None else keys[g])
                if cache is not None:
                    ks, vs, pos = zip(*cg)
                auxes.append(aux)
                ins.append(ins_g)
            aux = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxes)
            return (x_BTD, (None if cache is None else (ks, vs, pos)), flat_aux(aux),
                    jnp.concatenate(ins) if keep_inputs else None)

        if n_stages > 1:
            if keep_inputs:  # gpipe returns the last stage's output only
                raise ValueError("hidden_states(all_layers=True) under pipeline parallelism is not supported: each "
                                 "stage keeps its layers' outputs; use all_layers=False (the final hidden states) or a "
                                 "mesh without a 'stage' axis")
            if cache is not None:
                raise ValueError("KV-cache decoding under pipeline parallelism is not supported; decode on a "
                                 "mesh without a 'stage' axis")
            M = cfg.pipeline_microbatches
            if problem := pipeline_problem(L, P, n_stages, x_BTD.shape[0], M, mesh_shards("batch"), n_kind[True]):
                raise ValueError(problem)
            # bf16 on CPU: the stage's layer scan keeps its residuals as bits, as the plain layer scan does (XLA:CPU
            # kept them as float32 stacks: remat 'none' under {stage: 4} 1.65x the bf16 estimate; models.residuals)
            stage_body = bits_residuals(lambda st, x, a: group(st, x, a)[0], cfg.dtype)
            x_BTD = gpipe(stage_body, grouped, x_BTD, ctx.arrays(), n_microbatches=M, axis=stage_axis)
            return x_BTD, None, None, None

        if cache is None:
            def body(x, xs):
                x, _, aux, ins = group(xs[0], x, ctx.arrays(), None, xs[1])
                return x, (aux if ins is None else (aux, ins))

            if all(isinstance(n, int) for n in x_BTD.shape):  # bf16 on CPU: see models.residuals; not with a
                # symbolic B or T (jax.export): its VJP's export (vjp_order=1) failed, "Too many leaves for PyTreeDef"
                body = bits_residuals(body, cfg.dtype)
            x_BTD, ys = jax.lax.scan(body, x_BTD, (grouped, keys), unroll=cfg.scan_unroll)
            aux, ins = ys if keep_inputs else (ys, None)  # ins [L/P, P, B, T, D]
            return x_BTD, None, flat_aux(aux), None if ins is None else ins.reshape((L,) + ins.shape[2:])

        # the cache stacks ride in the carry, each layer writing its new slots in place: as scanned xs / ys, every
        # decode step copied each layer's k / v out and back into a fresh stack (B 8, P 10, N 1000: 2.4x HF's time)
        def step(carry, xs):
            x, ks, vs = carry
            gst, g = xs
            x, out, aux, _ = group(gst, x, ctx.arrays(), [(ks[j], vs[j], cache.pos[j], g) for j in range(P)])
            ks, vs, pos = zip(*out)
            return (x, ks, vs), (pos, aux)

        (x_BTD, ks, vs), (pos, aux) = jax.lax.scan(step, (x_BTD, cache.k, cache.v),
                                                   (grouped, jnp.arange(L // P)), unroll=cfg.scan_unroll)
        return x_BTD, (ks, vs, tuple(p[0] for p in pos)), flat_aux(aux), None  # every group: the same positions
