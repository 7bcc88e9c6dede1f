"""Parameter count, FLOPs and training memory of the video diffusion Transformer (`models.video.VideoDiT`).

Takes a `models.video.DiTConfig` or anything with its field names (duck-typed): latent_shape (T, H, W),
latent_channels, patch (pt, ph, pw), d_model, n_layers, n_heads, head_dim, mlp_dim, attention
('full' | 'factorized'), text_dim, pooled_text, time_freq_dim, qk_norm. The architecture counted:
- patchify: S = (T/pt)(H/ph)(W/pw) tokens, Linear(P = pt·ph·pw·C -> d) with bias; the same shape out
  (Linear(d -> P) with bias after a final adaLN Linear(d -> 2d));
- conditioning c = MLP(sinusoid(t)) (freq -> d -> d, biases) + Linear(pooled caption, E -> d);
- each block (adaLN-Zero): Linear(c, d -> 9d) modulating self-attention, cross-attention and a SwiGLU
  MLP (3 matrices); attention projections without biases, optional QK-norm scales (2·head_dim);
  'factorized': spatial attention then temporal attention (its own projections and a d -> 3d
  modulation), the temporal one skipped when there is a single latent frame; cross-attention keys /
  values are projected from text_dim-wide caption tokens.
Windows (spatial_window / temporal_window) do not change the executed FLOPs counted here: models.video
applies them as masks over dense scores, except a temporal window under 'factorized', which runs the blocked
sliding-window kernel with one block spanning all T' frames (every score still computed).

FLOPs are 2 per multiply-add for *one clip* (one latent video); per-clip conditioning work (adaLN,
timestep MLP, caption K/V projections) is counted once per clip. Training = 3 x forward; sampling =
steps x forward (x2 with classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from scaling.flops import int_at_least


@dataclasses.dataclass(frozen=True)
class DiTShape:
    """The fields of a DiT config that its parameter count and FLOPs depend on, read duck-typed (`dit_shape`)."""

    latent_shape: tuple[int, int, int]  # (T, H, W) of the latents
    latent_channels: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_dim: int
    patch: tuple[int, int, int] = (1, 2, 2)
    head_dim: int | None = None
    attention: str = "factorized"  # or "full"
    text_dim: int = 64
    pooled_text: bool = True
    time_freq_dim: int = 128
    qk_norm: bool = True

    def __post_init__(self):
        # whole numbers, numpy ints taken as ints (a sweep's np.int64 patch was refused); d_model=0 counted 16
        # parameters, n_layers=-1 a negative count and n_heads=0 raised a bare ZeroDivisionError
        for f in ("latent_channels", "d_model", "n_layers", "n_heads", "mlp_dim", "text_dim", "time_freq_dim",
                  "head_dim"):
            if f != "head_dim" or self.head_dim is not None:  # None: d_model // n_heads
                object.__setattr__(self, f, int_at_least(f"DiTShape.{f}", getattr(self, f), 1))
        for f in ("latent_shape", "patch"):
            v = getattr(self, f)
            try:
                if not isinstance(v, tuple | list) or len(v) != 3:
                    raise ValueError
                object.__setattr__(self, f, tuple(int_at_least(f, x, 1) for x in v))
            except ValueError:
                raise ValueError(f"DiTShape.{f} must be ({'pt, ph, pw' if f == 'patch' else 'T, H, W'}) of ints >= 1, "
                                 f"got {v}") from None
        for f in ("pooled_text", "qk_norm"):  # 'no' is truthy: it counted the layers it meant to leave out
            if not isinstance(getattr(self, f), bool | np.bool_):
                raise ValueError(f"DiTShape.{f} must be True or False, got {getattr(self, f)!r}")
            object.__setattr__(self, f, bool(getattr(self, f)))
        if self.time_freq_dim % 2:  # DiTConfig refuses it: the timestep features are sin and cos halves
            raise ValueError(f"DiTShape.time_freq_dim must be even (sin and cos halves), got {self.time_freq_dim}")
        if self.head_dim is None and self.d_model % self.n_heads:  # d_model // n_heads floored it, as no DiT runs
            raise ValueError(f"DiTShape.head_dim: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "set head_dim explicitly")
        if any(s % p for s, p in zip(self.latent_shape, self.patch)):
            raise ValueError(f"DiTShape.patch {self.patch} must divide latent_shape {self.latent_shape}; pad the "
                             "latents or change the patch")
        if self.attention not in ("full", "factorized"):
            raise ValueError(f"DiTShape.attention={self.attention!r}: use 'full' or 'factorized'")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.latent_shape, self.patch))

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch) * self.latent_channels

    @property
    def temporal(self) -> bool:
        """Whether blocks run temporal attention (factorized and more than one latent frame)."""
        return self.attention == "factorized" and self.grid[0] > 1

    def self_attention_keys(self) -> int:
        """Keys per query summed over a block's self-attentions."""
        T, H, W = self.grid
        if self.attention == "full":
            return self.tokens
        return H * W + (T if self.temporal else 0)


