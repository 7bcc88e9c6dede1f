"""Parameter counts and FLOPs per token for decoder LMs (dense, sliding-window, MoE), plus MFU.

This is the one place those numbers come from. Every function takes a config *duck-typed*: anything
with `vocab_size, d_model, n_layers, n_heads` (and optionally `n_kv_heads, head_dim, mlp_dim,
qkv_bias, tie_embeddings`) works, so `models.TransformerConfig` and configs that do not exist yet
plug in without an import. Features that are still being built are read with `getattr` defaults:

- attention window per layer: `cfg.layer_windows()` (or a `layer_windows` tuple) returning one
  window per layer (`None` = global causal); else `cfg.sliding_window` (int) for every layer,
  with every `cfg.global_every`-th layer global when that is set (Gemma-style local:global).
  Or pass `windows=` explicitly.
- mixture of experts: read from `cfg.moe` (e.g. a `models.moe.MoEConfig`) or from `cfg` itself:
  `n_experts` (> 0 turns it on), `top_k`, `expert_mlp_dim` (default `mlp_dim`), `n_shared_experts`,
  `shared_mlp_dim` (total shared width, default n_shared x expert width), `moe_every` (every k-th
  layer is MoE), `dispatch` / `capacity_factor`. Or pass `moe=MoESpec(...)`.

Conventions (units are FLOPs = 2 per multiply-add, per *token*):
- matmul FLOPs forward = 2 x (parameters a token multiplies with): the LM head counts, the
  embedding lookup (a gather) does not; with MoE only the `top_k` routed experts count (active).
- attention forward = 4 x n_heads x head_dim x keys per query (QK^T and PV), with `keys` from
  `attended_keys` (the useful causal/windowed work; what MFU uses) or `executed_keys` (what a
  kernel actually computes, e.g. a dense masked kernel computes all T keys).
- training = 3 x forward (backward is twice the forward), plus the forward work that remat
  recomputes when `include_recompute=True` (hardware FLOPs, for HFU rather than MFU).
- elementwise work (norms, softmax, SiLU, RoPE, loss) is not counted: a few percent at small
  d_model, negligible at scale (tests/test_scaling_flops.py bounds it against XLA).

Status (see docs/scaling.md): dense LMs, the blocked sliding-window kernel, `TransformerConfig`'s
window patterns (`layer_windows()`), MoE layers (alone and in the Transformer, capacity dispatch) and the
video DiT are checked against `cost_analysis()` in tests (tests/test_scaling_flops.py).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from fractions import Fraction

RECOMPUTE_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
# models.moe_dispatch.DROPLESS_IMPLS, spelt out so that this module imports no jax (tests pin the two equal)
DROPLESS_IMPLS = ("auto", "gmm", "blocks", "ragged_dot", "dense", "capacity")


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts MLP (models.moe layout). Per MoE layer: `n_experts` routed SwiGLU experts of
    width `expert_mlp_dim` (each token uses `top_k`), `n_shared_experts` always-on experts run as one
    SwiGLU of total width `shared_mlp_dim` (default n_shared x expert_mlp_dim), a router [d_model,
    n_experts] and a selection bias [n_experts] (no FLOPs). `moe_every=k`: layers k-1, 2k-1, ... are
    MoE, the rest dense. `capacity_factor` (> 1 only for capacity dispatch) scales the *executed*
    routed-expert FLOPs (`matmul_flops_per_token(executed=True)`); model FLOPs never include it.
    `dispatch` ('capacity' | 'dropless') and `dropless_impl` (models.moe's) change what the kernels run, never the
    model FLOPs: the executed FLOPs (`executed_slots`) and the memory model. Dropless through capacity buffers (impl
    'capacity', or 'auto' with experts sharded) runs C = T slots per expert."""

    n_experts: int
    top_k: int
    expert_mlp_dim: int
    n_shared_experts: int = 0
    shared_mlp_dim: int | None = None
    moe_every: int = 1
    capacity_factor: float = 1.0
    dispatch: str = "capacity"
    dropless_impl: str = "auto"

    def __post_init__(self):
        if self.dispatch not in ("capacity", "dropless"):
            raise ValueError(f"MoESpec.dispatch must be 'capacity' or 'dropless', got {self.dispatch!r}")
        # a misspelt one ('capcity', 'Auto') was read as an explicit sorted kernel: K rows per token where C = T
        # buffers run E on an expert mesh, and every expert counted as gathered onto each device
        if self.dropless_impl not in DROPLESS_IMPLS:
            raise ValueError(f"MoESpec.dropless_impl must be one of {DROPLESS_IMPLS} (models.moe's), got "
                             f"{self.dropless_impl!r}")
        # whole numbers, named: an expert of width 0 counted 0 FLOPs, a string count raised a bare TypeError
        for f, low in (("n_experts", 1), ("top_k", 1), ("expert_mlp_dim", 1), ("n_shared_experts", 0),
                       ("shared_mlp_dim", 0), ("moe_every", 1)):
            if f != "shared_mlp_dim" or self.shared_mlp_dim is not None:  # None: n_shared x expert_mlp_dim
                object.__setattr__(self, f, _whole(f"MoESpec.{f}", getattr(self, f), low))
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, numbers.Real):
            raise ValueError(f"MoESpec.capacity_factor must be a positive number, got {self.capacity_factor!r}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoESpec.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoESpec.capacity_factor must be positive, got {self.capacity_factor}")


