"""Frozen configuration of the decoder Transformer.

The config is the single source of truth for shapes: it validates itself (errors name the field
and the fix) and computes its own parameter count and FLOPs per token, Levanter-style.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from models.moe import MoEConfig

RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch"]
AttnImpl = Literal["xla", "cudnn", "reference"]
SwaImpl = Literal["auto", "blocked", "cudnn", "splash", "dense"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind='llama3'` follows Llama 3.1; `kind='linear'` divides positions; `kind='yarn'`
    is YaRN (Peng et al. 2023, as transformers computes it): frequencies of wavelengths beyond
    original_max_position_embeddings / beta_slow rotations interpolated by `factor`, those within / beta_fast kept,
    a linear ramp between, and cos / sin scaled by `attention_factor` (default 0.1·ln(factor) + 1, or the ratio of
    mscale / mscale_all_dim's, DeepSeek's)."""

    kind: Literal["llama3", "linear", "yarn"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0  # yarn only, from here on
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True  # the ramp's ends rounded to whole dimensions

    def __post_init__(self):
        for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                  "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = getattr(self, f)
            if v is None and f in ("mscale", "mscale_all_dim", "attention_factor"):
                continue
            if not _is_real(v):
                raise ValueError(f"RopeScaling.{f}: must be a number, got {v!r}")
            object.__setattr__(self, f, int(v) if _is_int(v) else float(v))  # numpy scalars: configs go to JSON
        if not isinstance(self.truncate, bool):
            raise ValueError(f"RopeScaling.truncate: must be True or False, got {self.truncate!r}")
        if self.kind not in ("llama3", "linear", "yarn"):
            raise ValueError(f"RopeScaling.kind: unknown {self.kind!r}; use 'llama3', 'linear' or 'yarn' (others, "
                             "e.g. dynamic NTK, are not implemented)")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor: must be positive, got {self.factor}")
        if self.kind == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0
                                        and self.original_max_position_embeddings >= 1):
            raise ValueError("RopeScaling: yarn needs beta_fast > 0, beta_slow > 0 and original_max_position_embeddings"
                             f" >= 1, got {self.beta_fast}, {self.beta_slow}, {self.original_max_position_embeddings}")
        # YaRN's alone: llama3 / linear scalings never read them, so a scale set there was silently dropped
        # (attention_scale(...) is 1.0 for RopeScaling(kind='linear', attention_factor=2.0))
        for f in ("mscale", "mscale_all_dim", "attention_factor"):
            if self.kind != "yarn" and getattr(self, f) is not None:
                raise ValueError(f"RopeScaling.{f}: only kind='yarn' uses it; kind={self.kind!r} would ignore "
                                 f"{f}={getattr(self, f)}; use kind='yarn' or leave {f}=None")
        # the same for YaRN's ramp and llama3's band, whose fields have defaults: one moved off its default on another
        # kind was read by nothing (kind='llama3', beta_fast=16 ran llama3 as if beta_fast were unset)
        for f, kind in (("beta_fast", "yarn"), ("beta_slow", "yarn"), ("truncate", "yarn"),
                        ("low_freq_factor", "llama3"), ("high_freq_factor", "llama3")):
            default = RopeScaling.__dataclass_fields__[f].default
            if self.kind != kind and getattr(self, f) != default:
                raise ValueError(f"RopeScaling.{f}: only kind={kind!r} uses it; kind={self.kind!r} would ignore "
                                 f"{f}={getattr(self, f)}; use kind={kind!r} or leave {f}={default}")
        if self.kind == "yarn" and self.beta_fast < self.beta_slow:  # swapped: interpolates the fast dims instead
            raise ValueError(f"RopeScaling.beta_fast: must be >= beta_slow (YaRN keeps the dims rotating more than "
                             f"beta_fast times and interpolates those under beta_slow; 32 and 1 are usual), got "
                             f"beta_fast={self.beta_fast}, beta_slow={self.beta_slow}: swap them")
        for f in ("mscale", "mscale_all_dim"):  # a negative one made the attention factor negative, or 1 / 0
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise ValueError(f"RopeScaling.{f}: must be >= 0 (0 or None: unset, the attention factor then "
                                 f"0.1·ln(factor) + 1), got {getattr(self, f)}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"RopeScaling.attention_factor: must be positive, got {self.attention_factor}")
        if self.kind == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor
                                          and self.original_max_position_embeddings >= 1):
            raise ValueError("RopeScaling: llama3 needs 0 < low_freq_factor < high_freq_factor and "
                             f"original_max_position_embeddings >= 1, got {self.low_freq_factor}, "
                             f"{self.high_freq_factor}, {self.original_max_position_embeddings}")


