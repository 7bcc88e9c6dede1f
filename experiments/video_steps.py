"""Train steps and checkpoints of the video experiment: plain `jax.jit` over `nnx.split` state.

Both steps donate (params, opt_state[, ema]) and return metrics as float32 scalars. Checkpoints are the LM
trainer's (`experiments.checkpoint.Checkpoints`): the trees as one state with a checksum, and a JSON record.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

from experiments.checkpoint import (
    Checkpoints,
    NonFiniteState,
    array_tree_handler,
    check_fits,
    from_pure as _unpure,
    to_pure as _pure,
    tree_restore_args,
)
from experiments.lm_step import all_finite
from models.video.t2v import t2v_loss
from models.video.vae import vae_loss
from parallel import batch_sharding, logical_to_spec
from parallel.host import step_compiler_options
from parallel.sharding import check_fits_x32, host_array


def shard(batch, mesh):
    """Rows along the batch axes: captions [B, L] as `parallel.shard_batch` does (L over 'sequence'); clips and
    latents [B, T, ...] and per-example vectors [B] on the batch axes only (their frame axis, 1 + 4k long, is
    not a token axis: the DiT shards its own tokens)."""
    def one(path, x):
        where = f"batch{jax.tree_util.keystr(path)}"
        try:
            x = host_array(x)  # host rows straight onto their shards (jnp.asarray went through device 0)
        except TypeError:  # captions as strings: jax's "Value 'a' with dtype <U1 is not a valid JAX array type"
            raise TypeError(f"shard: {where} is a {type(x).__name__}, not an array of numbers (captions: tokenize "
                            "them first, data.moving_shapes.encode_caption)") from None
        if isinstance(x, np.ndarray):  # int64 / uint64 rows jax would wrap to 32 bits (as shard_batch refuses)
            check_fits_x32(x, f"shard: {where}")
        # with the shape, a B (or a caption length L) the mesh axes do not divide is named with the key and the fix
        # (jax's IndivisibleError named neither; shard_batch given the captions alone named 'batch', not the key)
        try:
            sharding = (batch_sharding(mesh, 2, shape=x.shape) if x.ndim == 2 else
                        NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (x.ndim - 1), mesh, x.shape)))
        except ValueError as e:
            raise ValueError(f"shard: {where}, an array {x.shape}: {e}") from None
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(one, batch)


def shardings_of(tree):
    """The shardings of a pytree of arrays (e.g. the train state), to pin a step's outputs to its inputs."""
    return jax.tree.map(lambda x: x.sharding, tree)


def make_vae_step(graphdef, optimizer: optax.GradientTransformation, state_shardings=None):
    """`step(params, opt_state, video_BTHWC, key) -> (params, opt_state, metrics)`.

    `state_shardings` = shardings_of((params, opt_state)): outputs keep them, so the second call does not
    recompile for shardings that XLA chose differently from `parallel.create_sharded`'s.
    """

    def step(params, opt_state, video, key):
        def loss_fn(p):
            return vae_loss(nnx.merge(graphdef, p), video, key)

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, m | {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    out = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out, compiler_options=step_compiler_options())


def ema_init(params):
    """The EMA starts as a float32 copy of the params: kept in bfloat16, (1 - decay)·(p - e) falls below
    half an ulp of e once decay nears 1 and the average stops moving. A copy: steps donate both trees."""
    return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_update(ema, params, decay):
    """ema ← ema + (1 − decay)·(params − ema), leaf by leaf, in the EMA's dtype (float32)."""
    return jax.tree.map(lambda e, p: e + (1 - decay) * (p.astype(e.dtype) - e), ema, params)


def ema_cast(ema, params):
    """The float32 EMA in the params' dtypes, to sample and evaluate with the model as configured."""
    return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)


def make_t2v_step(graphdef, optimizer: optax.GradientTransformation, null_L, ema_decay: float = 0.999,
                  state_shardings=None):
    """`step(params, opt_state, ema, batch, key, step_no) -> (params, opt_state, ema, metrics)`, `ema` from
    `ema_init`; `state_shardings` = shardings_of((params, opt_state, ema)) pins the outputs as in `make_vae_step`.

    The EMA decay warms up as min(ema_decay, (1 + n) / (10 + n)), so early averages are not dominated
    by the random initialisation in short runs.
    """
    null_L = jnp.asarray(null_L)

    def step(params, opt_state, ema, batch, key, n):
        def loss_fn(p):
            return t2v_loss(nnx.merge(graphdef, p), batch, key, null_L)

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = ema_update(ema, params, decay)
        return params, opt_state, ema, m | {"grad_norm": optax.tree.norm(grads)}

    out = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=out, compiler_options=step_compiler_options())


