"""3D causal convolutional video VAE (KL-regularised), in Flax NNX.

Causal in time only: every convolution pads its temporal taps on the front (repeating the first frame)
and spatial taps symmetrically; norms are per position (RMSNorm over channels, never over time); a
temporal downsampler folds frame pairs (1, 2), (3, 4), ... and keeps frame 0 alone (paired with itself).
Hence latent frame j depends only on frames <= temporal_factor·j, and T = 1 + 4k frames give 1 + k
latent frames; the first frame is encoded on its own, like an image.
There is no streaming API: a prefix encodes as in the whole clip (encode(x[:, :1 + 4k]) == encode(x)[:, :1 + k]),
but a chunk cut later starts with a frame read as an image, so its latents match the whole clip's only after one
temporal receptive field of lead frames (44 for VAEConfig(channels=(8, 16, 16)), measured): overlap chunks by that
much and drop the overlap's latents. Cut at frame 4m (a multiple of temporal_factor): the chunk's latent i is then
the clip's m + i; cut elsewhere, its frames fold in other groups than the clip's and no latent matches.

Shapes: B batch, T frames, H/W height/width, C channels (3 for RGB in [-1, 1]), Z latent channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import dtype_of
from models.linear import add_bias
from models.params import param
from models.transformer import rms_norm
from models.video.config import VAEConfig
from parallel.halo import halo_axis, halo_map, whole
from parallel.rules import constrain

BATCH = ("batch", None, None, None, None)
# Rows over `sequence` (`act_height`) where it divides them: each sequence device runs its band of every frame, the
# convolutions exchanging halo rows (`Conv`). Height, not time: T = 1 + tf·k is odd at every level, and the causal
# front padding and time_fold's lone frame 0 make the first frames special, whereas a height is H / 2^k at every
# level, zero-padded alike at both ends.
ROWS = ("batch", None, "act_height", None, None)


def _row_axis(x_BTHWC):
    """The mesh axis x's rows are split over (parallel.halo.halo_axis), or None: whole rows."""
    return halo_axis("act_height", x_BTHWC.shape[2], x_BTHWC.dtype)[0]


def _constrain(x_BTHWC):
    """Batch over the batch axes; rows split only where the convolutions split them: a convolution is never left
    to XLA with split rows (docs/parallelism.md)."""
    return constrain(x_BTHWC, BATCH if _row_axis(x_BTHWC) is None else ROWS)


