"""Diffusion objectives and samplers, independent of the network.

A model is any `pred_fn(x_B..., t_B) -> prediction_B...`; `guided` turns a conditional model into a
classifier-free-guided one. Time runs from t = 0 (data) to t = 1 (noise) for both objectives.

- Rectified flow: x_t = (1 - t)·x0 + t·ε, target velocity v = ε - x0; training t is logit-normal, then
  shifted t ← s·t / (1 + (s - 1)·t); Euler sampling from t = 1 to 0 on the same shifted grid.
- DDPM (cosine ᾱ): x_t = √ᾱ·x0 + √(1-ᾱ)·ε, target ε ('eps') or v = √ᾱ·ε - √(1-ᾱ)·x0 ('v'); t ~ U(1e-3, 1);
  deterministic DDIM sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import _is_int
from models.video.config import DiffusionConfig

PredFn = Callable[[jax.Array, jax.Array], jax.Array]


def shift_time(t, shift: float):
    """t ← s·t / (1 + (s - 1)·t): monotone on [0, 1], fixes 0 and 1, moves mass towards noise when s > 1.

    Computed with the denominator as s·t + (1 - t), a sum of two terms >= 0: 1 + float32(s - 1)·t cancelled at
    t = 1 for a small s (the grid started at 1.0000129 for s = 1e-3, at inf below s ~ 3e-8: NaN samples)."""
    return shift * t / (shift * t + (1.0 - t))


def sample_time(key, batch: int, cfg: DiffusionConfig):
    """Training times [B] in (0, 1), float32 (flow: [0, 1], as float32's sigmoid reaches 1.0 past a logit of ~17, at
    extreme logit_mean / logit_std / shift; harmless, x_t is then the noise). Drawn as float32 explicitly:
    jax.random's default dtype is float64 under jax_enable_x64, whose other random bits gave other times from the same
    key (and float64 noisy latents and loss)."""
    if cfg.kind == "flow":
        u = cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (batch,), jnp.float32)
        return shift_time(jax.nn.sigmoid(u), cfg.shift)
    return jax.random.uniform(key, (batch,), jnp.float32, minval=1e-3, maxval=1.0)


def alpha_bar(t, cfg: DiffusionConfig):
    """Cosine schedule ᾱ(t) (Nichol & Dhariwal), ᾱ(0) = 1, clipped below at alpha_bar_min."""
    f = lambda s: jnp.cos((s + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2  # noqa: E731
    return jnp.clip(f(t) / f(0.0), cfg.alpha_bar_min, 1.0)


def _bcast(t_B, x):
    return t_B.reshape(t_B.shape + (1,) * (x.ndim - 1))


def noisy(x0, eps, t_B, cfg: DiffusionConfig):
    """(x_t, target) for clean x0 [B, ...], noise ε of x0's shape and times t_B [B] (or one time, 0-d)."""
    # a t_B of [B, 1] was reshaped to [B, 1, 1, ...] and broadcast x_t to [B, B, ...] while the target stayed
    # [B, ...]; an ε of another shape broadcast x_t and the target apart: both silently
    t_B = jnp.asarray(t_B)  # a Python float (one time) or a list of times: no .reshape of their own
    if jnp.shape(eps) != jnp.shape(x0) or jnp.shape(t_B) not in ((), jnp.shape(x0)[:1]):
        raise ValueError(f"noisy: eps must have x0's shape {list(jnp.shape(x0))} and t_B be [B] = "
                         f"{list(jnp.shape(x0)[:1])} (one time per example) or 0-d, got eps "
                         f"{list(jnp.shape(eps))} and t_B {list(jnp.shape(t_B))}")
    t = _bcast(t_B, x0)
    if cfg.kind == "flow":
        return (1 - t) * x0 + t * eps, eps - x0
    ab = alpha_bar(t, cfg)
    a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    return a * x0 + b * eps, (eps if cfg.prediction == "eps" else a * eps - b * x0)


