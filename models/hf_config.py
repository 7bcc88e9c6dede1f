"""Hugging Face config.json <-> `TransformerConfig`, for `models.hf` (Llama, Mistral, Ministral, Qwen2, Qwen3,
Qwen3-MoE, Gemma 2, Gemma 3 text, Mixtral, OLMo 2).

Reads both layouts found on published checkpoints: `rope_theta` / `rope_scaling` as transformers 4.x writes them and
`rope_parameters` as 5.x does; fields a config.json leaves out take the value transformers assumes (`HF_DEFAULTS`),
not our own default. Features we do not implement are refused with the field's name and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings

from models.config import RopeScaling, TransformerConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Gemma2ForCausalLM": "gemma2", "MixtralForCausalLM": "mixtral", "MinistralForCausalLM": "ministral",
                 "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma3ForCausalLM": "gemma3_text",
                 "Olmo2ForCausalLM": "olmo2"}
# What transformers' config classes (5.x) assume for fields a config.json leaves out: an absent field must mean what it
# means to HF (e.g. Gemma 2 without softcapping fields is soft-capped at 50 / 30), not our own default.
# max_position_embeddings too: it was "lacks required field", and it is the default original length of llama3 / YaRN.
HF_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(sliding_window=4096, num_key_value_heads=8, max_position_embeddings=131072),
    # Mistral with a window per layer (layer_types)
    "ministral": dict(sliding_window=4096, num_key_value_heads=8, max_position_embeddings=131072),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, router_aux_loss_coef=0.001, num_key_value_heads=8,
                    max_position_embeddings=131072),
    "qwen2": dict(sliding_window=4096, max_window_layers=28, num_key_value_heads=32, max_position_embeddings=32768),
    # Qwen3Config's head_dim is a field of its own (128), not hidden_size // num_attention_heads
    "qwen3": dict(head_dim=128, sliding_window=4096, max_window_layers=28, num_key_value_heads=32,
                  max_position_embeddings=32768),
    # (its attention reads head_dim when config.json has one, else hidden_size // num_attention_heads)
    "qwen3_moe": dict(sliding_window=4096, num_key_value_heads=4, max_position_embeddings=32768,
                      num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, norm_topk_prob=False,
                      router_aux_loss_coef=0.001),
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                   num_key_value_heads=4, max_position_embeddings=8192),
    # (Gemma3TextConfig: its RoPE defaults, theta 1e6 globally and 1e4 locally, are read in _gemma3_rope)
    "gemma3_text": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=4096,
                        num_key_value_heads=4, max_position_embeddings=131072, sliding_window_pattern=6),
    # (Olmo2Config: eps 1e-5, not Llama's 1e-6; its absent num_key_value_heads is num_attention_heads, as Llama's)
    "olmo2": dict(max_position_embeddings=2048, rms_norm_eps=1e-5),
}  # (Llama's absent num_key_value_heads is num_attention_heads)
_HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}  # our mlp_act -> HF hidden_act / hidden_activation
# HF hidden_act -> our mlp_act: transformers' ACT2FN runs 'swish' as SiLU and 'gelu_new' as the same tanh GELU
# as 'gelu_pytorch_tanh' (published checkpoints use all four; they were refused)
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# our field -> the config.json fields config_from_hf reads it from, to name them in TransformerConfig's errors
_HF_FIELDS = {"vocab_size": ("vocab_size",), "d_model": ("hidden_size",), "n_layers": ("num_hidden_layers",),
              "n_heads": ("num_attention_heads",), "n_kv_heads": ("num_attention_heads", "num_key_value_heads"),
              "head_dim": ("head_dim", "hidden_size", "num_attention_heads"), "mlp_dim": ("intermediate_size",),
              "max_seq_len": ("max_position_embeddings",), "norm_eps": ("rms_norm_eps",),
              "init_std": ("initializer_range",), "sliding_window": ("sliding_window",),
              "attn_logit_softcap": ("attn_logit_softcapping",),
              "final_logit_softcap": ("final_logit_softcapping",), "query_pre_attn_scalar": ("query_pre_attn_scalar",),
              "moe_every": ("decoder_sparse_step",)}
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_FIELDS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def _unsupported(field, value, what_to_do):
    return ValueError(f"HF config field {field}={value!r} is not supported: {what_to_do}")


def _number(field: str, value, whole: bool = False) -> float | int:
    """value as a float (an int when `whole`), or an error naming the HF field: null was a bare TypeError from
    float(), and int() cut a fractional original length (512.5 -> 512) that transformers uses as is."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (whole and not float(value).is_integer()):
        raise ValueError(f"HF config field {field}={value!r} must be a {'whole number' if whole else 'number'}; "
                         "fix config.json")
    return int(value) if whole else float(value)