@dataclasses.dataclass(frozen=True)
class LMShape:
    """A normalised view of a decoder-LM config: everything the accounting needs, nothing else."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    qkv_bias: bool = False
    tie_embeddings: bool = False
    windows: tuple[int | None, ...] = ()  # one per layer; None = global causal attention; () = every layer global
    moe: MoESpec | None = None
    post_norms: bool = False  # Gemma-2 style RMSNorm on each sublayer output: 4 norm scales per layer, not 2
    pre_norms: bool = True  # RMSNorm on each sublayer input (False: OLMo 2, whose block has post_norms only)
    qk_norm: bool = False  # RMSNorm of each head's q and k (Qwen 3): two [head_dim] scales per layer
    qk_norm_scope: str = "head"  # 'all_heads': over the whole q / k projection (OLMo 2): [N·H] and [K·H] scales
    attn_block: int | None = None  # query block of the block-causal global kernel (None: dense masked)
    swa_block: int = 256  # query block of the blocked sliding-window kernel (the `block` the functions default to)
    swa_dense: bool = False  # local layers on the dense masked oracle (swa_impl='dense'), not the blocked kernel

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "head_dim", "mlp_dim"):
            # (a float mlp_dim gave float parameter counts); stored as Python ints: numpy int32 ones (a sweep's)
            # wrapped every product past 2**31 (Llama 3 70B counted 1.8e9 parameters, its KV cache 0 bytes)
            object.__setattr__(self, f, int_at_least(f"LM shape: {f}", getattr(self, f), 0 if f == "mlp_dim" else 1))
        # every layer's attention is summed over `windows`: the default () counted none (no attention FLOPs, a 0-byte
        # KV cache, a StopIteration in memory_per_device) and a short tuple only its entries' layers
        windows = tuple(self.windows) or (None,) * self.n_layers
        if len(windows) != self.n_layers:
            raise ValueError(f"LM shape: windows has {len(windows)} entr{'ies' if len(windows) != 1 else 'y'} for "
                             f"n_layers={self.n_layers}; give one per layer (None = global), or leave it out")
        object.__setattr__(self, "windows", windows)
        for f in ("attn_block", "swa_block"):  # block sizes multiply key counts (checked where they are used)
            if isinstance(getattr(self, f), numbers.Integral) and not isinstance(getattr(self, f), bool):
                object.__setattr__(self, f, int(getattr(self, f)))
        if self.qk_norm_scope not in ("head", "all_heads"):
            raise ValueError(f"LM shape: qk_norm_scope={self.qk_norm_scope!r}; use 'head' or 'all_heads'")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"LM shape: n_heads={self.n_heads} is not a multiple of kv_heads={self.kv_heads}; "
                             "grouped-query attention shares each KV head among n_heads / kv_heads query heads")

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe.moe_every == 0

    @property
    def n_moe_layers(self) -> int:  # layers k-1, 2k-1, ... (is_moe_layer); counted, not looped: O(1) in n_layers
        return 0 if self.moe is None else self.n_layers // self.moe.moe_every


def _first(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _windows_of(cfg, n_layers: int) -> tuple[int | None, ...]:
    lw = getattr(cfg, "layer_windows", None)
    if lw is not None:
        lw = tuple(lw() if callable(lw) else lw)
        if len(lw) != n_layers:
            raise ValueError(f"cfg.layer_windows has {len(lw)} entr{'ies' if len(lw) != 1 else 'y'} for "
                             f"n_layers={n_layers}; give one per layer")
        return lw
    w = _first(cfg, ("sliding_window", "window"))
    if w is None:
        return (None,) * n_layers
    every = getattr(cfg, "global_every", None)
    w = _window(w)  # int() floored a fractional window
    return tuple(None if every and (i + 1) % every == 0 else w for i in range(n_layers))


def _moe_of(cfg) -> MoESpec | None:
    src = getattr(cfg, "moe", None)
    src = src if getattr(src, "n_experts", None) else cfg
    n = _first(src, ("n_experts", "num_experts"), 0)
    if not n:
        return None
    f = int(_first(src, ("expert_mlp_dim", "moe_mlp_dim", "mlp_dim")))
    shared = int(_first(src, ("n_shared_experts", "num_shared_experts"), 0))
    dispatch = _first(src, ("dispatch",), "capacity")  # as given: MoESpec names a misspelt one (read as dropless)
    capacity = dispatch == "capacity"
    return MoESpec(
        n_experts=int(n), top_k=int(_first(src, ("top_k", "experts_per_token", "num_experts_per_tok"), 1)),
        expert_mlp_dim=f, n_shared_experts=shared, shared_mlp_dim=_first(src, ("shared_mlp_dim",)),
        moe_every=int(_first(cfg, ("moe_every",), _first(src, ("moe_every",), 1))),
        capacity_factor=float(_first(src, ("capacity_factor",), 1.0)) if capacity else 1.0,
        dispatch=dispatch, dropless_impl=_first(src, ("dropless_impl",), "auto"))


def lm_shape(cfg, *, windows: Sequence[int | None] | None = None, moe: MoESpec | None = None) -> LMShape:
    """Normalise a (duck-typed) LM config; `windows` / `moe` override what the config says."""
    if isinstance(cfg, LMShape) and windows is None and moe is None:
        return cfg
    if isinstance(cfg, Mapping) and not hasattr(cfg, "vocab_size"):  # (an OmegaConf DictConfig reads as attributes)
        raise ValueError(f"the config is a {type(cfg).__name__}; scaling.flops reads a config's attributes: pass "
                         "TransformerConfig(**d) (or types.SimpleNamespace(**d)) with vocab_size, d_model, n_layers, "
                         "n_heads")
    for f in ("vocab_size", "d_model", "n_layers", "n_heads"):
        if getattr(cfg, f, None) is None:
            raise ValueError(f"config has no {f!r}; scaling.flops needs vocab_size, d_model, n_layers, n_heads")
    for f in ("n_heads", "n_layers"):  # before d_model // n_heads and (None,) * n_layers (a bare TypeError for 2.0)
        int_at_least(f"LM shape: {f}", getattr(cfg, f), 1)
    L = cfg.n_layers
    kv = _first(cfg, ("kv_heads", "n_kv_heads"), cfg.n_heads)
    hd = _first(cfg, ("hd", "head_dim"), cfg.d_model // cfg.n_heads)
    windows = tuple(windows) if windows is not None else _windows_of(cfg, L)
    if len(windows) != L:
        raise ValueError(f"windows has {len(windows)} entr{'ies' if len(windows) != 1 else 'y'} for n_layers={L}; "
                         "give one per layer (None = global)")
    windows = _checked_windows(windows)
    # the 'reference' kernel (models.attention's autodiff oracle) ignores attn_block: dense masked scores
    attn_block = None if getattr(cfg, "attn_impl", "xla") == "reference" else getattr(cfg, "attn_block", None)
    return LMShape(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=L, n_heads=cfg.n_heads, kv_heads=kv,
                   head_dim=hd, mlp_dim=getattr(cfg, "mlp_dim", 4 * cfg.d_model),
                   qkv_bias=bool(getattr(cfg, "qkv_bias", False)),
                   tie_embeddings=bool(getattr(cfg, "tie_embeddings", False)), windows=windows,
                   moe=moe if moe is not None else _moe_of(cfg), post_norms=bool(getattr(cfg, "post_norms", False)),
                   qk_norm=bool(getattr(cfg, "qk_norm", False)), pre_norms=bool(getattr(cfg, "pre_norms", True)),
                   qk_norm_scope=getattr(cfg, "qk_norm_scope", "head"),
                   attn_block=attn_block, swa_block=int(getattr(cfg, "swa_block", 256)),
                   # an LMShape carries it as swa_dense (rebuilt for a `windows=` / `moe=` override, it was lost)
                   swa_dense=bool(getattr(cfg, "swa_dense", False)) or getattr(cfg, "swa_impl", "auto") == "dense")


# ---- parameters ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts. `total` = stored; `active` = used per token (MoE: top_k routed experts).
    `embedding` = input table (+ untied head); `matmul_active` = what enters 2N-per-token FLOPs
    (non-embedding active + LM head). Kaplan et al. 2020 fit laws on `non_embedding`."""

    total: int
    active: int
    embedding: int
    non_embedding: int
    matmul_active: int
    attention: int
    mlp_total: int
    mlp_active: int
    norms: int