def diffusion_loss(pred_fn: PredFn, x0, key, cfg: DiffusionConfig):
    """Mean squared error of the prediction at random times. Returns (loss, per-example loss [B], t [B])."""
    if jnp.shape(x0)[:1] == (0,):  # failed at the per-example reshape as a bare 'integer modulo by zero'
        raise ValueError("diffusion_loss: an empty batch (B = 0) has no examples; pass at least one")
    k_t, k_e = jax.random.split(key)
    t_B = sample_time(k_t, x0.shape[0], cfg)
    eps = jax.random.normal(k_e, x0.shape, jnp.float32)
    x_t, target = noisy(x0.astype(jnp.float32), eps, t_B, cfg)
    err = (_prediction(pred_fn, x_t, t_B, "diffusion_loss").astype(jnp.float32) - target) ** 2
    per_ex = err.reshape(err.shape[0], -1).mean(1)
    return per_ex.mean(), per_ex, t_B


def _prediction(pred_fn: PredFn, x, t_B, where: str):
    """pred_fn(x, t_B), after checking (static shapes) that it has x's shape: a [B, 1, ...] or [B, C] prediction
    broadcast against the target or the sampler's x, a loss and samples of other numbers, silently."""
    p = pred_fn(x, t_B)
    if jnp.shape(p) != jnp.shape(x):
        raise ValueError(f"{where}: pred_fn(x, t) must return x's shape {list(jnp.shape(x))} (one prediction per "
                         f"element), got {list(jnp.shape(p))}")
    return p


def guided(model_fn: Callable, cond, uncond, scale: float) -> PredFn:
    """Classifier-free guidance: pred = uncond + scale·(cond - uncond), both halves in one batched call.

    model_fn(x_B, t_B, c) -> prediction; cond/uncond: pytrees with leading batch B. scale == 1 is the
    plain conditional model (one call, when `scale` is a Python number); scale == 0 the unconditional one.
    A traced `scale` always runs both halves, so one compiled sampler serves every scale.
    """
    if jnp.ndim(scale) != 0:  # a [B] of per-example scales broadcast against the last (channel) axis, silently
        raise ValueError(f"guided: scale must be one number (0-d), got shape {list(jnp.shape(scale))}; run one "
                         "sampler per guidance scale")
    if isinstance(scale, int | float) and scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)

    def pred(x, t):
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        c, u = jnp.split(out, 2)
        return u + scale * (c - u)

    return pred


def flow_times(steps: int, shift: float):
    """[steps + 1] float32 times from 1 to 0 on the shifted grid (float32 under jax_enable_x64 too: a float64 grid
    promoted the sampler's float32 carry, a scan carry-type TypeError; so did a float64 shift there, np.float64 or a
    float64 array, which promoted the float32 grid: the shift is float32 too, as it always was with x64 off)."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), jnp.asarray(shift, jnp.float32))


def euler_sample(pred_fn: PredFn, noise, steps: int, shift: float = 1.0):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) with Euler steps."""
    _check_steps(steps, none_ok=False)  # 0 steps returned the noise unchanged
    # as DiffusionConfig.shift: 0, a negative, NaN or inf shift made the grid's first time NaN, and every sample NaN
    if not isinstance(shift, jax.core.Tracer) and not _shift_ok(shift):
        raise ValueError(f"euler_sample: shift={shift!r} must be a number in (0, 1e6] (1: the plain grid; "
                         "DiffusionConfig.shift)")
    ts = flow_times(steps, shift)

    def step(x, i):
        t, t_next = ts[i], ts[i + 1]
        v = _prediction(pred_fn, x, jnp.full((x.shape[0],), t, jnp.float32), "euler_sample")
        return x + (t_next - t) * v.astype(x.dtype), None

    return _integrate(step, noise, steps)


