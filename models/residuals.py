"""bf16 / f16 residuals kept as raw bits across a layer scan on the CPU backend.

A `lax.scan` over layers stacks what each layer's backward needs into [L, ...] arrays, one layer's slice per
iteration (a dynamic-update-slice per residual). XLA:CPU has no bf16 / f16 kernel for that update: it converts the
*whole* stack to float32, writes the slice and converts the stack back, in every iteration, so the cost grows as L²
and the float32 copies take memory. Kept as uint16 bits, the update is a plain integer copy: the scanned bf16
reference train step ran 0.85x / 0.79x / 0.70x the time at 4 / 8 / 16 layers (temp memory 1025 → 657 MiB at 16;
`python -m benchmarks.scan_residuals`, docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def bits_residuals(fn, compute_dtype):
    """fn with the same values and gradients, whose backward keeps its bf16 / f16 residuals as uint16 bits (the
    module docstring): for the body of a layer scan. `fn` itself unless `compute_dtype` is bf16 / f16 on the CPU
    backend. Values it differentiates must come in as arguments: JAX refuses to differentiate a custom VJP with
    respect to closed-over values (CustomVJPException); closed-over constants (positions, masks) are fine."""
    if jnp.dtype(compute_dtype) not in _LOW or jax.default_backend() != "cpu":
        return fn
    layouts = {}  # the packed residuals' avals → (the VJP's treedef, the residuals' dtypes), recorded by fwd

    @jax.custom_vjp
    def packed(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp = jax.vjp(fn, *args)
        res, tree = jax.tree.flatten(vjp)
        bits = [jax.lax.bitcast_convert_type(r, jnp.uint16) if r.dtype in _LOW else r for r in res]
        layouts[_avals(bits)] = (tree, [r.dtype for r in res])
        return out, bits

    def bwd(bits, ct):
        tree, dtypes = layouts[_avals(bits)]
        res = [jax.lax.bitcast_convert_type(b, dt) if dt in _LOW else b for b, dt in zip(bits, dtypes)]
        return jax.tree.unflatten(tree, res)(ct)

    packed.defvjp(fwd, bwd)
    return packed


def _avals(arrays):
    return tuple((a.shape, a.dtype) for a in arrays)
