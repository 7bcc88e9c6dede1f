"""Orbax checkpoints of the LM trainer: async saves, keep-last-N + best-by-eval-loss, verified restore.

One checkpoint = `ocp.args.Composite(state=StandardSave(train state), meta=JsonSave({step, loader, config,
fingerprint, eval_loss}))` under `<dir>/<step>`. The train state is the dict of `experiments.lm_step`
(params, opt_state, step, skipped, rng); nnx.State nodes are stored as pure dicts.

Integrity: orbax finalises a step directory atomically (a save killed half-way leaves only an
`*.orbax-checkpoint-tmp-*` directory, never a step), and `meta.fingerprint` holds a bitwise checksum of every
leaf taken at save time. A restore that fails to read or whose checksum differs is reported in one line, the
step is moved to `<dir>-corrupt/`, and the previous step is tried. Only finite states are ever saved.
Multi-process: every process calls save/restore (orbax coordinates the writes); logs come from process 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from experiments.lm_step import all_finite, per_device_set


class NonFiniteState(RuntimeError):
    """Refused to save a state with NaN/Inf in it."""


def _is_state(x):
    return isinstance(x, nnx.State)


def to_pure(tree):
    """nnx.State nodes (params, Adam's mu / nu) → plain nested dicts of arrays, for orbax."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)


def from_pure(target, pure):
    """Put restored pure dicts back into the nnx.State nodes of `target` (a tree of the same structure)."""
    leaves, treedef = jax.tree.flatten(target, is_leaf=_is_state)
    out = []
    for t, p in zip(leaves, treedef.flatten_up_to(pure)):
        if _is_state(t):
            t = jax.tree.map(lambda x: x, t)  # a copy to fill in place
            nnx.replace_by_pure_dict(t, p)
            p = t
        out.append(p)
    return treedef.unflatten(out)


@jax.jit
def _leaf_sums(leaves):
    def one(x):
        bits = {8: jnp.uint64, 4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
        return jnp.sum(u, dtype=jnp.uint32)  # wraps mod 2^32: exact and order-independent

    return [one(x) for x in leaves]


def fingerprint(tree) -> str:
    """Bitwise checksum of every array leaf (sum of the raw bits mod 2^32 per leaf, then sha256 over leaves)."""
    sums = np.asarray(per_device_set(_leaf_sums, jax.tree.leaves(tree)), dtype=np.uint32)
    return hashlib.sha256(sums.tobytes()).hexdigest()[:16]


def abstract_of(tree):
    """ShapeDtypeStructs carrying the shardings of `tree`: the restore target on the *current* mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """`ocp.CheckpointManager` over `directory` with the trainer's policies.

    keep: the last N steps are kept; keep_best: also the step with the lowest eval loss (saved as a metric).
    async_save: saves return after the device→host copy and write in a background thread.
    """

    def __init__(self, directory, keep: int = 2, keep_best: bool = True, async_save: bool = True, log=print):
        self.dir = pathlib.Path(directory).absolute()
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        self._report_incomplete()
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                                          keep_checkpoints_without_metrics=False))
        opts = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.mgr = ocp.CheckpointManager(self.dir, options=opts)

    def _report_incomplete(self):
        if jax.process_index() == 0 and self.dir.is_dir():
            tmp = sorted(p.name for p in self.dir.iterdir() if ".orbax-checkpoint-tmp" in p.name)
            if tmp:
                self.log(f"checkpoint: ignoring incomplete save(s) {', '.join(tmp)} (interrupted while writing)")

    # ---- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, state, meta: dict, eval_loss: float | None = None) -> None:
        """Start an async save of `state` (+ JSON `meta`) at `step`; raises NonFiniteState instead of saving
        NaN/Inf. Returns once the arrays are copied off the devices (training may then donate them)."""
        if not bool(all_finite(state)):
            raise NonFiniteState(f"checkpoint: refusing to save step {step}: the state has NaN/Inf values")
        pure = to_pure(state)
        meta = dict(meta, step=int(step), fingerprint=fingerprint(pure), eval_loss=eval_loss)
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                                    meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    # ---- restore ---------------------------------------------------------------------------------------------
    def restore(self, template, step: int | None = None):
        """Restore the newest good checkpoint (or `step`) onto the shardings of `template` (the freshly
        initialised state on the current mesh, any device count). Returns (state, meta) or None.

        An unreadable checkpoint or one whose fingerprint differs is reported, moved aside, and the previous
        one is tried."""
        abstract = abstract_of(to_pure(template))
        if step is not None and step not in self.mgr.all_steps():
            return None
        candidates = [step] if step is not None else sorted(self.mgr.all_steps(), reverse=True)
        for s in candidates:
            try:
                out = self.mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
                meta = dict(out["meta"])
                got = fingerprint(out["state"])
                if meta.get("fingerprint") != got or meta.get("step") != s:
                    raise ValueError(f"checksum {got} != saved {meta.get('fingerprint')}")
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: do not use it
                older = [x for x in candidates if x < s]
                nxt = f"falling back to step {older[0]}" if older else "no older checkpoint: starting fresh"
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                self.log(f"checkpoint: step {s} is corrupt or incomplete ({type(e).__name__}: {msg}); {nxt}")
                self._quarantine(s)
                continue
            return from_pure(template, out["state"]), meta
        return None

    def _quarantine(self, step: int):
        """Move a bad step out of the manager's directory, so it is never listed or overwritten again."""
        if jax.process_index() == 0:
            src = self.dir / str(step)
            if src.exists():
                dst = self.dir.parent / f"{self.dir.name}-corrupt" / str(step)
                shutil.rmtree(dst, ignore_errors=True)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.mgr.reload()


def read_meta(directory, step: int) -> dict:
    """The JSON meta of a saved step, without restoring arrays (for tools and tests)."""
    path = pathlib.Path(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())