def _integrate(step, noise, steps: int):
    """`steps` sampler steps from `noise`, in float32 at least, returned in the noise's dtype: bf16 noise was a bf16
    carry that the float32 time grid promoted, a bare scan carry-type TypeError (and bf16 steps round at each step).
    Integer or bool noise (a probe of the noise-to-sample map) returns the float carry: cast back, the samples were
    truncated to integers, silently."""
    dtype = jnp.result_type(noise)  # a float64 numpy array: float32, as jax reads it with x64 off
    x = jnp.asarray(noise, jnp.promote_types(dtype, jnp.float32))
    out = jax.lax.scan(step, x, jnp.arange(steps))[0]
    return out.astype(dtype) if jnp.issubdtype(dtype, jnp.floating) else out


def _shift_ok(shift) -> bool:
    """A concrete shift in (0, 1e6], DiffusionConfig.shift's range (0-d arrays too)."""
    try:
        return not isinstance(shift, str) and np.ndim(shift) == 0 and 0 < float(shift) <= 1e6  # float('3') is 3.0
    except (TypeError, ValueError):  # None
        return False


def _check_sampler_args(cfg, steps) -> None:
    """sample(pred, noise, cfg, steps) and ddim_sample(pred, noise, steps, cfg) take them in opposite orders."""
    if not isinstance(cfg, DiffusionConfig):
        raise TypeError(f"cfg must be a DiffusionConfig, got {type(cfg).__name__} (sample takes (pred_fn, noise, cfg, "
                        "steps), ddim_sample (pred_fn, noise, steps, cfg))")
    _check_steps(steps)


def _check_steps(steps, none_ok: bool = True) -> None:
    """A step count: an int >= 1, numpy ints too (np.int64 from np.arange was refused as not an int)."""
    if not ((none_ok and steps is None) or (_is_int(steps) and steps >= 1)):
        raise ValueError(f"steps must be an int >= 1{' (or None: cfg.sample_steps)' if none_ok else ''}, "
                         f"got {steps!r}")


def ddim_sample(pred_fn: PredFn, noise, steps: int | None, cfg: DiffusionConfig):
    """Deterministic DDIM (η = 0) from t = 1 to 0 on a uniform grid, for ε- or v-prediction (steps None:
    cfg.sample_steps, as the check's message offers; it was a bare TypeError in the grid)."""
    _check_sampler_args(cfg, steps)
    if cfg.kind != "ddpm":  # a flow's velocity was taken for v on the cosine schedule: wrong samples, silently
        raise ValueError(f"ddim_sample needs a DiffusionConfig(kind='ddpm'), got kind={cfg.kind!r}; sample a flow "
                         "model with sample(pred_fn, noise, cfg) or euler_sample")
    steps = cfg.sample_steps if steps is None else steps
    ts = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)  # float32 under x64 too, as flow_times

    def step(x, i):
        t, t_next = ts[i], ts[i + 1]
        ab, ab_next = alpha_bar(t, cfg), jnp.where(t_next > 0, alpha_bar(t_next, cfg), 1.0)
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        p = _prediction(pred_fn, x, jnp.full((x.shape[0],), t, jnp.float32), "ddim_sample").astype(x.dtype)
        if cfg.prediction == "eps":
            eps, x0 = p, (x - b * p) / a
        else:  # v = a·ε - b·x0 and x = a·x0 + b·ε, with a² + b² = 1
            x0, eps = a * x - b * p, b * x + a * p
        return jnp.sqrt(ab_next) * x0 + jnp.sqrt(1 - ab_next) * eps, None

    return _integrate(step, noise, steps)


def sample(pred_fn: PredFn, noise, cfg: DiffusionConfig, steps: int | None = None):
    """The objective's own sampler: Euler for flow, DDIM for DDPM (steps None: cfg.sample_steps)."""
    _check_sampler_args(cfg, steps)
    steps = cfg.sample_steps if steps is None else steps
    if cfg.kind == "flow":
        return euler_sample(pred_fn, noise, steps, cfg.shift)
    return ddim_sample(pred_fn, noise, steps, cfg)