# --- checkpoints ---------------------------------------------------------------------------------------------


TREES = ("params", "opt_state", "ema")  # the pytrees a stage may save


def manager(directory, read_only: bool = False, log=print) -> Checkpoints:
    """One stage's checkpoints under `directory` (the last 2 kept), through the LM trainer's `Checkpoints`: a save
    carries a checksum, and a restore that fails to read or verify sets that step aside in `<directory>-corrupt/`
    and falls back to the one before (a corrupt newest step stopped the video trainer with an orbax error).
    read_only: for readers (load_video_model): nothing is created or moved. log: where its notes go."""
    return Checkpoints(directory, keep=2, keep_best=False, async_save=False, read_only=read_only, log=log)


def save(ckpt: Checkpoints, step: int, trees: dict, meta: dict):
    """Save pytrees (nnx.State is stored as a pure dict) and a JSON record under `step`; waits for it. Raises
    NonFiniteState instead of saving NaN / Inf (a later run would resume from it, and sample noise)."""
    if unknown := set(trees) - set(TREES):
        raise ValueError(f"video checkpoint trees {sorted(unknown)}: a stage saves only {TREES}")
    try:  # Checkpoints.save checks the whole state; the trees one by one only to name the bad ones (each checked
        ckpt.save(step, trees, meta)  # first as well: 2-3 more finiteness programs to compile, two passes a save)
    except NonFiniteState:
        bad = [k for k, v in trees.items() if not all_finite(v)]
        raise NonFiniteState(f"{ckpt.dir}: refusing to save step {step}: {bad} hold NaN / Inf values") from None
    ckpt.wait()


def latest_meta(ckpt: Checkpoints) -> tuple[int, dict] | None:
    """(step, JSON record) of the newest checkpoint whose record reads, reading no array; None when there is none
    (a step whose record does not read is set aside by the restore that follows)."""
    for step in reversed(ckpt.steps()):
        try:
            return step, dict(ckpt.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # noqa: BLE001 - an unreadable record: not a checkpoint to compare settings with
            continue
    return None


def restore(ckpt: Checkpoints, targets: dict, step: int | None = None, check=None):
    """Restore the newest good (or given) step into `targets` (trees of arrays, or ShapeDtypeStructs with shardings,
    giving shape, dtype and sharding; some of the saved trees, e.g. only 'params'), falling back past a corrupt one.
    check(meta): as `Checkpoints.restore`'s, before any array is read.

    Returns (step, trees, meta) or None when there is no checkpoint.
    """
    def legacy(s):  # (asked step by step: a corrupt newer step falls back to an older-layout one, not past it)
        if not _is_legacy(ckpt, s):
            return None
        s, trees, meta = _restore_legacy(ckpt, targets, s)
        return trees, {**meta, "step": s}

    if (r := ckpt.restore(targets, step, check=check, other=legacy)) is None:
        return None
    trees, meta = r
    return int(meta["step"]), trees, meta


# --- checkpoints written before the video trainer used `Checkpoints`: one orbax item per tree, no checksum ------


def _is_legacy(ckpt: Checkpoints, step: int) -> bool:
    """Whether `step` is an older checkpoint (its trees as items beside the record)."""
    d = ckpt.dir / str(step)
    return not (d / "state").exists() and any((d / k).is_dir() for k in TREES)


def _restore_legacy(ckpt: Checkpoints, targets: dict, step: int):
    abstract = {k: jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure(v)) for k, v in targets.items()}
    handlers = {k: array_tree_handler() for k in TREES} | {"meta": ocp.JsonCheckpointHandler()}
    mgr = ocp.CheckpointManager(ckpt.dir, options=ocp.CheckpointManagerOptions(create=False), item_handlers=handlers)
    saved = mgr.item_metadata(step)  # (read once: each call reads every item's metadata)
    for k, v in abstract.items():  # another model's step is a mismatch (kept), not corruption (set aside)
        check_fits(saved[k].tree, v, ckpt.dir / str(step) / k)
    args = {k: tree_restore_args(v) for k, v in abstract.items()}
    out = mgr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
    print(f"checkpoint: {ckpt.dir / str(step)} predates checksummed video checkpoints; restored unverified")
    return step, {k: _unpure(targets[k], out[k]) for k in targets}, dict(out["meta"])