def _rope_from_hf(hf: dict, where: str | None = None) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout: 5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`. where: the
    config.json field the dict came from, for errors (Gemma 3's)."""
    params = hf.get("rope_parameters") or {}
    # nested per layer type: dicts under layer-type keys (a flat one with 4.x's `type` key is read as transformers does)
    if any(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", params, "per-layer-type RoPE is not supported (Llama, Mistral "
                           "and Qwen2 use one rope_type/rope_theta for all layers)")
    # A non-null rope_scaling wins over rope_parameters in both versions (4.x reads only rope_scaling; 5.x takes
    # `rope_scaling or rope_parameters`); theta then comes from it or the top-level rope_theta.
    where = where or ("rope_scaling" if hf.get("rope_scaling") else "rope_parameters")  # the dict the fields come from
    params = dict(hf.get("rope_scaling") or params)
    theta = _number(f"{where}.rope_theta" if "rope_theta" in params else "rope_theta",
                    params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    # a top-level one (the 4.x layout) counts as well: 5.x moves it into rope_parameters when they lack it, and it was
    # refused from there but ignored at the top level. null means full width, as in transformers.
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise _unsupported("partial_rotary_factor", partial, "only full-width RoPE (1.0)")
    if kind == "default":
        return theta, None
    # a required key absent was "HF config lacks required field 'factor'", as if config.json's top level lacked it;
    # YaRN's too (transformers requires the key: only a null factor is DeepSeek's ratio of the lengths, below)
    need = {"linear": ("factor",), "llama3": _LLAMA3_FIELDS[:3], "yarn": ("factor",)}.get(kind, ())
    if missing := [f for f in need if f not in params]:
        raise ValueError(f"HF config field {where} lacks {', '.join(map(repr, missing))}, which rope_type={kind!r} "
                         "needs (transformers refuses it too); add it to config.json")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=_number(f"{where}.factor", params["factor"]))
    if kind in ("llama3", "yarn"):
        # transformers 5.x defaults an absent inner original_max_position_embeddings to max_position_embeddings: the
        # config classes of these models never read a top-level one (only those declaring it, as Phi-3's, do), and
        # 4.x reads only the inner one. A top-level one that differs says something the model will not do.
        field = f"{where}.original_max_position_embeddings"
        if params.get("original_max_position_embeddings") is None:
            field = f"max_position_embeddings (the default of {field})"
            params["original_max_position_embeddings"] = hf.get("max_position_embeddings")
        used = _number(field, params["original_max_position_embeddings"], whole=True)
        top = hf.get("original_max_position_embeddings")
        if top is not None and int(top) != used:
            raise _unsupported("original_max_position_embeddings", top, f"transformers ignores this top-level "
                               f"field and uses {used} (rope_scaling's, else max_position_embeddings); keep one value")
        if kind == "yarn":
            if params.get("factor") is None:  # DeepSeek's layout: the ratio of the two lengths, as transformers takes
                params["factor"] = hf["max_position_embeddings"] / used
            opt = {f: params[f] for f in _YARN_FIELDS if params.get(f) is not None}
            if "truncate" in params:  # transformers tests it for truth: null (or 0) leaves the ramp's ends unrounded
                opt["truncate"] = bool(params["truncate"])
            return theta, RopeScaling(kind="yarn", factor=_number(f"{where}.factor", params["factor"]),
                                      original_max_position_embeddings=used, **opt)
        return theta, RopeScaling(kind="llama3", **{f: _number(f"{where}.{f}", params[f]) for f in _LLAMA3_FIELDS[:3]},
                                  original_max_position_embeddings=used)
    raise _unsupported("rope_type", kind, "supported RoPE types are default, linear, llama3 and yarn")


def _gemma3_rope(hf: dict) -> tuple[float, RopeScaling | None, float | None]:
    """Gemma 3's two RoPEs as (theta, scaling, local theta): full_attention layers' (theta 1e6 by default, any
    scaling), sliding ones' (unscaled, theta 1e4 by default), from 5.x's per-layer-type rope_parameters or 4.x's
    rope_theta / rope_scaling / rope_local_base_freq (a rope_scaling updates the full layers' in 5.x too). The local
    theta is None when it is the global one unscaled: every layer then rotates alike."""
    params = hf.get("rope_parameters") or {}
    if params and not all(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", params, "Gemma 3 keeps one dict per layer type: {'full_attention': "
                           "{...}, 'sliding_attention': {...}}")
    if unknown := sorted(set(params) - {"full_attention", "sliding_attention"}):
        raise _unsupported("rope_parameters", unknown, "Gemma 3's layer types are full_attention and sliding_attention")
    full = {**(params.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
    full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise _unsupported("rope_parameters.sliding_attention.rope_type", local.get("rope_type", local.get("type")),
                           "Gemma 3's sliding layers rotate unscaled here ('default')")
    local_theta = _number("rope_parameters.sliding_attention.rope_theta" if "rope_theta" in local
                          else "rope_local_base_freq", local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))
    theta, scaling = _rope_from_hf({"rope_parameters": full,
                                    "max_position_embeddings": hf.get("max_position_embeddings"),
                                    "original_max_position_embeddings": hf.get("original_max_position_embeddings")},
                                   # (a missing factor was named as rope_parameters', a dict of layer types here)
                                   "rope_scaling" if hf.get("rope_scaling") else "rope_parameters.full_attention")
    return theta, scaling, None if (scaling is None and local_theta == theta) else local_theta


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        # a bare-model export (LlamaModel: no head, no "model." prefix) is the CausalLM's body, which transformers'
        # AutoModelForCausalLM builds from model_type and loads it into (the head tied, or missing and named)
        causal = a.removesuffix("Model") + "ForCausalLM" if a.endswith("Model") else a
        if causal in ARCHITECTURES:
            # transformers' Auto classes build the model of `model_type`: another one would load other maths
            mt = hf.get("model_type")
            if mt is not None and mt != ARCHITECTURES[causal]:
                raise _unsupported("model_type", mt, f"architectures says {a} ({ARCHITECTURES[causal]!r}), and "
                                   "transformers would build a model_type one; make the two agree")
            return ARCHITECTURES[causal]
    if not archs and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"]
    raise _unsupported("architectures", archs or hf.get("model_type"),
                       f"supported are {sorted(ARCHITECTURES)}")


def _attention_pattern(hf: dict, arch: str) -> dict:
    """attn_pattern / sliding_window fields from the HF window settings (Mistral semantics)."""
    window, L = hf.get("sliding_window"), hf["num_hidden_layers"]
    if arch in ("llama", "olmo2") or window is None or (arch.startswith("qwen")
                                                         and not hf.get("use_sliding_window", False)):
        return {}
    if arch == "gemma2":
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    elif arch == "gemma3_text":  # sliding but every sliding_window_pattern-th layer
        types = hf.get("layer_types")
        if not types:  # (the count is read only then: layer_types wins, as in transformers)
            period = _window_count(hf, "sliding_window_pattern", "the period of one full layer among sliding ones", 1)
            types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(L)]
    elif arch in ("qwen2", "qwen3"):
        types = hf.get("layer_types")
        if not types:
            k = _window_count(hf, "max_window_layers", "the number of full-attention layers below the sliding ones")
            types = ["sliding_attention" if i >= k else "full_attention" for i in range(L)]
    elif arch in ("mistral", "ministral"):  # with layer_types, AutoConfig builds a Mistral one as Ministral
        types = hf.get("layer_types") or ["sliding_attention"] * L
    else:
        types = ["sliding_attention"] * L
    if len(types) != L:  # transformers refuses it too
        raise ValueError(f"HF config field layer_types has {len(types)} entr{'ies' if len(types) != 1 else 'y'} for "
                         f"num_hidden_layers={L}; give one per layer")
    # any other type (Llama 4's chunked_attention, a typo) read as full attention; transformers fails only in forward
    for i, t in enumerate(types):
        if t not in ("sliding_attention", "full_attention"):
            raise _unsupported(f"layer_types[{i}]", t, f"{arch} layers are 'sliding_attention' or 'full_attention'")
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
    return dict(attn_pattern="".join("L" if x else "G" for x in local), sliding_window=int(window))  # layer by layer


def _window_count(hf: dict, field: str, what: str, least: float = -float("inf")) -> int | float:
    """hf[field], the count that places the sliding layers when config.json has no layer_types, or an error naming
    it: null or a string was a bare TypeError from the comparison, 0 a ZeroDivisionError (transformers fails alike).
    What transformers takes passes (a negative max_window_layers slides every layer, as 0 does)."""
    v = hf[field]
    if isinstance(v, bool) or not isinstance(v, int | float) or v < least or not float(v).is_integer():
        raise ValueError(f"HF config field {field}={v!r} must be a whole number{f' >= {least}' * (least > 0)} "
                         f"({what}); fix config.json, or give layer_types")
    return v


def config_from_hf(hf: dict, **overrides) -> TransformerConfig:
    """TransformerConfig from a HF config.json dict (transformers 4.x or 5.x layout).

    `overrides` (e.g. dtype, attn_impl, remat, scan_layers, max_seq_len) replace mapped fields. Absent fields take
    transformers' defaults (HF_DEFAULTS); an explicit null keeps its HF meaning (e.g. no soft-capping).
    """
    arch = _architecture(hf)
    defaulted = set(HF_DEFAULTS.get(arch, {})) - set(hf)  # fields transformers' default fills in
    hf = {**HF_DEFAULTS.get(arch, {}), **hf}
    # a string "false" was read as true (a tied head, q/k/v biases, Qwen2's windows): transformers 5.x refuses it,
    # 4.x reads it as true. null stays false and 0 / 1 are taken, as 4.x reads them
    for f in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_bidirectional_attention",
              "norm_topk_prob"):
        v = hf.get(f)
        if v is not None and (not isinstance(v, int) or v not in (0, 1)):
            raise ValueError(f"HF config field {f}={v!r} must be true, false or null; fix config.json")
    if hf.get("use_bidirectional_attention"):
        raise _unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"],
                           "only causal decoders are supported; load a causal checkpoint (false or null)")
    # transformers drops attention probabilities in train mode; we have no dropout, so a fine-tune ran without it
    # silently. Loaded (inference is the same) with a word, as the other fields we read but cannot honour in training
    if (p := hf.get("attention_dropout")) and p != 0:
        warnings.warn(f"HF config attention_dropout={p!r}: this model has no dropout, so fine-tuning it runs without "
                      "(transformers' train mode drops attention probabilities at that rate); inference is unchanged",
                      stacklevel=3)
    # the one its MLP reads; others ignored
    act_field = "hidden_activation" if arch in ("gemma2", "gemma3_text") else "hidden_act"
    act = hf.get(act_field, "silu")
    if not isinstance(act, str) or act not in _ACT_FROM_HF:  # (a list was "unhashable type")
        raise _unsupported(act_field, act, f"our gated MLP runs one of {sorted(_ACT_FROM_HF)} (silu, or GELU's tanh "
                                           "approximation)")
    # (Llama's MLP alone reads it: a Qwen2 / Mistral config.json carrying it true has no MLP biases in transformers)
    if hf.get("mlp_bias", False) and arch == "llama":
        raise _unsupported("mlp_bias", True, "our MLP has no biases")
    if q := hf.get("quantization_config"):
        raise _unsupported("quantization_config", q.get("quant_method", q) if isinstance(q, dict) else q,
                           "quantized checkpoints (their scale tensors) are not read; load the unquantized model")
    # "2" failed as "unsupported operand type(s) for //: 'int' and 'str'"; null too where transformers gives it no
    # meaning (its strict config refuses it) and '//', '*' or range() read it before any check, naming no field
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "max_position_embeddings", "sliding_window", "num_local_experts",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
        v = hf.get(f)
        if (v is not None or (f in required and f in hf)) and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"HF config field {f}={v!r} must be an integer; fix config.json")
    for f in ("rope_scaling", "rope_parameters"):  # a number or a list was a bare TypeError where its keys were read
        if (v := hf.get(f)) is not None and not isinstance(v, dict):
            raise ValueError(f"HF config field {f}={v!r} must be an object of RoPE settings (e.g. {{\"rope_type\": "
                             "\"linear\", \"factor\": 2.0}) or null; fix config.json")
    fields = [f.name for f in dataclasses.fields(TransformerConfig)]
    if unknown := sorted(set(overrides) - set(fields)):
        near = {u: difflib.get_close_matches(u, fields, n=1) for u in unknown}
        raise ValueError(f"config overrides {unknown} are not TransformerConfig fields"
                         + "".join(f"; {u!r}: did you mean {m[0]!r}?" for u, m in near.items() if m))
    try:
        gemma3 = arch == "gemma3_text"
        theta, scaling, local_theta = _gemma3_rope(hf) if gemma3 else (*_rope_from_hf(hf), None)
        n_heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads")
        # (n_heads <= 0: TransformerConfig names it; the division was a bare ZeroDivisionError)
        head_dim = hf.get("head_dim") or (hf["hidden_size"] // n_heads if n_heads > 0 else None)
        kw = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  # null is MHA, as in transformers; 0 was read as null (a Llama 3 8B with 32 KV heads), where
                  # transformers fails: TransformerConfig names it
                  n_heads=n_heads, n_kv_heads=n_heads if kv is None else kv,
                  head_dim=None if head_dim is None or head_dim * n_heads == hf["hidden_size"] else head_dim,
                  mlp_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                  rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
                  # the std transformers initialises every projection and embedding with (0.02 in each of its
                  # configs): a model built from a config.json to train from scratch starts as HF's would
                  init_std=hf.get("initializer_range", 0.02),
                  # Qwen2 always has q/k/v biases; Llama's and Gemma 2's attention_bias also adds an o_proj bias,
                  # which the loader accepts only when it is zero (see from_pretrained). Mistral's and Mixtral's
                  # attention has no biases whatever the flag says (transformers ignores it there too).
                  # Qwen3's attention_bias is Llama's (q / k / v and o_proj), and so is OLMo 2's
                  qkv_bias=arch == "qwen2" or (arch in ("llama", "gemma2", "gemma3_text", "qwen3", "qwen3_moe",
                                                        "olmo2") and bool(hf.get("attention_bias", False))),
                  qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", arch.startswith("gemma"))),
                  mlp_act=_ACT_FROM_HF[act], **_attention_pattern(hf, arch))
        if arch == "mixtral":
            kw.update(moe=_moe_from_hf(hf, kw["mlp_act"]), moe_every=1)
        if arch == "qwen3_moe":
            kw.update(_qwen3_moe_from_hf(hf, kw["mlp_act"]))
        if arch == "olmo2":  # norms on the sublayers' outputs only; q / k norms over the whole projection
            kw.update(pre_norms=False, post_norms=True, qk_norm_scope="all_heads")
        if arch in ("gemma2", "gemma3_text"):  # (1 + w) norms, four per layer, sqrt(D) embedding scale, soft-caps
            kw.update(norm_offset=1.0, post_norms=True, embed_scale=True,
                      # null is refused, as transformers refuses it (None ** -0.5): read as head_dim, a Gemma 2
                      # 27B (head_dim 128, its scalar 144 = hidden_size / heads) scaled every score wrong, silently
                      query_pre_attn_scalar=_number("query_pre_attn_scalar", hf["query_pre_attn_scalar"]),
                      # Gemma 3's attention never reads its attn_logit_softcapping (q / k norms replace the cap)
                      attn_logit_softcap=None if gemma3 else hf["attn_logit_softcapping"],
                      final_logit_softcap=hf["final_logit_softcapping"])
        if local_theta is not None and kw.get("attn_pattern", "global") != "global":  # else no layer uses it
            kw.update(local_rope_theta=local_theta)
    except KeyError as e:
        raise ValueError(f"HF config lacks required field {e.args[0]!r}") from None
    except ValueError as e:  # MoEConfig / RopeScaling (built from config.json alone) name fields of ours
        if not (read := _moe_rope_source(str(e), hf)):
            raise
        raise ValueError(f"{e} (read from HF config field {read}; fix config.json)") from None
    kw.update(overrides)
    kv = kw["n_kv_heads"]
    if "num_key_value_heads" in defaulted and "n_kv_heads" not in overrides and kw["n_heads"] % kv:
        # TransformerConfig would blame n_kv_heads, a field of ours that is in no config.json
        raise ValueError(f"HF config has no num_key_value_heads: transformers' default for {arch} is {kv}, which does "
                         f"not divide num_attention_heads={kw['n_heads']}; set num_key_value_heads in config.json")
    try:
        return TransformerConfig(**kw)
    except ValueError as e:  # it names a field of ours, which no config.json has: add the HF ones it came from
        ours = re.match(r"TransformerConfig\.(\w+):", str(e))
        names = _HF_FIELDS.get(ours[1], ()) if ours else ()
        # an override behind the value (n_heads against config.json's kv heads, a d_model giving an odd head_dim,
        # attn_pattern='local' without a window) is the user's to fix, not config.json's
        if not names or any(o == ours[1] or set(_HF_FIELDS.get(o, ())) & set(names) or re.search(rf"\b{o}=", str(e))
                            for o in overrides):
            raise
        read = ", ".join(f"{n}={hf.get(n)!r}" for n in names)
        raise ValueError(f"{e} (read from HF config field{'s' * (len(names) > 1)} {read}; fix config.json)") from None


def _moe_rope_source(message: str, hf: dict) -> str | None:
    """'field=value' of the config.json field behind a MoEConfig / RopeScaling error, or None: 'MoEConfig.top_k: 3 >
    n_experts=2' said nothing of num_experts_per_tok."""
    m = re.match(r"(MoEConfig|RopeScaling)\.(\w+):", message)
    if not m:
        return None
    if m[1] == "RopeScaling":  # the dict _rope_from_hf read it from
        where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        params = hf.get(where) or {}
        return f"{where}.{m[2]}={params[m[2]]!r}" if m[2] in params else None
    experts = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"  # as _moe_from_hf reads
    if hf.get("model_type") == "qwen3_moe" or "Qwen3MoeForCausalLM" in (hf.get("architectures") or []):
        experts = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"  # as it reads
    width = "moe_intermediate_size" if "moe_intermediate_size" in hf else "intermediate_size"  # Qwen3-MoE's / Mixtral's
    name = {"n_experts": experts, "top_k": "num_experts_per_tok", "expert_mlp_dim": width,
            "lb_loss_weight": "router_aux_loss_coef"}.get(m[2])
    return f"{name}={hf.get(name)!r}" if name else None


def _moe_from_hf(hf: dict, mlp_act: str):
    k = hf.get("num_experts_per_tok", 2)
    # null (transformers stores it as given; its router's top-k then fails) was a bare TypeError in the product below
    for field, v in (("num_experts_per_tok", k), ("router_aux_loss_coef", hf.get("router_aux_loss_coef", 0.0))):
        if v is None:
            raise ValueError(f"HF config field {field}=null: a Mixtral config needs a value (transformers' default "
                             f"is {2 if field == 'num_experts_per_tok' else 0.001}); fix config.json")
    # transformers' Mixtral balancing loss is k × ours per layer (tests/test_moe.py): keep its objective's weight.
    # (HF pools the router statistics of all layers before the product, we average per-layer losses: equal for
    # one layer, close otherwise.) Mixtral has no router z-loss: its weight is 0.
    # transformers' MixtralConfig maps `num_experts` onto num_local_experts (attribute_map), and it wins over it
    n = hf["num_experts"] if hf.get("num_experts") is not None else hf.get("num_local_experts", 8)
    return _checkpoint_moe("Mixtral's renormalised top-k", n_experts=n, top_k=k, expert_mlp_dim=hf["intermediate_size"],
                           router="softmax", renormalize=True,
                           # (a string "0.02" was repeated k times in MoEConfig's message: "got '0.020.02'")
                           lb_loss_weight=_number("router_aux_loss_coef", hf["router_aux_loss_coef"]) * k,
                           z_loss_weight=0.0, mlp_act=mlp_act)


def _checkpoint_moe(routing: str, **fields):
    """MoEConfig(**fields) of a checkpoint's routing. Its top-1 renormalised warning advised renormalize=False, which
    changes the checkpoint's logits (transformers weights the one expert by 1) and has no Mixtral export: said here
    as the checkpoint's own routing instead."""
    from models.moe import MoEConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"MoEConfig\(top_k=1, renormalize=True\)")
        moe = MoEConfig(**fields)
    if moe.top_k == 1 and moe.n_experts > 1 and moe.renormalize:
        warnings.warn(f"HF config num_experts_per_tok=1 with {routing}: every expert output is weighted exactly 1, as "
                      "in transformers, so fine-tuning trains the router through the balancing loss only (kept: "
                      "other weights would change the checkpoint's logits)", stacklevel=4)
    return moe


def _qwen3_moe_from_hf(hf: dict, mlp_act: str) -> dict:
    """moe / moe_every of a Qwen3-MoE config.json: layer i is MoE when (i + 1) % decoder_sparse_step == 0 (our
    moe_every), unless mlp_only_layers lists it; softmax routing, top-k weights renormalised when norm_topk_prob."""
    step, k = hf["decoder_sparse_step"], hf["num_experts_per_tok"]
    # 5.x writes num_local_experts, and its attribute_map reads num_experts (the hub's) onto it; given both,
    # num_local_experts wins (Mixtral's config the other way round)
    experts = "num_local_experts" if hf.get("num_local_experts") is not None else "num_experts"
    n = hf.get(experts, 128)
    for field, v in (("decoder_sparse_step", step), ("num_experts_per_tok", k), (experts, n),
                     ("router_aux_loss_coef", hf["router_aux_loss_coef"])):
        if v is None:
            raise ValueError(f"HF config field {field}=null: a Qwen3-MoE config needs a value; fix config.json")
    if n == 0:  # transformers then builds dense layers only
        raise _unsupported(experts, 0, "a Qwen3-MoE without experts is a dense model: load it as Qwen3 "
                           "(architectures ['Qwen3ForCausalLM'], model_type 'qwen3')")
    L = hf["num_hidden_layers"]
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ValueError(f"HF config field mlp_only_layers={only!r} must be a list of layer indices; fix config.json")
    if forced := sorted(i for i in set(only) if 0 <= i < L and step > 0 and (i + 1) % step == 0):
        raise _unsupported("mlp_only_layers", only, f"layers {forced} would be dense where decoder_sparse_step={step} "
                           "makes them MoE; our MoE layers are every decoder_sparse_step-th one (empty it)")
    moe = _checkpoint_moe("norm_topk_prob=true", n_experts=n, top_k=k, expert_mlp_dim=hf["moe_intermediate_size"],
                          router="softmax", renormalize=bool(hf["norm_topk_prob"]),
                          # transformers' loss is k x ours (as Mixtral's)
                          lb_loss_weight=_number("router_aux_loss_coef", hf["router_aux_loss_coef"]) * k,
                          z_loss_weight=0.0, mlp_act=mlp_act)
    return dict(moe=moe, moe_every=step)


def _check_moe_export(arch: str, cfg: TransformerConfig, windows, checks=()) -> None:
    """Refuse a MoE model `arch`'s Hugging Face layout cannot hold: softmax routing, no shared experts, dropless, one
    window (or none) on every layer, and `checks` (field, value, what to set, ok) of its own."""
    m = cfg.moe
    wrong = [f"{field}={value!r} (set {want})" for field, value, want, ok in (
        ("MoEConfig.router", m.router, "'softmax'", m.router == "softmax"),
        ("MoEConfig.n_shared_experts", m.n_shared_experts, "0", m.n_shared_experts == 0),
        ("MoEConfig.dispatch", m.dispatch, f"'dropless': {arch} drops no token", m.dispatch == "dropless"),
        *checks) if not ok]
    if wrong:  # the one that fails, not the whole list ("needs moe_every=2 (set 1 ...)" read as asking for the 2)
        raise ValueError(f"a {arch} export has no form for {'; '.join(wrong)}")
    if len(set(windows)) != 1:
        raise ValueError(f"TransformerConfig.attn_pattern: windows {windows}: {arch} takes the same window (or "
                         "none) on every layer; no Hugging Face MoE layout here mixes local and global layers")


def _mixtral_config(cfg: TransformerConfig, hf: dict, windows) -> dict:
    m = cfg.moe
    _check_moe_export("Mixtral", cfg, windows, (
        ("TransformerConfig.moe_every", cfg.moe_every, "1: MoE on every layer", cfg.moe_every == 1),
        ("MoEConfig.renormalize", m.renormalize, "True", m.renormalize),
        ("TransformerConfig.qkv_bias", cfg.qkv_bias, "False", not cfg.qkv_bias)))
    return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", sliding_window=windows[0],
                num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, output_router_logits=False,
                router_aux_loss_coef=m.lb_loss_weight / m.top_k, router_jitter_noise=0.0,
                **{**hf, "intermediate_size": m.expert_mlp_dim})


def config_to_hf(cfg: TransformerConfig) -> dict:
    """HF config.json dict (5.x layout) that transformers loads into the same model.

    Gemma2ForCausalLM for its block (attention_bias when cfg.qkv_bias; save_pretrained writes its o_proj biases as
    zeros), Qwen3ForCausalLM with qk_norm (Qwen3MoeForCausalLM with moe too; attention_bias as Gemma 2's),
    MixtralForCausalLM with moe, Qwen2ForCausalLM when cfg.qkv_bias (q/k/v bias, no o_proj bias),
    MistralForCausalLM with a window on every layer or a d_model that n_heads does not divide,
    MinistralForCausalLM with one window on some layers, Olmo2ForCausalLM without pre_norms (or with
    qk_norm_scope='all_heads'), LlamaForCausalLM otherwise.
    """
    if not cfg.pre_norms or cfg.qk_norm_scope == "all_heads":
        return _olmo2_config(cfg)
    if cfg.post_norms or cfg.norm_offset or cfg.embed_scale:
        if cfg.query_pre_attn_scalar is not None and not float(cfg.query_pre_attn_scalar).is_integer():
            raise ValueError("TransformerConfig.query_pre_attn_scalar must be a whole number for Gemma 2 / 3")
        return _gemma2_config(cfg)
    if cfg.local_rope_theta is not None:
        raise ValueError("TransformerConfig.local_rope_theta (a RoPE base of the local layers' own) is Gemma 3's, "
                         "whose block (post_norms, norm_offset=1, embed_scale, qk_norm) this model lacks; set it to "
                         "None")
    if cfg.final_logit_softcap is not None or cfg.attn_logit_softcap is not None:
        raise ValueError("TransformerConfig soft-capping has no Llama/Mistral/Qwen2 equivalent; set it to None "
                         "(or use the Gemma 2 block: post_norms, norm_offset=1, embed_scale)")
    if cfg.query_pre_attn_scalar is not None:
        raise ValueError("TransformerConfig.query_pre_attn_scalar: Llama/Mistral/Qwen2 use the default "
                         "1/sqrt(head_dim) query scale; set it to None (or use the Gemma 2 block)")
    windows = cfg.layer_windows()
    rope = _rope_to_hf(cfg)
    hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd,
              intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              initializer_range=cfg.init_std,
              # their MLPs (Mixtral's experts too) run hidden_act, as config_from_hf reads it: both activations
              hidden_act=_HF_ACT[cfg.mlp_act], tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
              **_rope_4x(rope),
              bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=cfg.param_dtype)
    if cfg.qk_norm:
        return _qwen3_config(cfg, hf, windows)
    if cfg.moe is not None:
        return _mixtral_config(cfg, hf, windows)
    if cfg.qkv_bias:
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                    **_qwen_windows(cfg, windows, "qkv_bias (Qwen2)"), **hf)
    # Mistral: one window on every layer. Without one it is Llama's model, and the form transformers 5.x loads when
    # d_model is not a multiple of n_heads (an explicit head_dim): its LlamaConfig refuses that, MistralConfig does not
    if any(w is not None for w in windows) or cfg.d_model % cfg.n_heads:
        local = {w for w in windows if w is not None}
        if len(local) > 1:
            raise ValueError(f"TransformerConfig.attn_pattern: windows {windows} have no Hugging Face layout here: "
                             "Mistral (and Mixtral, Qwen2 with qkv_bias) take one window on every layer "
                             "(attn_pattern='local'), Ministral one window on the layers layer_types names; Gemma 2 "
                             "alternates, with its block (post_norms, norm_offset=1, embed_scale)")
        if len(set(windows)) != 1:  # some layers global: Ministral (what transformers builds of Mistral + layer_types)
            return dict(architectures=["MinistralForCausalLM"], model_type="ministral", sliding_window=local.pop(),
                        layer_types=["sliding_attention" if w else "full_attention" for w in windows], **hf)
        return dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=windows[0], **hf)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False, **hf)


def _olmo2_config(cfg: TransformerConfig) -> dict:
    """Olmo2ForCausalLM: Llama's attention and MLP with RMSNorms on the sublayers' outputs only (no pre-norms) and
    q / k norms over the whole projection; its attention_bias adds an o_proj bias too, written as zeros."""
    wrong = [f"TransformerConfig.{field}={value!r} (set {want})" for field, value, want, ok in (
        ("pre_norms", cfg.pre_norms, "False", not cfg.pre_norms),
        ("post_norms", cfg.post_norms, "True", cfg.post_norms),
        ("qk_norm", cfg.qk_norm, "True", cfg.qk_norm),
        ("qk_norm_scope", cfg.qk_norm_scope, "'all_heads'", cfg.qk_norm_scope == "all_heads"),
        ("norm_offset", cfg.norm_offset, "0", cfg.norm_offset == 0),
        ("embed_scale", cfg.embed_scale, "False", not cfg.embed_scale),
        ("moe", cfg.moe, "None", cfg.moe is None),
        ("attn_pattern", cfg.attn_pattern, "'global': OLMo 2 has no sliding window",
         not any(w is not None for w in cfg.layer_windows())),
        ("attn_logit_softcap", cfg.attn_logit_softcap, "None", cfg.attn_logit_softcap is None),
        ("final_logit_softcap", cfg.final_logit_softcap, "None", cfg.final_logit_softcap is None),
        ("query_pre_attn_scalar", cfg.query_pre_attn_scalar, "None", cfg.query_pre_attn_scalar is None)) if not ok]
    if wrong:  # the settings that fail, not the whole block
        raise ValueError(f"an OLMo 2 export (the Hugging Face form of a block without pre-norms, or with q / k norms "
                         f"over all heads) has no form for {'; '.join(wrong)}")
    rope = _rope_to_hf(cfg)
    return dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, intermediate_size=cfg.mlp_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act=_HF_ACT[cfg.mlp_act],
                initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias,
                rope_parameters=rope,
                **_rope_4x(rope), bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=cfg.param_dtype)


def _qwen_windows(cfg: TransformerConfig, windows, why: str) -> dict:
    """Qwen2 / Qwen3's window fields: they slide on the layers from max_window_layers on (4.x reads only that)."""
    if not any(w is not None for w in windows):
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                    layer_types=["full_attention"] * cfg.n_layers)
    k = windows.index(next(w for w in windows if w is not None))
    if any(w is not None for w in windows[:k]) or len(set(windows[k:])) != 1:
        raise ValueError(f"TransformerConfig.attn_pattern: with {why} global layers then local ones of one window "
                         f"('GGLL', 'local'), got windows {windows}")
    return dict(use_sliding_window=True, sliding_window=windows[k], max_window_layers=k,
                layer_types=["full_attention"] * k + ["sliding_attention"] * (cfg.n_layers - k))


def _qwen3_config(cfg: TransformerConfig, hf: dict, windows) -> dict:
    """Qwen3ForCausalLM (q / k norms), Qwen3MoeForCausalLM with moe. Their attention_bias adds an o_proj bias too,
    which save_pretrained writes as zeros."""
    hf = dict(hf, attention_bias=cfg.qkv_bias)
    if cfg.moe is None:
        return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                    **_qwen_windows(cfg, windows, "qk_norm (Qwen3)"), **hf)
    m = cfg.moe
    _check_moe_export("Qwen3-MoE", cfg, windows)
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                use_sliding_window=windows[0] is not None, sliding_window=windows[0], num_experts=m.n_experts,
                num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_mlp_dim,
                decoder_sparse_step=cfg.moe_every, mlp_only_layers=[], norm_topk_prob=m.renormalize,
                router_aux_loss_coef=m.lb_loss_weight / m.top_k, output_router_logits=False, **hf)


def _rope_to_hf(cfg: TransformerConfig) -> dict:
    """cfg's RoPE as a 5.x rope_parameters dict (rope_type, rope_theta and the scaling's fields)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope.update(rope_type=rs.kind, factor=rs.factor)
        if rs.kind == "llama3":
            rope.update({f: getattr(rs, f) for f in _LLAMA3_FIELDS[1:]})
        if rs.kind == "yarn":
            rope.update(original_max_position_embeddings=rs.original_max_position_embeddings,
                        # every field set, truncate only when off (its default); `not in (None, True)` also
                        # dropped mscale / attention_factor / betas of 1.0 (1.0 == True), changing the scale
                        **{f: getattr(rs, f) for f in _YARN_FIELDS
                           if getattr(rs, f) is not None and not (f == "truncate" and rs.truncate is True)})
    return rope


def _rope_4x(rope: dict) -> dict:
    """The same RoPE in transformers 4.x's fields (it ignores rope_parameters and would silently use theta 1e4);
    5.x reads rope_scaling as rope_parameters and rope_theta as its default theta, so both agree."""
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return dict(rope_theta=rope["rope_theta"], rope_scaling=scaling if scaling["rope_type"] != "default" else None)


def _gemma2_config(cfg: TransformerConfig) -> dict:
    windows = cfg.layer_windows()
    # any mlp_act: its MLP runs hidden_activation, as config_from_hf reads it (a loaded silu Gemma 2 was refused);
    # tied or not: Gemma2Config takes tie_word_embeddings=false; any rope_scaling: its rotary embedding reads
    # rope_parameters as Llama's does (both loaded, and were refused here)
    # qkv_bias: attention_bias=true, as config_from_hf reads it (a loaded Gemma 2 with q/k/v biases was refused);
    # save_pretrained writes the o_proj biases that flag adds as zeros
    wrong = [f"TransformerConfig.{field}={value!r} (set {want})" for field, value, want, ok in (
        ("post_norms", cfg.post_norms, "True", cfg.post_norms),
        ("norm_offset", cfg.norm_offset, "1.0", cfg.norm_offset == 1.0),
        ("embed_scale", cfg.embed_scale, "True", cfg.embed_scale),
        ("moe", cfg.moe, "None: Gemma 2 / 3 have no moe layers", cfg.moe is None)) if not ok]
    if wrong:  # the settings that fail, not the whole block ("needs ... norm_offset=1" said to a norm_offset=1 model)
        raise ValueError("a Gemma 2 / 3 export (the Hugging Face form of post_norms, norm_offset or embed_scale) has "
                         f"no form for {'; '.join(wrong)}")
    if cfg.local_rope_theta is not None and not cfg.qk_norm:
        raise ValueError("TransformerConfig.local_rope_theta (a RoPE base of the local layers' own) is Gemma 3's: "
                         "Gemma 2 rotates every layer alike; set it to None, or qk_norm=True for Gemma 3")
    # (with no local layer there is nothing to rotate unscaled, and TransformerConfig refuses a local_rope_theta)
    if cfg.qk_norm and cfg.rope_scaling is not None and cfg.local_rope_theta is None and any(
            w is not None for w in windows):
        raise ValueError("TransformerConfig.rope_scaling with local_rope_theta=None: Gemma 3 rotates its local layers "
                         "unscaled (rope_local_base_freq); set local_rope_theta (10000 as Gemma 3's)")
    if cfg.qk_norm and cfg.attn_logit_softcap is not None:  # Gemma 3 config.json keeps the field, its model not
        raise ValueError("TransformerConfig.attn_logit_softcap: transformers' Gemma 3 attention has no soft-cap (its "
                         "q / k norms replace it; attn_logit_softcapping is stored and ignored), so the export would "
                         "run uncapped; set it to None, or qk_norm=False for Gemma 2")
    rs = cfg.rope_scaling
    if cfg.qk_norm and rs is not None and rs.kind == "yarn" and not rs.truncate:
        # 5.x reads YaRN's truncate from rope_parameters' top level, which Gemma 3 nests per layer type: always True
        raise ValueError("RopeScaling.truncate=False: transformers' Gemma 3 reads YaRN's truncate where its per-layer-"
                         "type rope_parameters have none and rounds the ramp's ends anyway; set truncate=True, or "
                         "qk_norm=False for Gemma 2")
    if cfg.d_model % cfg.n_heads:  # transformers' Gemma2Config refuses to load it
        raise ValueError(f"TransformerConfig.d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads}, which "
                         "transformers' Gemma 2 / 3 require (head_dim may differ from d_model / n_heads); change "
                         "n_heads")
    local = [w for w in windows if w is not None]
    if len(set(local)) > 1:
        raise ValueError(f"TransformerConfig.sliding_window: Gemma 2 / 3 have one window, got {sorted(set(local))}")
    rope = _rope_to_hf(cfg)
    if cfg.qk_norm:  # Gemma 3: q / k norms, a RoPE per layer type (5.x), the local one's base in 4.x's own field
        local_rope = dict(rope_type="default", rope_theta=cfg.local_rope_theta or cfg.rope_theta)
        gemma = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                     rope_parameters=dict(full_attention=rope, sliding_attention=local_rope), **_rope_4x(rope),
                     rope_local_base_freq=local_rope["rope_theta"], use_bidirectional_attention=False)
        # transformers < 4.53 reads the pattern from this field alone (layer i slides unless (i + 1) % P == 0)
        L, slides = cfg.n_layers, tuple(w is not None for w in windows)
        period = next((p for p in range(1, L + 2) if slides == tuple((i + 1) % p != 0 for i in range(L))), None)
        if period is not None:
            gemma.update(sliding_window_pattern=period)
    else:
        gemma = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", rope_parameters=rope, **_rope_4x(rope))
    return dict(**gemma, vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, intermediate_size=cfg.mlp_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
                hidden_activation=_HF_ACT[cfg.mlp_act], tie_word_embeddings=cfg.tie_embeddings,
                query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.hd),  # transformers wants an int
                sliding_window=local[0] if local else cfg.max_seq_len,
                layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows],
                attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
                attention_bias=cfg.qkv_bias, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                dtype=cfg.param_dtype)
