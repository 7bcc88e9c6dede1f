"""Hugging Face interop: load and save Llama / Mistral / Ministral / Qwen2 / Qwen3 / Qwen3-MoE / Gemma 2 / Gemma 3
(text) / Mixtral / OLMo 2 checkpoints as `Transformer`s.

config.json maps to `TransformerConfig` in models/hf_config.py (`config_from_hf`, `config_to_hf`).
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
Sliding windows (Mistral, Ministral `layer_types`, Qwen2 `use_sliding_window`, Gemma 2 alternation) map to
`attn_pattern`.
Mixtral (every layer MoE, softmax top-k renormalised; its attention and norms live in `moe_blocks`):
  block_sparse_moe.gate.weight [E, D] <-> moe.router[i] [D, E]
  block_sparse_moe.experts.e.w1 / w3 [F, D] <-> moe.w_gate / w_up[i, e] [D, F]   w2 [D, F] <-> moe.w_down[i, e]
  transformers 5.x in-memory names (mlp.gate, mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]) load too.
Qwen3 adds per-head q / k norms: self_attn.q_norm / k_norm.weight [H] <-> q_norm / k_norm[i] [H]; Gemma 3 (text:
Gemma3ForCausalLM) is Gemma 2's names with those, and its local layers' RoPE base is local_rope_theta. Qwen3-MoE (a
model with qk_norm and moe) has MoE layers every decoder_sparse_step-th (moe_blocks), dense ones between (blocks):
  mlp.gate.weight [E, D] <-> moe.router[i] [D, E]
  mlp.experts.e.gate_proj / up_proj [F, D] <-> moe.w_gate / w_up[i, e] [D, F]   down_proj [D, F] <-> moe.w_down[i, e]
  (the fused 5.x names load too, as Mixtral's).
OLMo 2 (Olmo2ForCausalLM: pre_norms=False, qk_norm_scope='all_heads') has norms on the sublayers' outputs only and q / k
norms over the whole projection:
  post_attention_layernorm / post_feedforward_layernorm <-> post_attn_norm / post_mlp_norm[i] [D]
  self_attn.q_norm.weight [N*H] <-> q_norm[i] [N, H]   self_attn.k_norm.weight [K*H] <-> k_norm[i] [K, H]
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from data.cli import local_path
from models.config import TransformerConfig, dtype_name
from models.hf_config import config_from_hf, config_to_hf
from models.transformer import Transformer

_DTYPES = ("float32", "bfloat16", "float16")  # what we load into and save as


def _moe_names(cfg: TransformerConfig) -> tuple[str, tuple[str, str, str]]:
    """A MoE layer's hub names: its prefix and the gate / up / down experts' names (Qwen3-MoE's with q / k norms,
    Mixtral's otherwise, as config_to_hf picks the architecture)."""
    if cfg.qk_norm:
        return "model.layers.{i}.mlp.", ("gate_proj", "up_proj", "down_proj")
    return "model.layers.{i}.block_sparse_moe.", ("w1", "w3", "w2")


def _hf_layout(cfg: TransformerConfig) -> dict:
    """ours -> (HF name template, to_hf, from_hf); {i} is the layer, {e} the expert. to_hf/from_hf act on one
    layer (and expert). Keys under blocks. / moe_blocks. are stacked over the dense / MoE layers."""
    lay = _dense_layout(cfg)
    if cfg.moe is None:
        return lay
    T = lambda a: a.T  # noqa: E731
    moe, (gate, up, down) = _moe_names(cfg)
    stacked = {key: v for key, v in lay.items() if key.startswith("blocks.")}
    lay = {key: v for key, v in lay.items() if key not in stacked}
    if not all(cfg.moe_layers()):  # dense layers between (Qwen3-MoE's decoder_sparse_step > 1)
        lay.update(stacked)
    lay.update({"moe_" + key: v for key, v in stacked.items()
                if key not in ("blocks.w_gate", "blocks.w_up", "blocks.w_down")})
    lay.update({"moe_blocks.moe.router": (moe + "gate.weight", T, T),
                "moe_blocks.moe.w_gate": (moe + f"experts.{{e}}.{gate}.weight", T, T),
                "moe_blocks.moe.w_up": (moe + f"experts.{{e}}.{up}.weight", T, T),
                "moe_blocks.moe.w_down": (moe + f"experts.{{e}}.{down}.weight", T, T)})
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
    moe, (gate, up, down) = _moe_names(cfg)
    for i in range(cfg.n_layers):
        pre, hub = f"model.layers.{i}.mlp.", moe.format(i=i)
        if pre + "experts.gate_up_proj" not in where:
            continue
        out[hub + "gate.weight"] = (pre + "gate.weight", lambda a: a)
        for e in range(cfg.moe.n_experts):
            out[hub + f"experts.{e}.{gate}.weight"] = (pre + "experts.gate_up_proj", lambda a, e=e: a[e, :F])
            out[hub + f"experts.{e}.{up}.weight"] = (pre + "experts.gate_up_proj", lambda a, e=e: a[e, F:])
            out[hub + f"experts.{e}.{down}.weight"] = (pre + "experts.down_proj", lambda a, e=e: a[e])
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
    if cfg.qk_norm and cfg.qk_norm_scope == "head":  # Qwen3, Gemma 3
        lay["blocks.q_norm"] = (attn + "q_norm.weight", None, None)
        lay["blocks.k_norm"] = (attn + "k_norm.weight", None, None)
    flat = lambda a: a.reshape(-1)
    if cfg.qk_norm and cfg.qk_norm_scope == "all_heads":  # OLMo 2: one scale over all heads, ours split by heads
        lay["blocks.q_norm"] = (attn + "q_norm.weight", flat, lambda a: a.reshape(n, h))
        lay["blocks.k_norm"] = (attn + "k_norm.weight", flat, lambda a: a.reshape(k, h))
    if cfg.qkv_bias:
        lay["blocks.bq"] = (attn + "q_proj.bias", flat, lambda a: a.reshape(n, h))
        lay["blocks.bk"] = (attn + "k_proj.bias", flat, lambda a: a.reshape(k, h))
        lay["blocks.bv"] = (attn + "v_proj.bias", flat, lambda a: a.reshape(k, h))
    if cfg.post_norms:  # Gemma 2 names: post_attention_layernorm is the attention *output* norm
        lay["blocks.post_attn_norm"] = ("model.layers.{i}.post_attention_layernorm.weight", None, None)
        lay["blocks.mlp_norm"] = ("model.layers.{i}.pre_feedforward_layernorm.weight", None, None)
        lay["blocks.post_mlp_norm"] = ("model.layers.{i}.post_feedforward_layernorm.weight", None, None)
    if not cfg.pre_norms:  # OLMo 2: no input norms
        del lay["blocks.attn_norm"], lay["blocks.mlp_norm"]
    if not cfg.tie_embeddings:
        lay["lm_head"] = ("lm_head.weight", T, T)
    return lay


def _open_weights(folder: Path) -> dict:
    """HF tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists() and not (folder / "model.safetensors").exists():  # transformers prefers the single file too
        try:
            where = {n: folder / f for n, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor name "
                             f"-> file; {type(e).__name__}: {e}); download it again") from None
        # a tensor stored in a second shard too: transformers reads every tensor of every shard, so the copy in the
        # file it reads last wins over the one the index names (we read the index's): two models, one each
        for f in sorted(set(where.values())):
            if f.exists():  # a missing shard is named when read
                with _opened(f) as sf:
                    twice = (n for n in sf.keys() if n in where and where[n] != f and where[n].exists())
                    if other := next(twice, None):
                        raise ValueError(f"{folder}: tensor {other!r} is in both {where[other].name} (as "
                                         f"model.safetensors.index.json says) and {f.name}; transformers may read "
                                         "either copy: remove the other one, or download the shards again")
        return where
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
        with _opened(f) as sf:
            for name in sf.keys():
                # two exports' shards side by side: the last file sorted won each tensor, a mix of both models
                if name in names:
                    raise ValueError(f"{folder}: tensor {name!r} is in both {names[name].name} and {f.name}, and no "
                                     "model.safetensors.index.json says which to read; remove the other export's "
                                     "files, or restore the index")
                names[name] = f
    return names


@contextlib.contextmanager
def _opened(f: Path):
    """safe_open(f), its errors (a truncated download, a tensor the index puts in the wrong file) naming the file."""
    try:
        with safe_open(f, framework="numpy") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: cannot read it as safetensors ({e}); download this file again, or fix "
                         "model.safetensors.index.json if it names the wrong file for a tensor") from None


def from_pretrained(path, dtype: str = "float32", param_dtype: str | None = None, mesh=None, rules=None,
                    **config_overrides) -> Transformer:
    """Transformer from a local HF Llama / Mistral / Ministral / Qwen2 / Qwen3 / Qwen3-MoE / Gemma 2 / Gemma 3 (text) /
    Mixtral / OLMo 2 folder (config.json + safetensors, sharded or not).

    dtype: compute dtype, a name ('float32', 'bfloat16', 'float16'; not None: the weights' own dtype is not read,
    a float64 checkpoint loads in any of them); param_dtype: storage dtype of the parameters (None: same as dtype,
    so dtype="bfloat16" keeps bf16 weights, as for inference; for training pass param_dtype="float32").
    mesh: place every parameter straight onto it, sharded by the logical-axis rules (`rules`: overrides, as
    `parallel.create_sharded` takes; they place the parameters only, so run the model inside `use_rules(...)` with
    the same overrides), one tensor in host memory at a time: no device ever holds the whole model.
    None: the mesh `jax.set_mesh` set (as mesh=that mesh), else the default device.
    Other keyword arguments override TransformerConfig fields (attn_impl, remat, scan_layers, ...). With
    mup_base_width (μP) the head is read times the width multiplier, undoing `save_pretrained`'s fold: the model gives
    the checkpoint's logits, and a saved μP model loads back as it was.
    """
    if dtype is None:  # not "the checkpoint's dtype": failed as "unsupported 'float64'" whatever the weights were
        raise ValueError("from_pretrained(dtype=None): dtype is the compute dtype, a name: 'float32' (the default), "
                         "'bfloat16' or 'float16' (param_dtype=None then stores the weights in it)")
    for arg, v in (("dtype", dtype), ("param_dtype", param_dtype)):  # else blamed on TransformerConfig.param_dtype
        if v is not None and dtype_name(v) not in _DTYPES:
            raise ValueError(f"from_pretrained({arg}={v!r}): use 'float32', 'bfloat16' or 'float16'")
    folder = Path(local_path(path))  # ~ expanded; gs://... refused (it read and wrote a local gs:/ folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} not found; expected a HF checkpoint folder")
    hf = _json_object(folder / "config.json")
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    where, in_file = _open_weights(folder), {}  # in_file: HF name -> the name in the file, where they differ
    bare = any(n.startswith(("embed_tokens.", "layers.")) for n in where)
    if bare and not any(n.startswith("model.") for n in where):
        # a bare-model export (LlamaModel's save_pretrained, some converters) names its tensors without "model.":
        # transformers adds the prefix loading it into a ...ForCausalLM (refused here as tensors with no place)
        in_file = {n if n == "lm_head.weight" else "model." + n: n for n in where}
        where = {hf_name: where[n] for hf_name, n in in_file.items()}
    layout = _hf_layout(cfg)
    aliases = _fused_moe_aliases(where, cfg)
    if cfg.tie_embeddings and "lm_head.weight" in where:
        if "model.embed_tokens.weight" not in where:  # tied, stored under the head's name: transformers ties it too
            aliases["model.embed_tokens.weight"] = ("lm_head.weight", lambda a: a)
        else:
            with _opened(where["lm_head.weight"]) as a, _opened(where["model.embed_tokens.weight"]) as b:
                embed = b.get_tensor(in_file.get("model.embed_tokens.weight", "model.embed_tokens.weight"))
                if not np.array_equal(a.get_tensor("lm_head.weight"), embed):
                    if "tie_embeddings" in config_overrides:  # not config.json's doing
                        raise ValueError(f"{folder}: from_pretrained(tie_embeddings=True) ties lm_head to the "
                                         "embedding, but lm_head.weight differs from model.embed_tokens.weight; "
                                         "load it untied (leave tie_embeddings out)")
                    # Gemma ties by default: a config.json without the field did not "say" it
                    says = ("says tie_word_embeddings=true" if "tie_word_embeddings" in hf else
                            "leaves tie_word_embeddings out (true by default for this architecture)")
                    raise ValueError(
                        f"{folder}: config.json {says} but lm_head.weight differs from "
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
    from parallel.sharding import abstract_model, logical_shardings

    graphdef, abstract = nnx.split(abstract_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    shapes = {k: v.shape for k, v in _flatten(nnx.to_pure_dict(abstract)).items()}
    if mesh is None and not (set_mesh := jax.sharding.get_mesh()).empty:
        mesh = set_mesh  # jnp.asarray there put every parameter whole on each of its devices, silently
    if mesh is not None:

        where_to = _flatten(nnx.to_pure_dict(logical_shardings(abstract, mesh, rules)))
        place = lambda a, name: jax.device_put(a, where_to[name])  # noqa: E731
    else:
        place = lambda a, name: jnp.asarray(a)  # noqa: E731
    pd, values = np.dtype(jnp.dtype(cfg.param_dtype)), {}
    # weights are stored in param_dtype and cast to dtype for the products: both must hold them
    narrow = min((np.dtype(jnp.dtype(d)) for d in (cfg.param_dtype, cfg.dtype)), key=lambda d: jnp.finfo(d).max)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_opened(f)) for f in set(where.values())}

        def read(name):
            try:
                return handles[where[name]].get_tensor(in_file.get(name, name))
            except SafetensorError as e:
                raise ValueError(f"{where[name]}: cannot read tensor {name!r} ({e}); download this file again, or "
                                 "fix model.safetensors.index.json if it names the wrong file") from None
        read_fused = functools.lru_cache(maxsize=2)(read)  # a layer's fused experts, read once for all E

        def get(name):
            if name in aliases:
                fused, pick = aliases[name]
                return pick(read_fused(fused))
            if name not in where:  # (an index that omits one a shard holds was not named: _open_weights read it)
                indexed = (folder / "model.safetensors.index.json").exists() and not (
                    folder / "model.safetensors").exists()
                # a bare-model export untied (LlamaModel's default) has no head: transformers initialises it at random
                headless = in_file and name == "lm_head.weight"
                raise ValueError(f"checkpoint {folder} lacks tensor {name!r} needed by {cfg}" + (
                    "; model.safetensors.index.json lists no such tensor (if a shard holds it, the index is damaged: "
                    "download it again)" if indexed else "") + (
                    "; it is a bare-model export (tensors without 'model.', as LlamaModel saves them) with no LM head, "
                    "which transformers' ...ForCausalLM initialises at random: load the checkpoint with its head, or "
                    "read the embedding as the head with from_pretrained(path, tie_embeddings=True)"
                    if headless else ""))
            return read(name)

        for ours, (name, to_hf, from_hf) in layout.items():
            fix = from_hf or (lambda a: a)
            if ours == "lm_head" and cfg.mup_base_width:  # save_pretrained's fold undone: HF's head gives the logits
                # itself, where μP's forward divides them by m (kept as read, they came out m times smaller)
                fix = lambda a, f=fix: f(a).astype(np.float32) * cfg.width_mult  # noqa: E731
            layers = _layers_of(cfg, ours)
            want = shapes[ours][(layers is not None) + ("{e}" in name):]  # one layer's (and expert's) shape
            # the shape as stored, checked before `fix` reshapes it: a k_proj stored transposed ([D, K*H]) has the
            # size of [K*H, D] and reshaped into scrambled weights without a word (transformers refuses it), and a
            # size that does not fit was numpy's bare 'cannot reshape array' naming no tensor
            stored = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(want, np.float32)).shape if to_hf else want

            def tensor(n, fix=fix, want=stored, ours=ours):
                a = get(n)
                if a.dtype.kind in "iub":  # int8 / packed weights cast to float are noise (bf16 is kind V)
                    raise ValueError(f"tensor {n!r} is {a.dtype}, not floating point: a quantized or packed "
                                     "checkpoint (its scales are not read); load the unquantized model")
                if a.shape != want:  # named here: a stack of mismatched layers fails without the name
                    raise ValueError(f"tensor {n!r} gives {ours} a slice of shape {a.shape}, expected {want} from "
                                     f"{cfg}; is config.json right for these weights?")
                a = fix(a)
                _check_fits_dtype(a, narrow, n, cfg)
                return a

            one = lambda i: (np.stack([tensor(name.format(i=i, e=e)) for e in range(cfg.moe.n_experts)])  # noqa: E731
                             if "{e}" in name else tensor(name.format(i=i))).astype(pd)
            arr = np.stack([one(i) for i in layers]) if layers is not None else one(None)
            if arr.shape != shapes[ours]:
                raise ValueError(f"tensor {name!r} gives {ours} shape {arr.shape}, expected {shapes[ours]} "
                                 f"from {cfg}")
            values[ours] = place(arr, ours)
            del arr  # one stacked tensor in host memory at a time
        # Llama attention_bias=True also adds an o_proj bias we do not have: exact only when it is zero. A config
        # without attention_bias (or another architecture) has none either: transformers drops the tensor as an
        # unexpected key, so config.json and the weights disagree
        flag = bool(hf.get("attention_bias", False)) and cfg.qkv_bias
        for i in range(cfg.n_layers):
            name = f"model.layers.{i}.self_attn.o_proj.bias"
            if name in where and np.any(get(name) != 0):
                raise ValueError(f"{name} is non-zero but our Transformer has no o_proj bias (attention_bias="
                                 "True); only checkpoints whose o_proj biases are zero can be loaded" if flag else
                                 f"{name} is non-zero but config.json says attention_bias="
                                 f"{str(hf.get('attention_bias')).lower() if 'attention_bias' in hf else 'absent'}"
                                 f" (model_type {hf.get('model_type')!r}): neither transformers nor our Transformer "
                                 "has an o_proj bias then (transformers drops the tensor unread); is config.json "
                                 "right for these weights?")
    if cfg.moe is not None:  # Mixtral and Qwen3-MoE route without a selection bias
        values["moe_blocks.moe.router_bias"] = place(np.zeros(shapes["moe_blocks.moe.router_bias"], np.float32),
                                                     "moe_blocks.moe.router_bias")
    nnx.replace_by_pure_dict(abstract, _unflatten(values))
    return nnx.merge(graphdef, abstract)


def _check_fits_dtype(a: np.ndarray, narrow: np.dtype, name: str, cfg: TransformerConfig) -> None:
    """Refuse tensor `name` (a, as read) when the narrower-ranged of cfg's param_dtype and dtype (`narrow`) would turn
    finite values into inf: float16 tops out at 65504, and a float32 / bf16 weight beyond it loaded as inf (or was
    cast to inf in every float16 product) without a word; save_pretrained's `_check_representable` refuses the same."""
    if jnp.finfo(a.dtype).max <= jnp.finfo(narrow).max or not a.size:  # it fits whatever it holds
        return
    # float64 holds every source dtype's values (a float64 tensor's 1e39 was cast to float32 first: inf, which
    # looked like a source inf and passed, then loaded as inf)
    peak = np.float64(np.max(np.abs(a)))
    with np.errstate(over="ignore"):  # the overflow is what we look for
        over = bool(np.isinf(peak.astype(narrow)) and np.isfinite(peak))
    if over:
        in_f32 = peak <= jnp.finfo(jnp.float32).max
        fix = ("load with dtype='bfloat16' (bf16 has float32's range) or 'float32'" if in_f32 else
               "no dtype we load into holds it (float32 is the widest); fix the checkpoint's tensor")
        raise ValueError(f"from_pretrained(dtype={cfg.dtype!r}, param_dtype={cfg.param_dtype!r}): tensor {name!r} "
                         f"(max |value| {float(peak):.6g}) holds values beyond {narrow.name}'s largest, "
                         f"{float(jnp.finfo(narrow).max):.6g}, which would be inf; {fix}")


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_token_ids(path) -> dict:
    """The special-token ids of a HF checkpoint folder ({bos,eos,pad}_token_id: int, list of ints or None), from its
    generation_config.json where present, else its config.json: pass them to `save_pretrained(token_ids=...)`, since
    our config does not carry them."""
    folder, ids = Path(local_path(path)), {}
    for name in ("config.json", "generation_config.json"):  # the generation config wins, as in transformers
        if (folder / name).exists():
            saved = _json_object(folder / name)
            ids.update({k: v for k, v in saved.items() if k in TOKEN_ID_FIELDS})
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} not found; expected a HF checkpoint folder")
    return ids


