"""Parameter creation shared by every module: a normal / zeros / ones draw annotated with logical axes."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

FLAT_DRAW_BACKENDS = ("cpu",)  # benchmarks/init_compile.py compares against () (every draw in its shape)


def _normal(std: float):
    def init(key, shape, dtype=jnp.float32):
        # narrower floats drawn in float32 and rounded once: jax.random.normal in bfloat16 has 128 values, none past
        # 2.9 sigma, and param_dtype='bfloat16' gave another model than the float32 one rounded (same seed)
        want, dtype = dtype, jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype
        # the same bits drawn flat (threefry numbers the elements by their flat index in both of JAX's modes), but
        # XLA:CPU compiles a draw of rank r several times slower (a 5-D conv kernel 1.7 s, flat 0.2 s: 14 s for a
        # small VAE's init). Elsewhere a draw keeps its shape, so that a sharded init draws each device's block only.
        if len(shape) > 1 and jax.default_backend() in FLAT_DRAW_BACKENDS:
            x = (jax.random.normal(key, (math.prod(shape),), dtype) * jnp.array(std, dtype)).reshape(shape)
        else:
            x = nnx.initializers.normal(std)(key, shape, dtype)
        return x.astype(want)

    return init


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = None, fill: float | None = None) -> nnx.Param:
    """A parameter of `shape` with logical axis names `axes`: normal(0, std²) draws, zeros (std=0) or ones
    (std=None); `fill` (std left None): that constant instead. Each call takes one key from `rngs.params` whatever
    it draws, so the keys of later parameters do not depend on which earlier ones are constant. `axes` are logical
    names, placed later by parallel's rules: eager sharding is off here, so a module of your own that calls it
    builds without `nnx.use_eager_sharding(False)` (flax read the names as mesh axes: "An auto mesh context or
    metadata is required")."""
    if fill is not None and std is not None:
        raise ValueError(f"param: std={std} and fill={fill}; give one (a normal draw or a constant)")
    init = (nnx.initializers.constant(fill) if fill is not None else nnx.initializers.ones if std is None
            else nnx.initializers.zeros if std == 0 else _normal(std))
    with nnx.use_eager_sharding(False):
        p = nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))
    _check_not_built_under_a_mesh(p[...])
    return p


def _check_not_built_under_a_mesh(value) -> None:
    """Warn when a module is built eagerly inside `jax.set_mesh` (flax's own idiom for sharded init). Our modules
    turn flax's eager sharding off (logical names are not mesh axes), so every parameter came out replicated on
    every device of the mesh, silently: on {fsdp 8} each device held the whole model, 8x create_sharded's share.
    create_sharded's jitted init builds under the mesh too, but traced: no warning there."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or isinstance(value, jax.core.Tracer):
        return
    warnings.warn(f"a model built inside jax.set_mesh({dict(zip(mesh.axis_names, mesh.axis_sizes))}) has every "
                  "parameter replicated on every device (the logical-axis rules are not applied at a plain build): "
                  "build it with `graphdef, state = parallel.create_sharded(lambda: Model(cfg, rngs=...), mesh)`, "
                  "or place a built one with parallel.shard_state(nnx.state(model), mesh)",
                  stacklevel=1)  # (here: one warning per process, not one per parameter-creating line)