# Weights whose fan-in and fan-out both grow with the width ("hidden" in μP): Adam's step on them scales by 1 / m.
# Routed experts count as hidden when expert_mlp_dim grows with the width, as it does when scaled with d_model.
MUP_HIDDEN = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")
# Output-like weights inside the body: fan-in grows, fan-out (E experts) does not. μP's Adam step is 1 / m on them
# too (1 / fan_in); without it the router's logit change per step grew linearly with the width. Their init is μP's
# for output weights, std init_std / m (variance ∝ 1 / fan_in², Tensor Programs V Table 3), not the hidden 1 / sqrt(m).
MUP_OUTPUT = ("router",)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Llama/Mistral/Qwen-family decoder. All sizes are per model, not per device."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1: MQA; anything dividing n_heads: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 1024  # SwiGLU hidden width (HF intermediate_size)
    # the context length trained for (the trainer refuses longer rows; HF's max_position_embeddings). RoPE is computed
    # for any position, so the model runs past it, as length-extrapolation work needs; `generate` warns
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    # local (sliding-window) layers' own RoPE base, unscaled (Gemma 3's rope_local_base_freq: 1e4 locally, 1e6 with
    # rope_scaling globally); None: every layer rotates with rope_theta and rope_scaling
    local_rope_theta: float | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    attn_impl: AttnImpl = "xla"  # global layers; local (sliding-window) layers follow swa_impl ('dense': the oracle)
    # query block of the 'xla' kernel for global causal attention: key blocks above the diagonal are
    # skipped ((Q + 1) / 2Q of the dense [T, T] work for Q = T / attn_block, at most 16 blocks: longer sequences
    # get T / 16 rows a block, models.attention.causal_block_rows); None: one dense block
    attn_block: int | None = 64
    # projections' products (models.linear): 'auto' computes their weight gradients from a materialised
    # transpose of the activation or of its cotangent on CPU (XLA:CPU then uses its fast kernels for them),
    # plain x @ w elsewhere
    matmul_impl: Literal["auto", "plain", "transposed_grad"] = "auto"
    scan_layers: bool = True
    # layer groups per scan iteration (jax.lax.scan's `unroll`); True: every layer, no while loop, so no
    # per-iteration slicing / stacking of residuals (~5% faster on CPU at 4 layers) for a longer compile
    scan_unroll: int | bool = 1
    remat: RematPolicy = "none"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax, logits and bias-gradient sums stay float32
    init_std: float = 0.02
    # --- attention pattern: which layers are local (sliding window) and their windows ---
    # 'global' | 'local' | 'alternating' (local first, Gemma 2) | 'N:1' (Gemma 3) | one letter per layer, L local
    # or G global ('GGLL': Qwen2's sliding layers from max_window_layers on)
    attn_pattern: str = "global"
    sliding_window: int | tuple[int, ...] | None = None  # W (query i sees i-W < j <= i); a tuple: one per local layer
    swa_impl: SwaImpl = "auto"  # auto: cudnn on GPU, splash on TPU, blocked elsewhere, under plain_autodiff and in a
    # pipeline's stages (splash cannot run in their shard_map)
    swa_block: int = 256  # query block of the blocked kernel
    attn_logit_softcap: float | None = None  # cap·tanh(s / cap) on attention scores (Gemma 2)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5 instead of head_dim**-0.5
    # RMSNorm over each head's H of q and k, after their projections (and biases), before RoPE, with a learned [H]
    # scale each (Qwen 3, Gemma 3; Dehghani et al. 2023): bounds the attention logits' growth in training
    qk_norm: bool = False
    # what one q / k norm's RMS runs over: 'head' (each head's H, an [H] scale: Qwen 3, Gemma 3) or 'all_heads' (the
    # whole projection, N·H for q and K·H for k, scales [N, H] and [K, H]: OLMo 2)
    qk_norm_scope: Literal["head", "all_heads"] = "head"
    # --- block variants (Gemma 2, OLMo 2) ---
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w); Gemma stores w around 0 with offset 1
    pre_norms: bool = True  # RMSNorm on each sublayer's input; False: none (OLMo 2 normalises outputs only)
    post_norms: bool = False  # RMSNorm on each sublayer's output before the residual add
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model)
    pipeline_microbatches: int = 1  # GPipe microbatches when the mesh has a `stage` axis
    # --- mixture of experts: layers moe_every-1, 2·moe_every-1, ... replace the dense MLP ---
    moe: MoEConfig | None = None  # models.moe.MoEConfig; None: all layers dense
    moe_every: int = 1  # 1: every layer (Mixtral); 2: every other layer (Switch, GShard)
    # --- μP (maximal-update parametrisation, Yang et al. 2022): None = standard parametrisation ---
    # the d_model whose tuned learning rate / init_std transfer to this width; keep head_dim fixed across widths
    # (attention stays scaled by 1/sqrt(head_dim): μP's only for heads that do not widen; docs/scaling.md)
    mup_base_width: int | None = None

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"TransformerConfig.{field}: {msg}")

        # sizes must be ints: a float from JSON / YAML (256.0) would otherwise fail deep inside JAX, and a
        # fractional moe_every would silently build a dense model
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len", "swa_block",
                  "pipeline_microbatches", "moe_every", "n_kv_heads", "head_dim", "attn_block", "mup_base_width"):
            if _is_int(getattr(self, f)):  # a numpy int (from a sweep) as a plain int: configs go to JSON
                object.__setattr__(self, f, int(getattr(self, f)))
        w = self.sliding_window
        if _is_int(w) or (isinstance(w, tuple | list) and all(_is_int(x) for x in w)):
            object.__setattr__(self, "sliding_window", int(w) if _is_int(w) else tuple(int(x) for x in w))
        for f in ("rope_theta", "norm_eps", "init_std", "final_logit_softcap", "attn_logit_softcap",
                  "query_pre_attn_scalar", "norm_offset", "local_rope_theta"):
            v = getattr(self, f)
            optional = f not in ("rope_theta", "norm_eps", "init_std", "norm_offset")
            need((v is None and optional) or _is_real(v), f,
                 f"must be a number{' or None' if optional else ''}, got {v!r}")
            if v is not None:
                object.__setattr__(self, f, float(v))
        for f in ("qkv_bias", "tie_embeddings", "pre_norms", "post_norms", "embed_scale", "scan_layers", "qk_norm"):
            v = getattr(self, f)  # 'no' is truthy: it built biases and tied the embeddings
            need(isinstance(v, bool | np.bool_), f, f"must be True or False, got {v!r}")
            object.__setattr__(self, f, bool(v))
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len", "swa_block",
                  "pipeline_microbatches", "moe_every"):
            v = getattr(self, f)
            need(_is_int(v) and v > 0, f, f"must be a positive int, got {v!r}")
        for f in ("attn_block", "mup_base_width"):
            v = getattr(self, f)
            need(v is None or (_is_int(v) and v > 0), f, f"must be a positive int or None, got {v!r}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
             f"must be a models.RopeScaling or None, got {type(self.rope_scaling).__name__} (for a Hugging Face "
             "rope_scaling dict, build RopeScaling(kind=..., factor=..., ...) or load with models.hf)")
        need(self.moe is None or type(self.moe).__name__ == "MoEConfig", "moe",
             f"must be a models.moe.MoEConfig or None, got {type(self.moe).__name__}")
        need(isinstance(self.attn_pattern, str), "attn_pattern",  # None or 2 failed in str methods, unnamed
             f"must be a string ('global', 'local', 'alternating', 'N:1' or one L / G per layer), got "
             f"{self.attn_pattern!r}")
        need(self.sliding_window is None or _is_int(self.sliding_window) or isinstance(self.sliding_window, tuple),
             "sliding_window", f"must be an int, a tuple of ints (one per local layer; not bools) or None, got "
             f"{self.sliding_window!r}")
        for f in ("n_kv_heads", "head_dim"):  # None means the default; 0 or True must not quietly mean it too
            v = getattr(self, f)
            need(v is None or (_is_int(v) and v > 0), f, f"must be a positive int or None (the default), got {v!r}")
        need(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, "n_kv_heads",
             f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}; "
             "pick a divisor of n_heads (1 for MQA)")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0, "head_dim",
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
        need(self.hd % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {self.hd}")
        need(self.attn_impl in ("xla", "cudnn", "reference"), "attn_impl",
             f"unknown {self.attn_impl!r}; use 'xla', 'cudnn' or 'reference'")
        need(self.remat in ("none", "full", "save_dots", "save_dots_no_batch"), "remat",
             f"unknown {self.remat!r}; use none, full, save_dots or save_dots_no_batch")
        for f in ("param_dtype", "dtype"):  # kept as names: a dtype object compares equal but is no JSON and no key
            object.__setattr__(self, f, dtype_name(getattr(self, f)))
            need(isinstance(getattr(self, f), str) and getattr(self, f) in ("float32", "bfloat16", "float16"), f,
                 f"unsupported {getattr(self, f)!r}; use the name 'float32', 'bfloat16' or 'float16'")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        # YaRN's ramp finds the dimension of a wavelength through log(theta) (HF's find_correction_dim divides by
        # 2·log(base) too): theta = 1 divided by zero on the first forward, theta < 1 (frequencies rising with the
        # dimension) put the ramp's ends below dimension 0 and interpolated the wrong dims without an error
        need(self.rope_scaling is None or self.rope_scaling.kind != "yarn" or self.rope_theta > 1, "rope_theta",
             f"{self.rope_theta} with rope_scaling kind='yarn': YaRN needs rope_theta > 1 (its ramp divides by "
             "log(rope_theta)); use the model's base, e.g. 10000")
        need(self.local_rope_theta is None or self.local_rope_theta > 0, "local_rope_theta",
             f"must be positive or None, got {self.local_rope_theta}")
        need(self.local_rope_theta is None or self._n_local() > 0, "local_rope_theta",
             f"is set but attn_pattern={self.attn_pattern!r} has no local layer to rotate with it; set it to None")
        need(self.norm_eps >= 0, "norm_eps", f"must be >= 0, got {self.norm_eps}")
        need(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        need(self.sliding_window is None or self._n_local() > 0, "sliding_window",
             f"is set but attn_pattern={self.attn_pattern!r} has no local layer, so no window would apply; use "
             "attn_pattern='local' (every layer), 'alternating' or 'N:1', or sliding_window=None")
        for f in ("final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar"):
            need(getattr(self, f) is None or getattr(self, f) > 0, f, "must be positive or None")
        need(self.swa_impl in ("auto", "blocked", "cudnn", "splash", "dense"), "swa_impl",
             f"unknown {self.swa_impl!r}; use auto, blocked, cudnn, splash or dense")
        need(self.matmul_impl in ("auto", "plain", "transposed_grad"), "matmul_impl",
             f"unknown {self.matmul_impl!r}; use auto, plain or transposed_grad")
        need(isinstance(self.scan_unroll, bool) or (_is_int(self.scan_unroll) and self.scan_unroll >= 1),
             "scan_unroll",
             f"must be True (unroll every layer) or an int >= 1, got {self.scan_unroll!r}")
        if _is_int(self.scan_unroll):  # (a bool stays True: "unroll every layer")
            object.__setattr__(self, "scan_unroll", int(self.scan_unroll))
        for f, other in (("attn_impl", "'xla'"), ("swa_impl", "'auto'")):
            need(getattr(self, f) != "cudnn" or self.dtype in ("bfloat16", "float16"), f,
                 f"'cudnn' (cuDNN's fused attention) takes bfloat16 or float16, not dtype={self.dtype!r}; use "
                 f"dtype='bfloat16' or {f}={other}")
        need(self.mlp_act in ("silu", "gelu_tanh"), "mlp_act", f"unknown {self.mlp_act!r}; use silu or gelu_tanh")
        need(self.qk_norm_scope in ("head", "all_heads"), "qk_norm_scope",
             f"unknown {self.qk_norm_scope!r}; use 'head' (each head's H) or 'all_heads' (the whole N·H projection)")
        need(self.qk_norm or self.qk_norm_scope == "head", "qk_norm_scope",
             f"{self.qk_norm_scope!r} is set but qk_norm=False, so there is no q / k norm to scope; set qk_norm=True "
             "or leave qk_norm_scope='head'")
        need(self.mup_base_width is None or not self.tie_embeddings, "mup_base_width",
             "μP scales the readout separately from the embedding; set tie_embeddings=False")
        need(self.mup_base_width is None or not self.embed_scale, "embed_scale",
             "multiplies the embeddings by sqrt(d_model), which grows with the width, where μP keeps the input "
             "layer's output O(1) at every width; set embed_scale=False (or mup_base_width=None)")
        need(self.moe is None or self.moe_every <= self.n_layers, "moe_every",
             f"{self.moe_every} > n_layers={self.n_layers}: no layer would be MoE; lower it or set moe=None")
        need(self.moe is None or self.moe.mlp_act == self.mlp_act, "moe",
             f"moe.mlp_act={getattr(self.moe, 'mlp_act', None)!r} differs from mlp_act={self.mlp_act!r}; use one")
        self._check_windows(self._n_local())  # attn_pattern and sliding_window together, O(1) in n_layers

    # scan_unroll True (every layer) and 1 (a rolled scan) build different programs, but the generated __eq__ /
    # __hash__ compared them equal (True == 1): jit caches keyed on a config (generate's) ran one's for the other
    def _key(self) -> tuple:
        return (*(getattr(self, f.name) for f in dataclasses.fields(self)), type(self.scan_unroll))

    def __eq__(self, other):
        return self._key() == other._key() if other.__class__ is self.__class__ else NotImplemented

    def __hash__(self):
        return hash(self._key())

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def local_layers(self) -> tuple[bool, ...]:
        """Which layers use sliding-window attention, from `attn_pattern`."""
        run = self._local_run()
        if isinstance(run, str):
            return tuple(c == "L" for c in run)
        n, period = run
        return tuple(i % period < n for i in range(self.n_layers))

    def _local_run(self) -> tuple[int, int] | str:
        """attn_pattern validated against n_layers: (n, period) when every `period` layers start with n local ones
        ('global' (0, 1), 'local' (1, 1), 'alternating' (1, 2), 'N:1' (N, N + 1)); a per-layer 'GGLL' as given."""
        p, L = self.attn_pattern, self.n_layers
        if p in ("global", "local"):
            return int(p == "local"), 1
        if p == "alternating":
            if L < 2:  # as '1:1' (the same pattern) is refused
                raise ValueError(f"TransformerConfig.attn_pattern='alternating' with n_layers={L} has no global "
                                 "layer (the first would be layer 2); use 'local'")
            return 1, 2
        n, sep, one = p.partition(":")
        if sep and n.isdigit() and one == "1" and int(n) > 0:
            if int(n) >= L:  # the first global layer would be layer n + 1
                raise ValueError(f"TransformerConfig.attn_pattern={p!r} with n_layers={L} has no global layer (the "
                                 f"first would be layer {int(n) + 1}); use N < n_layers, or 'local'")
            return int(n), int(n) + 1
        if p and set(p) <= {"L", "G"}:
            if len(p) != L:
                raise ValueError(f"TransformerConfig.attn_pattern={p!r} names {len(p)} layer{'s' * (len(p) != 1)} "
                                 f"for n_layers={L}; give one letter (L local, G global) per layer")
            return p
        why = ""
        if sep and n.isdigit() and one.isdigit():  # '0:1', '2:2': the ratio form with what it cannot say
            # the example spells the asked-for period over this model's layers (a fixed 'LLGG' answered '1:2' too),
            # its first 48 letters at most (n_layers may be 10**12)
            k, shown = max(int(n) + int(one), 1), min(L, 48)
            letters = "".join("L" if i % k < int(n) else "G" for i in range(shown))
            letters = repr(letters) if shown == L else f"'{letters}...' ({L} letters)"
            why = (" (N:1 with N >= 1: N local layers then one global; 0 local layers is 'global')" if one == "1"
                   else f" (the ratio form takes one global layer per period: for {n} local then {one} global layers "
                        f"spell the period with letters, one per layer, e.g. {letters} for n_layers={L})")
        raise ValueError(f"TransformerConfig.attn_pattern: unknown {p!r}{why}; use 'global', 'local', "
                         "'alternating', 'N:1' (N local layers, then one global) or one letter per layer (L local, "
                         "G global), e.g. 'GGLL'")

    def _n_local(self) -> int:
        """How many layers are local, counted per period: __post_init__ validates with this, since building the
        per-layer tuples (local_layers, layer_windows) took minutes to hours for n_layers=10**9..10**12, or all the
        memory, before any check could refuse anything."""
        run, L = self._local_run(), self.n_layers
        if isinstance(run, str):
            return run.count("L")
        n, period = run
        return L // period * n + min(L % period, n)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per-layer attention window (None: global causal attention)."""
        local = self.local_layers()
        n_local = sum(local)
        self._check_windows(n_local)
        w = self.sliding_window
        it = iter((w,) * n_local if _is_int(w) else w or ())
        return tuple(next(it) if is_local else None for is_local in local)

    def _check_windows(self, n_local: int) -> None:
        """sliding_window against n_local local layers: one int, or one window per local layer (none needed when
        there is no local layer); checked without building a tuple per layer."""
        w = self.sliding_window
        if n_local == 0:
            return
        if w is None:
            raise ValueError(f"TransformerConfig.sliding_window: attn_pattern={self.attn_pattern!r} has "
                             f"{n_local} local layers; set sliding_window to their window size")
        ws = (w,) if _is_int(w) or isinstance(w, bool) else tuple(w)  # a bool: rejected below
        if not (_is_int(w) or isinstance(w, bool)) and len(ws) != n_local:
            raise ValueError(f"TransformerConfig.sliding_window: got {len(ws)} windows for {n_local} local layers; "
                             "give one int, or one window per local layer")
        if any(not _is_int(x) or x < 1 for x in ws):
            raise ValueError(f"TransformerConfig.sliding_window: windows must be integers >= 1 (not bools), got {w!r}")

    @property
    def width_mult(self) -> float:
        """μP width multiplier m = d_model / mup_base_width (1.0 under the standard parametrisation)."""
        return 1.0 if self.mup_base_width is None else self.d_model / self.mup_base_width

    def moe_layers(self) -> tuple[bool, ...]:
        """Which layers carry an MoE feed-forward block (layers k-1, 2k-1, ... for moe_every=k)."""
        return tuple(self.moe is not None and (i + 1) % self.moe_every == 0 for i in range(self.n_layers))

    # ---- accounting: delegated to scaling.flops, the one implementation of the counts ----------
    def param_count(self) -> int:
        """Total number of parameters (embedding and head counted once when tied; all experts). MoE layers also
        count their router_bias (E each: the selection bias a sigmoid router moves; zero under softmax routing, so
        a Mixtral-8x7B count is 32 x 8 = 256 above Hugging Face's, which has none)."""
        from scaling.flops import param_counts

        return param_counts(self).total

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: non-embedding + LM head (MoE: active only)."""
        from scaling.flops import param_counts

        return param_counts(self).matmul_active

    def attention_flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs of QK^T and AV per token, averaged over a sequence of `seq_len`.

        causal: count only the keys each query sees (min(W, i + 1) for a local layer); otherwise
        the full T×T square a dense masked kernel computes.
        """
        from scaling.flops import attention_flops_per_token

        return attention_flops_per_token(self, seq_len, kernel="ideal" if causal else "dense")

    def flops_per_token(self, seq_len: int, causal: bool = True, training: bool = True) -> float:
        """6·N_matmul + 3·attention per token when training (2·N + attention for inference).

        `causal=True` counts only the keys a causal query sees (the useful work); `causal=False`
        counts the full T×T score matrix, which is what a dense masked kernel executes.
        Against XLA's `compiled.cost_analysis()['flops']`, compile with `scan_layers=False` and a dense MLP or
        capacity dispatch: XLA does not multiply a loop's body by its trip count, so a scanned layer stack counts
        one iteration of its scan (a 4-layer train step: 0.29-0.74x of the unscanned count, by the LM head's
        share; 0.49x for the default config at T = 128) and the dropless MoE kernel's dynamic tile loops do not compare
        (tests/test_flops.py; scaling.flops.forward_flops_per_token(cfg, T, kernel='executed') counts what the
        kernels run).
        """
        from scaling.flops import forward_flops_per_token

        return (3 if training else 1) * forward_flops_per_token(self, seq_len, kernel="ideal" if causal else "dense")

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype: str | int | None = None) -> int:
        """Bytes of `KVCache.zeros(cfg, batch, seq_len, dtype)`'s keys and values (its slot positions, length and row
        starts, int32, are left out: 4 bytes a slot per pattern position): local layers keep only their window's
        slots; dtype defaults to the compute dtype, as the cache does (an int: bytes per element, as this argument
        once was).
        Only dtypes the cache can be built in are counted (floats of 16 bits or more; float64 is stored as float32
        unless jax_enable_x64, as jnp.zeros does): dtype=1 was counted as an int8 cache KVCache.zeros refuses. For
        another system's int8 / fp8 cache, use `scaling.memory.kv_cache_bytes`, which takes any dtype."""
        from scaling.memory import DTYPE_BYTES, dtype_bytes, kv_cache_bytes

        if isinstance(dtype, numbers.Integral) and not isinstance(dtype, bool):
            by_size = {2: "bfloat16", 4: "float32", 8: "float64"}
            if int(dtype) not in by_size:
                raise ValueError(f"kv_cache_bytes(dtype={dtype!r}): an int is bytes per element, one of "
                                 f"{sorted(by_size)} (KVCache.zeros builds no 1-byte cache); or pass a dtype name "
                                 "such as 'bfloat16'")
            dtype = by_size[int(dtype)]
        dtype = given = dtype or self.dtype
        nbytes = dtype_bytes(dtype)  # an unknown name is named there
        if isinstance(dtype, str) and dtype in DTYPE_BYTES:  # its aliases ('bf16', 'fp8'): floats but int8
            floating = dtype != "int8"
        else:
            import jax
            import jax.numpy as jnp

            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
            dtype = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))  # what jnp.zeros stores (float64: float32)
            nbytes = dtype_bytes(dtype)
        if not floating or nbytes < 2:
            raise ValueError(f"kv_cache_bytes(dtype={dtype_name(given)!r}): KVCache.zeros builds no such cache (it "
                             "stores keys and values unscaled: 'bfloat16', 'float16' or 'float32'); for another "
                             "system's int8 / fp8 cache use scaling.memory.kv_cache_bytes(cfg, ..., dtype=...)")
        return kv_cache_bytes(self, batch, seq_len, dtype=dtype)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy ints too


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # numpy floats too