def _json_object(path: Path) -> dict:
    """The JSON object in `path` (config.json, generation_config.json), or a ValueError naming the file: a damaged
    copy ([] or null, UTF-16) failed as "'list' object has no attribute 'get'" or a bare UnicodeDecodeError."""
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(got, dict):
        raise ValueError(f"{path} is not a JSON object (it holds {type(got).__name__} {str(got)[:40]!r}); "
                         "download it again")
    return got


def _check_token_ids(token_ids, vocab_size: int) -> dict:
    ids = dict(token_ids or {})
    # an id past the vocabulary (another tokenizer's) is one the model never emits: generate never stopped at it
    ok = lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size)  # noqa: E731
    for k, v in ids.items():
        if k not in TOKEN_ID_FIELDS:
            raise ValueError(f"save_pretrained token_ids: unknown key {k!r}; use {TOKEN_ID_FIELDS}")
        # numpy / jax integer scalars (a tokenizer's or generate's ids, which generate's eos_id takes) as Python
        # ints: they were refused as no token id, and json cannot write them
        got = [_scalar_id(x) for x in v] if isinstance(v, list | tuple) else _scalar_id(v)
        # only eos_token_id may be a list: transformers 5.x's configs type bos / pad as one int (or None) and refuse
        # to load a config.json with a list there (StrictDataclassFieldValidationError), after the old files went
        if isinstance(got, list) and k != "eos_token_id":
            raise ValueError(f"save_pretrained token_ids[{k!r}]={v!r}: transformers takes one {k} (an int or None); "
                             "only eos_token_id may be a list: give one id")
        if not (ok(got) or (isinstance(got, list) and got and all(ok(x) and x is not None for x in got))):
            raise ValueError(f"save_pretrained token_ids[{k!r}]={v!r}: give a token id in [0, "
                             f"vocab_size={vocab_size}){', a list of them' * (k == 'eos_token_id')} or None")
        ids[k] = got
    return ids