def dit_shape(cfg) -> DiTShape:
    """A DiTShape from a `models.video.DiTConfig` or any object with the same field names."""
    if isinstance(cfg, DiTShape):
        return cfg
    names = [f.name for f in dataclasses.fields(DiTShape)]
    return DiTShape(**{n: getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None})


def dit_param_count(cfg) -> int:
    """Parameters of the DiT described by `cfg` (a `models.video.DiTConfig` or a duck-typed equivalent)."""
    s = dit_shape(cfg)
    d, nh, e, p = s.d_model, s.n_heads * s.hd, s.text_dim, s.patch_dim
    qk = 2 * s.hd if s.qk_norm else 0
    attn = 4 * d * nh + qk
    cross = 2 * d * nh + 2 * e * nh + qk
    block = attn + cross + 3 * d * s.mlp_dim + 9 * d * d + 9 * d
    if s.attention == "factorized":
        block += attn + 3 * d * d + 3 * d
    embed = p * d + d + s.time_freq_dim * d + d + d * d + d + (e * d + d if s.pooled_text else 0)
    final = 2 * d * d + 2 * d + d * p + p
    return embed + s.n_layers * block + final


def dit_forward_flops(cfg, text_len: int, batch: int = 1) -> float:
    """FLOPs of one denoiser forward pass on `batch` clips with `text_len` caption tokens (0: none)."""
    # a negative or fractional caption length, or a batch of -1 clips, was counted (a negative FLOP count)
    text_len, batch = int_at_least("text_len", text_len, 0), int_at_least("batch", batch, 1)
    s = dit_shape(cfg)
    d, nh, e, p, S, L = s.d_model, s.n_heads * s.hd, s.text_dim, s.patch_dim, s.tokens, text_len
    n_self = 2 if s.temporal else 1
    per_token = 2 * p * d + 2 * d * p + s.n_layers * (
        n_self * 2 * 4 * d * nh + 2 * 2 * d * nh + 2 * 3 * d * s.mlp_dim  # projections: self, cross q/o, MLP
        + 4 * nh * (s.self_attention_keys() + L))  # scores and PV: self + cross
    per_clip = 2 * (s.time_freq_dim * d + d * d + (e * d if s.pooled_text else 0) + 2 * d * d) + s.n_layers * (
        2 * (9 + (3 if s.temporal else 0)) * d * d + 2 * 2 * L * e * nh)  # adaLN + caption K/V
    return batch * (S * per_token + per_clip)


def dit_train_flops(cfg, text_len: int, batch: int = 1) -> float:
    """One training step on `batch` clips (one noise level each): 3 x forward."""
    return 3.0 * dit_forward_flops(cfg, text_len, batch)


def dit_sampling_flops(cfg, text_len: int, steps: int, cfg_guidance: bool = True, batch: int = 1) -> float:
    """Generating `batch` clips with `steps` denoiser evaluations (x2 for classifier-free guidance)."""
    steps = int_at_least("steps", steps, 1)
    if not isinstance(cfg_guidance, bool | np.bool_):  # 'no' is truthy: it doubled the count
        raise ValueError(f"cfg_guidance must be True or False, got {cfg_guidance!r}")
    return steps * (2 if cfg_guidance else 1) * dit_forward_flops(cfg, text_len, batch)


def _kernel(cfg, kernel: str | None) -> str:
    """'flash' (a fused kernel that stores no scores: attn_impl 'cudnn') or 'dense' (models.attention's)."""
    kernel = kernel or ("flash" if getattr(cfg, "attn_impl", "xla") == "cudnn" else "dense")
    if kernel not in ("dense", "flash"):
        raise ValueError(f"kernel={kernel!r}: use 'dense' (scores in memory) or 'flash' (a fused kernel)")
    return kernel


