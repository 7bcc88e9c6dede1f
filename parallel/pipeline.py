"""Pipeline parallelism (GPipe) over the `stage` mesh axis with `jax.shard_map` + `ppermute`.

The layer stack [L, ...] is split over S stages (rule `layers -> stage`): stage s holds layers
s·L/S .. (s+1)·L/S. The batch is cut into M microbatches; at clock tick t stage s runs microbatch
t - s, then hands its activations to stage s + 1. M + S - 1 ticks; the bubble fraction is
(S - 1) / (M + S - 1). Only `stage` is manual: other mesh axes (data, fsdp, tensor) stay under
GSPMD inside each stage, so pipeline composes with FSDP and tensor parallelism. Gradients come
from autodiff through scan and ppermute (the backward pass runs the pipeline in reverse), each stage's layers
under a custom VJP that drops the idle ticks' gradients (a select, so a layer NaN on the filler cannot leak).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from parallel.autodiff import custom_vjp


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """Idle fraction of a GPipe schedule: (S - 1) / (M + S - 1). Both are counts (ints >= 1, numpy's too)."""
    # (1, 0) divided by zero, (4, 0) said 1.0; 2.5 microbatches said 0.545 and True stages 0.0, where gpipe refuses
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in (n_stages, n_microbatches)):
        raise ValueError(f"bubble_fraction: n_stages={n_stages!r} and n_microbatches={n_microbatches!r} must be >= 1, "
                         "and ints (counts of stages and of microbatches)")
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


