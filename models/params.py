"""Parameter creation shared by every module: a normal / zeros / ones draw annotated with logical axes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

FLAT_DRAW_BACKENDS = ("cpu",)  # benchmarks/init_compile.py compares against () (every draw in its shape)


def _normal(std: float):
    def init(key, shape, dtype=jnp.float32):
        # the same bits drawn flat (threefry numbers the elements by their flat index in both of JAX's modes), but
        # XLA:CPU compiles a draw of rank r several times slower (a 5-D conv kernel 1.7 s, flat 0.2 s: 14 s for a
        # small VAE's init). Elsewhere a draw keeps its shape, so that a sharded init draws each device's block only.
        if len(shape) > 1 and jax.default_backend() in FLAT_DRAW_BACKENDS:
            return (jax.random.normal(key, (math.prod(shape),), dtype) * jnp.array(std, dtype)).reshape(shape)
        return nnx.initializers.normal(std)(key, shape, dtype)

    return init


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = None) -> nnx.Param:
    """A parameter of `shape` with logical axis names `axes`: normal(0, std²) draws, zeros (std=0) or ones
    (std=None). Each call takes one key from `rngs.params` whatever it draws, so the keys of later parameters do
    not depend on which earlier ones are constant."""
    init = nnx.initializers.ones if std is None else nnx.initializers.zeros if std == 0 else _normal(std)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))