def dit_saved_bytes_per_token(cfg, remat: str, text_len: int, *, compute_dtype: str | None = None,
                              mesh=None, rules=None, kernel: str | None = None) -> float:
    """Bytes one block keeps per local video token for the backward pass under `remat` (read off
    `jax.ad_checkpoint.print_saved_residuals` of `DiTBlock`). D width, NH = heads·head_dim and F mlp_dim (both
    divided by the tensor degree), N heads, c compute-dtype bytes, n = 1 or 2 self-attentions, K_s their keys per
    query summed (`DiTShape.self_attention_keys`), L text tokens, q = 1 with QK-norm:
      full                : c·D (the block input)
      save_dots_no_batch  : c·(D + n·(3NH + D) + NH + D + 2F + D)  input; q, k, v and out-projection of each
                            self-attention; cross-attention's q and out-projection; gate, up and down (the gates
                            g·f(h) need every sublayer's output)
      save_dots           : the above + c·(n + 1)·NH (PV outputs) + 4·N·(K_s + L) (float32 scores)
      none                : every sublayer's input, normalised input, modulated input and output (4·c·D each), per
                            self-attention c·(5 + 2q)·NH (q, k before QK-norm, models.attention's q, k, v, output
                            (float32 or flash only: c·(4 + 2q)·NH in bf16) and the out-projection's input),
                            cross-attention c·(3 + q)·NH + NH (its padding mask; c·(2 + q)·NH in bf16),
                            the MLP's gate and up, and models.attention's float32 weights and row sums,
                            4·N·(K_s + L) + 4·N·(n + 1).
    kernel='flash' (default when cfg.attn_impl is 'cudnn'): a fused kernel keeps no scores, only a float32
    log-sum-exp per query, head and attention: 4·N·(K_s + L) -> 4·N·(n + 1) under save_dots and none (the
    lse replaces the row sums). Per-clip residuals (caption keys / values, adaLN vectors) are in
    `dit_memory_per_device`."""
    from scaling.memory import REMAT_POLICIES, check_mesh, dtype_bytes, shard_factor

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {REMAT_POLICIES}")
    text_len = int_at_least("text_len", text_len, 0)
    s, mesh = dit_shape(cfg), check_mesh(mesh or {})
    c = dtype_bytes(compute_dtype or getattr(cfg, "dtype", "float32"))
    t = shard_factor(("act_heads",), (s.n_heads,), mesh, rules)
    F = s.mlp_dim / shard_factor(("act_mlp",), (s.mlp_dim,), mesh, rules)
    D, N, NH = s.d_model, s.n_heads / t, s.n_heads * s.hd / t
    n, q, keys = (2 if s.temporal else 1), int(s.qk_norm), s.self_attention_keys() + text_len
    flash = _kernel(cfg, kernel) == "flash"
    if remat == "full":
        return c * D
    dots = c * (D + n * (3 * NH + D) + NH + D + 2 * F + D)
    if remat == "save_dots_no_batch":
        return dots
    scores = 4 * N * (n + 1) if flash else 4 * N * keys
    if remat == "save_dots":
        return dots + c * (n + 1) * NH + scores
    mask = NH  # the cross-attention's one-byte padding mask, broadcast over heads (its `jnp.where`)
    o = 0 if c < 4 and not flash else 1  # models.attention keeps a float32 output for its backward, not a bf16 one
    return (c * (4 * D * (n + 2) + n * (4 + o + 2 * q) * NH + (2 + o + q) * NH + 2 * F) + mask
            + (scores if flash else scores + 4 * N * (n + 1)))


