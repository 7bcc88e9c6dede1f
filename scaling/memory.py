"""Training memory per device: parameters, gradients, optimizer state and activations.

`memory_per_device(cfg, mesh={"data": 2, "fsdp": 4, "tensor": 2}, micro_batch=16, seq_len=2048,
remat="save_dots")` answers "will it fit" before compiling anything. Parameter placement comes from
*the* rules table (`parallel.rules`), so a new sharding strategy is accounted for by the same rule
that implements it; activations follow the activation rules (batch over data/fsdp/expert, sequence
over `sequence`, heads / mlp / vocab over `tensor`).

Model of a train step's peak (bytes per device; `B_l·T_l` = local tokens of one micro-batch):
- params, grads (same sharding, `grad_dtype`), optimizer state (`optimizer_moments` per parameter: AdamW 2;
  float32 unless `opt_dtype`);
- activations = L_local · B_l·T_l · saved_per_token(layer, remat) — what the backward pass needs,
  per remat policy (`saved_bytes_per_token`: an upper bound that XLA meets to 75-103% for the
  dot-saving policies; tests/test_scaling_memory.py states every tolerance);
- working set = B_l·T_l · (the full forward residuals of one scan group, i.e. one pattern period of layers
  such as local + global or dense + MoE, live while its backward runs or is rematerialised, + the
  logits/loss buffers; on backend 'cpu' with the sequence sharded, + 3 float32 MLP-wide transposes that XLA:CPU
  takes of [B, T, F] rows for their weight gradients);
- transient weights = with FSDP, one layer's weights all-gathered (x2 for the next layer's
  prefetch) in compute dtype, and the embedding table gathered for the lookup, a forward buffer (its VJP keeps the
  tokens alone), by what it exceeds the backward's working set (the peak holds the larger);
- with an explicit sorted / dense MoE `dropless_impl` on a mesh splitting the experts: one MoE layer's whole
  experts all-gathered in compute dtype and their whole gradient before its reduce-scatter (`experts_gathered`);
  with dropless_impl='blocks', each block's copy of its expert's weights and its cotangent;
- embedding gradients = the LM head's [D, V] gradient, built whole over `embed` before its reduce-scatter to the
  fsdp shards (the lookup's own is scatter-added into the table's shards, `models.embed`, never whole);
- on backend 'cpu', a forward phase at the lookup (`forward`): XLA:CPU gathers the table there (over the vocab axes
  too only where a device's tokens reach V/2, `models.embed`) beside the LM head, whose gather its scheduler hoists
  to the step's start, each in float32 (its bf16 collectives run in float32): the step's peak at vocabulary-heavy
  sizes (V 131072, D 256: 1.00-1.01x XLA's temp on {fsdp: 8}, {fsdp: 4, tensor: 2}, bf16 too; counted in the
  backward, XLA was 1.04-2.08x);
- the optimizer update, a second phase once the backward pass is done: the gradients + `update_buffers`
  float32 gradient-sized buffers (`experiments.lm_step.make_optimizer`'s clipped gradients, which XLA:CPU
  materialises for every leaf before the first moment update: 1) + a float32 copy of gradients narrower than
  float32; the step's temp peak is the larger phase (with remat 'full' and large layers the update's: XLA
  measured 2.0x the backward model's with bfloat16 gradients). On backend 'cpu' a tied table's gradient without FSDP
  is all-reduced as its two partial sums (lookup and head), added after: that all-reduce is counted in this phase.
Under pipeline parallelism (a `stage` axis, M = `cfg.pipeline_microbatches`) activations are those of the M + S - 1
ticks of B_l/M rows each, and the working set's group residuals those of one tick; with more than one scan group
per stage, each tick's gradient of the stage's layer stacks beside the ticks' running sum (`stage_grads`), and the
backward's copy of one tick's residuals (counted in the activations: M + S ticks); XLA's fragmentation is not
modelled.

The activation model is that of `models.Transformer` (pre-norm SwiGLU blocks): an MoE layer stores its
experts' rows per token (capacity buffers: E·C/T, `routed_slots_per_token`) and a blocked sliding-window kernel
(R + 1)·C scores per query (`executed_keys`) and its windowed K / V copies; tests/test_scaling_memory.py
compares whole-step temp bytes with `compiled.memory_analysis()`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping

from scaling.flops import executed_keys, executed_slots, lm_shape, model_kernel, model_window

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1, "fp8": 1, "bf16": 2, "f32": 4,
               "fp16": 2, "fp32": 4, "f16": 2}
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")


def dtype_bytes(name) -> int:
    """Bytes per element of a dtype name ('float32', 'bf16', ...), a dtype, or a scalar type (np.float32,
    jnp.bfloat16). numpy's type codes are refused: their digit counts bytes ('f8' is float64, 'i8' int64) where this
    table's counts bits ('f16', 'f32'), so 'f8' for fp8 was read as 8 bytes. So are sub-byte dtypes (int4, fp4:
    numpy stores them in a byte, packed storage in half of one) and dtypes that are not numbers ('S', 'U': 0 bytes)."""
    if isinstance(name, str) and name in DTYPE_BYTES:
        return DTYPE_BYTES[name]
    if name is None or isinstance(name, numbers.Number):  # np.dtype(None) would be float64
        raise ValueError(f"dtype {name!r}: give a dtype name such as 'bfloat16', or a numpy / jax dtype")
    import ml_dtypes
    import numpy as np

    names = f"a numpy / jax dtype name ('float64', 'int8') or one of {sorted(DTYPE_BYTES)}"
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}; use {names}") from None
    if isinstance(name, str) and re.fullmatch(r"[a-zA-Z?]\d*", name):  # 'f8', 'i8', 'e', 'd': numpy's type codes
        raise ValueError(f"dtype {name!r} is ambiguous: numpy reads it as a type code ({dt}: its digit counts bytes), "
                         f"this table's 'f16' / 'f32' count bits; spell it out, as {names}")
    bits = None
    for info in (ml_dtypes.finfo, ml_dtypes.iinfo):  # ml_dtypes' types (bfloat16, float8_*, int4) are of kind 'V'
        try:
            bits = info(dt).bits
            break
        except (TypeError, ValueError):
            pass
    if bits is None and dt.kind != "b":  # strings ('S', 'U': 0 bytes), objects, structured or raw bytes
        raise ValueError(f"dtype {name!r} ({dt}) is not a numeric dtype; use {names}")
    if bits is not None and bits < 8:
        raise ValueError(f"dtype {name!r} has {bits} bits: stored packed it takes less than the byte per element that "
                         "this estimate counts; count it as 'int8' / 'fp8' (an upper bound)")
    return int(dt.itemsize)


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter array: its path, global shape, dtype name and logical axis names."""

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def lm_param_table(cfg, *, param_dtype: str | None = None, windows=None, moe=None) -> list[ParamEntry]:
    """The parameter tree of `models.Transformer` for `cfg` (paths, shapes, logical axes), without building it.
    Dense layers stack under `blocks.*`, MoE layers (attention, norms and experts) under `moe_blocks.*`, each on
    its own 'layers' axis (tests/test_scaling_memory.py compares it with the real tree)."""
    s = lm_shape(cfg, windows=windows, moe=moe)
    pd = param_dtype or getattr(cfg, "param_dtype", "float32")
    d, v, L, n, k, h, f = s.d_model, s.vocab_size, s.n_layers, s.n_heads, s.kv_heads, s.head_dim, s.mlp_dim
    P = lambda path, shape, axes: ParamEntry(path, tuple(shape), tuple(axes), pd)  # noqa: E731

    def attention_and_norms(pre: str, n_layers: int) -> list[ParamEntry]:
        t = [P(f"{pre}.wq", (n_layers, d, n, h), ("layers", "embed", "heads", "head_dim")),
             P(f"{pre}.wk", (n_layers, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
             P(f"{pre}.wv", (n_layers, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
             P(f"{pre}.wo", (n_layers, n, h, d), ("layers", "heads", "head_dim", "embed"))]
        if s.pre_norms:  # (OLMo 2 has none)
            t += [P(f"{pre}.attn_norm", (n_layers, d), ("layers", "norm")),
                  P(f"{pre}.mlp_norm", (n_layers, d), ("layers", "norm"))]
        if s.qkv_bias:
            t += [P(f"{pre}.bq", (n_layers, n, h), ("layers", "heads", "head_dim")),
                  P(f"{pre}.bk", (n_layers, k, h), ("layers", "kv_heads", "head_dim")),
                  P(f"{pre}.bv", (n_layers, k, h), ("layers", "kv_heads", "head_dim"))]
        if s.qk_norm and s.qk_norm_scope == "head":  # Qwen 3: one [H] scale for the queries' heads, one for the keys'
            t += [P(f"{pre}.q_norm", (n_layers, h), ("layers", "head_dim")),
                  P(f"{pre}.k_norm", (n_layers, h), ("layers", "head_dim"))]
        elif s.qk_norm:  # OLMo 2: one scale over all the queries' heads, one over the keys'
            t += [P(f"{pre}.q_norm", (n_layers, n, h), ("layers", "heads", "head_dim")),
                  P(f"{pre}.k_norm", (n_layers, k, h), ("layers", "kv_heads", "head_dim"))]
        if s.post_norms:  # Gemma 2: norms after attention and after the MLP too (models.transformer.Block)
            t += [P(f"{pre}.post_attn_norm", (n_layers, d), ("layers", "norm")),
                  P(f"{pre}.post_mlp_norm", (n_layers, d), ("layers", "norm"))]
        return t

    n_moe = s.n_moe_layers
    t = [P("embed", (v, d), ("vocab", "embed"))]
    if L - n_moe:
        t += attention_and_norms("blocks", L - n_moe)
        t += [P("blocks.w_gate", (L - n_moe, d, f), ("layers", "embed", "mlp")),
              P("blocks.w_up", (L - n_moe, d, f), ("layers", "embed", "mlp")),
              P("blocks.w_down", (L - n_moe, f, d), ("layers", "mlp", "embed"))]
    if n_moe:
        m = s.moe
        fe, E = m.expert_mlp_dim, m.n_experts
        t += attention_and_norms("moe_blocks", n_moe)
        t += [P("moe_blocks.moe.router", (n_moe, d, E), ("layers", "embed", None)),
              ParamEntry("moe_blocks.moe.router_bias", (n_moe, E), ("layers", None), "float32"),  # f32 always
              P("moe_blocks.moe.w_gate", (n_moe, E, d, fe), ("layers", "expert", "embed", "mlp")),
              P("moe_blocks.moe.w_up", (n_moe, E, d, fe), ("layers", "expert", "embed", "mlp")),
              P("moe_blocks.moe.w_down", (n_moe, E, fe, d), ("layers", "expert", "mlp", "embed"))]
        fs = m.shared_mlp_dim if m.shared_mlp_dim is not None else m.n_shared_experts * fe
        if fs:
            t += [P("moe_blocks.moe.shared_gate", (n_moe, d, fs), ("layers", "embed", "mlp")),
                  P("moe_blocks.moe.shared_up", (n_moe, d, fs), ("layers", "embed", "mlp")),
                  P("moe_blocks.moe.shared_down", (n_moe, fs, d), ("layers", "mlp", "embed"))]
    t.append(P("final_norm", (d,), ("norm",)))
    if not s.tie_embeddings:
        t.append(P("lm_head", (d, v), ("embed", "vocab")))
    return t


def param_table_from_state(state) -> list[ParamEntry]:
    """ParamEntries of a real (possibly abstract) NNX state: paths, shapes, dtypes, logical axes."""
    from flax import nnx

    out = []
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        out.append(ParamEntry(".".join(str(p) for p in path), tuple(var.shape), tuple(names), str(var.dtype)))
    return out


class _Mesh:
    """Just enough of a jax Mesh for `parallel.rules.logical_to_spec`: axis names and sizes."""

    def __init__(self, shape: Mapping[str, int]):
        self.axis_names = tuple(shape)
        self.axis_sizes = tuple(int(v) for v in shape.values())


def check_counts(**values: tuple[int, int]):
    """Each keyword is (value, lowest allowed): an int at least that, or a ValueError naming it."""
    for name, (v, low) in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def check_mesh(mesh: Mapping[str, int]) -> dict[str, int]:
    """`mesh` (axis sizes, or a jax Mesh) as a plain {axis: int} dict; a ValueError for an axis name not in
    parallel.mesh.AXES or a size that is not a positive int (resolve a -1 first)."""
    if hasattr(mesh, "axis_names"):  # a real jax Mesh
        mesh = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if isinstance(mesh, str):  # dict("data=8") said "dictionary update sequence element #0 has length 1"
        raise ValueError(f"mesh={mesh!r} is a string; pass axis sizes as a dict, e.g. "
                         f"parallel.mesh.parse_mesh({mesh!r})")
    try:
        mesh = dict(mesh)
    except (TypeError, ValueError):  # None, an int: "'NoneType' object is not iterable", naming nothing
        raise ValueError(f"mesh={mesh!r}: pass axis sizes as a dict, e.g. {{'data': 8}} ({{}} for one device), or a "
                         "jax Mesh") from None
    from parallel.mesh import AXES

    unknown = sorted(set(mesh) - set(AXES))
    if unknown:  # a misspelt axis would silently count as one device
        raise ValueError(f"mesh axes {unknown} are unknown; use names from {AXES}")
    for a, n in mesh.items():
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"mesh[{a!r}] = {n!r}: axis sizes must be positive ints (resolve -1 first)")
    return {a: int(n) for a, n in mesh.items()}


def shard_factor(axes, shape, mesh: Mapping[str, int], rules=None) -> int:
    """How many ways the rules table splits an array with logical `axes` on `mesh` (a dict)."""
    from parallel.rules import logical_to_spec

    spec = logical_to_spec(tuple(axes), _Mesh(mesh), tuple(shape), rules)
    n = 1
    for entry in spec:
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= mesh[a]
    return n


def _axis_product(name: str, mesh: Mapping[str, int], size: int, rules=None) -> int:
    return shard_factor((name,), (size,), mesh, rules)


def _act_split(name: str, mesh: Mapping[str, int], size: int, rules=None) -> int:
    """How many ways the rules split the `name` dimension (of `size`) of an activation laid out [B, T, name] as the
    model constrains it: batch and act_seq come first and take their mesh axes first (the first dimension naming
    an axis takes it), so e.g. act_mlp='fsdp' splits nothing while batch holds fsdp."""
    n = math.prod(mesh.values())  # a B and T every axis divides
    return (shard_factor(("batch", "act_seq", name), (n, n, size), mesh, rules)
            // shard_factor(("batch", "act_seq"), (n, n), mesh, rules))


def input_shards(field: str, logical: str, size: int, mesh: Mapping[str, int], rules=None) -> int:
    """How many ways the rules split an input dimension (`logical` 'batch' or 'act_seq') of `size`; one that does
    not divide is refused naming the caller's `field` (micro_batch, seq_len), not a model dimension."""
    try:
        return _axis_product(logical, mesh, size, rules)
    except ValueError:
        n = _axis_product(logical, mesh, math.prod(mesh.values()), rules)  # the axes the rules would use
        raise ValueError(f"{field}={size} must be a multiple of {n}, the devices of this mesh the rules table splits "
                         f"{logical!r} over; change {field} or those mesh axes") from None


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device of one training step. `total` is the modelled peak."""

    params: int
    grads: int
    opt_state: int
    activations: int
    working: int
    transient_weights: int
    local_tokens: int
    layers_local: int
    update: int = 0  # beside the gradients, during the optimizer update (after the backward pass)
    accum: int = 0  # gradient accumulation's float32 running sum, live through every microbatch's backward
    embed_grads: int = 0  # the LM head's [D, V] gradient, whole over `embed` before its reduce-scatter (FSDP)
    stage_grads: int = 0  # a pipeline tick's gradient of the stage's layer stacks beside the ticks' running sum
    forward: int = 0  # backend 'cpu': the forward pass's live bytes at the lookup (gathered table and head)


    @property
    def backward_peak(self) -> int:
        """Gradients + activations + working set + gathered weights (+ the accumulated gradients, the embedding
        gradients' temporaries, a pipeline tick's stage gradients): the backward pass's live bytes."""
        return (self.grads + self.activations + self.working + self.transient_weights + self.accum + self.embed_grads
                + self.stage_grads)

    @property
    def update_peak(self) -> int:
        """Gradients + the optimizer update's float32 temporaries."""
        return self.grads + self.update

    @property
    def state(self) -> int:
        """What lives across steps: params + optimizer state (XLA's argument bytes)."""
        return self.params + self.opt_state

    @property
    def temp(self) -> int:
        """Everything but the state: what XLA reports as `memory_analysis().temp_size_in_bytes`."""
        return self.total - self.state

    @property
    def total(self) -> int:
        return self.state + max(self.forward, self.backward_peak, self.update_peak)

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:9.3f} GiB"  # noqa: E731
        rows = [("parameters", self.params), ("gradients", self.grads), ("optimizer state", self.opt_state),
                (f"activations ({self.layers_local} layer{'s' * (self.layers_local != 1)} x {self.local_tokens} "
                 f"token{'s' * (self.local_tokens != 1)})", self.activations),
                ("working set (a scan group's backward)", self.working),
                ("gathered weights (FSDP)", self.transient_weights),
                ("accumulated gradients (grad_accum > 1)", self.accum),
                ("LM head gradient before its reduction", self.embed_grads),
                ("a pipeline tick's stage gradients", self.stage_grads),
                ("optimizer update (after the backward)", self.update),
                ("forward pass at the lookup (XLA:CPU)", self.forward), ("total", self.total)]
        rows = [r for r in rows if r[1] or not r[0].startswith(("accumulated", "LM head", "a pipeline", "forward"))]
        peak = max([("backward pass", self.backward_peak), ("optimizer update", self.update_peak),
                    ("forward pass", self.forward)], key=lambda r: r[1])[0]
        return "\n".join(f"  {name:<44}{gib(b)}" for name, b in rows) + f"\n  (the step's peak: the {peak})"


def saved_bytes_per_token(cfg, remat: str, seq_len: int, *, compute_dtype: str | None = None,
                          mesh: Mapping[str, int] | None = None, window: int | None = None, kernel: str = "dense",
                          block: int = 256, rules=None, windows=None, moe=None, moe_layer: bool | None = None,
                          backend: str | None = None) -> float:
    """Bytes one layer keeps per local token for the backward pass under `remat`. moe_layer: whether the layer
    is an MoE one (None: any MoE config makes it one; `memory_per_device` passes each layer's kind).

    Per token (D d_model, N/K query/kv heads x H head dim, F mlp width, S scores per query; heads,
    kv heads and F divided by the tensor-parallel degree; c = compute-dtype bytes):
      full                : c·D (the layer input; everything else is recomputed)
      save_dots_no_batch  : c·(2D + NH + 2KH + 2F)  layer input, q, k, v, attention-out proj, gate, up (with
                            post_norms c·D more: a dense layer's down projection, the post-MLP norm's input)
      save_dots           : the above + c·NH (PV output) + 4·N·S (float32 scores)
      none                : c·(4D + 2NH + 2KH + 2F) + 8 + attention's own — JAX's residuals: the two
                            norms' inputs and outputs and their float32 inverse RMS (RMSNorm's backward recomputes
                            its normalised rows; without pre_norms, OLMo 2, the inputs alone: 2D and no 8; with
                            post_norms, Gemma 2 and OLMo 2, c·2D + 8 more: their inputs and inverse RMS),
                            q, k, v, o, gate and up (`models.glu.glu_linear` recomputes σ and their product;
                            routed experts keep gate, up and their product, 3 pieces per row; the sorted
                            grouped kernel 'gmm' saves 2 on its padded rows but is counted 3: its backward's
                            transposed x / g copies and cotangent rows, in no working set, stand in (counted 2,
                            XLA's temp on the demo preset, remat none, {data: 8}, grad_accum 2: 1.11x -> 1.13x
                            ours, bf16 1.17x -> 1.18x); tests/test_custom_vjps.py, tests/test_moe.py); attention's
                            c·NH + 4·N·S + 4·N: `models.attention`'s softmax VJP (under 'dense', 'causal_blocked'
                            and the 'blocked' sliding-window kernel, soft-capped or not) keeps the float32
                            unnormalised weights E, their row sums and (float32 only: not c·NH in bf16) its
                            output in its own [B, K, G, T, H] layout (attn_impl='reference', autodiff, keeps ~3-4x
                            those score bytes); with qk_norm, c·(NH + KH) + 4·(N + K) more: the q / k norms'
                            inputs and inverse RMS (qk_norm_scope='all_heads': one RMS per token each, 4·2, on
                            every device however the heads split).
    MoE layers: F is the shared experts' width plus, for the routed experts, X·expert_mlp_dim with X expert rows
    per token (`routed_slots_per_token`: E·C/T with capacity buffers, top_k for sorted dropless kernels). The
    routed experts' products have a batch dim (E), so save_dots_no_batch keeps none of them; save_dots adds their
    down-projection output (c·X·D) and the float32 combine (4·D); none adds the dispatched rows (c·X·D) and the
    float32 rows gathered back for the combine (4·top_k·D). kernel='flash' (a fused attention kernel, e.g. cuDNN /
    Pallas flash attention) stores no scores, only a float32 log-sum-exp per query and head (S·N·bytes -> 4·N);
    'dense' stores all T scores; 'blocked' (models.sliding_window) its (R + 1)·C, and under none also its windowed
    K / V copies (2·c·KH·S / C).
    Under save_dots / save_dots_no_batch the projections' outputs (q, k, v, attention-out, gate, up) are saved as
    the dots produce them: `projection_bytes` each (float32 for a bf16 / f16 model on the CPU `backend`).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {REMAT_POLICIES}")
    s = lm_shape(cfg, windows=windows, moe=moe)
    mesh = check_mesh(mesh or {})
    c = dtype_bytes(compute_dtype or getattr(cfg, "dtype", "float32"))
    D = s.d_model
    NH = s.n_heads * s.head_dim / _act_split("act_heads", mesh, s.n_heads, rules)
    KH = s.kv_heads * s.head_dim / _act_split("act_kv_heads", mesh, s.kv_heads, rules)
    N = s.n_heads / _act_split("act_heads", mesh, s.n_heads, rules)
    local = lambda w: w / _act_split("act_mlp", mesh, w, rules) if w else 0.0  # noqa: E731
    routed = moe_saved = moe_none = 0.0
    F2 = _dense_mlp_width(s, mesh, rules, moe_layer)  # the width the 2-D (batch-free) products produce
    if s.moe is not None and (moe_layer is None or moe_layer):
        m = s.moe
        X = routed_slots_per_token(s, seq_len, _axis_product("expert", mesh, m.n_experts, rules))
        routed = X * local(m.expert_mlp_dim)
        moe_saved, moe_none = c * X * D + 4 * D, c * X * D + 4 * m.top_k * D
    flash = kernel == "flash"
    S = 0.0 if flash else executed_keys(seq_len, window, kernel, block)
    lse = 4 * N if flash and remat != "full" else 0.0
    if remat == "full":
        return c * D
    # post_norms: the post-MLP norm's input is the down projection's output, a dot the policy keeps (a dense layer's;
    # the attention-out projection's is kept anyway)
    post_dot = D if s.post_norms and not (s.moe is not None and (moe_layer is None or moe_layer)) else 0.0
    dots = c * D + projection_bytes(c, backend) * (D + post_dot + NH + 2 * KH + 2 * F2)  # layer input + projections
    if remat == "save_dots_no_batch":
        return dots
    if remat == "save_dots":
        return dots + c * (NH + 2 * routed) + moe_saved + 4 * N * S + lse
    kv_windows = 2 * c * KH * S / max(1, min(block, seq_len)) if kernel == "blocked" else 0.0
    # models.attention's softmax VJP; a flash kernel keeps its output (the o-projection's input too) and `lse`
    attn = 0.0 if flash else (c * NH if c >= 4 else 0.0) + 4 * N * S + 4 * N  # a bf16 output is not kept
    # q / k norms: their inputs and float32 inverse RMS per head (Qwen 3; models.transformer.rms_norm's VJP), or
    # per token over all heads (OLMo 2: the [B, T, 1] RMS, whole on each device whatever the heads' split)
    rms = (N + KH / s.head_dim) if s.qk_norm_scope == "head" else 2
    qk = c * (NH + KH) + 4 * rms if s.qk_norm else 0.0
    # the layer's D-wide norms (pre: attention and MLP inputs; post: their outputs): each keeps its input, a pre-norm
    # also its output (the projections' input, which without it is the layer's own input), and a float32 inverse RMS
    norms = 2 * s.pre_norms + 2 * s.post_norms
    rows = c * (2 + norms) * D + 4 * norms
    return rows + c * (2 * NH + 2 * KH + 2 * F2 + 3 * routed) + moe_none + kv_windows + attn + lse + qk


def projection_bytes(compute_bytes: int, backend: str | None = None) -> int:
    """Bytes per element of a projection's output as a dot-saving remat policy keeps it: the compute dtype's on an
    accelerator (`backend` None, 'gpu', 'tpu', ...); on 'cpu' (jax.default_backend()'s name) a bf16 / f16 product
    accumulates into a float32 dot rounded afterwards (models.linear._dot), and the policy saves the float32 dot
    (XLA kept 1.92x the bf16 count under save_dots_no_batch)."""
    return 4 if compute_bytes < 4 and str(backend).lower() == "cpu" else compute_bytes


def _dense_mlp_width(s, mesh, rules, moe_layer) -> float:
    """Per device, the width of a layer's dense gated MLP: mlp_dim, or an MoE layer's shared experts'."""
    w = _shared_width(s.moe) if s.moe is not None and (moe_layer is None or moe_layer) else s.mlp_dim
    return w / _act_split("act_mlp", mesh, w, rules) if w else 0.0


# Expert-row-wide (X·F per token) temporaries of the [E, C] buffers' einsum backward beside its residuals: measured,
# not derived. A dense MLP's backward (models.glu.glu_linear's VJP) makes 2 (gate, up); the batched-over-E einsums
# (models.moe_dispatch.expert_swiglu) keep ~4 more: per-token slope over the batch of XLA's temp bytes, remat full,
# {data: 2, expert: 4}, E 8, F 256 / 512, C = T or capacity_factor 2: 3.7-4.1 X·F beyond the 2 (XLA 1.31-1.54x the
# whole step's estimate with 2 counted; 0.81-1.10x with 6, on expert meshes and one device alike). They come from
# recomputing the expert einsums in the backward: under remat 'none' / 'save_dots' their products are saved residuals
# (`saved_bytes_per_token`) and XLA keeps a dense MLP's 2 (6 counted there put XLA at 0.89-0.93x; 2: 1.00-1.06x).
BUFFERED_EXPERT_TEMPS = 6


def _buffered_expert_width(s, seq_len, mesh, rules) -> float:
    """Per token, the width of the routed experts' rows when they run through [E, C] buffers (capacity dispatch,
    or dropless with C = T), whose einsum backward makes BUFFERED_EXPERT_TEMPS temporaries that wide where it
    recomputes the einsums (remat full / save_dots_no_batch; else 2, as a dense MLP's); the sorted dropless kernels
    differentiate tile by tile (`models.moe_dispatch.grouped_swiglu`) and make none."""
    m = s.moe
    shards = _axis_product("expert", mesh, m.n_experts, rules)
    if m.dispatch == "dropless" and executed_slots(m, seq_len, shards) == m.top_k:
        return 0.0
    F = m.expert_mlp_dim
    return routed_slots_per_token(s, seq_len, shards) * F / _act_split("act_mlp", mesh, F, rules)


def _shared_width(m) -> int:
    return m.shared_mlp_dim if m.shared_mlp_dim is not None else m.n_shared_experts * m.expert_mlp_dim


def routed_slots_per_token(cfg, seq_len: int, expert_shards: int = 1) -> float:
    """Expert rows per token an MoE layer's routed experts run (`scaling.flops.executed_slots`)."""
    return executed_slots(lm_shape(cfg).moe, int(seq_len), expert_shards)


def memory_per_device(cfg, mesh: Mapping[str, int], micro_batch: int, seq_len: int, *, remat: str | None = None,
                      param_dtype: str | None = None, compute_dtype: str | None = None, grad_dtype: str | None = None,
                      optimizer_moments: int = 2, opt_dtype: str | None = None, kernel: str | None = None,
                      block: int | None = None, params: list[ParamEntry] | None = None, rules=None, windows=None,
                      moe=None, update_buffers: int = 1, grad_accum: int = 1, backend: str | None = None
                      ) -> MemoryBreakdown:
    """Modelled peak bytes per device of a training step (see the module docstring).

    mesh: axis sizes, e.g. {"data": 2, "fsdp": 4, "tensor": 2} (or a jax Mesh); micro_batch:
    *global* sequences whose activations are alive at once: the step's batch B, or B / A with `lm_step`'s
    grad_accum = A (one microbatch is differentiated at a time); seq_len: tokens per sequence; remat: default
    `cfg.remat`;
    dtypes default to `cfg.param_dtype` / `cfg.dtype`, grads to the param dtype, optimizer moments to float32
    (`experiments.lm_step.make_optimizer` keeps them in float32 whatever the params); optimizer_moments: 2 for
    AdamW, 1 for momentum SGD, 0 for plain SGD; kernel: how attention scores are stored (`executed_keys`);
    params: a real parameter table (`param_table_from_state`) instead of the analytic one; parameter bytes are
    counted at each entry's dtype (the analytic table's: param_dtype, but the MoE router bias float32 always).
    update_buffers: float32 gradient-sized buffers the optimizer update holds beside the gradients (1:
    `make_optimizer`'s global-norm clipping; 0 for an update XLA fuses leaf by leaf).
    grad_accum: `lm_step`'s A (micro_batch is then B / A): above 1 its float32 running sum of the gradients, one
    float32 copy of the local parameters, is live through every microbatch's backward (`accum`), and with gradients
    narrower than float32 through the optimizer update too (in `update`).
    kernel=None: 'flash' (no scores stored) when cfg.attn_impl is 'cudnn' (without an attention soft-cap, which
    runs 'xla'), as `scaling.dit` does; otherwise each layer's kernel as models.Transformer runs it with 'xla'
    (`scaling.flops.model_kernel`: the block-causal kernel of `attn_block` rows, or dense masked, for global
    layers and windows that span seq_len; 'blocked' with block = cfg.swa_block for the other windowed ones), its
    executed scores counted in the saved residuals and the working set; pass 'flash' for other fused GPU/TPU
    kernels. (Until the twenty-ninth session the saved residuals counted global layers' scores dense: at long
    sequences, 16 query blocks executing ~53% of them, XLA kept 0.66x of that estimate at T = 2048 under remat
    'none'; now 0.94x.)
    backend: where the step runs ('cpu', 'gpu', 'tpu'; None: an accelerator), which sets the bytes of the
    projections a dot-saving remat policy keeps (`projection_bytes`: float32 ones for a bf16 model on 'cpu'), and on
    'cpu' the forward phase at the lookup (`MemoryBreakdown.forward`: XLA:CPU's hoisted LM-head gather and float32
    collectives of bf16 arrays).
    On a mesh whose rules split the layer stack (`stage`), a pipelined step models.Transformer refuses raises a
    ValueError naming it: MoE layers, stages that cut a pattern period, or `cfg.pipeline_microbatches` whose
    microbatches of micro_batch rows do not split over the batch mesh axes.
    """
    mesh = check_mesh(mesh)
    check_counts(micro_batch=(micro_batch, 1), seq_len=(seq_len, 1), optimizer_moments=(optimizer_moments, 0),
                  update_buffers=(update_buffers, 0), grad_accum=(grad_accum, 1))
    if kernel is None and getattr(cfg, "attn_impl", "xla") == "cudnn" and not getattr(cfg, "attn_logit_softcap", None):
        kernel = "flash"  # (counted as the CPU kernel's float32 scores: 4.6x a 7B model's estimate at T = 8192)
    s = lm_shape(cfg, windows=windows, moe=moe)
    remat = remat or getattr(cfg, "remat", "none")
    pdt = param_dtype or getattr(cfg, "param_dtype", "float32")
    cdt = compute_dtype or getattr(cfg, "dtype", "float32")
    cb = dtype_bytes(cdt)
    gb, ob = dtype_bytes(grad_dtype or pdt), dtype_bytes(opt_dtype or "float32")
    table = params if params is not None else lm_param_table(s, param_dtype=pdt)

    elems = sum(p.size / shard_factor(p.axes, p.shape, mesh, rules) for p in table)
    # each entry at its own dtype (pb · elems missed a float32 router bias of a bf16 model, and a real table's dtypes)
    pbytes = sum(p.size * dtype_bytes(p.dtype) / shard_factor(p.axes, p.shape, mesh, rules) for p in table)
    bshards = input_shards("micro_batch", "batch", micro_batch, mesh, rules)
    sshards = input_shards("seq_len", "act_seq", seq_len, mesh, rules)
    local_tokens = (micro_batch // bshards) * (seq_len // sshards)
    stage = shard_factor(("layers",), (s.n_layers,), mesh, rules)
    layers_local = s.n_layers // stage

    if block is not None:  # 0 (falsy) was read as the config's block, where -4 was refused
        check_counts(block=(block, 1))
    block = getattr(cfg, "swa_block", 256) if block is None else block
    # each layer's kernel as models.Transformer runs it (`kernel` given: that one for every layer)
    ws = lambda w: (kernel, block) if kernel else model_kernel(s, w, block)  # noqa: E731
    layers = [(w, s.is_moe_layer(i)) for i, w in enumerate(s.windows)]
    # models.Transformer scans groups of one pattern period P (local + global, dense + MoE, ...): XLA keeps the
    # whole group's residuals live during its backward (alternating windows measured 1.24x one layer's)
    P = next(p for p in range(1, len(layers) + 1)
             if len(layers) % p == 0 and all(layers[i] == layers[i % p] for i in range(len(layers))))
    M = getattr(cfg, "pipeline_microbatches", 1) if stage > 1 else 1
    if stage > 1:  # what models.Transformer refuses to run has no estimate (M = 3 of 16 rows had one)
        from parallel.pipeline import pipeline_problem

        if problem := pipeline_problem(s.n_layers, P, stage, micro_batch, M, bshards, s.n_moe_layers):
            raise ValueError(problem)
    # what each layer runs on these rows: one whose window spans them runs the global kernel (`model_window`)
    runs = [(model_window(w, seq_len), m) for w, m in layers]
    saved = [saved_bytes_per_token(s, remat, seq_len, compute_dtype=cdt, mesh=mesh, window=w, kernel=ws(w)[0],
                                   block=ws(w)[1], rules=rules, moe_layer=m, backend=backend) for w, m in runs]
    acts = local_tokens * sum(saved) / stage
    # GPipe (parallel.pipeline): each stage runs its layers on B/M rows at each of M + S - 1 ticks (S - 1 of them
    # bubble ticks on real rows) and autodiff keeps every tick's residuals; one tick's working set is B/M rows
    acts *= (M + stage - 1) / M
    # with more than one scan group per stage, the backward of each tick slices that tick's residuals of the stage's
    # layer scan ([groups, B_l/M, T, ...]) out of the ticks' stack into buffers of their own, the inner scan's
    # operands: one tick's residuals more (XLA's buffer assignment: 4.46 MB of dynamic-slice values, one tick's
    # saved bytes to the byte, {stage: 2, data: 4}, 2 layers per stage, save_dots; uncounted, XLA was 1.13-1.24x this
    # estimate under none / save_dots*; one group per stage compiles the inner scan away and slices nothing)
    inner_scan = stage > 1 and layers_local // P > 1
    if inner_scan:
        acts *= (M + stage) / (M + stage - 1)
    # + the MLP backward's two MLP-wide gradient temporaries beside its residuals (gate, up), and attention's
    # float32 dP and dS (one score each per executed key and head); routed experts run through [E, C] buffers keep
    # BUFFERED_EXPERT_TEMPS row-wide ones (`_buffered_expert_width`) where the backward recomputes them, 2 otherwise
    expert_temps = BUFFERED_EXPERT_TEMPS if remat in ("full", "save_dots_no_batch") else 2
    n_local = s.n_heads / _act_split("act_heads", mesh, s.n_heads, rules)
    scores = lambda w: 0.0 if ws(w)[0] == "flash" else executed_keys(seq_len, w, *ws(w))  # noqa: E731
    group = sum(saved_bytes_per_token(s, "none", seq_len, compute_dtype=cdt, mesh=mesh, window=w,
                                      kernel=ws(w)[0], block=ws(w)[1], rules=rules, moe_layer=m)
                + 2 * cb * _dense_mlp_width(s, mesh, rules, m)
                + (expert_temps * cb * _buffered_expert_width(s, seq_len, mesh, rules) if m else 0.0)
                + 2 * 4 * n_local * scores(w) for w, m in runs[:P])
    v_local = s.vocab_size / _act_split("act_vocab", mesh, s.vocab_size, rules)
    cpu = str(backend).lower() == "cpu"
    if cpu and sshards > 1:
        # a sharded sequence runs the projections on [B, T, F] rows (models.linear.flat_rows), whose weight gradients
        # XLA:CPU contracts over (B, T) from transposed [F, B·T] float32 copies (bf16 compute too: its dots accumulate
        # in float32): 3 MLP-wide ones live in one layer's backward (buffer assignment: three [F, B·T] transposes).
        # Uncounted, {sequence: 2 or 4} (tensor 2 too) kept 2.5-3.6 [B·T, F_local] float32 buffers more than {data}
        # at the same local tokens, remat none / full / save_dots*, float32 and bf16: XLA 1.14-1.45x this estimate
        group += 3 * projection_bytes(cb, backend) * max(_dense_mlp_width(s, mesh, rules, m) for _, m in runs[:P])
    working = local_tokens * (group / M + 3 * 4 * v_local + 2 * cb * s.d_model)

    # models.embed's lookup reads each device's vocab shard where its tokens are under V/2 (`_vocab_split_lookup`:
    # the rows all-reduced over the vocab axes), else gathers the table whole
    V, D = s.vocab_size, s.d_model
    vocab_split = shard_factor(("vocab", None), (V, D), mesh, rules)  # the head's columns over tensor: XLA keeps that
    embed_split = shard_factor((None, "embed"), (V, D), mesh, rules)  # what the reduce-scatter undoes (fsdp)
    lookup_split = vocab_split if 2 * local_tokens < V else 1
    forward = 0.0
    if cpu and vocab_split * embed_split > lookup_split:
        # XLA:CPU's peak at vocabulary-heavy sizes is in the forward, at the lookup: the table as gathered for it, the
        # LM head gathered over `embed` (its scheduler hoists that gather to the step's start: live through the whole
        # forward), the shard a gather reads (a transposing or converting copy) and, untied, the lookup gradient's
        # float32 zeros (hoisted too). Its collectives of bf16 arrays run in float32 (FloatNormalization: convert,
        # all-gather float32, convert) and float16 ones are converted to float32 once gathered, so each gathered copy
        # is float32. Measured to 1-3% (8 devices, V 131072 / 32768, D 256): {fsdp: 8} 288 / 72 MiB, {fsdp: 4,
        # tensor: 2} 160 / 40, float32, bf16 and f16 alike; the backward model missed it: XLA 1.04-2.22x.
        cc = max(cb, 4)
        shard = V * D / (vocab_split * embed_split)
        head = cc * V * D / vocab_split if embed_split > 1 else 0.0
        forward = cc * V * D / lookup_split + head + (cc + 4 * (not s.tie_embeddings)) * shard
    transient = 0.0
    if mesh.get("fsdp", 1) > 1:
        # a layer's weights all-gathered over fsdp (still split over tensor), two in flight
        # (the largest layer: an MoE one holds its experts; each stack's leading dim is its own layer count)
        stacks: dict[str, float] = {}
        for p in table:
            if p.axes and p.axes[0] == "layers":
                stack = p.path.split(".")[0]
                stacks[stack] = stacks.get(stack, 0.0) + p.size / p.shape[0] / gathered_split(p, mesh, rules)
        gathered = max(stacks.values(), default=0.0)
        transient = 2 * cb * gathered
        if not cpu:
            # + the table the lookup gathers, a forward buffer: it sets the peak where it outweighs the backward's
            # working set (uncounted: XLA:CPU 1.34x this estimate at V 32768, D 256, 32 tokens a device on {fsdp: 8};
            # counted whole, XLA:CPU 0.62x at V 16384, D 64, whose logits buffers outweigh it; on 'cpu', `forward`)
            transient += max(0.0, cb * V * D / lookup_split - working)
    mo = s.moe
    if (remat == "none" and mo is not None and mo.dispatch == "dropless" and mo.dropless_impl != "blocks"
            and not experts_gathered(mo, mesh, rules)
            and executed_slots(mo, seq_len, _axis_product("expert", mesh, mo.n_experts, rules)) == mo.top_k):
        # without remat the layer scan saves a copy of each MoE layer's experts (FSDP-gathered, if split over fsdp) as
        # residuals of the sorted grouped kernel, whatever the tokens (XLA's buffer assignment, 'gmm', demo preset,
        # {fsdp: 8} and {data: 8}: each layer's [E, D, F] written into [layers, E, D, F] stacks, live through the
        # backward, which gathers them no more; capacity buffers' einsums, the dense MLP and attention keep no copy).
        # Uncounted, XLA was 1.17x (fsdp) / 1.24x (data) this estimate at grad_accum 2, where the halved activations
        # no longer hid them; save_dots* / full keep none ('blocks' counts its copies below; an explicit sorted
        # impl on an expert mesh, `experts_gathered`, is not measured)
        acts += cb * s.n_moe_layers / stage * sum(p.size / p.shape[0] / gathered_split(p, mesh, rules)
                                                  for p in table if p.axes[:2] == ("layers", "expert"))
    if remat == "none":
        # without remat the layer scan also saves each layer's weights as cast to a narrower compute dtype (bf16
        # compute, float32 parameters: `[layers, ...]` bf16 stacks of wq / wk / wv / wo and the dense MLP's in XLA's
        # buffer assignment, live through the backward; at the parameter dtype a layer's slice is no copy). Uncounted,
        # XLA was 1.17x this estimate on the demo preset in bf16 ({data: 8}, grad_accum 2; float32 1.11x), now 1.10x
        # (the experts' copies are counted above, in the compute dtype whatever the parameters')
        acts += cb / stage * sum(p.size / gathered_split(p, mesh, rules) for p in table
                                 if p.axes and p.axes[0] == "layers" and p.axes[1:2] != ("expert",)
                                 and len(p.shape) > 2 and dtype_bytes(p.dtype) > cb)
    if s.moe is not None and experts_gathered(s.moe, mesh, rules):
        # an explicit sorted / dense dropless_impl with experts split over `expert`: models.moe_dispatch's
        # dropless_dispatch all-gathers each MoE layer's whole experts (still split over tensor) in compute dtype, and
        # its backward builds their whole gradient before the reduce-scatter back to the expert shards (uncounted, XLA
        # was 1.3-2.2x this estimate with 'gmm' on {expert: 4 or 8} / {data: 2, expert: 4}, as the model's warning says)
        no_expert = {a: n for a, n in mesh.items() if a not in ("expert", "fsdp")}
        whole = sum(p.size / p.shape[0] / (shard_factor(p.axes[1:], p.shape[1:], no_expert, rules) if no_expert else 1)
                    for p in table if p.axes[:2] == ("layers", "expert"))
        transient += (cb + gb) * whole
    if s.moe is not None and s.moe.dispatch == "dropless" and s.moe.dropless_impl == "blocks":
        # models.moe_dispatch.sorted_blocks gathers its expert's weights for each of a layer's nb blocks ([nb, D, F]
        # copies in compute dtype) and their cotangents before the scatter-add (uncounted, XLA was 1.7-5.1x this
        # estimate: 39 blocks x 3 D F per MoE layer on {expert: 2..8}, {data: 2, expert: 4}; now 0.79-1.16x)
        from models.moe_dispatch import default_block_rows

        rows = local_tokens * s.moe.top_k  # one dispatch group per device: its own tokens' assignments
        nb = -(-rows // default_block_rows(rows, s.moe.n_experts)) + s.moe.n_experts - 1
        F = s.moe.expert_mlp_dim  # the weights as dropless_dispatch constrains them: whole but for act_mlp
        per_expert = 3 * s.d_model * F / _act_split("act_mlp", mesh, F, rules)
        # remat 'none' keeps every local MoE layer's copies as residuals (XLA 1.44x without: 1.10x with)
        copies = s.n_moe_layers / stage if remat == "none" else 1
        transient += (copies + 1) * cb * nb * per_expert
    # the LM head's [D, V] gradient (a tied table's head side too) is built whole over `embed` on each device before
    # its reduce-scatter to the fsdp shards. The lookup's own gradient is no [V, D] temporary: models.embed constrains
    # it to the table's layout, and the partitioner moves each device's cotangent rows to the devices holding their
    # columns (an all-to-all) and scatter-adds into the shard (it builds the whole gradient only when a device's tokens
    # rival V: from 2V tokens on {fsdp: 8} and {fsdp: 4, tensor: 2}, V/4 on {data: 2, fsdp: 4} at V = 256, where that
    # [V, D] is small next to the activations).
    embed_grads = gb * V * D / vocab_split * (1 - 1 / embed_split)
    # GPipe's tick loop sums the stage's layer gradients over ticks (the stacks are loop-invariant), and with more than
    # one scan group per stage each tick's layer scan writes its own stacked gradient before the sum takes it: one
    # more gradient copy of the local layer stacks, live through the backward (XLA's buffer assignment; uncounted,
    # XLA was 1.45x this estimate on {stage: 2, data: 4}, 2 layers per stage, remat 'full'; one group per stage
    # compiles the inner scan away and keeps none)
    stage_grads = 0.0
    if inner_scan:
        stage_grads = gb * sum(p.size / shard_factor(p.axes, p.shape, mesh, rules) for p in table
                               if p.axes and p.axes[0] == "layers")
    update = update_bytes(elems, gb, update_buffers)
    if cpu and s.tie_embeddings and embed_split == 1 and bshards * sshards > 1:
        # a tied table's gradient has two partial sums, the lookup's scatter-add and the head's product: XLA:CPU
        # all-reduces each over the batch axes (its combiner puts both in one all-reduce) and adds them after, so its
        # operands and results are 4 table gradients at once where the gradients count 1 (+1 where the batch and the
        # sequence both split: reduced over `sequence`, then over the batch axes). Where no layer loop runs (one scan
        # group per stage, or scan_layers=False) the layers' gradients join that all-reduce too, operands and results:
        # all the gradients twice. (Buffer assignment, {data: 4}, V 1024, D 128: all-reduce {1} f32[1024,128], {2}
        # f32[128,1024], then their sum; uncounted, XLA was 1.59x / 1.18x / 1.89x this estimate on {data: 4} /
        # {data: 2} / {sequence: 2, data: 2}, 1.10-1.62x with 2 layers; the untied step's temp bytes equal the tied
        # one's.) XLA:GPU's AllReduceReassociate adds the partials before one all-reduce; with FSDP each partial is
        # reduce-scattered to the shards (`embed_grads`)
        table_grad = gb * V * D / vocab_split
        extra = (3 + (bshards > 1 and sshards > 1)) * table_grad
        if not (getattr(cfg, "scan_layers", True) and layers_local // P > 1):
            extra += gb * elems - table_grad  # the other gradients' all-reduce operands
        update = max(update, extra)
    if grad_accum > 1 and gb < 4:
        # lm_step casts the float32 running sum down to the gradients' dtype for the update, and the sum stays live
        # beside its cast and the update's float32 copies (uncounted, bfloat16 parameters, A = 4: XLA 1.46x this)
        update += 4 * elems
    return MemoryBreakdown(params=int(pbytes), grads=int(gb * elems), opt_state=int(optimizer_moments * ob * elems),
                           activations=int(acts), working=int(working), transient_weights=int(transient),
                           local_tokens=int(local_tokens), layers_local=int(layers_local), update=int(update),
                           accum=int(4 * elems) if grad_accum > 1 else 0, embed_grads=int(embed_grads),
                           stage_grads=int(stage_grads), forward=int(forward))


def update_bytes(elems: float, grad_bytes: int, update_buffers: int = 1) -> float:
    """Bytes the optimizer update holds beside the gradients of `elems` local parameters: `update_buffers` float32
    copies (make_optimizer's clipped gradients) + a float32 cast of gradients narrower than float32 (the update runs
    in float32, `float32_state`, and the cast copy lives on beside the clipped one: bfloat16 parameters, remat
    'full': XLA 68.1 MB, this 66.2 MB)."""
    return 4 * elems * (update_buffers + (grad_bytes < 4))


def experts_gathered(m, mesh: Mapping[str, int], rules=None) -> bool:
    """Whether an MoE layer all-gathers every expert's weights onto each device: an explicit sorted or dense
    `dropless_impl` with the experts split over devices (`models.moe_dispatch.resolve_dropless_impl` warns of it;
    'auto' and 'capacity' exchange tokens instead)."""
    explicit = m.dispatch == "dropless" and m.dropless_impl not in ("auto", "capacity")
    return explicit and _axis_product("expert", mesh, m.n_experts, rules) > 1


def gathered_split(p: ParamEntry, mesh, rules) -> int:
    """How many ways one layer of a stacked parameter stays split once gathered over fsdp: its other dims' axes
    (tensor, expert), not the layer dim's (stage splits the stack, not a layer). Read off the whole mesh, fsdp then
    left out: the mesh without fsdp refused an override naming it (mlp='fsdp' on {fsdp: 2, tensor: 2}, which the
    model takes) as one to an absent axis."""
    from parallel.rules import logical_to_spec

    spec = logical_to_spec(tuple(p.axes[1:]), _Mesh(mesh), tuple(p.shape[1:]), rules)
    return math.prod(mesh[a] for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))
                     if a != "fsdp")


def kv_cache_bytes(cfg, batch: int, seq_len: int, *, dtype: str | None = None, windows=None) -> int:
    """KV-cache bytes for inference (global): a windowed layer needs only min(window, seq_len) slots. dtype: the
    cache's (default: the config's compute dtype, as `models.KVCache.zeros` stores it; bfloat16 for a config
    without one). Any dtype is counted, int8 / fp8 too, for planning another system's quantised cache: this
    library's `KVCache.zeros` builds only bfloat16 / float16 / float32 caches (`TransformerConfig.kv_cache_bytes`
    refuses the rest)."""
    check_counts(batch=(batch, 1), seq_len=(seq_len, 1))
    # Python ints: numpy int32 ones (a sweep's) wrapped the product below (Llama 3 70B at 128K: 0 bytes)
    batch, seq_len = int(batch), int(seq_len)
    dtype = dtype or getattr(cfg, "dtype", None) or "bfloat16"
    s = lm_shape(cfg, windows=windows)
    slots = sum(seq_len if w is None else min(w, seq_len) for w in s.windows)
    return int(2 * batch * slots * s.kv_heads * s.head_dim * dtype_bytes(dtype))