def _attn_params(s: LMShape) -> int:
    d, h, k, hd = s.d_model, s.n_heads, s.kv_heads, s.head_dim
    return d * h * hd + 2 * d * k * hd + h * hd * d + ((h + 2 * k) * hd if s.qkv_bias else 0)


def qk_norm_params(s: LMShape) -> int:
    """One layer's q / k norm scales: two [H] (per head), [N·H] + [K·H] (over all heads), or none."""
    if not s.qk_norm:
        return 0
    return 2 * s.head_dim if s.qk_norm_scope == "head" else (s.n_heads + s.kv_heads) * s.head_dim


def _mlp_params(s: LMShape, i: int) -> tuple[int, int]:
    """(total, active) MLP parameters of layer i (SwiGLU: 3 matrices)."""
    d = s.d_model
    if not s.is_moe_layer(i):
        return 3 * d * s.mlp_dim, 3 * d * s.mlp_dim
    m = s.moe
    expert = 3 * d * m.expert_mlp_dim
    shared = 3 * d * _shared_width(m)
    router = d * m.n_experts
    return m.n_experts * expert + shared + router + m.n_experts, m.top_k * expert + shared + router


def _shared_width(m: MoESpec) -> int:
    return m.shared_mlp_dim if m.shared_mlp_dim is not None else m.n_shared_experts * m.expert_mlp_dim