def causal_conv3d(x_BTHWC, w_thwIO, b_O=None, *, pad: int | None = None):
    """3D convolution, causal in time ('same' in space). w: [kt, kh, kw, I, O].

    The kt temporal taps are stacked into channels and one 2D convolution runs over all B·T frames:
    the same arithmetic as a 3D convolution, but XLA:CPU runs it 3-8× faster than its conv3d.
    pad: zero rows padded at the top and bottom (None: kh // 2, 'same'); the output has H + 2·pad - kh + 1 rows
    (`parallel.halo.halo_map`'s bands arrive with their neighbours' rows: pad=0).
    """
    # named here: a kernel of other input channels, or an even kw, failed in a reshape naming neither (an even kh
    # under 'same' rows returned H + 1 rows silently)
    if x_BTHWC.ndim != 5 or w_thwIO.ndim != 5:
        raise ValueError(f"causal_conv3d: x must be [B, T, H, W, C], got {list(x_BTHWC.shape)}, and w "
                         f"[kt, kh, kw, I, O], got {list(w_thwIO.shape)}")
    B, T, H, W, C = x_BTHWC.shape
    kt, kh, kw, n_in, n_out = w_thwIO.shape
    if n_in != C:
        raise ValueError(f"causal_conv3d: w's input channels ({n_in}) must equal x's C ({C}): w {list(w_thwIO.shape)}, "
                         f"x {list(x_BTHWC.shape)}")
    if kw % 2 == 0 or (pad is None and kh % 2 == 0):
        raise ValueError(f"causal_conv3d: 'same' in space needs odd kh and kw (pad=None; kh any with an explicit "
                         f"pad), got (kh, kw)=({kh}, {kw})")
    pad = kh // 2 if pad is None else pad
    if kt > 1:
        front = jnp.repeat(x_BTHWC[:, :1], kt - 1, axis=1)
        xp = jnp.concatenate([front, x_BTHWC], axis=1)
        x_BTHWC = jnp.concatenate([xp[:, i:i + T] for i in range(kt)], axis=-1)  # tap i = frame t - (kt-1) + i
    w = w_thwIO.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * C, n_out)
    y = jax.lax.conv_general_dilated(x_BTHWC.reshape(B * T, H, W, kt * C), w.astype(x_BTHWC.dtype), (1, 1),
                                     [(pad, pad), (kw // 2, kw // 2)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(B, T, y.shape[1], W, n_out)
    # the bias in float32 (models.linear.add_bias): under bf16 compute its gradient, a sum over every B·T·H·W position,
    # was summed in bf16 (the decoder output bias 8% off its exact sum; tests/test_video_models.py)
    return y if b_O is None else add_bias(y, b_O)


def space_to_depth(x_BTHWC):
    """[B, T, H, W, C] → [B, T, H/2, W/2, 4C]."""
    B, T, H, W, C = x_BTHWC.shape
    x = x_BTHWC.reshape(B, T, H // 2, 2, W // 2, 2, C).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, H // 2, W // 2, 4 * C)


def depth_to_space(x_BTHWC):
    """[B, T, H, W, 4C] → [B, T, 2H, 2W, C]."""
    B, T, H, W, C4 = x_BTHWC.shape
    x = x_BTHWC.reshape(B, T, H, W, 2, 2, C4 // 4).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, T, 2 * H, 2 * W, C4 // 4)


def time_fold(x_BTHWC):
    """[B, 1 + 2m, H, W, C] → [B, 1 + m, H, W, 2C]: pairs (0, 0), (1, 2), (3, 4), ... (causal)."""
    B, T, H, W, C = x_BTHWC.shape
    if T % 2 != 1:
        raise ValueError(f"temporal downsampling needs an odd number of frames (1 + 2m), got {T}")
    x = jnp.concatenate([x_BTHWC[:, :1], x_BTHWC], axis=1).reshape(B, (T + 1) // 2, 2, H, W, C)
    return x.transpose(0, 1, 3, 4, 2, 5).reshape(B, (T + 1) // 2, H, W, 2 * C)


def time_unfold(x_BTHWC):
    """[B, 1 + m, H, W, 2C] → [B, 1 + 2m, H, W, C]: inverse of `time_fold` (drops frame 0's twin)."""
    B, T, H, W, C2 = x_BTHWC.shape
    x = x_BTHWC.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C2 // 2)
    return x[:, 1:]


class Conv(nnx.Module):
    """Causal 3D convolution with bias. `in_axis`/`out_axis`: logical names of the channel dims (None for
    RGB-sized dims that no mesh axis divides). Where `act_height`'s mesh axis divides H, each device convolves
    its band of rows in a shard_map over that axis alone (`parallel.halo.halo_map`): left to XLA, a split height
    gave wrong gradients where fsdp also split the kernel's input channels (docs/parallelism.md)."""

    def __init__(self, cin, cout, kernel, *, rngs, dtype, std=None, in_axis="conv_in", out_axis="conv_out"):
        fan_in = cin * math.prod(kernel)
        std = 1.0 / math.sqrt(fan_in) if std is None else std
        axes = ("conv_kernel",) * 3 + (in_axis, out_axis)
        self.w = param(rngs, (*kernel, cin, cout), axes, dtype, std)
        self.b = param(rngs, (cout,), (out_axis,), dtype, 0.0)

    def __call__(self, x):
        # the kernel's input channels whole (ZeRO-3 gathers the weight for compute anyway): with kt = 1 they reached
        # the convolution split over fsdp (kt > 1 merges them with the taps, which gathers them), and XLA's partitioner
        # computed wrong gradients on {data: 2, fsdp: 2, tensor: 2} (kernel (1, 5, 3): off by the largest one)
        w = whole(self.w[...], "conv_in", 3)
        axis = _row_axis(x)
        if axis is None:  # whole rows, also where x comes from a split of twice its height
            return causal_conv3d(whole(x, "act_height", 2), w, self.b[...])
        return halo_map(causal_conv3d, x, w, self.b[...], axis=axis, dim=2, halo=self.w.shape[1] // 2)


class ResBlock(nnx.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), norms per position so that time stays causal."""

    def __init__(self, c, cfg: VAEConfig, *, rngs):
        pd = dtype_of(cfg.param_dtype)
        self.norm1 = param(rngs, (c,), ("norm",), pd)
        self.conv1 = Conv(c, c, cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std)
        self.norm2 = param(rngs, (c,), ("norm",), pd)
        self.conv2 = Conv(c, c, cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std)
        self.eps = cfg.norm_eps

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(rms_norm(x, self.norm1[...], self.eps)))
        h = self.conv2(jax.nn.silu(rms_norm(h, self.norm2[...], self.eps)))
        return _constrain(x + h)


class Resample(nnx.Module):
    """Down: fold 2 frames (causally) and/or 2×2 pixels into channels, then a linear map cin·k → cout.
    Up: the mirror image, a linear map cin → cout·k, then unfold."""

    def __init__(self, cin, cout, time: bool, space: bool, up: bool, *, rngs, dtype, std=None):
        self.time, self.space, self.up = time, space, up
        k = (2 if time else 1) * (4 if space else 1)
        fi, fo = (cin, cout * k) if up else (cin * k, cout)
        self.w = param(rngs, (fi, fo), ("conv_in", "conv_out"), dtype, 1.0 / math.sqrt(fi) if std is None else std)
        self.b = param(rngs, (fo,), ("conv_out",), dtype, 0.0)

    def __call__(self, x):
        if not self.up:
            x = time_fold(x) if self.time else x
            x = space_to_depth(x) if self.space else x
        w, b = self.w[...].astype(x.dtype), self.b[...]  # the bias added in float32, as causal_conv3d's
        if _row_axis(x) is None:
            lead = x.shape[:-1]  # a 2-D matmul: its weight gradient is a plain dot on XLA:CPU
            # the output width spelled out: reshape(*lead, -1) of an empty batch divided by zero (ZeroDivisionError)
            x = add_bias(x.reshape(-1, x.shape[-1]) @ w, b).reshape(*lead, self.w.shape[1])
        else:  # rows split over devices are no per-device block of B·T·H·W flat rows: XLA gathered H (4x its FLOPs)
            x = add_bias(x @ w, b)
        if self.up:
            x = depth_to_space(x) if self.space else x
            x = time_unfold(x) if self.time else x
        return x


class Encoder(nnx.Module):
    """Video [B, T, H, W, C] in [-1, 1] → the posterior's (mean, logvar), each [B, T', H', W', Z] float32
    (`VAEConfig.latent_shape`; logvar clipped to [-20, 10]). Causal in time (see the module docstring)."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        pd, ch = dtype_of(cfg.param_dtype), cfg.channels
        self.cfg = cfg
        self.conv_in = Conv(4 * cfg.in_channels, ch[0], cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std, in_axis=None)
        self.res = nnx.List([nnx.List([ResBlock(c, cfg, rngs=rngs) for _ in range(cfg.res_blocks)]) for c in ch])
        self.down = nnx.List([Resample(ch[i], ch[i + 1], t, s, False, rngs=rngs, dtype=pd, std=cfg.init_std)
                              for i, (t, s) in enumerate(cfg.down_kinds())])
        self.norm_out = param(rngs, (ch[-1],), ("norm",), pd)
        self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std,
                             out_axis=None)

    def __call__(self, x_BTHWC):
        x = self.conv_in(space_to_depth(x_BTHWC))
        for i, blocks in enumerate(self.res):
            for blk in blocks:
                x = blk(x)
            if i < len(self.down):
                x = _constrain(self.down[i](x))
        x = self.conv_out(jax.nn.silu(rms_norm(x, self.norm_out[...], self.cfg.norm_eps)))
        mean, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -20.0, 10.0)


class Decoder(nnx.Module):
    """Latents [B, 1 + k, H', W', Z] → video [B, 1 + tf·k, H, W, C] float32 (tf = cfg.temporal_factor), the
    Encoder's inverse in shape; causal in time."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        pd, ch = dtype_of(cfg.param_dtype), cfg.channels
        self.cfg = cfg
        self.conv_in = Conv(cfg.latent_channels, ch[-1], cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std,
                            in_axis=None)
        self.res = nnx.List([nnx.List([ResBlock(c, cfg, rngs=rngs) for _ in range(cfg.res_blocks + 1)])
                             for c in ch])
        self.up = nnx.List([Resample(ch[i + 1], ch[i], t, s, True, rngs=rngs, dtype=pd, std=cfg.init_std)
                            for i, (t, s) in enumerate(cfg.down_kinds())])
        self.norm_out = param(rngs, (ch[0],), ("norm",), pd)
        self.conv_out = Conv(ch[0], 4 * cfg.in_channels, cfg.kernel, rngs=rngs, dtype=pd, std=cfg.init_std,
                             out_axis=None)

    def __call__(self, z_BTHWZ):
        x = self.conv_in(z_BTHWZ)
        for i in reversed(range(len(self.res))):
            for blk in self.res[i]:
                x = blk(x)
            if i > 0:
                x = _constrain(self.up[i - 1](x))
        x = self.conv_out(jax.nn.silu(rms_norm(x, self.norm_out[...], self.cfg.norm_eps)))
        return depth_to_space(x).astype(jnp.float32)


class VideoVAE(nnx.Module):
    """`mean, logvar = vae.encode(x_BTHWC)`, `x_BTHWC = vae.decode(z_BTHWZ)`; video in [-1, 1] (decode's output is
    not clipped to it: clip before display or measurement, as `experiments.video_eval.to_uint8` does)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with nnx.use_eager_sharding(False):
            self.encoder = Encoder(cfg, rngs=rngs)
            self.decoder = Decoder(cfg, rngs=rngs)

    def encode(self, x_BTHWC):
        """[B, 1 + tf·k, H, W, C] → posterior (mean, logvar), each [B, 1 + k, H/sf, W/sf, Z] float32."""
        if x_BTHWC.ndim != 5 or x_BTHWC.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"VideoVAE.encode: video must be [B, T, H, W, C] with C = VAEConfig.in_channels="
                             f"{self.cfg.in_channels} (channels last), got {list(x_BTHWC.shape)}")
        if not jnp.issubdtype(x_BTHWC.dtype, jnp.floating):
            raise ValueError(f"VideoVAE.encode: video must be floats in [-1, 1], got {x_BTHWC.dtype}; convert 8-bit "
                             "frames with x / 127.5 - 1")
        self.cfg.latent_shape(*x_BTHWC.shape[1:4])  # raises a ValueError naming the factor that does not divide
        return self.encoder(_constrain(x_BTHWC.astype(dtype_of(self.cfg.dtype))))

    def decode(self, z_BTHWZ):
        """[B, 1 + k, h, w, Z] → [B, 1 + tf·k, sf·h, sf·w, C] float32."""
        if z_BTHWZ.ndim != 5 or z_BTHWZ.shape[-1] != self.cfg.latent_channels:
            raise ValueError(f"VideoVAE.decode: latents must be [B, T, h, w, Z] with Z = VAEConfig.latent_channels="
                             f"{self.cfg.latent_channels}, got {list(z_BTHWZ.shape)}")
        return self.decoder(_constrain(z_BTHWZ.astype(dtype_of(self.cfg.dtype))))


def _exp_minus_1_minus(x):
    """exp(x) - 1 - x, elementwise, to float32 precision also near x = 0, where it is ~x²/2: exp(x) - 1 - x
    cancelled (x = 1e-3: exp(x)'s ulp of 1.2e-7 against 5e-7, a KL off by a few %) and expm1(x) - x still did."""
    small = jnp.abs(x) < 0.1
    t = jnp.where(small, x, 0.0)  # the series' branch sees no large x (and so no inf in its gradient)
    series = t * t * (1 / 2 + t * (1 / 6 + t * (1 / 24 + t * (1 / 120 + t / 720))))  # next term < 4e-9 relative
    return jnp.where(small, series, jnp.expm1(x) - x)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element (float32): 0.5·(mean² + exp(logvar) - 1 - logvar).
    mean, logvar: [...] of any float dtype (the Encoder's are float32); bf16 / f16 run in float32, float64 as is."""
    # in bf16 the elements came out up to 4% off and the series below was rounded away
    dtype = jnp.promote_types(jnp.result_type(mean, logvar), jnp.float32)  # float64 stays float64
    mean, logvar = jnp.asarray(mean, dtype), jnp.asarray(logvar, dtype)
    return 0.5 * (mean ** 2 + _exp_minus_1_minus(logvar))


def vae_loss(vae: VideoVAE, x_BTHWC, key):
    """Reconstruction MSE of a posterior sample + kl_weight·mean KL. Returns (loss, metrics)."""
    if jnp.shape(x_BTHWC)[:1] == (0,):  # means over no clips: a NaN loss, mse, kl and psnr, silently
        raise ValueError("vae_loss: an empty batch (B = 0) has no clips; pass at least one clip")
    mean, logvar = vae.encode(x_BTHWC)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.decode(z)
    # in the decoder's float32: a float64 video under jax_enable_x64 made the loss and its metrics float64
    mse = jnp.mean((recon - x_BTHWC.astype(recon.dtype)) ** 2)
    kl = jnp.mean(kl_divergence(mean, logvar))
    return mse + vae.cfg.kl_weight * kl, {"mse": mse, "kl": kl, "psnr": psnr(mse)}


def psnr(mse):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2): 10·log10(4 / mse), mse a mean squared error of any shape.
    mse is floored at 1e-12, so identical videos read 10·log10(4e12) ≈ 126.02 dB, not inf."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def latent_stats(z_NTHWZ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of latents, to normalise them to zero mean and unit variance for the DiT."""
    z = np.asarray(z_NTHWZ, np.float64)  # the array's shape: a nested list has none (a bare AttributeError)
    z = z.reshape(-1, z.shape[-1])
    # no latents, or a NaN / inf one (a diverged VAE), gave NaN stats silently (the 1e-6 floor keeps a NaN std): they
    # went to latent_stats.json and made every normalised latent, and so the DiT's whole training, NaN
    if not z.size or not np.isfinite(z).all():
        bad = "no latents" if not z.size else f"{int((~np.isfinite(z)).sum())} non-finite values"
        raise ValueError(f"latent_stats: z_NTHWZ {list(np.shape(z_NTHWZ))} has {bad}; encode at least one clip with a "
                         "VAE whose posterior means are finite (check its training loss)")
    return z.mean(0).astype(np.float32), np.maximum(z.std(0), 1e-6).astype(np.float32)


def normalize(z, stats):
    """Latents [..., Z] to zero mean and unit variance per channel with `latent_stats` (mean [Z], std [Z])."""
    mean, std = stats
    return (z - jnp.asarray(mean)) / jnp.asarray(std)


def denormalize(z, stats):
    """The inverse of `normalize`: DiT-space latents [..., Z] back to the VAE's."""
    mean, std = stats
    return z * jnp.asarray(std) + jnp.asarray(mean)
