"""Mesh construction from named axis sizes (one may be -1: fill with the remaining devices).

Single slice / single node: `make_mesh({'fsdp': -1, 'tensor': 4})`. Multi-slice TPU or multi-node
GPU: give the slow (DCN / inter-node) part separately, `make_mesh({'fsdp': 8, 'tensor': 4},
dcn={'data': 16})`: each axis is `ici × dcn` long and devices are laid out so that only the `dcn`
factors cross slice (or node) boundaries.
"""

from __future__ import annotations

import collections
import math
import numbers

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType

AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")  # outermost (slowest links) first


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1' → {'data': 2, 'fsdp': -1} (the command lines' mesh form); ValueError naming the form, or
    naming an axis that is not in AXES (as make_mesh would, but before anything is built or compiled)."""
    if not isinstance(text, str):  # None (an unset --mesh) or a dict failed in text.split, naming nothing
        hint = "; a dict is already parsed: pass it to make_mesh" if isinstance(text, dict) else ""
        raise ValueError(f"mesh: parse_mesh takes a string like 'data=2,fsdp=4', got {type(text).__name__} "
                         f"{text!r:.80}{hint}")
    try:
        pairs = [(k.strip(), int(v)) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())]
    except ValueError:
        raise ValueError(f"mesh: cannot parse {text!r}; write axis=size pairs like data=2,fsdp=4") from None
    if not pairs:  # '' (an unset shell variable) was {}: make_mesh took it for data=-1, train_lm for 1 device
        raise ValueError(f"mesh: {text!r} names no axis; write axis=size pairs like data=2,fsdp=4 (data=-1: every "
                         "device on data)")
    twice = sorted({k for k, _ in pairs if [a for a, _ in pairs].count(k) > 1})
    if twice:
        raise ValueError(f"mesh: {text!r} names {twice} more than once; give each axis one size")
    _check_names(dict(pairs), "mesh: ")  # 'dat=2' parsed, and failed only in make_mesh, after the config was accepted
    return dict(pairs)


def _check_names(shape: dict, prefix: str = "") -> None:
    if unknown := set(shape) - set(AXES):
        raise ValueError(f"{prefix}mesh axes {sorted(unknown)} are unknown; use names from {AXES}")


def _fill(shape: dict[str, int], n: int, what: str) -> dict[str, int]:
    _check_names(shape)
    typed = [a for a, s in shape.items() if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
    if typed:
        raise ValueError(f"mesh axes {typed} need int sizes, got {[shape[a] for a in typed]} (e.g. {{'data': 2}})")
    fills = [a for a, s in shape.items() if s == -1]
    if len(fills) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fills}")
    bad = [a for a, s in shape.items() if s != -1 and s < 1]
    if bad:
        raise ValueError(f"mesh axes {bad} must be >= 1 (or -1 to fill)")
    fixed = math.prod(s for s in shape.values() if s != -1)
    out = dict(shape)
    if fills:
        if n % fixed:
            raise ValueError(f"mesh {shape}: {n} {what} are not divisible by {fixed}, the product of the axes other "
                             f"than {fills[0]!r}; make that product a divisor of {n}")
        out[fills[0]] = n // fixed
    if math.prod(out.values()) != n:
        raise ValueError(f"mesh {shape} needs {math.prod(out.values())} {what} but {n} are available; "
                         "make the product of the axis sizes equal the count or use -1")
    return out


def make_mesh(shape: dict[str, int] | None = None, devices=None,
              dcn: dict[str, int] | None = None) -> jax.sharding.Mesh:
    """`make_mesh({'data': -1, 'tensor': 2})` → Mesh over all devices with Auto axis types.

    Axes are laid out in the canonical order of `AXES` (tensor innermost, on the fastest links).
    `dcn` gives the inter-slice / inter-node factor of each axis (granules are TPU slices, or
    processes elsewhere); `shape` is then the per-granule (ICI / NVLink) part. `devices` may be a list or a grid
    (e.g. another mesh's `.devices`): they are taken in its flat order. Unknown names,
    several -1s, or a product that does not match the device count raise a ValueError.
    """
    for name, given in (("shape", shape), ("dcn", dcn)):  # dict("data=8") fails naming nothing
        if isinstance(given, str):
            raise ValueError(f"make_mesh: {name}={given!r} is a string; pass a dict, e.g. parse_mesh({given!r})")
    # flat: a device grid (mesh_utils.create_device_mesh, mesh.devices) was read row by row, "needs 8 devices but 2
    # are available"; make_mesh lays the devices out itself. Other iterables (a generator, filter, set) are listed
    # first: np.asarray made each one 0-d object array, an AttributeError ("no attribute 'device_kind'") in jax
    if devices is not None and not isinstance(devices, np.ndarray | list | tuple):
        devices = list(devices)
    devices = list(np.asarray(devices, dtype=object).flat) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("make_mesh: devices is empty; pass the devices to span (default: jax.devices())")
    # both built a mesh: device ids failed in jax naming no argument ("'int' object has no attribute 'device_kind'"),
    # a device listed twice at the first device_put, in a bare AssertionError
    if not_devices := [d for d in devices if not isinstance(d, jax.Device)]:
        raise ValueError(f"make_mesh: devices holds {type(not_devices[0]).__name__} {not_devices[0]!r}, not a jax "
                         "Device; pass jax.devices() or some of them (by id: [jax.devices()[i] for i in ids])")
    if len(set(devices)) < len(devices):
        twice = sorted(d.id for d, n in collections.Counter(devices).items() if n > 1)
        raise ValueError(f"make_mesh: devices lists {twice} more than once (by id); a mesh holds each device once")
    if not dcn:
        shape = _fill(dict(shape or {"data": -1}), len(devices), "devices")
        names = tuple(a for a in AXES if a in shape)
        return jax.make_mesh(tuple(shape[a] for a in names), names, axis_types=(AxisType.Auto,) * len(names),
                             devices=devices)
    by_slice = devices[0].platform == "tpu"  # TPU granules are slices; elsewhere processes (nodes)
    n_granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    dcn = _fill(dict(dcn), n_granules, "slices/processes")
    ici = _fill(dict(shape or {"data": -1}), len(devices) // n_granules, "devices per slice/process")
    names = tuple(a for a in AXES if a in ici or a in dcn)
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici.get(a, 1) for a in names], [dcn.get(a, 1) for a in names], devices,
        process_is_granule=not by_slice)
    return jax.sharding.Mesh(np.asarray(grid), names, axis_types=(AxisType.Auto,) * len(names))