def param_counts(cfg, **kw) -> ParamCounts:
    """Parameter counts of a decoder LM (see `ParamCounts`); equals `TransformerConfig.param_count()`
    for dense configs and the size of the real parameter tree (tests)."""
    s = lm_shape(cfg, **kw)
    d, v, L = s.d_model, s.vocab_size, s.n_layers
    attn = L * _attn_params(s)
    # per kind of layer times its count (integers: the per-layer sum's value), not a loop over n_layers
    n_moe = s.n_moe_layers
    moe_layer = _mlp_params(s, s.moe.moe_every - 1) if n_moe else (0, 0)
    dense_layer = (3 * d * s.mlp_dim,) * 2
    mlp_total = n_moe * moe_layer[0] + (L - n_moe) * dense_layer[0]
    mlp_active = n_moe * moe_layer[1] + (L - n_moe) * dense_layer[1]
    norms = (2 * s.pre_norms + 2 * s.post_norms) * d * L + d + L * qk_norm_params(s)
    head = 0 if s.tie_embeddings else v * d
    emb = v * d + head
    return ParamCounts(total=emb + attn + mlp_total + norms, active=emb + attn + mlp_active + norms, embedding=emb,
                       non_embedding=attn + mlp_total + norms, matmul_active=attn + mlp_active + v * d,
                       attention=attn, mlp_total=mlp_total, mlp_active=mlp_active, norms=norms)


# ---- attention keys -----------------------------------------------------------------------------


def int_at_least(name: str, v, low: int) -> int:
    """`v` as an int >= `low` (numpy ints too; not a bool, a float or a string), or a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def _whole(name: str, v, low: int = 1) -> int:
    """`v` as an int >= `low`: lengths and counts are whole numbers (16.0 is taken); int() floored 16.7 to 16 in
    some functions while others refused it, and a bool passed as 1."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v).is_integer() or v < low:
        raise ValueError(f"{name}={v!r} must be a whole number >= {low}")
    return int(v)


def _checked_windows(windows) -> tuple[int | None, ...]:
    """`_window` of each entry, each distinct one checked once (keyed by type too: True == 1 and 4.0 == 4 must each
    be checked): a call per layer made flops_per_token take seconds at n_layers=10**6."""
    checked, out = {}, []
    for w in windows:
        try:
            out.append(checked[k] if (k := (type(w), w)) in checked else checked.setdefault(k, _window(w)))
        except TypeError:  # unhashable (a list, an array): _window names it, not a bare "unhashable type"
            out.append(_window(w))
    return tuple(out)


def _window(w) -> int | None:
    """An attention window: None (global) or a whole number of keys >= 1."""
    if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Real) or not float(w).is_integer()
                          or w < 1):
        raise ValueError(f"attention window must be >= 1 or None (a whole number of keys), got {w!r}")
    return None if w is None else int(w)


def attended_keys(seq_len: int, window: int | None = None, causal: bool = True) -> float:
    """Mean number of keys a query attends to in a length-`seq_len` sequence.

    Causal: query at position p sees min(window, p + 1) keys (window None = p + 1), averaged over
    p = 0..T-1, i.e. (T + 1) / 2 for global attention. Non-causal (bidirectional, e.g. DiT): T.
    """
    T = _whole("seq_len", seq_len)
    if not causal:
        if window is not None:
            raise ValueError("windowed bidirectional attention is not modelled; pass window=None or causal=True")
        return float(T)
    W = T if window is None else min(_window(window), T)
    # sum_{p<W} (p + 1) + (T - W) * W, divided by T
    return (W * (W + 1) / 2 + (T - W) * W) / T


