"""Frozen configuration of the decoder Transformer.

The config is the single source of truth for shapes: it validates itself (errors name the field
and the fix) and computes its own parameter count and FLOPs per token, Levanter-style.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch"]
AttnImpl = Literal["xla", "cudnn", "reference"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind='llama3'` follows Llama 3.1; `kind='linear'` divides positions."""

    kind: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    attn_impl: AttnImpl = "xla"
    scan_layers: bool = True
    remat: RematPolicy = "none"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and logits stay float32
    init_std: float = 0.02

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"TransformerConfig.{field}: {msg}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
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
        for f in ("param_dtype", "dtype"):
            need(getattr(self, f) in ("float32", "bfloat16", "float16"), f,
                 f"unsupported {getattr(self, f)!r}; use float32, bfloat16 or float16")
        need(self.final_logit_softcap is None or self.final_logit_softcap > 0,
             "final_logit_softcap", "must be positive or None")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    # ---- accounting -----------------------------------------------------------------------
    def layer_params(self) -> int:
        d, h, k, hd, f = self.d_model, self.n_heads, self.kv_heads, self.hd, self.mlp_dim
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        bias = (h + 2 * k) * hd if self.qkv_bias else 0
        return attn + bias + 3 * d * f + 2 * d  # + two RMSNorm scales

    def param_count(self) -> int:
        """Total number of parameters (embedding and head counted once when tied)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.vocab_size * self.d_model + head + self.n_layers * self.layer_params() + self.d_model

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: non-embedding + LM head."""
        return self.n_layers * self.layer_params() + self.vocab_size * self.d_model

    def attention_flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Forward FLOPs of QK^T and AV per token, averaged over a sequence of `seq_len`."""
        keys = (seq_len + 1) / 2 if causal else seq_len
        return self.n_layers * 4 * self.n_heads * self.hd * keys

    def flops_per_token(self, seq_len: int, causal: bool = True, training: bool = True) -> float:
        """6·N_matmul + 3·attention per token when training (2·N + attention for inference).

        `causal=True` counts only the keys a causal query sees (the useful work); `causal=False`
        counts the full T×T score matrix, which is what a dense masked kernel executes.
        """
        mult = 3 if training else 1
        return mult * (2 * self.matmul_params() + self.attention_flops_per_token(seq_len, causal))

    def kv_cache_bytes(self, batch: int, seq_len: int, bytes_per: int = 4) -> int:
        return 2 * self.n_layers * batch * seq_len * self.kv_heads * self.hd * bytes_per


def dtype_of(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
