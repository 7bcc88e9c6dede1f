"""Hugging Face interop: load and save Llama / Mistral / Qwen2 / Gemma 2 / Mixtral checkpoints as `Transformer`s.

Only safetensors are read (through `safetensors.numpy`, so torch is not needed); pickle-based
`pytorch_model.bin` files are refused because unpickling runs arbitrary code.

Layout (HF `nn.Linear.weight` is [out, in]; ours is [in, out] split by heads). Per layer i:
  q_proj.weight [N*H, D] <-> wq[i] [D, N, H]      q_proj.bias [N*H] <-> bq[i] [N, H]
  k_proj/v_proj [K*H, D] <-> wk/wv[i] [D, K, H]   k/v_proj.bias [K*H] <-> bk/bv[i] [K, H]
  o_proj.weight [D, N*H] <-> wo[i] [N, H, D]
  gate/up_proj  [F, D]   <-> w_gate/w_up[i] [D, F]   down_proj [D, F] <-> w_down[i] [F, D]
  input_layernorm / post_attention_layernorm [D] <-> attn_norm / mlp_norm[i] [D]
Both use the half-split (rotate_half) RoPE, so q/k need no permutation. Gemma 2 renames the norms:
  input_layernorm / post_attention_layernorm <-> attn_norm / post_attn_norm (attention in, out)
  pre_feedforward_layernorm / post_feedforward_layernorm <-> mlp_norm / post_mlp_norm (MLP in, out)
Sliding windows (Mistral, Qwen2 `use_sliding_window`, Gemma 2 alternation) map to `attn_pattern`.
Mixtral (every layer MoE, softmax top-k renormalised; its attention and norms live in `moe_blocks`):
  block_sparse_moe.gate.weight [E, D] <-> moe.router[i] [D, E]
  block_sparse_moe.experts.e.w1 / w3 [F, D] <-> moe.w_gate / w_up[i, e] [D, F]   w2 [D, F] <-> moe.w_down[i, e]
  transformers 5.x in-memory names (mlp.gate, mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]) load too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import RopeScaling, TransformerConfig
from models.transformer import Transformer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Gemma2ForCausalLM": "gemma2", "MixtralForCausalLM": "mixtral"}
# What transformers' config classes (5.x) assume for fields a config.json leaves out: an absent field must mean what it
# means to HF (e.g. Gemma 2 without softcapping fields is soft-capped at 50 / 30), not our own default.
HF_DEFAULTS = {
    "mistral": dict(sliding_window=4096),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5),
    "qwen2": dict(sliding_window=4096, max_window_layers=28),
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
}
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _unsupported(field, value, what_to_do):
    return ValueError(f"HF config field {field}={value!r} is not supported: {what_to_do}")


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout: 5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if params and "rope_type" not in params and "rope_theta" not in params:
        raise _unsupported("rope_parameters", params, "per-layer-type RoPE is not supported (Llama, Mistral "
                           "and Qwen2 use one rope_type/rope_theta for all layers)")
    # A non-null rope_scaling wins over rope_parameters in both versions (4.x reads only rope_scaling; 5.x takes
    # `rope_scaling or rope_parameters`); theta then comes from it or the top-level rope_theta.
    params = dict(hf.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("partial_rotary_factor", params["partial_rotary_factor"], "only full-width RoPE (1.0)")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        # transformers 5.x replaces the inner original_max_position_embeddings by a top-level one (and defaults it
        # to max_position_embeddings); 4.x reads only the inner one
        top, inner = hf.get("original_max_position_embeddings"), params.get("original_max_position_embeddings")
        if top is not None and inner is not None and int(top) != int(inner):
            raise _unsupported("original_max_position_embeddings", top, f"it differs from rope_scaling's {inner}, "
                               "and transformers 4.x and 5.x would each use another; keep one value")
        if inner is None:
            params["original_max_position_embeddings"] = top or hf.get("max_position_embeddings")
        missing = [f for f in _LLAMA3_FIELDS if params.get(f) is None]
        if missing:
            raise _unsupported("rope_type", kind, f"llama3 scaling needs {missing} in rope_parameters/rope_scaling")
        return theta, RopeScaling(kind="llama3", factor=float(params["factor"]),
                                  low_freq_factor=float(params["low_freq_factor"]),
                                  high_freq_factor=float(params["high_freq_factor"]),
                                  original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise _unsupported("rope_type", kind, "supported RoPE types are default, linear and llama3")


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"]
    raise _unsupported("architectures", archs or hf.get("model_type"),
                       f"supported are {sorted(ARCHITECTURES)}")


def _attention_pattern(hf: dict, arch: str) -> dict:
    """attn_pattern / sliding_window fields from the HF window settings (Mistral semantics)."""
    window, L = hf.get("sliding_window"), hf["num_hidden_layers"]
    if arch == "llama" or window is None or (arch == "qwen2" and not hf.get("use_sliding_window", False)):
        return {}
    if arch == "gemma2":
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    elif arch == "qwen2":
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf["max_window_layers"]
                                          else "full_attention" for i in range(L)]
    else:
        types = ["sliding_attention"] * L
    local = tuple(t == "sliding_attention" for t in types)
    if not any(local):
        return {}
    if all(local):
        return dict(attn_pattern="local", sliding_window=int(window))
    if local == tuple(i % 2 == 0 for i in range(L)):
        return dict(attn_pattern="alternating", sliding_window=int(window))
    for n in range(2, L):  # Gemma 3's N sliding layers, then one full ('N:1'), as save_pretrained writes them
        if local == tuple(i % (n + 1) != n for i in range(L)):
            return dict(attn_pattern=f"{n}:1", sliding_window=int(window))
    raise _unsupported("layer_types", types, "supported layouts are all-sliding, all-full, alternating "
                       "(sliding first) and N sliding then one full, repeated")


def config_from_hf(hf: dict, **overrides) -> TransformerConfig:
    """TransformerConfig from a HF config.json dict (transformers 4.x or 5.x layout).

    `overrides` (e.g. dtype, attn_impl, remat, scan_layers, max_seq_len) replace mapped fields. Absent fields take
    transformers' defaults (HF_DEFAULTS); an explicit null keeps its HF meaning (e.g. no soft-capping).
    """
    arch = _architecture(hf)
    hf = {**HF_DEFAULTS.get(arch, {}), **hf}
    if hf.get("use_bidirectional_attention"):
        raise _unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"],
                           "only causal decoders are supported; load a causal checkpoint (false or null)")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise _unsupported("hidden_act", act, "our gated MLP uses silu or gelu_pytorch_tanh")
    if hf.get("mlp_bias", False):
        raise _unsupported("mlp_bias", True, "our MLP has no biases")
    try:
        theta, scaling = _rope_from_hf(hf)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        kw = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                  head_dim=None if head_dim * n_heads == hf["hidden_size"] else head_dim,
                  mlp_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                  rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
                  # Qwen2 always has q/k/v biases; Llama's attention_bias also adds an o_proj bias, which
                  # the loader accepts only when it is zero (see from_pretrained).
                  qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma2")),
                  mlp_act="silu" if act == "silu" else "gelu_tanh", **_attention_pattern(hf, arch))
        if arch == "mixtral":
            kw.update(moe=_moe_from_hf(hf), moe_every=1)
        if arch == "gemma2":  # (1 + w) norms, four per layer, sqrt(D) embedding scale, two soft-caps
            kw.update(norm_offset=1.0, post_norms=True, embed_scale=True,
                      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"] or head_dim),
                      attn_logit_softcap=hf["attn_logit_softcapping"],
                      final_logit_softcap=hf["final_logit_softcapping"])
    except KeyError as e:
        raise ValueError(f"HF config lacks required field {e.args[0]!r}") from None
    kw.update(overrides)
    return TransformerConfig(**kw)


def _moe_from_hf(hf: dict):
    from models.moe import MoEConfig

    k = hf.get("num_experts_per_tok", 2)
    # transformers' Mixtral balancing loss is k × ours per layer (tests/test_moe.py): keep its objective's weight.
    # (HF pools the router statistics of all layers before the product, we average per-layer losses: equal for
    # one layer, close otherwise.) Mixtral has no router z-loss: its weight is 0.
    return MoEConfig(n_experts=hf.get("num_local_experts", 8), top_k=k, expert_mlp_dim=hf["intermediate_size"],
                     router="softmax", renormalize=True, lb_loss_weight=hf.get("router_aux_loss_coef", 0.02) * k,
                     z_loss_weight=0.0)


def _mixtral_config(cfg: TransformerConfig, hf: dict, windows) -> dict:
    m = cfg.moe
    if not (cfg.moe_every == 1 and m.router == "softmax" and m.renormalize and m.n_shared_experts == 0
            and m.mlp_act == "silu" and not cfg.qkv_bias and m.dispatch == "dropless"):
        raise ValueError("TransformerConfig.moe: a Mixtral export needs MoE on every layer (moe_every=1), "
                         "router='softmax', renormalize=True, no shared experts, silu, no qkv_bias and "
                         "dispatch='dropless' (Mixtral drops no token; set it to compare the same model)")
    if len(set(windows)) != 1:
        raise ValueError("TransformerConfig.attn_pattern: Mixtral needs the same window (or none) on every layer")
    return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", sliding_window=windows[0],
                num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, output_router_logits=False,
                router_aux_loss_coef=m.lb_loss_weight / m.top_k, router_jitter_noise=0.0,
                **{**hf, "intermediate_size": m.expert_mlp_dim})


def config_to_hf(cfg: TransformerConfig) -> dict:
    """HF config.json dict (5.x layout) that transformers loads into the same model.

    Qwen2ForCausalLM when cfg.qkv_bias (q/k/v bias, no o_proj bias), LlamaForCausalLM otherwise.
    """
    if cfg.post_norms or cfg.norm_offset or cfg.embed_scale:
        if cfg.query_pre_attn_scalar is not None and not float(cfg.query_pre_attn_scalar).is_integer():
            raise ValueError("TransformerConfig.query_pre_attn_scalar must be a whole number for Gemma 2")
        return _gemma2_config(cfg)
    if cfg.final_logit_softcap is not None or cfg.attn_logit_softcap is not None:
        raise ValueError("TransformerConfig soft-capping has no Llama/Mistral/Qwen2 equivalent; set it to None "
                         "(or use the Gemma 2 block: post_norms, norm_offset=1, embed_scale)")
    if cfg.mlp_act != "silu" or cfg.query_pre_attn_scalar is not None:
        raise ValueError("TransformerConfig.mlp_act / query_pre_attn_scalar: Llama/Mistral/Qwen2 need silu and "
                         "the default 1/sqrt(head_dim) query scale")
    windows = cfg.layer_windows()
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope.update(rope_type=rs.kind, factor=rs.factor)
        if rs.kind == "llama3":
            rope.update({f: getattr(rs, f) for f in _LLAMA3_FIELDS[1:]})
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd,
              intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
              **_rope_4x(rope),
              bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=cfg.param_dtype)
    if cfg.moe is not None:
        return _mixtral_config(cfg, hf, windows)
    if cfg.qkv_bias:
        if any(w is not None for w in windows):  # Qwen2 slides on layers >= max_window_layers: all or none here
            if len(set(windows)) != 1:
                raise ValueError("TransformerConfig.attn_pattern: with qkv_bias (Qwen2) the window must be the same "
                                 f"on every layer (attn_pattern='local') or absent, got windows {windows}")
            return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                        sliding_window=windows[0], max_window_layers=0,
                        layer_types=["sliding_attention"] * cfg.n_layers, **hf)
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                    sliding_window=None, max_window_layers=cfg.n_layers,
                    layer_types=["full_attention"] * cfg.n_layers, **hf)
    if any(w is not None for w in windows):  # Mistral: one window on every layer
        if len(set(windows)) != 1:
            raise ValueError("TransformerConfig.attn_pattern: Mistral needs the same window on every layer "
                             f"(attn_pattern='local'), got windows {windows}")
        return dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=windows[0], **hf)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False, **hf)


def _rope_4x(rope: dict) -> dict:
    """The same RoPE in transformers 4.x's fields (it ignores rope_parameters and would silently use theta 1e4);
    5.x reads rope_scaling as rope_parameters and rope_theta as its default theta, so both agree."""
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return dict(rope_theta=rope["rope_theta"], rope_scaling=scaling if scaling["rope_type"] != "default" else None)


def _gemma2_config(cfg: TransformerConfig) -> dict:
    windows = cfg.layer_windows()
    if not (cfg.post_norms and cfg.norm_offset == 1.0 and cfg.embed_scale and cfg.mlp_act == "gelu_tanh"
            and cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None and cfg.moe is None):
        raise ValueError("TransformerConfig: a Gemma 2 export needs post_norms, norm_offset=1, embed_scale, "
                         "mlp_act='gelu_tanh', tie_embeddings, no qkv_bias, no rope_scaling and no moe")
    local = [w for w in windows if w is not None]
    if len(set(local)) > 1:
        raise ValueError(f"TransformerConfig.sliding_window: Gemma 2 has one window, got {sorted(set(local))}")
    return dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, intermediate_size=cfg.mlp_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                **_rope_4x({"rope_type": "default", "rope_theta": cfg.rope_theta}),
                query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.hd),  # transformers wants an int
                sliding_window=local[0] if local else cfg.max_seq_len,
                layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows],
                attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
                attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                dtype=cfg.param_dtype)


def _hf_layout(cfg: TransformerConfig) -> dict:
    """ours -> (HF name template, to_hf, from_hf); {i} is the layer, {e} the expert. to_hf/from_hf act on one
    layer (and expert). Keys under blocks. / moe_blocks. are stacked over the dense / MoE layers."""
    lay = _dense_layout(cfg)
    if cfg.moe is None:
        return lay
    T = lambda a: a.T  # noqa: E731
    moe = "model.layers.{i}.block_sparse_moe."
    lay = {("moe_" + key if key.startswith("blocks.") else key): v for key, v in lay.items()
           if key not in ("blocks.w_gate", "blocks.w_up", "blocks.w_down")}
    lay.update({"moe_blocks.moe.router": (moe + "gate.weight", T, T),
                "moe_blocks.moe.w_gate": (moe + "experts.{e}.w1.weight", T, T),
                "moe_blocks.moe.w_up": (moe + "experts.{e}.w3.weight", T, T),
                "moe_blocks.moe.w_down": (moe + "experts.{e}.w2.weight", T, T)})
    return lay


def _layers_of(cfg: TransformerConfig, key: str) -> list[int] | None:
    """The layer indices a stacked key covers (None: not stacked)."""
    if key.startswith("blocks."):
        return [i for i, m in enumerate(cfg.moe_layers()) if not m]
    if key.startswith("moe_blocks."):
        return [i for i, m in enumerate(cfg.moe_layers()) if m]
    return None


def _names(cfg: TransformerConfig, key: str, template: str) -> list[str]:
    layers = _layers_of(cfg, key) or [None]
    experts = range(cfg.moe.n_experts) if "{e}" in template else [None]
    return [template.format(i=i, e=e) for i in layers for e in experts]


def _fused_moe_aliases(where: dict, cfg: TransformerConfig) -> dict:
    """Hub names -> (fused tensor name, slice) for checkpoints written with transformers 5.x in-memory names."""
    if cfg.moe is None:
        return {}
    F, out = cfg.moe.expert_mlp_dim, {}
    for i in range(cfg.n_layers):
        pre, hub = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        if pre + "experts.gate_up_proj" not in where:
            continue
        out[hub + "gate.weight"] = (pre + "gate.weight", lambda a: a)
        for e in range(cfg.moe.n_experts):
            out[hub + f"experts.{e}.w1.weight"] = (pre + "experts.gate_up_proj", lambda a, e=e: a[e, :F])
            out[hub + f"experts.{e}.w3.weight"] = (pre + "experts.gate_up_proj", lambda a, e=e: a[e, F:])
            out[hub + f"experts.{e}.w2.weight"] = (pre + "experts.down_proj", lambda a, e=e: a[e])
    return out


def _dense_layout(cfg: TransformerConfig) -> dict:
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd
    T = lambda a: a.T
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    lay = {
        "blocks.attn_norm": ("model.layers.{i}.input_layernorm.weight", None, None),
        "blocks.wq": (attn + "q_proj.weight", lambda a: a.reshape(d, n * h).T, lambda a: a.T.reshape(d, n, h)),
        "blocks.wk": (attn + "k_proj.weight", lambda a: a.reshape(d, k * h).T, lambda a: a.T.reshape(d, k, h)),
        "blocks.wv": (attn + "v_proj.weight", lambda a: a.reshape(d, k * h).T, lambda a: a.T.reshape(d, k, h)),
        "blocks.wo": (attn + "o_proj.weight", lambda a: a.reshape(n * h, d).T, lambda a: a.T.reshape(n, h, d)),
        "blocks.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", None, None),
        "blocks.w_gate": (mlp + "gate_proj.weight", T, T),
        "blocks.w_up": (mlp + "up_proj.weight", T, T),
        "blocks.w_down": (mlp + "down_proj.weight", T, T),
        "embed": ("model.embed_tokens.weight", None, None),
        "final_norm": ("model.norm.weight", None, None),
    }
    if cfg.qkv_bias:
        flat = lambda a: a.reshape(-1)
        lay["blocks.bq"] = (attn + "q_proj.bias", flat, lambda a: a.reshape(n, h))
        lay["blocks.bk"] = (attn + "k_proj.bias", flat, lambda a: a.reshape(k, h))
        lay["blocks.bv"] = (attn + "v_proj.bias", flat, lambda a: a.reshape(k, h))
    if cfg.post_norms:  # Gemma 2 names: post_attention_layernorm is the attention *output* norm
        lay["blocks.post_attn_norm"] = ("model.layers.{i}.post_attention_layernorm.weight", None, None)
        lay["blocks.mlp_norm"] = ("model.layers.{i}.pre_feedforward_layernorm.weight", None, None)
        lay["blocks.post_mlp_norm"] = ("model.layers.{i}.post_feedforward_layernorm.weight", None, None)
    if not cfg.tie_embeddings:
        lay["lm_head"] = ("lm_head.weight", T, T)
    return lay


def _open_weights(folder: Path) -> dict:
    """HF tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists() and not (folder / "model.safetensors").exists():  # transformers prefers the single file too
        return {name: folder / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else sorted(
        p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
        if pickles:
            raise ValueError(f"{folder} holds only pickle-based weights {pickles}; they are never loaded here "
                             "(unpickling can run arbitrary code). Convert them to safetensors in a trusted "
                             "environment, e.g. transformers' model.save_pretrained(out, safe_serialization=True)")
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    names = {}
    for f in files:
        with safe_open(f, framework="numpy") as sf:
            names.update(dict.fromkeys(sf.keys(), f))
    return names


def from_pretrained(path, dtype: str = "float32", param_dtype: str | None = None, **config_overrides) -> Transformer:
    """Transformer from a local HF Llama/Mistral/Qwen2 folder (config.json + safetensors, sharded or not).

    dtype: compute dtype; param_dtype: storage dtype of the parameters (None: same as dtype).
    Other keyword arguments override TransformerConfig fields (attn_impl, remat, scan_layers, ...).
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} not found; expected a HF checkpoint folder")
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    where = _open_weights(folder)
    layout = _hf_layout(cfg)
    aliases = _fused_moe_aliases(where, cfg)
    if cfg.tie_embeddings and "lm_head.weight" in where:
        if "model.embed_tokens.weight" not in where:  # tied, stored under the head's name: transformers ties it too
            aliases["model.embed_tokens.weight"] = ("lm_head.weight", lambda a: a)
        else:
            with safe_open(where["lm_head.weight"], framework="numpy") as a, \
                    safe_open(where["model.embed_tokens.weight"], framework="numpy") as b:
                if not np.array_equal(a.get_tensor("lm_head.weight"), b.get_tensor("model.embed_tokens.weight")):
                    raise ValueError(
                        f"{folder}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                        "model.embed_tokens.weight (transformers 5.x then loads them untied, 4.x ties them); set "
                        "tie_word_embeddings in config.json to what these weights are")
    used = {n for key, (name, _, _) in layout.items() for n in _names(cfg, key, name)}
    used |= {fused for fused, _ in aliases.values()}
    # o_proj.bias: Llama attention_bias (checked below); inv_freq: a buffer old exports saved; lm_head when tied.
    extra = sorted(n for n in where if n not in used and not n.endswith((".o_proj.bias", ".rotary_emb.inv_freq"))
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"checkpoint {folder} has tensors our Transformer has no place for: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}; is config.json right for these weights?")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shapes = {k: v.shape for k, v in _flatten(nnx.to_pure_dict(abstract)).items()}
    pd, values = np.dtype(jnp.dtype(cfg.param_dtype)), {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in set(where.values())}

        read = lambda name: handles[where[name]].get_tensor(name)  # noqa: E731
        read_fused = functools.lru_cache(maxsize=2)(read)  # a layer's fused experts, read once for all E

        def get(name):
            if name in aliases:
                fused, pick = aliases[name]
                return pick(read_fused(fused))
            if name not in where:
                raise ValueError(f"checkpoint {folder} lacks tensor {name!r} needed by {cfg}")
            return read(name)

        for ours, (name, _, from_hf) in layout.items():
            fix = from_hf or (lambda a: a)
            layers = _layers_of(cfg, ours)
            want = shapes[ours][(layers is not None) + ("{e}" in name):]  # one layer's (and expert's) shape

            def tensor(n, fix=fix, want=want, ours=ours):
                a = fix(get(n))
                if a.shape != want:  # named here: a stack of mismatched layers fails without the name
                    raise ValueError(f"tensor {n!r} gives {ours} a slice of shape {a.shape}, expected {want} from "
                                     f"{cfg}; is config.json right for these weights?")
                return a

            one = lambda i: (np.stack([tensor(name.format(i=i, e=e)) for e in range(cfg.moe.n_experts)])  # noqa: E731
                             if "{e}" in name else tensor(name.format(i=i))).astype(pd)
            arr = np.stack([one(i) for i in layers]) if layers is not None else one(None)
            if arr.shape != shapes[ours]:
                raise ValueError(f"tensor {name!r} gives {ours} shape {arr.shape}, expected {shapes[ours]} "
                                 f"from {cfg}")
            values[ours] = jnp.asarray(arr)
        # Llama attention_bias=True also adds an o_proj bias we do not have: exact only when it is zero.
        for i in range(cfg.n_layers):
            name = f"model.layers.{i}.self_attn.o_proj.bias"
            if name in where and np.any(get(name) != 0):
                raise ValueError(f"{name} is non-zero but our Transformer has no o_proj bias (attention_bias="
                                 "True); only checkpoints whose o_proj biases are zero can be loaded")
    if cfg.moe is not None:  # Mixtral routes without a selection bias
        values["moe_blocks.moe.router_bias"] = jnp.zeros(shapes["moe_blocks.moe.router_bias"], jnp.float32)
    nnx.replace_by_pure_dict(abstract, _unflatten(values))
    return nnx.merge(graphdef, abstract)


def save_pretrained(model: Transformer, path, dtype: str | None = None, max_shard_size: int | str = "5GB") -> None:
    """Write config.json + safetensors (HF names) that transformers (4.x and 5.x) and `from_pretrained` load.

    dtype: storage dtype of the tensors (None: the model's param_dtype).
    max_shard_size: bytes per file (an int, or "5GB" / "500MiB" as transformers spells it). A model larger than
      that is written as model-0000k-of-0000n.safetensors + model.safetensors.index.json, one shard in host
      memory at a time (parameters move to the host one layer at a time).
    A μP model (mup_base_width) is written with its readout multiplier folded into lm_head, so it loads back as
    a standard-parametrisation model with the same logits. Weight files of an earlier save in the folder are
    removed first: transformers prefers a model.safetensors over an index, so a stale one would be loaded instead
    of the new shards. With several processes every one calls this (parameters sharded across them are gathered
    one layer at a time); process 0 writes the files.
    """
    cfg = model.cfg
    hf = config_to_hf(cfg)
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    hf["dtype"] = hf["torch_dtype"] = jnp.dtype(out_dtype).name  # a name, however given; 4.x reads torch_dtype
    limit = _parse_size(max_shard_size)
    ours = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if cfg.mup_base_width:  # μP's readout multiplier 1/m folded into the head: HF has no such factor
        ours["lm_head"] = ours["lm_head"] / cfg.width_mult
    if cfg.moe is not None and np.any(_to_host(ours["moe_blocks.moe.router_bias"]) != 0):
        raise ValueError("moe.router_bias is non-zero (aux-loss-free balancing); Mixtral has no selection bias, "
                         "so this model cannot be exported exactly")
    plan = []  # (HF name, bytes, thunk giving the HF-layout array): sizes known before anything is copied
    for key, (name, to_hf, _) in _hf_layout(cfg).items():
        arr, fix = ours[key], to_hf or (lambda a: a)
        layers = _layers_of(cfg, key)
        for j, i in enumerate(layers or [None]):
            per_layer = arr.shape[1:] if layers is not None else arr.shape
            experts = range(per_layer[0]) if "{e}" in name else [None]
            for e in experts:
                index = (() if layers is None else (j,)) + (() if e is None else (e,))
                shape = per_layer[1:] if e is not None else per_layer
                host = lambda a=arr, ix=index, f=fix: np.ascontiguousarray(f(_to_host(a[ix]).astype(out_dtype)))  # noqa: E731
                plan.append((name.format(i=i, e=e), int(np.prod(shape)) * out_dtype.itemsize, host))
    shards, size = [[]], 0
    for entry in plan:
        if shards[-1] and size + entry[1] > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[1]
    folder, primary = Path(path), jax.process_index() == 0
    if primary:
        folder.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(hf, indent=2) + "\n"  # before anything is deleted: a failure leaves the old export
        for old in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors",
                    folder / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
        (folder / "config.json").write_text(config_text)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(files, shards, strict=True):
        tensors = {name: thunk() for name, _, thunk in shard}  # every process: the gathers are collective
        if primary:
            save_file(tensors, folder / file, metadata={"format": "pt"})
    if primary and len(shards) > 1:
        index = {"metadata": {"total_size": sum(b for _, b, _ in plan)},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if jax.process_count() > 1:  # nobody reads the folder before it is complete
        multihost_utils.sync_global_devices(f"save_pretrained {folder}")


def _to_host(a) -> np.ndarray:
    """A parameter (slice) as a NumPy array; one sharded over several processes is gathered on each."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a transformers-style size string ("5GB" = 5e9, "500MiB" = 500 * 2**20)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if not m or float(m[1]) <= 0:
        raise ValueError(f"save_pretrained max_shard_size={size!r}: give a positive number of bytes or a string "
                         "like '5GB' or '500MiB'")
    return int(float(m[1]) * _UNITS[m[2]])


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _unflatten(flat):
    tree = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