def _scalar_id(v):
    """v as a Python int when it is a numpy / jax integer scalar (not a bool), else v as it is."""
    kind = getattr(getattr(v, "dtype", None), "kind", "")
    return int(v) if getattr(v, "ndim", None) == 0 and kind in ("i", "u") else v


def save_pretrained(model: Transformer, path, dtype: str | None = None, max_shard_size: int | str = "5GB",
                    token_ids: dict | None = None) -> None:
    """Write config.json + safetensors (HF names) that transformers and `from_pretrained` load: 5.x (the tests run
    5.24) and 4.x releases that have the architecture and its settings (a Gemma 3 or Qwen3 model, a YaRN RoPE or a
    Gemma 2 window pattern needs a 4.x new enough to know it; config.json carries both versions' RoPE fields).

    dtype: storage dtype of the tensors (None: the model's param_dtype).
    token_ids: {bos,eos,pad}_token_id for config.json (`read_token_ids(source_folder)` carries a loaded checkpoint's
      over); without them they are null, and transformers' `generate` then never stops at an end-of-sequence token.
      A generation_config.json already in the folder (which generate reads first) gets them too, its other settings
      kept.
    max_shard_size: bytes per file (an int, or "5GB" / "500MiB" as transformers spells it). A model larger than
      that is written as model-0000k-of-0000n.safetensors + model.safetensors.index.json, one shard in host
      memory at a time (parameters move to the host one layer at a time).
    A μP model (mup_base_width) is written with its readout multiplier folded into lm_head, so it loads back as
    a standard-parametrisation model with the same logits (or, with `from_pretrained(..., mup_base_width=...)`, as
    the μP model it was). Weight files of an earlier save in the folder are
    removed first: transformers prefers a model.safetensors over an index, so a stale one would be loaded instead
    of the new shards. With several processes every one calls this (parameters sharded across them are gathered
    one layer at a time); process 0 writes the files.
    """
    cfg = model.cfg
    hf = config_to_hf(cfg) | _check_token_ids(token_ids, cfg.vocab_size)
    # a cast to int8 / fp8 silently destroys weights; 'bf16' was numpy's bare "data type 'bf16' not understood"
    if dtype_name(dtype or cfg.param_dtype) not in _DTYPES:
        raise ValueError(f"save_pretrained dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'")
    out_dtype = np.dtype(jnp.dtype(dtype_name(dtype or cfg.param_dtype)))
    hf["dtype"] = hf["torch_dtype"] = jnp.dtype(out_dtype).name  # a name, however given; 4.x reads torch_dtype
    limit = _parse_size(max_shard_size)
    ours = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if cfg.mup_base_width:  # μP's readout multiplier 1/m folded into the head: HF has no such factor
        # in float32, as the forward divides the logits: a bf16 head divided in bf16 was rounded to 8 bits, so even
        # a dtype='float32' export of a bf16 model was off (logits 7e-4); the cast to out_dtype rounds once
        ours["lm_head"] = ours["lm_head"].astype(jnp.float32) / cfg.width_mult
    _check_representable(cfg, ours, out_dtype)
    if cfg.moe is not None and np.any(_to_host(ours["moe_blocks.moe.router_bias"]) != 0):
        raise ValueError("moe.router_bias is non-zero (aux-loss-free balancing); Mixtral and Qwen3-MoE have no "
                         "selection bias, so this model cannot be exported exactly")
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
                host = lambda a=arr, ix=index, f=fix: np.ascontiguousarray(f(_slice_to_host(a, ix).astype(out_dtype)))  # noqa: E731
                plan.append((name.format(i=i, e=e), int(np.prod(shape)) * out_dtype.itemsize, host))
    if hf["model_type"] in ("gemma2", "gemma3_text", "qwen3", "qwen3_moe", "olmo2") and cfg.qkv_bias:
        # its attention_bias also adds an o_proj bias, which our model has not: written as zeros (from_pretrained
        # loads a Gemma 2 only when they are zero); left out, transformers would initialise them itself
        zeros = lambda: np.zeros(cfg.d_model, out_dtype)  # noqa: E731
        plan += [(f"model.layers.{i}.self_attn.o_proj.bias", cfg.d_model * out_dtype.itemsize, zeros)
                 for i in range(cfg.n_layers)]
    shards, current, size = [], [], 0  # cut as huggingface_hub cuts (transformers' save_pretrained): same files
    for entry in plan:
        if entry[1] > limit:  # a shard of its own, placed now; the current shard keeps filling
            shards.append([entry])
            continue
        if current and size + entry[1] > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[1]
    if current or not shards:
        shards.append(current)
    folder, primary = Path(local_path(path)), jax.process_index() == 0
    if primary:
        folder.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(hf, indent=2) + "\n"  # before anything is deleted: a failure leaves the old export
        gen_text = _generation_config_text(folder, token_ids, cfg.vocab_size)
        for old in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors",
                    folder / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
        (folder / "config.json").write_text(config_text, encoding="utf-8")
        if gen_text is not None:
            (folder / "generation_config.json").write_text(gen_text, encoding="utf-8")
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(files, shards, strict=True):
        tensors = {name: thunk() for name, _, thunk in shard}  # every process: the gathers are collective
        if primary:
            save_file(tensors, folder / file, metadata={"format": "pt"})
    if primary and len(shards) > 1:
        index = {"metadata": {"total_size": sum(b for _, b, _ in plan)},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if jax.process_count() > 1:  # nobody reads the folder before it is complete
        multihost_utils.sync_global_devices(f"save_pretrained {folder}")


def _generation_config_text(folder: Path, token_ids: dict | None, vocab_size: int) -> str | None:
    """The folder's generation_config.json with the given token ids written into it (None: nothing to change).
    Both transformers' generate and `read_token_ids` prefer it to config.json, so a stale one left by an earlier
    export would silently override the ids just saved; its other settings (sampling, ...) are kept."""
    path = folder / "generation_config.json"
    if not token_ids or not path.exists():
        return None
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); save_pretrained writes token_ids into it, since "
                         "transformers' generate reads them from there first: fix or remove it") from None
    if not isinstance(gen, dict):
        raise ValueError(f"{path} is not a JSON object; save_pretrained writes token_ids into it, since "
                         "transformers' generate reads them from there first: fix or remove it")
    return json.dumps(gen | _check_token_ids(token_ids, vocab_size), indent=2) + "\n"


