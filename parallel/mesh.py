"""Mesh construction from named axis sizes (one may be -1: fill with the remaining devices)."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType

AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")  # outermost (slowest links) first


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
    """`make_mesh({'data': -1, 'tensor': 2})` → Mesh over all devices with Auto axis types.

    Axes are laid out in the canonical order of `AXES` (tensor innermost, so it lands on the
    fastest interconnect). Unknown names, several -1s, or a product that does not match the
    device count raise a ValueError that says which.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are unknown; use names from {AXES}")
    fills = [a for a, n in shape.items() if n == -1]
    if len(fills) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fills}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if fills:
        if len(devices) % fixed:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {fixed}")
        shape[fills[0]] = len(devices) // fixed
    if math.prod(shape.values()) != len(devices):
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices but {len(devices)} are "
                         "available; make the product of the axis sizes equal the device count or use -1")
    names = tuple(a for a in AXES if a in shape)
    return jax.make_mesh(tuple(shape[a] for a in names), names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)
