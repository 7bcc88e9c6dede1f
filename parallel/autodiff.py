"""The switch between the hand-written backward passes (`jax.custom_vjp`, the default) and plain JAX autodiff.

Every custom VJP in models/ and parallel/ is declared with `custom_vjp` below, which is `jax.custom_vjp` unless
`plain_autodiff()` is on when the function is traced: then the undecorated primal runs (or a `plain` form where the
primal is not differentiable both ways), and JAX differentiates it in either mode. The switch lives here, not in
models/, so that parallel/ (halo_map) reads the same one without importing models/.
"""

from __future__ import annotations

import contextlib
import functools

import jax

_PLAIN = jax.make_user_context(default_value=False)  # part of jit's cache key: a switch flip retraces


@contextlib.contextmanager
def plain_autodiff():
    """Trace the models with plain JAX autodiff instead of their custom VJPs, for forward mode: `jax.jvp`,
    `jax.jacfwd`, `jax.hessian`, `jax.linearize`, Hessian-vector products (jvp of grad), NTK / Gauss-Newton products.
    Without it those raise JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function".

        with models.plain_autodiff():
            loss, slope = jax.jvp(lambda p: lm_loss(graphdef, p, batch), (params,), (direction,))

    Values and gradients are the default path's up to float32 rounding (tests/test_custom_vjps.py and the video
    tests): float32 Transformers (GQA with bias and soft-caps, sliding-window + global, MoE capacity and dropless)
    give the same loss bit for bit (the video losses within 1 ulp) and gradients within 7e-7 of each leaf's largest;
    jvp equals <default gradient, v> within 8e-7 relative, and a finite difference within 1.4e-4 (float32 noise); a
    jvp-of-grad HVP equals reverse-over-reverse through the custom VJPs within 6.1e-7 of each leaf's largest.
    Not in bf16 / f16 on the CPU backend with scanned layers: there reverse-over-reverse (grad of <grad, v>) through
    the custom VJPs is silently wrong (a 2-layer bf16 model's HVP 60-90% off per leaf), since `models.residuals` keeps
    the scan's residuals as integer bits, which carry no derivative; take HVPs under this switch there.
    Exceptions: past its cap `models.video.align.capped_exp` has min()'s gradient, 0 (the custom one lets a positive
    cotangent through: no function has that gradient); a bf16 model's embedding gradient is summed in bf16, and its
    products' gradients are autodiff's (`models.embed`, `models.linear`).
    It costs what the custom VJPs save: memory (the residuals a scanned layer stack keeps per layer) and time. The
    dropless 'gmm' experts run each expert on every row (E× their FLOPs): their tile loops, of data-dependent length,
    are while loops, which reverse mode refuses (so reverse-over-reverse through them fails by default, works here).
    JAX's own fused kernels keep their custom VJPs, which forward mode refuses: under the switch swa_impl 'auto' takes
    the blocked kernel (not cuDNN / splash on GPU / TPU), and attn_impl / swa_impl 'cudnn' and swa_impl 'splash' are
    ValueErrors naming the field, at trace time (use 'xla' / 'blocked').

    Read when a function is traced, and part of `jax.jit`'s cache key: a function jitted and traced outside is traced
    again inside (its default program stays cached for calls outside). A program already lowered or compiled
    (`.lower`, `.compile`) keeps what it was traced with. Programs traced outside it are unchanged by this switch's
    existence (the same StableHLO text).
    """
    with _PLAIN(True):
        yield


def plain() -> bool:
    """Whether `plain_autodiff` is on (read at trace time)."""
    return bool(_PLAIN.value)


class custom_vjp:  # noqa: N801  (a drop-in for jax.custom_vjp)
    """`jax.custom_vjp(fun, nondiff_argnums)` that calls `plain` (default: `fun` itself) under `plain_autodiff()`.
    `plain` must compute fun's values with ops JAX differentiates in both modes."""

    def __init__(self, fun, nondiff_argnums: tuple[int, ...] = (), plain=None):
        self.fun, self.plain = fun, fun if plain is None else plain
        self._custom = jax.custom_vjp(fun, nondiff_argnums=nondiff_argnums)
        functools.update_wrapper(self, fun)

    def defvjp(self, fwd, bwd):
        self._custom.defvjp(fwd, bwd)

    def __call__(self, *args, **kwargs):
        return (self.plain if plain() else self._custom)(*args, **kwargs)
