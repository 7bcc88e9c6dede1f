"""Rotary position embeddings (half-split convention, as in HF Llama), with llama3 / linear / yarn scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.config import RopeScaling, _is_real


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, computed in float64 then rounded to float32.

    transformers computes them in float32, so entries differ from its by float32 ulps (theta 1e4-1e7): with head
    dims that are powers of two (16-256) a quarter to half of them, by 1 ulp (up to 4 with llama3 scaling, whose
    ramp it also computes in float32; 2 with YaRN, 27 with YaRN's untruncated ramp); with head dims 80 and 96, whose
    i / head_dim float32 cannot hold exactly, up to 4/5 of them by up to 6 ulps (14 with llama3).
    A few ulps are the size of float32's own rounding of the angle position·freq (YaRN's untruncated 27 are more),
    small, but it shows at long positions: logits agree with transformers to ~2e-6 at short positions and drift
    with the position and the weights' scale (a tiny
    Llama with weights of std 0.2, |logits| ~ 10, theta 5e5 + llama3 scaling: 1.9e-2 at 30K, 7e-2 at 100K). Both
    are float32-angle errors of the same size: against angles in float64, ours and transformers' logits are off
    by 3.4e-2 / 3.6e-2 at ~100K and 0.17 / 0.17 at ~450K (means over 30 windows; twenty-third-session audit)."""
    # an odd one gave ceil(head_dim / 2) entries (a bare broadcast error with YaRN), 0 or less none at all
    if not (_is_real(head_dim) and float(head_dim).is_integer() and head_dim >= 2 and head_dim % 2 == 0):
        raise ValueError(f"inv_frequencies: head_dim must be a positive even integer (RoPE rotates pairs (i, i + "
                         f"head_dim / 2)), got {head_dim!r}; use an even head dim")
    head_dim = int(head_dim)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.kind == "yarn":
        return _yarn(inv, head_dim, theta, scaling).astype(np.float32)
    # Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between.
    old = scaling.original_max_position_embeddings
    low_wl, high_wl = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BT, inv_freq_F):
    """(cos, sin), each [B, T, 1, F] float32. NumPy positions give NumPy tables, i.e. constants of the
    compiled program: XLA fuses cos/sin computed in the graph into every rotation and evaluates them
    per head element (at B·T = 2048, 4 heads of 64: ~2.4 ms of a 33 ms CPU layer)."""
    if np.ndim(positions_BT) != 2:  # [T] failed in the [:, :, None, :] below with a bare IndexError
        raise ValueError(f"positions_BT must be [batch, length] (or [1, length] for every row), got shape "
                         f"{tuple(np.shape(positions_BT))}; one sequence's positions are positions[None]")
    xp = np if isinstance(positions_BT, np.ndarray) else jnp
    # inv_freq as [1, 1, F]: a rank promotion is an error under jax_numpy_rank_promotion='raise'
    ang_BTF = positions_BT[..., None].astype(np.float32) * xp.asarray(inv_freq_F, np.float32)[None, None]
    return xp.cos(ang_BTF)[:, :, None, :], xp.sin(ang_BTF)[:, :, None, :]


def rotate(x_BTNH, cos_BT1F, sin_BT1F):
    """Rotate pairs (i, i + H/2) by the tables' angles; computed in float32, returned in x's dtype."""
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x_BTNH.dtype)


def apply_rope(x_BTNH, positions_BT, inv_freq_F):
    """Rotate pairs (i, i + H/2) by angle position·freq; computed in float32, returned in x's dtype.

    x_BTNH [B, T, N, H]; positions_BT [B, T] or [1, T] (shared by every row); inv_freq_F [H // 2]."""
    pos_shape = tuple(np.shape(positions_BT))
    if len(pos_shape) != 2 or pos_shape[0] not in (1, x_BTNH.shape[0]) or pos_shape[1] != x_BTNH.shape[1]:
        raise ValueError(f"positions_BT must be [batch, length] = {tuple(x_BTNH.shape[:2])} or [1, length] like "
                         f"x_BTNH {tuple(x_BTNH.shape)}, got shape {pos_shape}"
                         + ("; one sequence's positions are positions[None]" if len(pos_shape) == 1 else ""))
    H, F = x_BTNH.shape[-1], np.shape(inv_freq_F)[-1]
    if H != 2 * F:  # an odd H failed as "array split does not result in an equal division", a mismatch in a broadcast
        raise ValueError(f"x_BTNH's head dim {H} must be 2 x len(inv_freq_F) = {2 * F}: RoPE rotates pairs of an even "
                         "head dim; pass inv_frequencies(head_dim, theta) for the head dim of x")
    return rotate(x_BTNH, *rope_tables(positions_BT, inv_freq_F))


def _yarn(inv, dim: int, theta: float, s: RopeScaling):
    """YaRN's frequencies: interpolated (inv / factor) from the dimension whose wavelength makes beta_slow rotations
    over the original context on (slower ones), kept up to the one making beta_fast (faster ones), a linear ramp
    between."""
    def dim_of(rotations):  # the dimension whose wavelength fits `rotations` times in the original context
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high + 0.001 if low == high else high) - low),
                   0, 1)
    return inv / s.factor * ramp + inv * (1 - ramp)


def attention_scale(scaling: RopeScaling | None) -> float:
    """What YaRN multiplies cos and sin by (so every attention score by its square); 1 for other scalings."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def m(scale, k=1.0):
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return m(scaling.factor, scaling.mscale) / m(scaling.factor, scaling.mscale_all_dim)
    return m(scaling.factor)
