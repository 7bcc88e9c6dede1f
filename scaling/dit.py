"""Parameter count and FLOPs of the video diffusion Transformer (`models.video.VideoDiT`).

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
Windows (spatial_window / temporal_window) are masks over dense scores in models.video, so they do
not change the executed FLOPs counted here.

FLOPs are 2 per multiply-add for *one clip* (one latent video); per-clip conditioning work (adaLN,
timestep MLP, caption K/V projections) is counted once per clip. Training = 3 x forward; sampling =
steps x forward (x2 with classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
import math


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
        if len(self.patch) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch):
            raise ValueError(f"DiTShape.patch must be (pt, ph, pw) of ints >= 1, got {self.patch}")
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
    """FLOPs of one denoiser forward pass on `batch` clips with `text_len` caption tokens."""
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
    return steps * (2 if cfg_guidance else 1) * dit_forward_flops(cfg, text_len, batch)
