"""One check for the seeds of the data generators: an int (numpy ints too), never a bool or a fraction; and one
for the types of the data configs' fields."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection, Iterable

import numpy as np


def check_seed(seed, where: str, below: int | None = None) -> int:
    """`seed` as a plain int (configs go to JSON), or a ValueError naming `where`. seed=True ran as seed 1, and a
    float failed inside numpy naming neither the seed nor its owner (grain's shuffle ran 1.5 as 1): another run's
    data under the seed it logged. below: an exclusive upper bound (grain's shuffle takes seeds below 2**32)."""
    if (isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or seed < 0
            or (below is not None and seed >= below)):
        span = "an int >= 0" if below is None else f"an int in [0, {'2**32' if below == 2**32 else below})"
        raise ValueError(f"{where}={seed!r} must be {span} (a numpy int too), not a float or bool")
    return int(seed)


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and math.isfinite(v)


def _threshold(v) -> bool:  # inf is a bound that never binds (max_mean_word_len=inf: no upper limit); NaN fails all
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and not math.isnan(v)


_SCALARS = {"int": (_int, int, "an int"), "float": (_threshold, float, "a number, not NaN"),
            "bool": (lambda v: isinstance(v, bool | np.bool_), bool, "True or False")}


def read_once(v):
    """`v` with each one-shot iterable in it (a generator, an iterator, a map; at any depth of tuples and lists)
    read into a tuple; anything else as given (the same object where nothing changed). A config's checks iterate
    its entries before storing them: a generator passed them and was stored used up, so a filter's phrases, a
    label's keywords or a held-out split were silently empty (QualityConfig(blocklist=(w for w in words)) kept
    every blocked document). A set (or frozenset) becomes a sorted tuple: iterated, it runs in hash order, which
    differs between processes (PYTHONHASHSEED), so the cleaning run's fingerprint did too and a resume was refused
    (and a set of shard files was read in another order)."""
    if isinstance(v, str | bytes) or not isinstance(v, Iterable):
        return v
    if isinstance(v, set | frozenset):
        items = [read_once(x) for x in v]
        try:
            return tuple(sorted(items))
        except TypeError:  # mixed kinds ({'a', 1}): still one order in every process; the field's check names it
            return tuple(sorted(items, key=repr))
    if not isinstance(v, Collection):  # a Collection (tuple, list, set, dict) can be iterated again
        v = tuple(v)
    if isinstance(v, tuple | list):
        items = [read_once(x) for x in v]
        if any(a is not b for a, b in zip(items, v)):
            return type(v)(items) if type(v) in (tuple, list) else tuple(items)
    return v


def check_field_types(cfg) -> None:
    """Each int / float / bool field of a frozen data config (each optionally `| None`, and fixed pairs such as
    tuple[int, int]; of a tuple[X, ...] of entries, that it is a collection, not a string, None or a number)
    against its annotation, before the config's checks of values; others (the entries) are left to those. A
    ValueError names Class.field. Without it a NaN threshold passed every range check and switched its filter off
    (QualityConfig(min_chars=nan) kept a 10-character document), the string 'no' switched a flag on
    (NormalizeConfig(collapse_spaces='no') collapsed spaces), and a float count failed inside str or numpy
    (max_caption_len=8.0, max_blank_lines=2.0). Accepted numpy numbers become Python's (configs go to JSON and into
    fingerprints); Python's stay as given. A one-shot iterable given for a tuple field is read into a tuple first
    (`read_once`). models.config.check_field_types does the same for the model configs; this one keeps jax out of the
    data workers."""
    where = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        kind, v = kind.removesuffix("|None"), getattr(cfg, f.name)
        if "tuple[" in kind and (once := read_once(v)) is not v:  # before any check iterates (and uses up) it
            object.__setattr__(cfg, f.name, once)
            v = once
        if v is None and optional:
            continue
        if kind in _SCALARS:
            ok, cast, what = _SCALARS[kind]
            if not ok(v):
                raise ValueError(f"{where}.{f.name}={v!r} must be {what}{' or None' if optional else ''}")
            if type(v) not in (int, float, bool):  # numpy numbers as Python's (JSON, fingerprints); Python's
                object.__setattr__(cfg, f.name, cast(v))  # as given: an int threshold keeps its fingerprint
        elif kind.startswith("tuple[") and "..." not in kind and kind[6:-1] and all(
                k in ("int", "float") for k in kind[6:-1].split(",")):  # a fixed pair: (min, max)
            kinds = kind[6:-1].split(",")
            if not (isinstance(v, tuple | list) and len(v) == len(kinds)
                    and all((_int if k == 'int' else _real)(x) for k, x in zip(kinds, v))):
                raise ValueError(f"{where}.{f.name}={v!r} must be a tuple of {len(kinds)} "
                                 f"{'ints' if set(kinds) == {'int'} else 'finite numbers'}")
            object.__setattr__(cfg, f.name, tuple(x if type(x) in (int, float) else _SCALARS[k][1](x)
                                                  for k, x in zip(kinds, v)))
        elif kind.startswith("tuple[") and kind.endswith(",...]") and (
                isinstance(v, str | bytes) or not isinstance(v, Iterable)):  # entries: phrases, (tag, words) pairs
            # None or a number failed in iteration ("'NoneType' object is not iterable", naming no field), and one
            # string in place of a tuple of phrases was read letter by letter
            one = f", ({v!r},) for one entry (a string alone is read letter by letter)" if isinstance(v, str) else ""
            raise ValueError(f"{where}.{f.name}={v!r:.120} must be a tuple{' or None' if optional else ''}: () for "
                             f"none{one}")