def _check_representable(cfg: TransformerConfig, ours: dict, out_dtype: np.dtype) -> None:
    """Refuse, before anything is written, a storage dtype that turns finite weights into inf: float16 tops out at
    65504, and the cast wrote inf in their place without a word (bfloat16 reaches 3.4e38, as float32 does).

    ours: flat {key: array}, stacked [L, ...] (and [L, E, ...] for experts) as `_hf_layout` lists them. The maxima
    are taken where the arrays live (one number per HF tensor comes to the host), and cast as the export casts."""
    bad = []
    for key, (name, _, _) in _hf_layout(cfg).items():
        arr = ours[key]
        if jnp.finfo(arr.dtype).max <= jnp.finfo(out_dtype).max:  # it fits whatever it holds (float32 -> float32)
            continue
        layers = _layers_of(cfg, key)
        lead = (layers is not None) + ("{e}" in name)  # the leading axes index HF tensors (layer, expert)
        peak = _to_host(jnp.max(jnp.abs(arr), axis=tuple(range(lead, arr.ndim))))
        with np.errstate(over="ignore"):  # the overflow is what we look for
            over = np.isinf(peak.astype(out_dtype)) & np.isfinite(peak)
        for ix in zip(*np.nonzero(over)) if lead else ([()] if over else []):
            i = layers[ix[0]] if layers is not None else None
            e = ix[1] if len(ix) > 1 else None
            bad.append(f"{name.format(i=i, e=e)} (max |value| {float(peak[ix]):.6g})")
    if bad:
        top = float(jnp.finfo(out_dtype).max)
        raise ValueError(f"save_pretrained dtype={out_dtype.name!r}: {len(bad)} tensor(s) hold values beyond its "
                         f"largest, {top:.6g}, which would be written as inf: {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}; save as 'bfloat16' or 'float32'")


def _slice_to_host(a, index: tuple) -> np.ndarray:
    """a[index] (one layer's or expert's slice) as a NumPy array, sliced on the mesh `a` is placed on: the eager
    slice otherwise lands on the mesh `jax.set_mesh` set, and under another one raised jax's IndivisibleError."""
    mesh = getattr(getattr(a, "sharding", None), "mesh", None)
    with jax.set_mesh(mesh) if isinstance(mesh, jax.sharding.Mesh) else contextlib.nullcontext():
        return _to_host(a[index])


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
    if re.fullmatch(r"\s*[\d.]+\s*[KMGTkmgt]b\s*", str(size)):  # transformers reads a lowercase b as bits
        raise ValueError(f"save_pretrained max_shard_size={size!r} is ambiguous: transformers reads '{size}' as bits "
                         "(shards 8x smaller); write bytes as 'GB' / 'MB' (or 'GiB' / 'MiB')")
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
