"""Stencils (convolutions) over a dimension split across a mesh axis, by halo exchange in a `jax.shard_map`.

Each device holds a band of n / S rows of one dimension of x; a stencil of radius r needs r rows past each edge of
its band, which `halo_map` fetches from the neighbouring devices with `ppermute` (several hops when a band is thinner
than r) and fills with zeros past the ends of the whole dimension, exactly as a 'same' zero-padded convolution pads
it. Only that axis is manual: the other mesh axes (data, fsdp, tensor) stay with the partitioner inside, as in
`parallel.pipeline.gpipe`, which then never sees a convolution split spatially (XLA's partitioner miscomputes one
whose input is split along a spatial dimension while its kernel is split along input channels).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel.autodiff import custom_vjp
from parallel.rules import mesh_axis_for


def halo_axis(name: str, size: int, dtype=None) -> tuple[str | None, int]:
    """(mesh axis, S) to split a dimension of `size` named by logical `name` over, in the current mesh; (None, 1)
    when its rule maps to no axis here or S does not divide `size` (the caller then runs unsplit, as
    `REPLICATE_IF_INDIVISIBLE` names replicate such a dimension), and for bfloat16 (`dtype`) on XLA:CPU where other
    mesh axes split too: a bfloat16 all-reduce inside a shard_map manual over some axes only aborts the process
    there ("Invalid binary instruction opcode copy", as in `parallel.pipeline.gpipe`)."""
    axis, n = mesh_axis_for(name)
    if axis is None or n == 1 or size % n:
        return None, 1
    mesh = jax.sharding.get_abstract_mesh()
    others = [a for a, k in zip(mesh.axis_names, mesh.axis_sizes) if a != axis and k > 1]
    if others and dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return None, 1
    return axis, n


def whole(x, name: str, dim: int):
    """x with dimension `dim` whole on every device where logical `name` maps to a mesh axis here (its other dims
    left to the partitioner); x itself elsewhere. For a stencil that runs unsplit (`halo_axis` said no) on an input
    that may arrive split: XLA carried a 3-row split of 12 rows, folded to 6, into such a convolution and computed
    its weight gradient wrong."""
    if mesh_axis_for(name)[1] == 1:
        return x
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[dim] = None
    return jax.lax.with_sharding_constraint(x, P(*spec))


def _with_halo(band, halo: int, dim: int, axis: str, n: int):
    """band [..., b, ...] (dim `dim`) → [..., halo + b + halo, ...]: the rows of the devices before and after
    along `axis`, zeros past either end of the whole dimension (ppermute gives zeros to a device no one sends to)."""
    b = band.shape[dim]
    before, after = [], []
    for hop in range(1, -(-halo // b) + 1):  # a band thinner than the halo takes rows from several neighbours
        k = min(b, halo - (hop - 1) * b)  # rows still needed from the device `hop` away
        last = jax.lax.slice_in_dim(band, b - k, b, axis=dim)  # the next devices' `before` rows
        first = jax.lax.slice_in_dim(band, 0, k, axis=dim)
        if hop >= n:  # past both ends on every device (a stencil taller than the whole dimension)
            before.insert(0, jnp.zeros_like(last))
            after.append(jnp.zeros_like(first))
            continue
        before.insert(0, jax.lax.ppermute(last, axis, [(i, i + hop) for i in range(n - hop)]))
        after.append(jax.lax.ppermute(first, axis, [(i + hop, i) for i in range(n - hop)]))
    return jnp.concatenate([*before, band, *after], axis=dim)


def _unsplit(band, dim: int):
    """band with `dim` whole over the mesh axes left to the partitioner inside halo_map's shard_map (its other dims
    unconstrained): x split over ('sequence', 'tensor') along dim reached the band's convolution still split over
    tensor, and with the kernel's output channels also over tensor XLA computed it wrong (tests/test_parallel.py)."""
    if jax.sharding.AxisType.Auto not in jax.sharding.get_abstract_mesh().axis_types:
        return band  # every axis manual: nothing left to split it (and P.UNCONSTRAINED is refused)
    spec = [P.UNCONSTRAINED] * band.ndim
    spec[dim] = None
    return jax.lax.with_sharding_constraint(band, P(*spec))


def _off_axis(a, axis: str):
    """a whole over the Explicit `axis` (its other axes kept), as halo_map's in_specs P() take it on an Auto mesh: a
    weight split over it failed in the gradient with JAX's "Expected cotangent type float32[3,3,3,4@sequence] but got
    float32[3,3,3,4]"."""
    spec = tuple(jax.typeof(a).sharding.spec)
    drop = lambda s: (s if s != axis else None) if not isinstance(s, tuple) else (  # noqa: E731
        tuple(n for n in s if n != axis) or None)
    return a if all(drop(s) == s for s in spec) else jax.sharding.reshard(a, P(*map(drop, spec)))


