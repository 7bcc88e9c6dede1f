"""Checking that an argument is one PRNG key, before jax.random reads it with a less helpful error.

jax.random takes a typed key (jax.random.key, any implementation: its dtype says which) or raw uint32 key data
(jax.random.PRNGKey, jax.random.key_data), which it reads with the *default* implementation: shape [2] under
threefry2x32, [4] under jax_default_prng_impl='rbg' or 'unsafe_rbg'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# implementations by the shape of their raw key data (jax 0.10), to name in the fix
_IMPLS_OF_SHAPE = {(1,): "'philox2x32'", (2,): "'threefry2x32' or 'philox4x32'",
                   (4,): "'rbg', 'unsafe_rbg' or 'threefry4x32'"}


def key_error(key, hint: str = "") -> str | None:
    """None when `key` is one PRNG key that jax.random reads as given: a typed key of shape [] or raw uint32 key
    data of the default implementation's shape. Otherwise 'got <dtype>[shape]' and the fix, or `hint` when `key`
    is not recognisably a key at all (say, two arguments swapped)."""
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    got = f"got {dtype if dtype is not None else type(key).__name__}{list(shape)}"
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return None
        return _batch_fix(got, shape, "keys")
    if dtype != jnp.uint32 or not shape:
        return got + hint
    raw = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape  # the default impl's key data shape
    if shape == raw:
        return None
    if shape[-len(raw):] == raw:
        return _batch_fix(got, shape[:-len(raw)], "raw keys")
    if (impls := _IMPLS_OF_SHAPE.get(shape[-1:])) is not None:
        return (f"{got}, raw key data of another PRNG implementation than the default "
                f"{jax.config.jax_default_prng_impl} (whose raw keys are uint32{list(raw)}, and jax.random reads raw "
                f"keys with it); pass the typed key, jax.random.wrap_key_data(data, impl=...) with the implementation "
                f"that made it ({impls})")
    return got + hint


def _batch_fix(got: str, batch: tuple[int, ...], what: str) -> str:
    """The error for a batch of keys of shape `batch` where one key was due: pick one by the index that does it
    (keys[0], keys[0, 0], ...), or vmap over several. An empty batch has no key to pick (keys[0] raised IndexError)."""
    n = math.prod(batch)
    if n == 0:
        return f"{got}, an empty batch of {what}; pass one key, e.g. jax.random.key(0)"
    one = f"pass it ({_first(batch)})" if n == 1 else f"pass one ({_first(batch)}), or jax.vmap the call over them"
    return f"{got}, a batch of {n} {what[:-1] if n == 1 else what}; {one}"


def _first(batch: tuple[int, ...]) -> str:
    """The index that picks one key of a batch of this shape: keys[0], keys[0, 0], ..."""
    return f"keys[{', '.join('0' * len(batch))}]"