def dit_memory_per_device(cfg, mesh, micro_batch: int, text_len: int, *, remat: str | None = None,
                          compute_dtype: str | None = None, grad_dtype: str | None = None, optimizer_moments: int = 2,
                          opt_dtype: str | None = None, params=None, rules=None, update_buffers: int = 1,
                          kernel: str | None = None):
    """Modelled peak bytes per device of a `VideoDiT` training step (a `scaling.memory.MemoryBreakdown`; its terms
    as in scaling/memory.py's module docstring), for `micro_batch` global clips with `text_len` caption tokens.

    cfg: a `models.video.DiTConfig`; params: a parameter table (`param_table_from_state`), default the real tree of
    an abstract `VideoDiT(cfg)`. Activations: blocks x local tokens x `dit_saved_bytes_per_token` + per clip the
    caption keys / values (c·L·2·NH, + c·L·NH under 'none' with QK-norm) and adaLN vectors (c·9D, factorized
    c·12D) of every block; the working set: one block's
    residuals under remat 'none' plus its backward's gate / up cotangents and float32 dP / dS, and the final
    layer's patch-wide buffers (prediction, target, their difference, float32). Gathered weights (FSDP) and the
    optimizer update as `scaling.memory.memory_per_device`. kernel: 'dense' or 'flash' (no scores; the default when
    cfg.attn_impl is 'cudnn'), as in `dit_saved_bytes_per_token` (a window's mask that cuDNN takes as a bias is not
    counted). tests/test_scaling_dit_memory.py states the tolerances.
    """
    from flax import nnx

    from models.video import VideoDiT
    from models.video.config import token_grid
    from parallel.sharding import abstract_model
    from scaling.memory import (
        MemoryBreakdown,
        check_counts,
        check_mesh,
        dtype_bytes,
        gathered_split,
        input_shards,
        param_table_from_state,
        shard_factor,
        update_bytes,
    )

    mesh = check_mesh(mesh)
    check_counts(micro_batch=(micro_batch, 1), text_len=(text_len, 1), optimizer_moments=(optimizer_moments, 0),
                  update_buffers=(update_buffers, 0))
    s, remat = dit_shape(cfg), remat or cfg.remat
    if (stages := shard_factor(("layers",), (s.n_layers,), mesh, rules)) > 1:
        # VideoDiT scans every block on every device (no GPipe): a stack split over 'stage' is gathered whole each
        # step, which this model does not count (XLA kept 2.2-3.5x the estimate on {data: 4, stage: 2} / {data: 2,
        # stage: 4}); the estimate had divided the parameters by the stages and counted nothing back
        raise ValueError(f"mesh {mesh}: the rules split VideoDiT's block stack {stages} ways ('layers' -> 'stage'), "
                         "but the DiT does not pipeline its blocks; put those devices on 'fsdp' (or 'data') instead")
    if params is None:
        params = param_table_from_state(nnx.state(abstract_model(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0)))))
    cdt = compute_dtype or cfg.dtype
    c, gb, ob = dtype_bytes(cdt), dtype_bytes(grad_dtype or cfg.param_dtype), dtype_bytes(opt_dtype or "float32")
    elems = sum(p.size / shard_factor(p.axes, p.shape, mesh, rules) for p in params)
    pbytes = sum(p.size * dtype_bytes(p.dtype) / shard_factor(p.axes, p.shape, mesh, rules) for p in params)

    clips = micro_batch / input_shards("micro_batch", "batch", micro_batch, mesh, rules)
    try:  # the rules' refusal said "a sequence length", which the DiT has no field of (as models.video's check)
        seq = shard_factor(("act_seq",), (s.tokens,), mesh, rules)
    except ValueError as e:
        raise ValueError(f"dit_memory_per_device: its {token_grid(s)} do not split over the mesh's act_seq axes "
                         f"({e}); use a latent_shape / patch whose T'·H'·W' they divide, or a mesh with fewer sequence "
                         "devices") from None
    tokens = clips * s.tokens / seq
    NH = s.n_heads * s.hd / shard_factor(("act_heads",), (s.n_heads,), mesh, rules)
    F = s.mlp_dim / shard_factor(("act_mlp",), (s.mlp_dim,), mesh, rules)
    per_clip = c * (text_len * (2 + (remat == "none") * int(s.qk_norm)) * NH + (12 if s.temporal else 9) * s.d_model)
    kernel = _kernel(cfg, kernel)
    saved = dit_saved_bytes_per_token(s, remat, text_len, compute_dtype=cdt, mesh=mesh, rules=rules, kernel=kernel)
    acts = s.n_layers * (tokens * saved + (0 if remat == "full" else clips * per_clip))
    block = dit_saved_bytes_per_token(s, "none", text_len, compute_dtype=cdt, mesh=mesh, rules=rules, kernel=kernel)
    keys = 0 if kernel == "flash" else s.self_attention_keys() + text_len  # dP and dS: a fused kernel tiles them
    n_local = s.n_heads / shard_factor(("act_heads",), (s.n_heads,), mesh, rules)
    working = tokens * (block + 2 * c * F + 2 * 4 * n_local * keys + 3 * 4 * s.patch_dim)

    transient = 0.0
    if mesh.get("fsdp", 1) > 1:  # one block's weights gathered over fsdp, two in flight
        transient = 2 * c * sum(p.size / p.shape[0] / gathered_split(p, mesh, rules)
                                for p in params if p.axes and p.axes[0] == "layers")
    update = update_bytes(elems, gb, update_buffers)
    return MemoryBreakdown(params=int(pbytes), grads=int(gb * elems), opt_state=int(optimizer_moments * ob * elems),
                           activations=int(acts), working=int(working), transient_weights=int(transient),
                           local_tokens=int(tokens), layers_local=s.n_layers, update=int(update))