def halo_map(fn: Callable, x, *args, axis: str, dim: int, halo: int):
    """fn(x_band, *args, pad=0) on each device's band of x along `dim` (< 0: from the end), split over mesh `axis` of
    the current mesh, with `halo` rows of the neighbours (zeros past the ends) on either side of the band.
    fn(x, *args, pad) is a stencil of radius `halo` along `dim`, affine in x (a convolution), over x padded with `pad`
    zero rows at either end ('valid' past them): pad=0 returns the band's own rows; the backward pass calls it with
    pad=2·halo. args (weights) enter whole over `axis`; their gradients are summed over it. The result is x's shape
    with fn's trailing dims, split along `dim` like x. Call it under `jax.set_mesh` with an axis from `halo_axis`
    (which checks that the axis divides the dim)."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if axis not in sizes:  # was a bare KeyError
        raise ValueError(f"halo_map: axis={axis!r} is not an axis of the current mesh {sizes}: call it under "
                         "`jax.set_mesh(mesh)` with an axis from `halo_axis`")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"halo_map: dim={dim} is out of range for x of shape {x.shape}")
    dim %= x.ndim  # counted from the end, as in jnp: P(*(None,) * -3, axis) split dim 0, the halos came from dim -3
    if not hasattr(halo, "__index__") or halo < 0:  # (NumPy ints too: the kernel's shape // 2)
        raise ValueError(f"halo_map: halo={halo!r} must be an int >= 0, fn's radius along dim {dim}")
    halo, n = int(halo), sizes[axis]
    if x.shape[dim] % n:
        raise ValueError(f"halo_map: dim {dim} of x {x.shape} does not divide over the {n} devices of '{axis}': "
                         "run the stencil unsplit where `halo_axis` says (None, 1)")
    kind = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
    if kind == jax.sharding.AxisType.Explicit and jax.typeof(x).sharding.spec[dim] not in (axis, (axis,)):
        # x whole along dim (or split over another axis) on an Explicit axis (jax.make_mesh's default): its gradient
        # failed in JAX's "Expected cotangent type float32[2,8,5,3] but got float32[2,8@sequence,5,3]"; moved onto
        # the axis first, as the shard_map's in_specs split it on an Auto mesh
        spec_x = list(jax.typeof(x).sharding.spec) + [None] * (x.ndim - len(jax.typeof(x).sharding.spec))
        # (split over ('data', axis) along dim itself: the reshard leaves dim to axis alone)
        used = [d for d, s in enumerate(spec_x) if d != dim and axis in (s if isinstance(s, tuple) else (s,))]
        if used:
            raise ValueError(f"halo_map: x {jax.typeof(x)} is split over axis={axis!r} along dim {used[0]}, not "
                             f"dim {dim}: reshard it (jax.sharding.reshard) so that only dim {dim} uses '{axis}'")
        spec_x[dim] = axis
        x = jax.sharding.reshard(x, P(*spec_x))
    if kind == jax.sharding.AxisType.Explicit:  # args split over the axis: their gradient failed as x's did
        args = jax.tree.map(lambda a: _off_axis(a, axis), args)
    if x.shape[dim] == 0:  # no rows to exchange (one device returns an empty result; bands of 0 rows divided by 0)
        return fn(x, *args, pad=halo)
    spec = P(*(None,) * dim, axis)

    def stencil(x_ext, *args):
        y = fn(x_ext, *args, pad=0)
        # a halo other than fn's radius (or an even kernel, which has none) gave each band the wrong number of rows:
        # a result of another height, silently (kernel 5 with halo 1: no rows at all)
        if y.shape[dim] != x_ext.shape[dim] - 2 * halo:
            raise ValueError(f"halo_map: fn made {y.shape[dim]} rows along dim {dim} of a band of "
                             f"{x_ext.shape[dim] - 2 * halo} with halo={halo} on either side; halo must be fn's "
                             "radius along that dim (kernel // 2 for an odd kernel, times its dilation)")
        return y

    # Autodiff of fn(with_halo(x)) computes the input gradient of all b + 2·halo rows of the extended band and
    # sends the halos' back: 2x a stencil's data-gradient FLOPs on 2-row bands. Exchanging the output gradient's
    # halos instead computes exactly the band's b rows.
    @custom_vjp
    def local(x_band, *args):
        return stencil(_with_halo(_unsplit(x_band, dim), halo, dim, axis, n), *args)

    def local_fwd(x_band, *args):
        x_ext = _with_halo(_unsplit(x_band, dim), halo, dim, axis, n)
        return stencil(x_ext, *args), (x_ext, args)

    def local_bwd(res, dy):
        x_ext, args = res
        dy = _unsplit(dy, dim)
        x_band = jax.lax.slice_in_dim(x_ext, halo, x_ext.shape[dim] - halo, axis=dim)  # (its values go unread)
        # the band's share of every output row it reaches: its own and `halo` rows of each neighbour's (fn affine
        # in x: the zero rows padded around the band stand for the neighbours', whose share the neighbours add)
        _, reach = jax.vjp(lambda xb: fn(xb, *args, pad=2 * halo), x_band)
        (dx,) = reach(_with_halo(dy, halo, dim, axis, n))
        _, of_args = jax.vjp(lambda *a: fn(x_ext, *a, pad=0), *args)
        return (dx, *of_args(dy))  # each band's share: shard_map sums the args' gradients over the axis

    local.defvjp(local_fwd, local_bwd)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, *(P(),) * len(args)), out_specs=spec,
                         axis_names=frozenset({axis}))(x, *args)