def pipeline_problem(n_layers: int, period: int, n_stages: int, rows: int, n_microbatches: int, batch_shards: int,
                     n_moe_layers: int = 0, scan_layers: bool = True) -> str | None:
    """Why models.Transformer cannot pipeline this step over `n_stages` (None: it can): an unscanned layer stack, MoE
    layers, stages that cut a pattern period of `period` layers, or `rows` that do not split into `n_microbatches`
    microbatches whose rows divide `batch_shards` (the batch mesh axes). The model raises it; scaling.memory and
    experiments.aot refuse to estimate or compile it."""
    if not scan_layers:  # the layers would only be sharded over 'stage': every device running every layer
        return ("TransformerConfig.scan_layers=False under pipeline parallelism: the pipeline runs the scanned layer "
                "stack; set scan_layers=True or use a mesh without a 'stage' axis")
    if n_moe_layers:
        return ("MoE layers under pipeline parallelism are not supported (their auxiliary losses do not cross stages "
                "yet); use a mesh without a 'stage' axis")
    if (n_layers // period) % n_stages:
        return (f"n_layers={n_layers} (pattern period {period}) does not split into {n_stages} pipeline stages; use a "
                f"multiple of {period * n_stages} layers")
    M = n_microbatches
    if rows % M or (rows // M) % batch_shards:  # else XLA fails on the microbatch without naming the setting
        return (f"pipeline_microbatches={M}: a batch of {rows} rows must split into {M} microbatches whose rows "
                f"divide the batch mesh axes ({batch_shards}); use a divisor of {rows // batch_shards} as the "
                "microbatch count")
    return None


def gpipe(layer_fn: Callable, params, x_BTD, ctx=None, *, n_microbatches: int, axis: str = "stage"):
    """Apply `layer_fn(layer_params, x_bTD, ctx_b) -> x_bTD` for each of the L stacked layers in
    `params` (leading axis L), pipelined over mesh axis `axis` of the current mesh.

    x_BTD: [B, T, D] (B divisible by n_microbatches). ctx: a pytree of per-example arrays with a
    leading B axis (positions, masks) that travel with their microbatch; None if unused.
    Must be called under `jax.set_mesh(mesh)` (e.g. inside a jitted step). Its idle ticks' gradients are cut off
    by a custom VJP: forward mode (jax.jvp) runs under `parallel.autodiff.plain_autodiff()`, which cuts them with a
    select instead (also the way to Hessian-vector products of a layer that is NaN on the filler: reverse over
    reverse through the custom VJP multiplies the filler's saved values by 0).
    """
    # numbers.Integral: a count computed with numpy (np.int64) is an int here, as make_mesh's axis sizes are
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, numbers.Integral) or n_microbatches < 1:
        raise ValueError(f"gpipe: n_microbatches={n_microbatches!r} must be an int >= 1")
    n_microbatches = int(n_microbatches)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError("gpipe runs under a mesh: call it inside `with jax.set_mesh(mesh):` (e.g. in a jitted step)")
    if axis not in mesh.axis_names:
        raise ValueError(f"gpipe: the mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))} has no {axis!r} axis to "
                         f"pipeline over; add one (make_mesh({{'{axis}': S, ...}})) or pass axis=")
    S = dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]
    if not jax.tree.leaves(params):
        raise ValueError("gpipe: params holds no arrays; pass the stacked layer parameters (leading axis L)")
    # np.shape, not .shape: a Python number leaf (a scale; the numbers of a nested list) failed as an AttributeError
    # ("'float' object has no attribute 'shape'"), a 0-d first leaf as an IndexError, not as the errors below
    L = next((np.shape(a)[0] for a in jax.tree.leaves(params) if np.shape(a)), None)  # the first non-scalar's
    if bad := {jax.tree_util.keystr(k): np.shape(a) for k, a in jax.tree_util.tree_leaves_with_path(params)
               if not np.shape(a) or np.shape(a)[0] != L}:
        raise ValueError(f"gpipe: params are stacked layers with one leading dim L (the first leaf has {L}); these "
                         f"differ: {dict(list(bad.items())[:3])}")
    B, M = x_BTD.shape[0], n_microbatches
    if bad := [np.shape(a) for a in jax.tree.leaves(ctx) if not np.shape(a) or np.shape(a)[0] != B]:
        raise ValueError(f"gpipe: ctx arrays travel with their rows, so each needs the batch's leading dim {B}; "
                         f"got shapes {bad[:3]}")
    if L % S:
        raise ValueError(f"n_layers={L} must be divisible by the '{axis}' mesh axis ({S} stages)")
    if B % M:
        raise ValueError(f"batch {B} must be divisible by n_microbatches={M}")
    others = {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes) if a != axis and n > 1}
    # which are bfloat16: "compute in float32" alone misled bf16 parameters already computing in float32
    low = [what for what, tree in (("parameters (TransformerConfig.param_dtype)", params),
                                   ("activations (TransformerConfig.dtype)", x_BTD))
           if any(getattr(a, "dtype", None) == jnp.bfloat16 for a in jax.tree.leaves(tree))]
    if others and jax.default_backend() == "cpu" and low:
        # XLA:CPU aborts the process ("Invalid binary instruction opcode copy") on a bfloat16 all-reduce in a
        # shard_map manual over some axes only; float16 / float32, or 'stage' alone, compile fine
        raise ValueError(f"bfloat16 pipeline parallelism with other mesh axes {others} is not supported on "
                         f"XLA:CPU (it aborts the process): bfloat16 {' and '.join(low)}; use float32 on CPU, or "
                         "pipeline over 'stage' alone. GPUs and TPUs are not affected")

    def micro(a):  # [B, ...] -> [M, B/M, ...], microbatch m = rows m::M
        # strided, not contiguous: the batch is sharded over data axes in contiguous blocks, so rows m::M take
        # an equal share from every data shard, while a contiguous block would sit on a few devices only
        return a.reshape((B // M, M) + a.shape[1:]).swapaxes(0, 1)

    x_MbTD, ctx_M = micro(x_BTD), jax.tree.map(micro, ctx)

    def stage_fn(local_params, x_MbTD, ctx_M):
        s = jax.lax.axis_index(axis)

        def layers(params, x, c):
            return jax.lax.scan(lambda h, p: (layer_fn(p, h, c), None), x, params)[0]

        # idle ticks' gradients cut off by a select, not a product by 0: before tick s stage s > 0 holds no
        # activation of its depth, only filler (the batch itself), where a layer finite on real activations (sqrt,
        # log) can be NaN, and the idle tick's Jacobian times its zero cotangent (0 x NaN) made the gradients NaN.
        # (A jnp.where on the inputs would do it too, but the scan then saved the selected parameters per tick.)
        # Under plain_autodiff it is that select (forward mode and HVPs; plain layers ran NaN gradients there).
        def plain_guarded(params, x, c, idle):
            def keep(a):
                return jnp.where(idle, jax.lax.stop_gradient(a), a) if jnp.issubdtype(a.dtype, jnp.inexact) else a
            return layers(*jax.tree.map(keep, (params, x, c)))

        @functools.partial(custom_vjp, plain=plain_guarded)
        def guarded(params, x, c, idle):
            return layers(params, x, c)

        def guarded_fwd(params, x, c, idle):
            y, back = jax.vjp(layers, params, x, c)
            return y, (back, idle)

        def guarded_bwd(res, dy):
            back, idle = res
            cut = lambda g: g if g.dtype == jax.dtypes.float0 else jnp.where(idle, jnp.zeros_like(g), g)  # noqa: E731
            return (*jax.tree.map(cut, back(dy)), None)

        guarded.defvjp(guarded_fwd, guarded_bwd)

        # Inputs enter and outputs leave as scan xs / ys, not as carried [M, ...] buffers: reverse-mode
        # autodiff saves every carry per tick, which made a step cost O(M) per tick (O(M^2) in all).
        def tick(buf, xs):
            t, x_in = xs
            j = jnp.clip(t - s, 0, M - 1)  # the microbatch this stage works on at tick t
            y = guarded(local_params, jnp.where(s == 0, x_in, buf), jax.tree.map(lambda a: a[j], ctx_M),
                        (t < s) | (t - s >= M))
            return jax.lax.ppermute(y, axis, [(i, i + 1) for i in range(S - 1)]), y

        ticks = jnp.arange(M + S - 1)
        # Bubble ticks compute on real rows (the last microbatch fed again, the first as the initial carry), not
        # zeros: their outputs are dropped and `guarded` cuts their gradients, but reverse-over-reverse products
        # still multiply the forward rule's saved values by 0, and a layer that is NaN at 0 (RMSNorm with eps 0)
        # would turn those NaN.
        x_in = jnp.concatenate([x_MbTD, jnp.broadcast_to(x_MbTD[-1:], (S - 1,) + x_MbTD.shape[1:])])
        # the carry differs per stage ("varying" over the manual axis) from the first tick on
        init = jax.lax.pcast(x_MbTD[0], (axis,), to="varying")
        _, ys = jax.lax.scan(tick, init, (ticks, x_in))
        # the last stage finishes microbatch m at tick m + S - 1; share its outputs with every stage
        return jax.lax.psum(jnp.where(s == S - 1, ys[S - 1:], 0.0), axis)

    layer_spec = jax.tree.map(lambda _: P(axis), params)
    # size-1 axes manual too: they split nothing, but left to GSPMD XLA:CPU aborted the process on the bfloat16
    # all-reduce of {stage: 2, tensor: 1} as it does for the refused axes above (no rule names a size-1 axis)
    manual = frozenset({axis} | {a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n == 1})
    out = jax.shard_map(stage_fn, mesh=mesh, in_specs=(layer_spec, P(), P()), out_specs=P(),
                        axis_names=manual)(params, x_MbTD, ctx_M)
    return out.swapaxes(0, 1).reshape(x_BTD.shape)  # back to row order
