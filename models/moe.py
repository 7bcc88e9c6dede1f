"""Mixture-of-Experts SwiGLU layer (Mixtral, DeepSeek-V3, Switch/GShard) in Flax NNX, used functionally.

`y_BTD, aux = MoE(d_model, MoEConfig(...), rngs=...)(x_BTD)` replaces a dense MLP: a router picks `top_k` of
`n_experts` SwiGLU experts per token and combines their outputs with the router weights; optional shared experts
always run. `aux` carries the unweighted auxiliary losses and per-step routing metrics (see `MoE.__call__`).

Shapes: B batch rows, T tokens per row, D d_model, E experts, K experts per token, F expert width, C slots per
expert per row (capacity), G token groups, N tokens per group, A = N·K assignments, R padded rows.

Dispatch. `capacity` (GShard): each row is a routing group; an expert takes at most C = ceil(K·T/E·CF) of a row's
assignments, queued in token order (token t's K choices, then token t+1's: MaxText's order), and the overflow is
dropped. GShard's order (all first choices, then all second choices) would let a later token's first choice evict an
earlier token's second choice, i.e. future tokens would change earlier outputs; in token order whether an assignment is
kept depends only on the tokens up to it and on the row length T (C is computed from it), so later tokens' contents
never change earlier outputs, but their number can. With a KV cache (inference: prefill and one-token decode steps)
capacity layers run dropless (C = T), so any chunking of a prompt gives the same logits: per-call capacities would
drop in the prefill and never in decode (C = 1). Padding tokens (valid_BT False) are not routed:
they take no slot, output 0 and are left out of the aux statistics. The dispatch and combine are
gathers into [E, B, C, D] buffers rather than GShard's one-hot einsums: the same values at O(E·C·D) cost instead of
O(T·E·C·D), which would exceed the expert FLOPs for rows of a few thousand tokens. `dropless` computes every
assignment: sort by expert, grouped matmul, unsort (`dropless_impl`; the implementations are in models/moe_dispatch.py).

Parallelism is GSPMD with logical names only. Capacity buffers are constrained to ('expert', 'batch', ...), so a
mesh with an `expert` axis exchanges tokens with one all-to-all each way while expert weights stay sharded. Dropless
sorts within groups of rows that live on one device (one group per `batch` shard), so the sort never crosses
devices; with experts sharded it runs as capacity dispatch with C = T (nothing can drop: fixed-size buffers, since
ragged all-to-all is unavailable on CPU), which costs E/K× the expert FLOPs. That is dropless_impl='auto'; an explicit
sorted or dense implementation gathers every expert onto each device instead (and warns).
"""

from __future__ import annotations