_SCALARS = {"int": (_is_int, int, "an int"), "float": (_is_real, float, "a finite number"),
            "bool": (lambda v: isinstance(v, bool | np.bool_), bool, "True or False")}


def check_field_types(cfg, need) -> None:
    """Each field of a frozen dataclass config against its annotation (int, float, bool, a tuple of ints; each
    optionally `| None`), before its checks of values; others (str, Literal, nested configs) are left to those.
    A float size from JSON (d_model=32.0) failed deep inside JAX, a string flag ('no' is truthy) built what it
    meant to switch off, a list made the config unhashable (a jit static argument). Accepted values are
    normalised: numpy numbers and ints given for floats to Python's types, lists of ints to tuples.
    need(cond, field, message) raises the config's error."""
    for f in dataclasses.fields(cfg):
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        kind, v = kind.removesuffix("|None"), getattr(cfg, f.name)
        if v is None and optional:
            continue
        if kind in _SCALARS:
            ok, cast, what = _SCALARS[kind]
            need(ok(v), f.name, f"must be {what}{' or None' if optional else ''}, got {v!r}")
            object.__setattr__(cfg, f.name, cast(v))
        elif kind.startswith("tuple[int"):
            need(isinstance(v, tuple | list) and all(_is_int(x) for x in v), f.name,
                 f"must be a tuple of ints{' or None' if optional else ''}, got {v!r}")
            object.__setattr__(cfg, f.name, tuple(int(x) for x in v))


def dtype_name(v):
    """A dtype given as an object (jnp.bfloat16, np.float32) as its name; anything else unchanged (then refused
    by the config's check). None stays None: np.dtype(None) is float64, so dtype=None was refused as "unsupported
    'float64'", a dtype nobody gave."""
    if v is None or isinstance(v, str):
        return v
    try:
        return np.dtype(v).name
    except TypeError:
        return v


def dtype_of(name: str):
    """The jnp dtype of a config's dtype name: 'float32' | 'bfloat16' | 'float16'."""
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x (e.g. a vocab padded to a multiple of 128)."""
    return int(math.ceil(x / m) * m)
