"""bf16 / f16 residuals kept as raw bits across a layer scan on the CPU backend.

A `lax.scan` over layers stacks what each layer's backward needs into [L, ...] arrays, one layer's slice per
iteration (a dynamic-update-slice per residual). XLA:CPU has no bf16 kernel for that update: it converts the
*whole* stack to float32, writes the slice and converts the stack back, in every iteration, so the cost grows as L²
and the float32 copies take memory. (f16 stacks are not converted with jax 0.10.2: 0 whole-stack converts in the
compiled gradient of a 3-layer model, against 36 for bf16; they are packed too, as a bitcast costs nothing.)
Kept as uint16 bits, the update is a plain integer copy: the scanned bf16 reference train step ran 0.87x / 0.80x /
0.72x the time at 4 / 8 / 16 layers (temp memory 1025 → 657 MiB at 16;
`python -m benchmarks.scan_residuals`, docs/benchmarks.md). The same holds for any loop that slices or updates bf16
arrays (`to_bits` / `from_bits`: the MoE's tile loops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.autodiff import custom_vjp

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def packs(dtype) -> bool:
    """Whether arrays of `dtype` are better kept as uint16 bits across loop iterations here: bf16 / f16 on CPU."""
    return jnp.dtype(dtype) in _LOW and jax.default_backend() == "cpu"


def to_bits(x):
    """bf16 / f16 → the same bits as uint16 (anything else unchanged)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype in _LOW else x


def from_bits(b, dtype):
    """Inverse of `to_bits` for an array that was of `dtype`."""
    return jax.lax.bitcast_convert_type(b, dtype) if jnp.dtype(dtype) in _LOW else b


def bits_residuals(fn, compute_dtype):
    """fn with the same values and gradients, whose backward keeps its bf16 / f16 residuals as uint16 bits (the
    module docstring): for the body of a layer scan. `fn` itself unless `compute_dtype` is bf16 / f16 on the CPU
    backend. Values it differentiates must come in as arguments: JAX refuses to differentiate a custom VJP with
    respect to closed-over values (CustomVJPException); closed-over constants (positions, masks) are fine.
    Its backward is not differentiable again through the packed residuals (integer bits have no tangent): a gradient
    of a gradient (reverse-over-reverse HVP) through it silently drops their terms; under `plain_autodiff` it is fn."""
    if not packs(compute_dtype):
        return fn
    # (the VJP's treedef, the residuals' dtypes) of each traced forward, found by the backward through a zero-size
    # [0, i] residual (shapes are static everywhere, free to keep): keyed by the packed residuals' shapes and dtypes,
    # two calls whose residuals packed alike took the later one's (bf16 and f16 are both uint16 bits)
    layouts = []

    @custom_vjp
    def packed(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp = jax.vjp(fn, *args)
        res, tree = jax.tree.flatten(vjp)
        layouts.append((tree, [r.dtype for r in res]))
        return out, ([to_bits(r) for r in res], jnp.zeros((0, len(layouts) - 1), jnp.uint8))

    def bwd(saved, ct):
        bits, tag = saved
        tree, dtypes = layouts[tag.shape[-1]]
        res = [from_bits(b, dt) for b, dt in zip(bits, dtypes)]
        return jax.tree.unflatten(tree, res)(ct)

    packed.defvjp(fwd, bwd)
    return packed