import dataclasses
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import _is_int as is_int, _is_real as is_real
from models.glu import ACTIVATIONS
from models.linear import flat_rows, linear
from models.moe_dispatch import DROPLESS_IMPLS, capacity_dispatch, dropless_dispatch, resolve_dropless_impl, swiglu
from models.params import param
from parallel.rules import constrain


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer. Mixtral 8x7B: MoEConfig(8, 2, 14336); DeepSeek-V3-style: router='sigmoid', many small
    experts (fine-grained: large E and K, small F) plus n_shared_experts always-on ones."""

    n_experts: int = 8
    top_k: int = 2
    expert_mlp_dim: int = 512  # hidden width F of each SwiGLU expert
    n_shared_experts: int = 0  # always-on experts, run as one dense SwiGLU of width n_shared · F
    router: str = "softmax"  # 'softmax' (Mixtral) | 'sigmoid' (DeepSeek-V3)
    renormalize: bool = True  # top-k weights sum to 1 (top_k=1 needs False: Switch; else the weight is always 1)
    router_jitter: float = 0.0  # Switch: router input × U(1 - j, 1 + j), only when an rng is passed
    dispatch: str = "dropless"  # 'dropless' | 'capacity'
    capacity_factor: float = 1.25  # capacity dispatch: C = ceil(K·T/E·CF) slots per expert per row
    # dispatch='dropless' only (capacity ignores it): auto = ragged_dot on GPU/TPU, CPU_DROPLESS_IMPL on CPU,
    # capacity with C = T if experts are sharded
    dropless_impl: str = "auto"
    # 'gmm' tile rows, largest first, each a multiple of the next; None: default_tile_rows. The best set depends
    # on the machine and shape (docs/benchmarks.md, Mixture of Experts)
    gmm_tile_rows: tuple[int, ...] | None = None
    lb_loss_weight: float = 0.01  # for the trainer: weight of aux['lb_loss']
    z_loss_weight: float = 0.001  # for the trainer: weight of aux['z_loss']
    bias_update_rate: float = 0.001  # for the trainer: update_router_bias step (aux-loss-free balancing)
    mlp_act: str = "silu"

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"MoEConfig.{field}: {msg}")

        for f in ("n_experts", "top_k", "expert_mlp_dim", "n_shared_experts"):
            if is_int(getattr(self, f)):  # numpy ints as plain ints: configs go to JSON
                object.__setattr__(self, f, int(getattr(self, f)))
        for f in ("router_jitter", "capacity_factor", "lb_loss_weight", "z_loss_weight", "bias_update_rate"):
            v = getattr(self, f)  # numpy floats as plain floats; a string or inf failed later, unnamed
            need(is_real(v), f, f"must be a finite number, got {v!r}")
            object.__setattr__(self, f, float(v))
        need(isinstance(self.renormalize, bool | np.bool_), "renormalize",
             f"must be True or False, got {self.renormalize!r}")
        object.__setattr__(self, "renormalize", bool(self.renormalize))
        for f in ("n_experts", "top_k", "expert_mlp_dim"):
            v = getattr(self, f)
            need(is_int(v) and v > 0, f, f"must be a positive int, got {v!r}")
        need(self.top_k <= self.n_experts, "top_k", f"{self.top_k} > n_experts={self.n_experts}; pick at most E")
        if self.top_k == 1 and self.n_experts > 1 and self.renormalize:
            warnings.warn("MoEConfig(top_k=1, renormalize=True): every combine weight is exactly 1, so the router "
                          "learns from the balancing losses only, never from the task loss; Switch-style top-1 "
                          "routing scales the expert by its probability: set renormalize=False", stacklevel=3)
        need(is_int(self.n_shared_experts) and self.n_shared_experts >= 0, "n_shared_experts",
             f"must be an int >= 0, got {self.n_shared_experts!r}")
        need(self.router in ("softmax", "sigmoid"), "router", f"unknown {self.router!r}; use softmax or sigmoid")
        need(0 <= self.router_jitter < 1, "router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        need(self.dispatch in ("dropless", "capacity"), "dispatch",
             f"unknown {self.dispatch!r}; use dropless or capacity")
        need(self.capacity_factor > 0, "capacity_factor", f"must be positive, got {self.capacity_factor}")
        need(self.dropless_impl in DROPLESS_IMPLS, "dropless_impl",
             f"unknown {self.dropless_impl!r}; use one of {DROPLESS_IMPLS}")
        t = self.gmm_tile_rows
        if t is not None:
            if isinstance(t, (list, tuple)) and all(is_int(v) for v in t):
                t = tuple(int(v) for v in t)  # JSON gives a list; a tuple keeps the config hashable
                object.__setattr__(self, "gmm_tile_rows", t)
            need(isinstance(t, tuple) and t and all(is_int(v) and v > 0 for v in t), "gmm_tile_rows",
                 f"must be None or positive ints, largest first, e.g. (512, 128), got {t!r}")
            need(all(a > b and a % b == 0 for a, b in zip(t, t[1:])), "gmm_tile_rows",
                 f"each size must be a larger multiple of the next (the tiles cover runs greedily), got {t}")
        for f in ("lb_loss_weight", "z_loss_weight", "bias_update_rate"):
            need(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        need(isinstance(self.mlp_act, str) and self.mlp_act in ACTIVATIONS, "mlp_act",  # (a list: "unhashable type")
             f"unknown {self.mlp_act!r}; use silu or gelu_tanh")

    @property
    def shared_mlp_dim(self) -> int:
        return self.n_shared_experts * self.expert_mlp_dim

    def capacity(self, tokens_per_row: int) -> int:
        """Slots per expert per row: ceil(K·T/E·CF) exactly (`scaling.flops.capacity_slots`), at most T (an expert
        sees a token at most once)."""
        from scaling.flops import capacity_slots

        if jax.export.is_symbolic_dim(tokens_per_row):  # jax.export's symbolic length: the same exact ceil, as a
            # dimension expression (K·CF/E >= 1 is clamped to T; below 1 the ceil is already within [1, T])
            r = Fraction(self.top_k) * Fraction(repr(self.capacity_factor)) / self.n_experts
            return tokens_per_row if r >= 1 else -(-tokens_per_row * r.numerator // r.denominator)
        return capacity_slots(self.top_k, tokens_per_row, self.capacity_factor, self.n_experts)

    def active_params_per_token(self, d_model: int) -> int:
        """Matmul parameters a token uses: router, K routed experts, shared experts (not the selection bias)."""
        return d_model * self.n_experts + 3 * d_model * (self.top_k * self.expert_mlp_dim + self.shared_mlp_dim)

    def param_count(self, d_model: int) -> int:
        """All parameters of the layer: router and its bias, E experts, shared experts."""
        e = self.n_experts
        return d_model * e + e + 3 * d_model * (e * self.expert_mlp_dim + self.shared_mlp_dim)


class MoE(nnx.Module):
    """Router + E routed SwiGLU experts (+ shared experts). Parameters carry logical axes only."""

    def __init__(self, d_model: int, cfg: MoEConfig, *, param_dtype=jnp.float32, init_std=0.02,
                 router_std: float | None = None, rngs: nnx.Rngs):
        """router_std: the router's init std (None: init_std); μP's Transformer passes init_std / m for it."""
        self.cfg = cfg
        d, e, f, fs, pd = d_model, cfg.n_experts, cfg.expert_mlp_dim, cfg.shared_mlp_dim, param_dtype
        # Logical names are not mesh axes: no eager sharding (parallel.sharding places params after init).
        with nnx.use_eager_sharding(False):
            self.router = param(rngs, (d, e), ("embed", None), pd, init_std if router_std is None else router_std)
            # Selection-only bias (aux-loss-free balancing): read through stop_gradient, so the optimizer sees zero
            # gradients; the trainer moves it with update_router_bias. Stays 0 for Mixtral-style routing. float32
            # whatever param_dtype: its ±rate steps (1e-3) round away in bf16 once |bias| >= 0.5.
            self.router_bias = param(rngs, (e,), (None,), jnp.float32, 0)
            self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, init_std)
            self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, init_std)
            self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd, init_std)
            if fs:
                self.shared_gate = param(rngs, (d, fs), ("embed", "mlp"), pd, init_std)
                self.shared_up = param(rngs, (d, fs), ("embed", "mlp"), pd, init_std)
                self.shared_down = param(rngs, (fs, d), ("mlp", "embed"), pd, init_std)

    def __call__(self, x_BTD, *, compute_dtype=jnp.float32, rng=None, valid_BT=None,
                 inference: bool = False) -> tuple[jax.Array, dict]:
        """x [B, T, D] → (y [B, T, D] in compute_dtype, aux). inference: capacity dispatch runs dropless (C = T), as
        the Transformer asks with a KV cache (see the module docstring).

        valid_BT: [B, T] bool, False for padding tokens (the Transformer's padding_mask), or None (all real). Padding
        tokens are not routed: no capacity slot, routed output 0 (shared experts still run on them), and they count in
        none of the aux values. The capacity C is still computed from T, pads included (shapes are static).
        aux: 'lb_loss' and 'z_loss' (scalars, unweighted: the trainer multiplies by cfg.lb_loss_weight and
        cfg.z_loss_weight), 'load' [E] (fraction of the routed assignments of real tokens per expert, sums to 1, or
        all 0 if no token is real: feed it to update_router_bias and log it as tokens per expert), 'dropped_frac'
        (fraction of those assignments dropped by capacity dispatch; 0 when dropless). rng: a key, used for router
        jitter only. The router runs in float32 (ST-MoE: bf16 routers are unstable); experts run in compute_dtype.
        """
        d = self.router.shape[0]
        if jnp.ndim(x_BTD) != 3 or x_BTD.shape[-1] != d:  # else a tuple unpack or the router's dot failed, unnamed
            raise ValueError(f"MoE x: shape {tuple(jnp.shape(x_BTD))}; pass [B, T, D] with D = d_model = {d} "
                             f"(a [N, D] batch of tokens as x[None])")
        cfg, (B, T, _), K = self.cfg, x_BTD.shape, self.cfg.top_k
        if B * T == 0:  # else a ZeroDivisionError in a reshape (or 'tokens=0' from the capacity), naming neither
            raise ValueError(f"MoE x: shape {tuple(x_BTD.shape)} holds no tokens (B·T = 0): nothing to route; skip "
                             "the call for an empty batch, or pad it to one token with valid_BT False")
        if valid_BT is not None and jnp.shape(valid_BT) != (B, T):  # else a reshape or broadcast failed, unnamed
            raise ValueError(f"MoE valid_BT: shape {jnp.shape(valid_BT)}, but x [B, T, D] is {tuple(x_BTD.shape)}; "
                             f"pass one bool per token, [B, T] = ({B}, {T}), True for real tokens")
        valid_BT = None if valid_BT is None else jnp.asarray(valid_BT).astype(bool)  # 0/1 ints: `&`, `~` stay logical
        x_BTD = x_BTD.astype(compute_dtype)
        xr_BTD = x_BTD.astype(jnp.float32)
        if rng is not None and cfg.router_jitter > 0:
            xr_BTD *= jax.random.uniform(rng, xr_BTD.shape, jnp.float32, 1 - cfg.router_jitter, 1 + cfg.router_jitter)
        logits_BTE = linear(xr_BTD, self.router[...].astype(jnp.float32), "plain", flatten=flat_rows())
        bias_E = jax.lax.stop_gradient(self.router_bias[...]).astype(jnp.float32)
        weights_BTK, experts_BTK, probs_BTE = route(logits_BTE, bias_E, K, cfg.router, cfg.renormalize)
        if valid_BT is not None:  # where, not a product: a pad's weights never reach the output, even if not finite
            weights_BTK = jnp.where(valid_BT[..., None], weights_BTK, 0.0)
        flat_probs_NE, flat_experts_NK = probs_BTE.reshape(B * T, -1), experts_BTK.reshape(B * T, K)
        valid_N = None if valid_BT is None else valid_BT.reshape(B * T)
        if cfg.router == "sigmoid":  # balance the normalised scores (DeepSeek-V3's sequence-wise loss does too);
            # s / Σ s as a softmax of log σ: σ underflows to 0 for every expert below ~-88 and 0 / 0 is NaN
            flat_probs_NE = jax.nn.softmax(jax.nn.log_sigmoid(logits_BTE.reshape(B * T, -1)), axis=-1)
        aux = {"lb_loss": load_balancing_loss(flat_probs_NE, flat_experts_NK, cfg.n_experts, valid_N),
               "z_loss": router_z_loss(logits_BTE.reshape(B * T, -1), valid_N),
               "load": expert_load(flat_experts_NK, cfg.n_experts, valid_N)}

        w = tuple(p[...].astype(compute_dtype) for p in (self.w_gate, self.w_up, self.w_down))
        act = ACTIVATIONS[cfg.mlp_act]
        impl = resolve_dropless_impl(cfg.dropless_impl) if cfg.dispatch == "dropless" else "capacity"
        if impl == "capacity":  # dropless through capacity buffers: C = T, an expert sees a token at most once
            cap = cfg.capacity(T) if cfg.dispatch == "capacity" and not inference else T
            y_BTD, aux["dropped_frac"] = capacity_dispatch(x_BTD, weights_BTK, experts_BTK, w, act, cap, valid_BT)
        else:  # pads computed as zero rows: a zero weight times a pad's non-finite expert output (or one that
            # overflows, from a finite x of ~1e30) is NaN, where capacity dispatch gives 0; and its gradient too
            x_in = x_BTD if valid_BT is None else jnp.where(valid_BT[..., None], x_BTD, 0).astype(x_BTD.dtype)
            y_BTD = dropless_dispatch(x_in, weights_BTK, experts_BTK, w, act, impl, cfg.gmm_tile_rows)
            aux["dropped_frac"] = jnp.zeros((), jnp.float32)
        if cfg.shared_mlp_dim:
            sw = tuple(p[...].astype(compute_dtype) for p in (self.shared_gate, self.shared_up, self.shared_down))
            rows = x_BTD.reshape(-1, x_BTD.shape[-1]) if flat_rows() else x_BTD  # 2-D: faster XLA:CPU gradients
            y_BTD = y_BTD + swiglu(rows, *sw, act).reshape(x_BTD.shape)
        return constrain(y_BTD.astype(compute_dtype), ("batch", "act_seq", "act_embed")), aux


# ---- routing and losses ------------------------------------------------------------------------------------------

def route(logits_TE, bias_E, top_k: int, router: str = "softmax", renormalize: bool = True):
    """Router logits [..., E] → (weights [..., K] f32, experts [..., K] int32, probs [..., E] f32).

    softmax (Mixtral): probs = softmax over all E, pick the top-k, weights = their probs.
    sigmoid (DeepSeek-V3): probs = sigmoid scores, the same per expert. Either way experts are chosen by
    probs + bias_E and weighted by probs alone, so the bias steers load without entering the output or gradients.
    renormalize: weights / their sum.
    """
    if router not in ("softmax", "sigmoid"):  # else any other name fell through to sigmoid routing, silently
        raise ValueError(f"route: router={router!r}; use softmax or sigmoid")
    logits_TE = logits_TE.astype(jnp.float32)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1) if router == "softmax" else jax.nn.sigmoid(logits_TE)
    # bias [E] broadcast explicitly: an implicit rank promotion is an error under jax_numpy_rank_promotion='raise'
    experts_TK = top_k_indices(jax.lax.stop_gradient(probs_TE) + jnp.broadcast_to(bias_E, probs_TE.shape), top_k)
    weights_TK = jnp.take_along_axis(probs_TE, experts_TK, axis=-1)
    if renormalize:  # p / Σ p as a softmax of the chosen log p: a diverged sigmoid router's scores (every chosen
        # logit below ~-41) fell under p / (Σ p + 1e-20)'s epsilon, shrinking the weights, to 0 below ~-88
        log_TE = jax.nn.log_softmax(logits_TE, axis=-1) if router == "softmax" else jax.nn.log_sigmoid(logits_TE)
        weights_TK = jax.nn.softmax(jnp.take_along_axis(log_TE, experts_TK, axis=-1), axis=-1)
    return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def top_k_indices(scores_TE, k: int):
    """Indices [..., k] of the k largest scores, largest first; ties: lower index first.
    Not lax.top_k: its SPMD partitioner all-gathers batch-sharded scores. Small k: k argmax passes (elementwise
    reductions; ≈ 4× faster than a sort of [2048, 8] on CPU); larger k: a stable sort."""
    if not 0 < k <= scores_TE.shape[-1]:  # else the argmax passes repeat index 0 and the sort returns E columns
        raise ValueError(f"top_k_indices: k={k} with {scores_TE.shape[-1]} scores per row; pick 1 <= k <= E")
    if k > 4:
        return jnp.argsort(-scores_TE, axis=-1, stable=True)[..., :k]
    out, taken_TE = [], jnp.zeros(scores_TE.shape, bool)
    for _ in range(k):
        i_T = jnp.argmax(jnp.where(taken_TE, -jnp.inf, scores_TE), axis=-1)
        # every unpicked score -inf (an expert pruned by a -inf bias): argmax returned the first -inf, maybe a picked
        # one (the token then took one expert twice); the tie's lowest unpicked index is the sort's
        hot_TE = jax.nn.one_hot(i_T, scores_TE.shape[-1], dtype=bool)  # (no gather: batch-sharded rows stay put)
        i_T = jnp.where(jnp.any(hot_TE & taken_TE, axis=-1), jnp.argmax(~taken_TE, axis=-1), i_T)
        out.append(i_T)
        taken_TE = taken_TE | jax.nn.one_hot(i_T, scores_TE.shape[-1], dtype=bool)
    return jnp.stack(out, axis=-1)


def _token_rows(fn: str, valid_T, **arrays):
    """Each array [..., X] as rows [T, X] and valid_T [...] as [T]: route's [B, T, ·] outputs go in as they are, the
    same tokens as [B·T, ·] rows. Their token shapes (all but the last axis; valid_T's whole) must agree."""
    lead = {name: tuple(jnp.shape(a)[:-1]) for name, a in arrays.items()}
    if valid_T is not None:
        lead["valid_T"] = tuple(jnp.shape(valid_T))
    if len(set(lead.values())) > 1:  # else a reshape or broadcast failed, naming neither array
        raise ValueError(f"{fn}: token shapes differ ({', '.join(f'{k} {v}' for k, v in lead.items())}); pass "
                         "one row per token in each, and valid_T one bool per token (or None)")
    rows = tuple(jnp.reshape(a, (-1, jnp.shape(a)[-1])) for a in arrays.values())
    return rows, None if valid_T is None else jnp.reshape(valid_T, -1)


def _token_weights(valid_T, n: int):
    """Per-token weights [T] float32: 1 for real tokens (all when valid_T is None), and their count (at least 1).
    valid_T as a mask (nonzero: real, as MoE's astype(bool)): a float 0.5 weighted the counts but not the masked sums
    over real tokens, so P summed to 2 and a balanced router's lb_loss read 2.0"""
    v_T = jnp.ones(n, jnp.float32) if valid_T is None else valid_T.reshape(n).astype(bool).astype(jnp.float32)
    return v_T, jnp.maximum(v_T.sum(), 1.0)


def expert_load(experts_TK, n_experts: int, valid_T=None):
    """Fraction of the routed assignments of real tokens (valid_T [T] bool; None: all) per expert: [E], sums to 1
    (all 0 when no token is real). experts [T, K] (or route's [..., K], valid_T [...])."""
    (experts_TK,), valid_T = _token_rows("expert_load", valid_T, experts=experts_TK)
    v_T, n = _token_weights(valid_T, experts_TK.shape[0])
    counts_E = jnp.zeros(n_experts, jnp.float32).at[experts_TK.reshape(-1)].add(
        jnp.repeat(v_T, experts_TK.shape[-1]))
    return counts_E / (n * experts_TK.shape[-1])


def load_balancing_loss(probs_TE, experts_TK, n_experts: int, valid_T=None):
    """Switch/GShard load-balancing loss E · Σ_e f_e · P_e.

    f_e: fraction of the routed assignments that went to expert e (Σ_e f_e = 1; no gradient).
    P_e: mean over (real) tokens of the router probability of e (probs rows sum to 1).
    Normalisation: perfect balance (f_e = P_e = 1/E) gives 1.0 for every k, as in Megatron-LM. Hugging Face
    Mixtral's load_balancing_loss_func counts f per choice (Σ f = k), so its value and anchor are k times this:
    use lb_loss_weight = k · router_aux_loss_coef to reproduce a Mixtral recipe (exactly for one MoE layer: HF pools
    every layer's f and P before the product, the model averages per-layer losses; 2.107 against 2.242 measured on a
    two-layer Mixtral).
    valid_T: [T] bool, False for padding tokens (left out of f and P); None: all tokens count. probs [T, E] and
    experts [T, K] (or route's [..., E], [..., K] with valid_T [...]).
    """
    (probs_TE, experts_TK), valid_T = _token_rows("load_balancing_loss", valid_T, probs=probs_TE,
                                                  experts=experts_TK)
    if probs_TE.shape[-1] != n_experts:  # else a broadcast of f [n_experts] against P [E] failed, unnamed
        raise ValueError(f"load_balancing_loss: n_experts={n_experts}, but probs has {probs_TE.shape[-1]} per token; "
                         "pass the router's expert count")
    f_E = expert_load(experts_TK, n_experts, valid_T)
    v_T, n = _token_weights(valid_T, probs_TE.shape[0])
    p_E = jnp.sum(jnp.where(v_T[:, None] > 0, probs_TE.astype(jnp.float32), 0.0), 0) / n
    return n_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE, valid_T=None):
    """ST-MoE router z-loss: mean over real tokens (valid_T [T] bool; None: all) of logsumexp(logits)²; keeps
    router logits small. logits [T, E] (or [..., E] with valid_T [...])."""
    (logits_TE,), valid_T = _token_rows("router_z_loss", valid_T, logits=logits_TE)
    v_T, n = _token_weights(valid_T, logits_TE.shape[0])
    z_T = jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1))
    return jnp.sum(jnp.where(v_T > 0, z_T, 0.0)) / n


def update_router_bias(bias_E, load_E, rate: float):
    """DeepSeek-V3 auxiliary-loss-free balancing, outside the optimizer: bias += rate · sign(mean load − load), i.e.
    overloaded experts become less likely to be selected. load_E: aux['load'] (summed or averaged over layers
    and microbatches as the trainer likes; only its sign against the mean matters). Its shape must broadcast to
    bias_E's without changing it: a bias [E] given the per-layer load [L_moe, E] came back [L_moe, E], silently."""
    b, ld = tuple(jnp.shape(bias_E)), tuple(jnp.shape(load_E))
    if b[-1:] != ld[-1:] or len(ld) > len(b) or any(x not in (1, y) for x, y in zip(ld[::-1], b[::-1])):
        raise ValueError(f"update_router_bias: load {ld} does not match bias {b}: pass one load per expert for each "
                         "bias row, e.g. aux['load'] [L_moe, E] for the stacked bias [L_moe, E], or average it over "
                         "layers (and microbatches) first for one layer's bias [E]")
    return (bias_E + rate * jnp.sign(jnp.mean(load_E, -1, keepdims=True) - load_E)).astype(bias_E.dtype)