def executed_keys(seq_len: int, window: int | None = None, kernel: str = "dense", block: int = 256) -> float:
    """Keys per query a *kernel* computes (scores it materialises), per real token.

    kernel: 'dense' — a masked [T, T] kernel (jax.nn.dot_product_attention 'xla'): T keys whatever
    the mask; 'ideal' / 'flash' — only the attended keys (`attended_keys`, causal; a fused kernel that
    skips fully masked blocks executes about this); 'blocked' —
    `models.sliding_window`: T is padded to Q = ceil(T / C) blocks of C = min(block, T) queries and
    each block scores nk·C keys, nk = min(Q, ceil((W - 1) / C) + 1); 'causal_blocked' — the global
    causal 'xla' kernel with `causal_block=C` (models.attention; C at least T / 16): the block of queries
    [lo, hi) scores keys [0, hi), no padding.
    """
    T, block = _whole("seq_len", seq_len), _whole("block", block)
    window = _window(window)
    if kernel == "dense":
        return float(T)
    if kernel == "causal_blocked":
        if window is not None:
            raise ValueError("kernel='causal_blocked' is the global causal kernel; pass window=None")
        block = max(block, -(-T // 16))  # at most 16 blocks, as models.attention.causal_block_rows
        return sum((min(lo + block, T) - lo) * min(lo + block, T) for lo in range(0, T, block)) / T
    if kernel in ("ideal", "flash"):
        return attended_keys(T, window)
    if kernel == "blocked":
        C = max(1, min(block, T))
        Q = math.ceil(T / C)
        W = T if window is None else int(window)
        nk = min(Q, math.ceil(max(W - 1, 0) / C) + 1)
        return Q * C * nk * C / T
    raise ValueError(f"kernel={kernel!r}: use 'dense', 'causal_blocked', 'ideal', 'flash' or 'blocked'")


def model_window(window: int | None, seq_len: int) -> int | None:
    """The window a layer runs with on `seq_len`-token rows: one that spans the row (W >= T) masks nothing, and
    models.Transformer runs such a layer with the global causal kernel (`Block._attend`): None."""
    return None if window is None or window >= seq_len else window


def model_kernel(s: LMShape, window: int | None, swa_block: int) -> tuple[str, int]:
    """(kernel, block) that models.Transformer runs for a layer on CPU: block-causal (or dense masked when
    `attn_block` is None) for global layers, the blocked sliding-window kernel for local ones (dense masked under
    swa_impl='dense', the oracle)."""
    if window is not None:
        return ("dense" if s.swa_dense else "blocked"), swa_block
    return ("causal_blocked", s.attn_block) if s.attn_block else ("dense", swa_block)


# ---- FLOPs --------------------------------------------------------------------------------------
# Every function below takes `windows=` / `moe=` overrides (see `lm_shape`) and `kernel=` / `block=`
# for how attention keys are counted (see `executed_keys`).


def matmul_flops_per_token(cfg, *, executed: bool = False, seq_len: int | None = None, windows=None,
                           moe=None) -> float:
    """Forward matmul FLOPs per token: 2 x active matmul parameters (incl. LM head and router).
    executed=True: the routed experts' capacity slots, padded ones included: E·C slots per row of T tokens
    instead of K·T assignments, with C = ceil(K·T·CF / E) clamped to T (`models.moe.MoEConfig.capacity`) when
    `seq_len` = T is given, else K·CF clamped to E per token (the large-T limit)."""
    s = lm_shape(cfg, windows=windows, moe=moe)
    f = 2.0 * param_counts(s).matmul_active
    if s.moe is not None:
        f += _routed_forward(s, seq_len, executed) - _routed_forward(s, seq_len, False)
    return f


def executed_slots(m: MoESpec, seq_len: int | None, expert_shards: int = 1) -> float:
    """Expert rows per token an MoE layer's routed experts run (models.moe): E·C / T with capacity buffers
    (C = ceil(top_k·T·CF / E) clamped to [1, T]; without `seq_len` the large-T limit top_k·CF clamped to E); E for
    dropless run through capacity buffers with C = T (`dropless_impl` 'capacity', or 'auto' with experts sharded over
    `expert_shards` > 1 devices) or the all-experts 'dense' kernel; top_k for the sorted dropless kernels."""
    if m.dispatch == "dropless":
        through_buffers = m.dropless_impl in ("capacity", "dense") or (m.dropless_impl == "auto" and expert_shards > 1)
        return float(m.n_experts if through_buffers else m.top_k)
    if seq_len is None:
        return min(m.top_k * m.capacity_factor, m.n_experts)
    seq_len = _whole("seq_len", seq_len)
    return m.n_experts * capacity_slots(m.top_k, seq_len, m.capacity_factor, m.n_experts) / seq_len


def capacity_slots(top_k: int, tokens: int, capacity_factor: float, n_experts: int) -> int:
    """Capacity dispatch's slots per expert per row: ceil(K·T·CF / E) in exact arithmetic (the capacity factor as
    written: 1.1 is 11/10; in floats 100·1.1 = 110.00000000000001 took one slot more), between 1 and T."""
    top_k, tokens, n_experts = _whole("top_k", top_k), _whole("tokens", tokens), _whole("n_experts", n_experts)
    exact = Fraction(top_k * tokens) * Fraction(repr(float(capacity_factor))) / n_experts
    return max(1, min(tokens, math.ceil(exact)))


def _routed_forward(s: LMShape, seq_len: int | None, executed: bool, expert_shards: int = 1) -> float:
    """Forward FLOPs per token of the routed experts over all MoE layers: top_k rows per token, or with
    `executed` the rows the kernels run (`executed_slots`)."""
    m = s.moe
    if m is None:
        return 0.0
    slots = executed_slots(m, seq_len, expert_shards) if executed else float(m.top_k)
    return 2.0 * slots * s.n_moe_layers * 3 * s.d_model * m.expert_mlp_dim


def attention_flops_per_token(cfg, seq_len: int, *, kernel: str = "ideal", block: int | None = None, windows=None,
                              moe=None) -> float:
    """Forward attention FLOPs per token summed over layers: 4·n_heads·head_dim·keys(layer).

    kernel='ideal' counts attended keys (causal, per-layer window): the model FLOPs for MFU;
    'dense' / 'causal_blocked' / 'blocked' / 'flash' count what that kernel executes (see
    `executed_keys`); 'executed': what models.Transformer runs (`model_kernel`: the config's attn_block for global
    layers, and for windowed ones whose window spans seq_len (`model_window`); the others in query blocks of
    `block`, default the config's swa_block).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Real) or not seq_len >= 1:
        raise ValueError(f"seq_len={seq_len!r}: the sequence length must be a number of tokens >= 1")
    s = lm_shape(cfg, windows=windows, moe=moe)
    block = s.swa_block if block is None else block
    kern = lambda w: model_kernel(s, w, block) if kernel == "executed" else (kernel, block)  # noqa: E731
    per_window = {}  # each distinct window's keys computed once, then summed per layer in order: the same floats
    for w in set(s.windows):  # added as before (bit-identical), without a kernel model per layer
        mw = model_window(w, seq_len)
        per_window[w] = executed_keys(seq_len, mw, *kern(mw))
    keys = sum(per_window[w] for w in s.windows)
    return 4.0 * s.n_heads * s.head_dim * keys


def forward_flops_per_token(cfg, seq_len: int, *, kernel: str = "ideal", block: int | None = None, windows=None,
                            moe=None, expert_shards: int = 1) -> float:
    """One forward pass per token: matmuls + attention (also the prefill cost per prompt token).
    kernel='executed' counts what the kernels run, the routed experts' rows by `executed_slots` too (capacity
    dispatch's padded slots; `expert_shards`: the devices the experts are sharded over)."""
    s = lm_shape(cfg, windows=windows, moe=moe)
    f = matmul_flops_per_token(s) + attention_flops_per_token(s, seq_len, kernel=kernel, block=block)
    if kernel == "executed" and s.moe is not None:  # top_k rows per token counted above; the kernels run these
        f += _routed_forward(s, seq_len, True, expert_shards) - _routed_forward(s, seq_len, False)
    return f


def prefill_flops_per_token(cfg, prompt_len: int, *, kernel: str = "ideal", block: int | None = None, windows=None,
                            moe=None, cache_len: int | None = None) -> float:
    """`models.generate`'s prefill per prompt token: a forward pass over `prompt_len` tokens whose LM head
    (2·d_model·vocab) runs on the last token only (the others' logits are never used): the forward's count less
    (prompt_len - 1) / prompt_len of the head (it was counted for every prompt token).
    kernel='executed' counts the experts' rows as they run with a cache (`_cached_moe`); its attention is that of an
    uncached forward unless `cache_len` (generate's P + max_new_tokens, KVCache.zeros' max_len) is given: generate's
    prefill runs through its cache, P - 1 tokens then the last one, each scoring a layer's written slots rounded up to
    a bucket (`prefix_keys`), not the causal kernel's (P = 512 of 1024 slots: 512 keys a query, not ~290); see
    `_cached_prefill_keys`. cache_len implies kernel='executed'."""
    if cache_len is not None:
        if kernel not in ("ideal", "executed"):
            raise ValueError(f"prefill_flops_per_token: cache_len counts the kernels the cached prefill runs; "
                             f"kernel={kernel!r} names another (leave it out, or pass kernel='executed')")
        _whole("prompt_len", prompt_len)
        if _whole("cache_len", cache_len) < prompt_len:
            raise ValueError(f"prefill_flops_per_token: cache_len={cache_len} must hold the prompt ({prompt_len} "
                             "tokens): generate allocates prompt_len + max_new_tokens slots")
        kernel = "executed"
    s = lm_shape(cfg, windows=windows, moe=moe)
    if kernel == "executed":
        s = _cached_moe(s)
    head = 2.0 * s.d_model * s.vocab_size
    if cache_len is None:
        return forward_flops_per_token(s, prompt_len, kernel=kernel, block=block) - head * (prompt_len - 1) / prompt_len
    block = s.swa_block if block is None else block
    keys = sum(_cached_prefill_keys(w, prompt_len, cache_len, block) for w in s.windows)
    f = matmul_flops_per_token(s) + _routed_forward(s, prompt_len, True) - _routed_forward(s, prompt_len, False)
    return f + 4.0 * s.n_heads * s.head_dim * keys - head * (prompt_len - 1) / prompt_len


def _cached_prefill_keys(window: int | None, P: int, S: int, block: int) -> float:
    """Keys per prompt token one layer scores in `models.generate`'s prefill through a cache of S slots (the layer
    keeps min(W, S) of them, `models.transformer.cache_slots`): P - 1 tokens at length 0, then the last one. The chunk
    scores its written slots' bucket (global layers), its slots and itself (a local layer's buffer of min(W, S) >=
    P - 1 slots) or, longer than the buffer, W + P - 1 rows of the blocked kernel; the last token its written slots'
    bucket. (On CPU a long chunk's query blocks pad fewer than one block of rows: not counted.)"""
    slots = S if window is None or window >= S else window
    T, keys = P - 1, float(prefix_keys(min(P, slots), slots))
    if T == 1 or (T and window is None):
        keys += T * prefix_keys(min(T, slots), slots)
    elif T > slots:
        keys += (slots + T) * executed_keys(slots + T, window, "blocked", block)
    elif T:
        keys += T * (slots + T)
    return keys / P


def _cached_moe(s: LMShape) -> LMShape:
    """`s` as its MoE layers run with a KV cache (prefill and decode): capacity dispatch runs dropless, C = T slots
    per expert (models.moe: `inference`)."""
    if s.moe is None or s.moe.dispatch != "capacity":
        return s
    return dataclasses.replace(s, moe=dataclasses.replace(s.moe, dispatch="dropless", dropless_impl="capacity",
                                                          capacity_factor=1.0))


def recompute_flops_per_token(cfg, seq_len: int, remat: str, *, kernel: str = "ideal", block: int | None = None,
                              windows=None, moe=None, expert_shards: int = 1) -> float:
    """Forward FLOPs that a remat policy recomputes in the backward pass (per token).

    'none' and 'save_dots' recompute no matmul work (only elementwise ops); 'save_dots_no_batch'
    saves the 2-D weight matmuls but recomputes the dots with a batch dim: attention's QK^T and PV and the
    routed experts' products (batched over E); 'full' reruns each block's forward except the dense / shared
    MLP's down projection, whose output only feeds the saved next-layer input (the attention-out projection is
    rerun: the MLP's pre-norm needs x + wo(attn); so are the routed experts' down products: the router's
    gradient needs the experts' outputs; with post_norms (Gemma 2 / 3, OLMo 2) the down projection is rerun too:
    the post-norm's gradient needs its input) — the LM head is outside the remat'ed layers and is not rerun.
    kernel='executed' counts the expert rows the kernels run (`executed_slots`; `expert_shards`: the devices the
    experts are sharded over), and for the 'dense' dropless kernel what it reruns: its products are 2-D (kept by
    'save_dots_no_batch') and it gates before the down product ('full' reruns only gate and up; all three with
    post_norms).
    """
    if remat not in RECOMPUTE_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {RECOMPUTE_POLICIES}")
    s = lm_shape(cfg, windows=windows, moe=moe)
    attn = attention_flops_per_token(s, seq_len, kernel=kernel, block=block)
    routed = _routed_forward(s, seq_len, kernel == "executed", expert_shards)
    m = s.moe
    # models.moe_dispatch.dense_experts: [N, D] @ [D, E·F] products, no batch dimension, and the router's gradient
    # reads the gated hidden h, not the down product's output (it only feeds the residual, as a dense MLP's does)
    dense_kernel = kernel == "executed" and m is not None and m.dispatch == "dropless" and m.dropless_impl == "dense"
    if remat == "full":
        routed *= 2 / 3 if dense_kernel and not s.post_norms else 1  # gate and up of the 3 products
        d = s.d_model
        n_moe = s.n_moe_layers  # integers: counted per kind of layer, not looped over n_layers
        down = n_moe * d * (_shared_width(s.moe) if n_moe else 0) + (s.n_layers - n_moe) * d * s.mlp_dim
        down *= not s.post_norms  # a post-norm's gradient reads the MLP's output: its down products rerun too
        rest = param_counts(s).matmul_active - s.vocab_size * d - down  # routed experts: replaced by `routed`
        return 2.0 * rest - _routed_forward(s, seq_len, False) + routed + attn
    return attn + (0.0 if dense_kernel else routed) if remat == "save_dots_no_batch" else 0.0


def train_flops_per_token(cfg, seq_len: int, *, kernel: str = "ideal", block: int | None = None,
                          remat: str | None = None, include_recompute: bool = False, windows=None, moe=None,
                          expert_shards: int = 1) -> float:
    """Training FLOPs per token = 3 x forward (+ remat recompute if `include_recompute`).

    With the defaults this is the *model* FLOPs that MFU divides by: 6N + 12·L·H·Q·(T + 1)/2, the attended causal
    keys. PaLM (Chowdhery et al. 2022, App. B) counts every key, 6N + 12·L·H·Q·T (its 46.2% MFU needs it):
    kernel='dense' gives that convention. `include_recompute=True` gives hardware FLOPs, under `remat`
    (default `cfg.remat`, as `scaling.memory.memory_per_device` takes it; 'none' for a config without one).
    kernel='executed' counts what the kernels run, the routed experts' rows by `executed_slots`: pass the mesh's
    `expert_shards` (dropless with experts sharded runs E rows per token, E/K× the model's).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Real) or not seq_len >= 1:
        raise ValueError(f"train_flops_per_token: seq_len={seq_len!r} must be >= 1 token")
    # the config's policy (a remat='full' config's hardware FLOPs counted 'none': its HFU read 23% low); checked
    # without include_recompute too, where a misspelt one was ignored
    remat = (getattr(cfg, "remat", None) or "none") if remat is None else remat
    if remat not in RECOMPUTE_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {RECOMPUTE_POLICIES}")
    s = lm_shape(cfg, windows=windows, moe=moe)
    # kernel='executed': capacity dispatch's padded slots too (forward_flops_per_token counts them)
    f = 3.0 * forward_flops_per_token(s, seq_len, kernel=kernel, block=block, expert_shards=expert_shards)
    if include_recompute:
        f += recompute_flops_per_token(s, seq_len, remat, kernel=kernel, block=block, expert_shards=expert_shards)
    return f


def decode_flops_per_token(cfg, context_len: int, *, cache_len: int | None = None, windows=None,
                           moe=None) -> float:
    """Inference FLOPs to generate one token with `context_len` tokens already in the KV cache.

    Each layer attends to min(window, context_len + 1) keys. models.generate's fixed-size cache executes more:
    pass its `cache_len` (KVCache.zeros' max_len). A layer of S slots (cache_len for global layers, a rolling
    buffer of min(W, cache_len) for local ones, the new token written into it first) then scores its written
    slots, min(context_len + 1, S), rounded up to a bucket (`prefix_keys`), and MoE layers count the expert rows the
    step runs (`executed_slots`): with a cache capacity dispatch runs dropless through C = T buffers, so a one-token
    row takes a slot in every expert, E rows per token, not top_k (the sorted dropless kernels run top_k).
    """
    _whole("context_len", context_len, 0)
    if cache_len is not None:
        _whole("cache_len", cache_len)
    if context_len < 0 or (cache_len is not None and cache_len < context_len + 1):
        raise ValueError(f"decode_flops_per_token: context_len={context_len} must be >= 0 and cache_len={cache_len} "
                         "(None or the cache's size) must hold the context and the new token")
    s = lm_shape(cfg, windows=windows, moe=moe)
    keys = 0.0
    for w in s.windows:
        if cache_len is None:
            keys += context_len + 1 if w is None else min(w, context_len + 1)
        else:
            slots = cache_len if w is None else min(w, cache_len)
            keys += prefix_keys(min(context_len + 1, slots), slots)
    f = matmul_flops_per_token(s)
    if cache_len is not None and s.moe is not None:  # top_k rows a token counted above; the step runs these
        f += _routed_forward(_cached_moe(s), 1, True) - _routed_forward(s, 1, False)
    return f + 4.0 * s.n_heads * s.head_dim * keys


PREFIX_MIN = 64  # models.transformer.PREFIX_MIN, spelt out so that this module imports no jax (a test pins them)


def prefix_keys(used: int, slots: int) -> int:
    """Keys a cached attention (models.transformer) scores with `used` of a layer's `slots` cache slots written: the
    smallest of PREFIX_MIN, 2·PREFIX_MIN, ... (below `slots`) and `slots` that holds them."""
    n = PREFIX_MIN
    while n < used:
        n *= 2
    return min(n, slots)


def chinchilla_flops(n_params: float, n_tokens: float) -> float:
    """C = 6·N·D, the approximation Hoffmann et al. 2022 (and `scaling.laws`) use; numbers or arrays, finite and > 0
    (a negative N gave a negative compute)."""
    from scaling.laws import _positive  # (scipy: not imported with scaling.flops)

    for name, v in (("n_params", n_params), ("n_tokens", n_tokens)):  # _positive reads '1e9' as a number, 6 * did not
        if isinstance(v, str | bytes):
            raise ValueError(f"chinchilla_flops: {name} must be a number or an array, got {v!r}")
        _positive(v, f"chinchilla_flops: {name}")
    return 6.0 * n_params * n_tokens


# ---- MFU ----------------------------------------------------------------------------------------


def _finite_number(v, above: bool) -> bool:
    """Whether `v` (a number, numpy / jax scalar included) is finite and > 0 (`above`) or >= 0; a string, bool or None
    is not (a string raised a bare TypeError, '>=' between str and int)."""
    if isinstance(v, str | bytes | bool) or v is None:
        return False
    try:
        return bool((v > 0 if above else v >= 0) and math.isfinite(v))
    except (TypeError, ValueError):  # another object, or an array of several values (ambiguous truth)
        return False


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the peak of all devices.

    tokens_per_s: global training throughput (tokens/s, all devices); flops_per_token: *model*
    FLOPs per token, e.g. `train_flops_per_token(cfg, seq_len)` (no remat recompute — that would be
    HFU); peak_flops_per_device: FLOP/s per device, e.g. `scaling.hardware.peak_flops('h100', 'bf16')`.
    """
    for name, v in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if not _finite_number(v, above=False):
            raise ValueError(f"mfu: {name} must be finite and >= 0, got {v!r}")
    _whole("mfu: n_devices", n_devices)
    if not _finite_number(peak_flops_per_device, above=True):  # inf: an MFU of 0, silently
        raise ValueError(f"mfu: peak_flops_per_device must be finite and > 0 FLOP/s, got {peak_flops_per_device!r}")
    u = tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)
    if u > 1.0 + 1e-6:  # above the peak: a unit slip (TFLOP/s given for FLOP/s) or a per-device / global mix-up
        raise ValueError(f"mfu: {u:.3g} > 1, above the devices' peak; peak_flops_per_device is in FLOP/s (e.g. "
                         f"peak_flops('h100') = 9.9e14, got {peak_flops_per_device:g}) and tokens_per_s counts all "
                         f"{n_devices} device(s)")
    return u
