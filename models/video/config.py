"""Frozen configurations of the video models; each validates itself and does its own accounting.

Errors name the field and the fix. `param_count()` is checked against the built modules in the tests;
FLOPs count multiply-adds as 2 and training as 3× the forward pass (forward + two backward matmuls).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from models.config import TransformerConfig, _is_int, _is_real as _real, check_field_types, dtype_name

Attention = Literal["factorized", "full"]
DTYPES = ("float32", "bfloat16", "float16")


def _need(cls: str):
    def need(cond, field, msg):
        if not cond:
            raise ValueError(f"{cls}.{field}: {msg}")

    return need


def _pos_int(v) -> bool:
    return _is_int(v) and v >= 1


def _log2(n: int) -> int | None:
    return int(math.log2(n)) if n >= 1 and 2 ** int(math.log2(n)) == n else None


def token_grid(cfg, field_prefix: str = "") -> str:
    """"S tokens (grid (t, h, w) of latent_shape (T, H, W) / patch (pt, ph, pw))" for a message that refuses a token
    split: the DiT's S = T'·H'·W' comes from latent_shape and patch, not from a sequence-length field. `cfg` is read
    duck-typed (a DiTConfig or scaling's DiTShape); `field_prefix` names where the fields live (e.g. "t2v.dit.")."""
    return (f"{cfg.tokens} tokens (grid {cfg.grid} of {field_prefix}latent_shape {cfg.latent_shape} / patch "
            f"{cfg.patch})")


def text_encoder_params(cfg: TransformerConfig) -> int:
    """Parameter count of `models.video.text.TextEncoder(cfg)`: embedding, blocks (the LM's), final norm: the LM's
    count without its head (a count of its own left the q / k norms out)."""
    from scaling.flops import param_counts

    pc = param_counts(cfg)
    return pc.total - (pc.embedding - cfg.vocab_size * cfg.d_model)  # embedding: the table, and an untied head


def default_rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) channels of 3D RoPE: ~1/4 of the head dim for time, the rest split evenly over h and w."""
    t = 2 * max(1, round(head_dim / 8))
    h = 2 * ((head_dim - t) // 4)
    return t, h, head_dim - t - h


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """3D causal convolutional VAE.

    The encoder first folds 2×2 pixels into channels (space-to-depth), then runs stages of `channels`
    joined by downsamplers; the first log2(spatial_factor / 2) downsamplers halve H and W and the first
    log2(temporal_factor) halve time (the first frame kept alone), so T = 1 + temporal_factor·k frames
    become 1 + k latent frames. The decoder mirrors it.
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64, 64)
    res_blocks: int = 1  # per stage, encoder; the decoder gets one more (decoding is the harder half)
    latent_channels: int = 8
    spatial_factor: int = 4
    temporal_factor: int = 4
    kernel: tuple[int, int, int] = (3, 3, 3)  # (t, h, w) taps of the causal convolutions
    kl_weight: float = 1e-4
    norm_eps: float = 1e-6
    init_std: float | None = None  # None: fan-in scaled (LeCun, 1/sqrt(fan_in)) init of every convolution
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        need = _need("VAEConfig")
        check_field_types(self, need)
        need(_pos_int(self.in_channels), "in_channels", f"must be a positive int, got {self.in_channels!r}")
        need(_real(self.kl_weight) and self.kl_weight >= 0, "kl_weight", f"must be >= 0, got {self.kl_weight!r}")
        need(_real(self.norm_eps) and self.norm_eps >= 0, "norm_eps", f"must be >= 0, got {self.norm_eps!r}")
        need(self.init_std is None or (_real(self.init_std) and self.init_std > 0), "init_std",
             f"must be positive or None (fan-in scaled), got {self.init_std!r}")
        need(len(self.channels) >= 1 and all(c > 0 for c in self.channels), "channels",
             f"need positive stage widths, got {self.channels}")
        need(self.spatial_factor in (2, 4, 8, 16), "spatial_factor",
             f"{self.spatial_factor} unsupported; use 2, 4, 8 or 16 (the stem folds 2×2 pixels)")
        need(self.temporal_factor in (1, 2, 4, 8), "temporal_factor", f"{self.temporal_factor}: use 1, 2, 4 or 8")
        need(self.n_down >= max(self.n_space_down, self.n_time_down), "channels",
             f"{len(self.channels)} stage{'s' * (len(self.channels) != 1)} allow{'s' * (len(self.channels) == 1)} "
             f"{self.n_down} downsampler{'s' * (self.n_down != 1)}, but spatial_factor="
             f"{self.spatial_factor} and temporal_factor={self.temporal_factor} need "
             f"{max(self.n_space_down, self.n_time_down)}; add stages")
        need(self.latent_channels > 0, "latent_channels", f"must be positive, got {self.latent_channels}")
        need(self.res_blocks >= 0, "res_blocks", f"must be >= 0, got {self.res_blocks}")
        need(len(self.kernel) == 3 and all(k >= 1 and k % 2 == 1 for k in self.kernel[1:]) and self.kernel[0] >= 1,
             "kernel", f"(kt, kh, kw) with odd spatial taps ('same' padding), got {self.kernel}")
        for f in ("param_dtype", "dtype"):
            object.__setattr__(self, f, dtype_name(getattr(self, f)))
            need(isinstance(getattr(self, f), str) and getattr(self, f) in DTYPES, f,
                 f"unsupported {getattr(self, f)!r}; use one of the names {DTYPES}")

    @property
    def n_down(self) -> int:
        return len(self.channels) - 1

    @property
    def n_space_down(self) -> int:
        return _log2(self.spatial_factor) - 1

    @property
    def n_time_down(self) -> int:
        return _log2(self.temporal_factor)

    def down_kinds(self) -> list[tuple[bool, bool]]:
        """(halve time, halve space) of each downsampler; the upsamplers undo them in reverse."""
        return [(i < self.n_time_down, i < self.n_space_down) for i in range(self.n_down)]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T', H', W', C) of the latents of a [frames, height, width] clip; raises if it does not divide."""
        need = _need("VAEConfig")
        # 9.0 frames gave a float latent frame count (3.0), True one frame, and a float height failed in flops_per_clip
        need(all(_is_int(n) for n in (frames, height, width)), "latent_shape", "frames, height and width must be ints "
             f">= 1 (numpy ints too), got {frames!r}×{height!r}×{width!r}")
        need(frames >= 1 and height >= 1 and width >= 1, "latent_shape", f"a clip needs frames, height and width >= 1, "
             f"got {frames}×{height}×{width}")
        tf, below = self.temporal_factor, 1 + (frames - 1) // self.temporal_factor * self.temporal_factor
        need((frames - 1) % tf == 0, "temporal_factor",  # the nearest valid counts: what to crop or pad to
             f"clips need 1 + {tf}·k frames, got {frames}: crop or pad to {below} or {below + tf}")
        sf = self.spatial_factor  # the nearest valid sizes, as for the frames: 'not divisible by 4' left the arithmetic
        bad = [f"{name} {n} to {' or '.join(str(m) for m in (n // sf * sf, n // sf * sf + sf) if m)}"
               for name, n in (("height", height), ("width", width)) if n % sf]
        need(not bad, "spatial_factor",
             f"frame size {height}×{width} is not divisible by {sf}: crop or pad the {' and the '.join(bad)}")
        return (1 + (frames - 1) // self.temporal_factor, height // self.spatial_factor,
                width // self.spatial_factor, self.latent_channels)

    # ---- accounting -------------------------------------------------------------------------------
    def _layers(self, frames: int, height: int, width: int):
        """(T, H, W, taps, fan_in, fan_out) of every conv / linear layer of encoder and decoder, at the
        resolution it runs; taps = None marks a 1×1 linear layer (the resamplers)."""
        k = self.kernel
        T, H, W = frames, height // 2, width // 2
        c_rgb = 4 * self.in_channels  # after the 2×2 space-to-depth stem
        enc, dec = [(T, H, W, k, c_rgb, self.channels[0])], []
        for i, c in enumerate(self.channels):
            enc += [(T, H, W, k, c, c)] * (2 * self.res_blocks)
            dec += [(T, H, W, k, c, c)] * (2 * (self.res_blocks + 1))
            if i < self.n_down:
                dt, ds = self.down_kinds()[i]
                n = (2 if dt else 1) * (4 if ds else 1)
                T, H, W = ((T - 1) // 2 + 1 if dt else T), (H // 2 if ds else H), (W // 2 if ds else W)
                enc.append((T, H, W, None, n * c, self.channels[i + 1]))
                dec.append((T, H, W, None, self.channels[i + 1], n * c))
        enc.append((T, H, W, k, self.channels[-1], 2 * self.latent_channels))
        dec.append((T, H, W, k, self.latent_channels, self.channels[-1]))
        dec.append((frames, height // 2, width // 2, k, self.channels[0], c_rgb))
        return enc + dec

    def param_count(self) -> int:
        """Encoder + decoder parameters, counted from the layer list (tests check it against the module)."""
        n = sum(math.prod(k or (1,)) * fi * fo + fo for *_, k, fi, fo in self._layers(1 + self.temporal_factor, 16, 16))
        # RMSNorm scales: two per res block, one before each output conv
        enc_norms = sum(2 * self.res_blocks * c for c in self.channels) + self.channels[-1]
        dec_norms = sum(2 * (self.res_blocks + 1) * c for c in self.channels) + self.channels[0]
        return n + enc_norms + dec_norms

    def flops_per_clip(self, frames: int, height: int, width: int, training: bool = True) -> float:
        """Multiply-add FLOPs of encoder + decoder for one clip (norms and activations excluded). Spatial
        taps that fall on 'same' padding are not counted (sum over rows of the taps inside the map, p = kh // 2);
        causal temporal taps on the repeated first frame are real work and are counted."""
        # a clip `encode` refuses (8 frames, 18×18) was counted as if the halvings divided it
        self.latent_shape(frames, height, width)
        total = 0
        for T, H, W, k, fi, fo in self._layers(frames, height, width):
            if k is None:
                total += 2 * T * H * W * fi * fo
                continue
            kt, kh, kw = k
            rows, cols = _valid_taps(kh, H), _valid_taps(kw, W)
            total += 2 * T * rows * cols * kt * fi * fo
        return (3 if training else 1) * total


def _valid_taps(k: int, n: int) -> int:
    """Taps of a 'same'-padded k-tap kernel that land inside a map of n positions, summed over the n outputs."""
    p = k // 2
    return sum(min(i + p, n - 1) - max(i - p, 0) + 1 for i in range(n))


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Video diffusion Transformer over spacetime patches of VAE latents.

    attention='factorized': each block attends spatially within each frame, then temporally over
    each position; 'full': one attention over all T'·H'·W' tokens. spatial_window (odd, in patches): a token sees
    the window×window neighbourhood of its position, within its frame under 'factorized' (the spatial attention; the
    temporal attention mixes frames at one position) and in every frame it attends to under 'full' (past and future
    alike without a temporal_window); temporal_window (in patch frames, pt latent frames each): a patch frame sees
    itself and the window - 1 patch frames before it (causal between patch frames, the sliding-window LM kernel).
    With a temporal patch pt > 1 the pt latent frames of one patch share its tokens, so they see each other (the
    first latent frame's output depends on the second's): causal between latent frames
    only with pt=1. None: no window.
    """

    latent_shape: tuple[int, int, int] = (3, 8, 8)  # (T, H, W) of the latents
    latent_channels: int = 8
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    mlp_dim: int = 384  # SwiGLU hidden width
    attention: Attention = "factorized"
    spatial_window: int | None = None
    temporal_window: int | None = None
    text_dim: int = 64  # width of the text encoder's tokens (cross-attention keys and values)
    pooled_text: bool = True  # also add the pooled caption to the adaLN conditioning vector
    time_freq_dim: int = 128
    rope_theta: float = 100.0  # positions are small (a few patches), so short wavelengths help
    rope_split: tuple[int, int, int] | None = None  # head-dim channels rotated by (t, h, w); None: ~1/4, 3/8, 3/8
    qk_norm: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attn_impl: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        need = _need("DiTConfig")
        check_field_types(self, need)
        need(len(self.latent_shape) == 3 and all(_pos_int(n) for n in self.latent_shape), "latent_shape",
             f"need positive ints (T, H, W), got {self.latent_shape}" + (
                 "; VAEConfig.latent_shape(...) gives (T, H, W, Z): pass its [:3] here and Z as latent_channels"
                 if len(self.latent_shape) == 4 else ""))
        for f in ("rope_theta", "init_std"):  # rope_theta 0 gave NaN outputs, silently
            need(_real(getattr(self, f)) and getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)!r}")
        need(_real(self.norm_eps) and self.norm_eps >= 0, "norm_eps", f"must be >= 0, got {self.norm_eps!r}")
        need(len(self.patch) == 3 and all(isinstance(p, int) and p >= 1 for p in self.patch), "patch",
             f"(pt, ph, pw) of ints >= 1, got {self.patch}")
        need(all(s % p == 0 for s, p in zip(self.latent_shape, self.patch)), "patch",
             f"patch {self.patch} must divide latent_shape {self.latent_shape}")
        for f in ("latent_channels", "d_model", "n_layers", "n_heads", "mlp_dim", "text_dim", "time_freq_dim"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        need(self.head_dim is None or self.head_dim > 0, "head_dim", f"must be positive or None, got {self.head_dim}")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0, "head_dim",
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
        need(self.time_freq_dim % 2 == 0, "time_freq_dim", "must be even (sin and cos halves)")
        need(self.attention in ("factorized", "full"), "attention", f"{self.attention!r}: use 'factorized' or 'full'")
        split = self.rope_dims
        src = "" if self.head_dim else f" (d_model={self.d_model} / n_heads={self.n_heads})"
        # an axis without a rotation pair has no position: the model is equivariant to permuting it
        bare = "/".join(a for a, d, n in zip("thw", split, self.grid) if n > 1 and d < 2)
        need(self.rope_split is not None or (self.hd % 2 == 0 and not bare), "head_dim",
             f"head_dim={self.hd}{src} gives RoPE split {split}, but 3D RoPE needs an even head dim with a "
             f"channel pair for every axis of grid {self.grid}; use an even head_dim >= 6 (fewer heads or a wider "
             "d_model) or set rope_split")
        # two sizes left w unrotated (no position along it), a fourth indexed an axis the grid does not have
        need(len(split) == 3 and sum(split) == self.hd and all(d >= 0 and d % 2 == 0 for d in split), "rope_split",
             f"{split} must be three even numbers summing to head_dim={self.hd}")
        need(not bare, "rope_split", f"{split} leaves axis {bare} (grid {self.grid}) without a rotation pair; "
             "give every axis longer than 1 at least 2 channels")
        need(self.spatial_window is None or (self.spatial_window >= 1 and self.spatial_window % 2 == 1),
             "spatial_window", f"must be odd (a centred neighbourhood) or None, got {self.spatial_window}")
        need(self.temporal_window is None or self.temporal_window >= 1, "temporal_window",
             f"must be >= 1 or None, got {self.temporal_window}")
        need(self.attn_impl in ("xla", "cudnn", "reference"), "attn_impl", "use 'xla', 'cudnn' or 'reference'")
        need(self.remat in ("none", "full", "save_dots", "save_dots_no_batch"), "remat",
             f"unknown {self.remat!r}; use none, full, save_dots or save_dots_no_batch")
        for f in ("param_dtype", "dtype"):
            object.__setattr__(self, f, dtype_name(getattr(self, f)))
            need(isinstance(getattr(self, f), str) and getattr(self, f) in DTYPES, f,
                 f"unsupported {getattr(self, f)!r}; use one of the names {DTYPES}")
        # as TransformerConfig.attn_impl: cuDNN's kernel otherwise failed at trace time on the GPU, naming no field
        need(self.attn_impl != "cudnn" or self.dtype in ("bfloat16", "float16"), "attn_impl",
             f"'cudnn' (cuDNN's fused attention) takes bfloat16 or float16, not dtype={self.dtype!r}; use "
             "dtype='bfloat16' or attn_impl='xla'")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        return tuple(self.rope_split) if self.rope_split is not None else default_rope_split(self.hd)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (t, h, w)."""
        return tuple(s // p for s, p in zip(self.latent_shape, self.patch))

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch) * self.latent_channels

    @property
    def factorized(self) -> bool:
        return self.attention == "factorized"

    # ---- accounting: delegated to scaling.dit, the one implementation of the counts -----------------
    def param_count(self) -> int:
        """The whole DiT: patch / time / pooled-text embeddings, the blocks and the final adaLN + projection."""
        from scaling.dit import dit_param_count

        return dit_param_count(self)

    def flops_per_clip(self, text_len: int, training: bool = True) -> float:
        """Matmul + attention FLOPs of the DiT on one clip (training = 3 x forward). Attention windows are masks
        over dense scores (and the temporal sliding-window kernel's single block spans all T' frames), so they
        cost the same."""
        from scaling.dit import dit_forward_flops

        # a negative or fractional count was subtracted from (or added to) the cross-attention FLOPs, silently
        _need("DiTConfig")(_is_int(text_len) and text_len >= 0, "flops_per_clip",
                           f"text_len must be an int >= 0 (caption tokens per clip), got {text_len!r}")
        return (3 if training else 1) * dit_forward_flops(self, text_len)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Dual encoder for the cross-modal alignment loss: a small video Transformer over latent patches
    (mean-pooled) and a projection of the pooled caption, both into `embed_dim`; symmetric InfoNCE with
    a learnable temperature (initialised to `init_temperature`, floored at 1 / max_logit_scale). The video tower
    takes only the DiT's latent geometry (latent_shape, latent_channels, patch, text_dim); its attention is its own:
    float32, RoPE θ = 100 over its head dim's default split, RMSNorm eps 1e-6, whatever the DiT's rope_theta,
    rope_split, norm_eps or dtype."""

    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    mlp_dim: int = 128
    embed_dim: int = 64
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        need = _need("AlignConfig")
        check_field_types(self, need)
        for f in ("d_model", "n_layers", "n_heads", "mlp_dim", "embed_dim"):
            need(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}")
        need(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        hd = self.d_model // self.n_heads
        need(hd % 2 == 0 and min(default_rope_split(hd)) >= 2, "n_heads",
             f"head dim d_model={self.d_model} / n_heads={self.n_heads} = {hd} must be even and >= 6 (3D RoPE "
             "rotates channel pairs over t, h and w); use fewer heads or a wider d_model")
        # checked first: a cap <= 0 was reported as a bad init_temperature, naming a field that was fine
        need(self.max_logit_scale > 0, "max_logit_scale",
             f"must be positive (100 is usual), got {self.max_logit_scale}")
        # the bound as stated, T >= 1/cap: 1 / T <= cap refused T = 1 / cap itself for caps where rounding lifts
        # 1 / (1 / cap) above cap (1.9, 7.3); a T at 1/cap starts its scale at most an ulp past the cap (capped_exp)
        need(0 < self.init_temperature and self.init_temperature >= 1 / self.max_logit_scale, "init_temperature",
             f"must be >= 1/max_logit_scale = {1 / self.max_logit_scale:g}, got {self.init_temperature}")

    def param_count(self, dit: DiTConfig) -> int:
        """The aligner's parameters: its patch embedding (`dit`'s patches), encoder blocks and both projections."""
        d, hd = self.d_model, self.d_model // self.n_heads
        layer = 4 * d * d + 2 * hd + 3 * d * self.mlp_dim + 2 * d
        proj = d * self.embed_dim + dit.text_dim * self.embed_dim + 1  # video, text projections; temperature
        return dit.patch_dim * d + d + self.n_layers * layer + d + proj


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """kind='flow': rectified flow, x_t = (1 - t)·x0 + t·ε, the model predicts the velocity ε - x0; t is
    logit-normal(logit_mean, logit_std) then shifted, t ← shift·t / (1 + (shift - 1)·t) (shift > 1 spends
    more training and sampling steps at high noise). kind='ddpm': cosine ᾱ(t), x_t = √ᾱ·x0 + √(1-ᾱ)·ε,
    t ~ U(1e-3, 1), prediction 'eps' (ε) or 'v' (√ᾱ·ε - √(1-ᾱ)·x0). Samplers: Euler (flow), DDIM (ddpm)."""

    kind: Literal["flow", "ddpm"] = "flow"
    prediction: Literal["velocity", "eps", "v"] | None = None  # None: 'velocity' for flow, 'eps' for ddpm
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    cosine_s: float = 0.008
    alpha_bar_min: float = 1e-4
    sample_steps: int = 30

    def __post_init__(self):
        need = _need("DiffusionConfig")
        check_field_types(self, need)
        need(self.kind in ("flow", "ddpm"), "kind", f"{self.kind!r}: use 'flow' or 'ddpm'")
        if self.prediction is None:  # kind="ddpm" alone was refused: the default belonged to flow
            object.__setattr__(self, "prediction", "velocity" if self.kind == "flow" else "eps")
        ok = ("velocity",) if self.kind == "flow" else ("eps", "v")
        need(self.prediction in ok, "prediction", f"{self.prediction!r} does not go with kind={self.kind!r}; use {ok}")
        fin = lambda x: _real(x) and math.isfinite(x)  # noqa: E731
        need(fin(self.logit_mean), "logit_mean", f"must be a finite number, got {self.logit_mean}")
        need(fin(self.logit_std) and self.logit_std > 0, "logit_std",
             f"must be positive and finite, got {self.logit_std}")
        # past ~1e6 shifted times overflow float32 (an inf shift made every time NaN, a NaN run)
        need(fin(self.shift) and 0 < self.shift <= 1e6, "shift",
             f"must be in (0, 1e6] (1-10 is usual), got {self.shift}")
        need(self.kind == "flow" or (self.shift, self.logit_mean, self.logit_std) == (1.0, 0.0, 1.0), "shift",
             "shift / logit_mean / logit_std shape the flow's time distribution; kind='ddpm' trains on uniform t "
             "and samples a uniform DDIM grid, so leave them at their defaults (1, 0, 1)")
        # and the reverse: the flow never reads the cosine schedule, so a tuned one was dropped unannounced
        for f in ("cosine_s", "alpha_bar_min"):
            need(self.kind == "ddpm" or getattr(self, f) == getattr(DiffusionConfig, f), f,
                 f"{getattr(self, f)} shapes the cosine schedule of kind='ddpm'; kind='flow' ignores it: set "
                 f"kind='ddpm' or leave {f} at its default ({getattr(DiffusionConfig, f)})")
        need(0 < self.alpha_bar_min < 1, "alpha_bar_min", "must be in (0, 1)")
        need(fin(self.cosine_s) and self.cosine_s >= 0, "cosine_s",
             f"must be >= 0 and finite (a negative offset bends the cosine schedule away from "
             f"noise), got {self.cosine_s}")
        need(self.sample_steps >= 1, "sample_steps", f"must be >= 1, got {self.sample_steps}")


@dataclasses.dataclass(frozen=True)
class TextToVideoConfig:
    """Text encoder (bidirectional `models.Block`s) + DiT + optional alignment dual encoder."""

    dit: DiTConfig = DiTConfig()
    text: TransformerConfig = TransformerConfig(vocab_size=16, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                                                max_seq_len=8, scan_layers=True)
    align: AlignConfig | None = AlignConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    caption_dropout: float = 0.1  # captions replaced by the null caption, for classifier-free guidance
    align_weight: float = 0.1

    def __post_init__(self):
        need = _need("TextToVideoConfig")
        check_field_types(self, need)
        # a dict (from JSON) failed with an AttributeError naming no field, or (align, diffusion) only in training
        for f, cls, mod in (("dit", DiTConfig, "models.video"), ("text", TransformerConfig, "models"),
                            ("align", AlignConfig, "models.video"), ("diffusion", DiffusionConfig, "models.video")):
            v = getattr(self, f)
            need(isinstance(v, cls) or (f == "align" and v is None), f,
                 f"must be a {mod}.{cls.__name__}{' or None' if f == 'align' else ''}, got {type(v).__name__} "
                 f"(build {cls.__name__}(**fields) from a dict)")
        need(self.dit.text_dim == self.text.d_model, "dit",
             f"dit.text_dim={self.dit.text_dim} must equal text.d_model={self.text.d_model}")
        need(0 <= self.caption_dropout < 1, "caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        need(self.align_weight >= 0, "align_weight", "must be >= 0")
        # the text encoder is bidirectional and dense: settings of the LM it would otherwise ignore
        need(self.text.moe is None, "text.moe", "the text encoder has dense MLPs only; set text.moe=None")
        need(not any(self.text.local_layers()), "text.attn_pattern",
             f"{self.text.attn_pattern!r}: the text encoder attends over the whole caption; use 'global'")

    def param_count(self) -> int:
        text = text_encoder_params(self.text)
        align = self.align.param_count(self.dit) if self.align else 0
        return self.dit.param_count() + text + align
