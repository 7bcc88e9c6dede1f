"""Orbax checkpoints of the LM trainer (and the video trainer's stages): async saves, keep-last-N +
best-by-eval-loss, verified restore.

One checkpoint = `ocp.args.Composite(state=PyTreeSave(train state), meta=JsonSave({step, config, fingerprint,
part_fingerprints, eval_loss}), loader=grain.checkpoint.CheckpointSave(data iterator))` under `<dir>/<step>`. grain's
handler writes one `process_<i>-of-<n>.json` per process: every process reads its own documents, so each needs its
own state. The train state is the dict of `experiments.lm_step` (params, opt_state, step, skipped, rng); nnx.State
nodes are stored as pure dicts.

Integrity: orbax finalises a step directory atomically (a save killed half-way leaves only an
`*.orbax-checkpoint-tmp-*` directory, never a step), and `meta.fingerprint` holds a bitwise checksum of every
leaf taken at save time. A restore that fails to read or whose checksum differs is reported in one line, the
step is moved to `<dir>-corrupt/<step>[-n]` (never over an earlier one), and the previous step is tried. A readable
step that does not fit the run (another model config, array paths or shapes, process count) is not
corruption: `CheckpointMismatch` is raised before any array is read and the directory is left alone. Arrays are read
by path: a tree holding the same arrays with its empty nodes elsewhere (a regrouped optax chain) restores into the
template's. Only finite states are ever saved.
Multi-process: every process calls save/restore (orbax coordinates the writes); logs come from process 0.

Reading a step with orbax alone (no import of this repo), on any device count: orbax's default restore re-creates the
saved shardings, which fails on a machine with other devices ("sharding passed to deserialization should be
specified"), so ask for numpy arrays; orbax wants an absolute path. Optax's empty states are None.

    import json, pathlib, jax, numpy as np, orbax.checkpoint as ocp
    step_dir = pathlib.Path("runs/demo/ckpt/200").absolute()
    meta = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))  # step, eval_loss, mesh, ...
    config = json.loads(meta["config"])  # the RunConfig, itself JSON text
    with ocp.PyTreeCheckpointer() as c:  # the train state: params, opt_state, step, skipped, rng
        saved = c.metadata(step_dir / "state").item_metadata.tree  # shapes and dtypes; nothing read yet
        state = c.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import pathlib
import re
import threading
import weakref

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data.cli import local_path
from data.loader import StreamMismatch
from experiments.lm_step import all_finite, per_device_set


class _SavesBetweenEvals(logging.Filter):
    """With `best_fn` set, orbax warns on every save that carries no metrics; here those are the saves between
    evaluations, which are normal (LatestN keeps them, BestN ignores them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_SavesBetweenEvals())

# This process's writing managers by directory: a second Checkpoints over a directory whose first is still open (a
# notebook cell run again) took the first's save still in flight for an interrupted one and cleaned it up under it:
# that step was lost, and the second manager's first save failed ("Directory not empty")
_WRITERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_WRITER_DIRS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # the same managers by str(directory)


class _SaveFailuresRaisedLater(logging.Filter):
    """orbax logs a failed background save at ERROR with its whole traceback, three times (the writer thread, the
    commit thread, the finalize wait: ~325 lines of asyncio / tensorstore frames on a full disk), then raises it at
    the next save or wait, where `Checkpoints._save_errors` says it in one line. Those logs are dropped for the
    directories open writers save into (the message or its exception names one); others' pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not (dirs := [*_WRITERS.keys(), *_WRITER_DIRS.keys()]):
            return True
        text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info and record.exc_info[1] else "")
        return not any(re.search(re.escape(d) + r"(?![\w.-])", text) for d in dirs)


logging.getLogger("absl").addFilter(_SaveFailuresRaisedLater())


class NonFiniteState(RuntimeError):
    """Refused to save a state with NaN/Inf in it."""


class CheckpointSaveFailed(OSError):
    """orbax could not write a save (a full disk, a directory gone read-only); `str(e)` names the directory, the
    cause and the step a rerun resumes from."""


class CheckpointMismatch(ValueError):
    """A readable checkpoint that belongs to another run configuration; `str(e)` names what differs and the fix."""


def _stream_mismatch(e: BaseException | None) -> StreamMismatch | None:
    """The loader's StreamMismatch behind `e` (grain's checkpoint handler may wrap it), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, StreamMismatch):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _LoaderItem:
    """An iterator with a JSON-able `get_state()` dict (data.loader.LMLoader) as grain's checkpoint handler
    expects a non-grain iterator: state as bytes, plus `start_prefetch`."""

    def __init__(self, loader):
        self.loader = loader

    def get_state(self) -> bytes:
        return json.dumps(self.loader.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.loader.set_state(json.loads(state))

    def start_prefetch(self):
        pass


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
        # bitcast refuses bool and complex, which a state may hold (optax.apply_if_finite's last_finite is a bool)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        elif jnp.issubdtype(x.dtype, jnp.complexfloating):
            x = jnp.stack([x.real, x.imag])
        # 8-byte leaves (jax_enable_x64) as two 32-bit words each: a cast to uint32 kept only the low word
        bits = {8: jnp.uint32, 4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
        return jnp.sum(u, dtype=jnp.uint32)  # wraps mod 2^32: exact and order-independent

    return [one(x) for x in leaves]


def _sums(tree) -> np.ndarray:
    return np.asarray(per_device_set(_leaf_sums, jax.tree.leaves(tree)), dtype=np.uint32).reshape(-1)


def fingerprint(tree) -> str:
    """Bitwise checksum of every array leaf (sum of the raw bits mod 2^32 per leaf, then sha256 over leaves)."""
    return hashlib.sha256(_sums(tree).tobytes()).hexdigest()[:16]


def part_fingerprints(tree, order: list[tuple[str, ...]] | None = None) -> tuple[str, dict[str, str] | None]:
    """(fingerprint(tree), the fingerprint of each top-level entry of a dict tree, or None): one pass over the
    leaves, so that a part restored alone can be verified. order: the leaves' paths (`_path_keys`) in the order the
    checksum was taken (the saved tree's, which may flatten otherwise than `tree`: a namedtuple's fields reordered
    since); by default the tree's own."""
    flat, sums = jax.tree_util.tree_flatten_with_path(tree)[0], _sums(tree)
    if order is not None:
        at = {_path_keys(path): i for i, (path, _) in enumerate(flat)}
        pick = [at[name] for name in order]
        flat, sums = [flat[i] for i in pick], sums[pick]
    whole = hashlib.sha256(sums.tobytes()).hexdigest()[:16]
    if not isinstance(tree, dict):
        return whole, None
    part = {k: [] for k in tree}  # each entry's positions in one pass: a scan per entry was quadratic in their count
    for i, (path, _) in enumerate(flat):
        part[path[0].key].append(i)
    return whole, {k: hashlib.sha256(sums[np.asarray(part[k], dtype=np.intp)].tobytes()).hexdigest()[:16]
                   for k in sorted(tree)}


def _jax_leaves(tree, what: str, abstract_ok: bool = False) -> None:
    """Every leaf a jax.Array (orbax and the checksums need their shardings), or with `abstract_ok` a
    ShapeDtypeStruct with a sharding; a TypeError naming one otherwise."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if abstract_ok and isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            continue
        if abstract_ok and isinstance(x, jax.ShapeDtypeStruct):  # jax.eval_shape's: no mesh to restore onto
            raise TypeError(f"Checkpoints {what}: {_path_name(path)} is a ShapeDtypeStruct without a sharding; give "
                            "each one its sharding (parallel.abstract_sharded builds a model's), or pass arrays")
        if not isinstance(x, jax.Array):
            raise TypeError(f"Checkpoints {what}: leaves must be jax.Arrays (the state as placed on the mesh, e.g. "
                            f"jax.device_put(x)); got {type(x).__name__} at {_path_name(path)}")
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(f"Checkpoints {what}: {_path_name(path)} is a typed PRNG key, which orbax does not "
                            "save; store its raw data, jax.random.key_data(key) (wrap_key_data when used)")


def _global_leaves(tree, what: str) -> None:
    """With several processes, every leaf an array over all of them: orbax refuses one on this process's devices
    only (a scalar made with jnp.int32, say) deep in its writer, naming neither the leaf nor how to place it."""
    if jax.process_count() == 1:
        return
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if x.is_fully_addressable:
            raise TypeError(f"Checkpoints {what}: {_path_name(path)} is on this process's devices only "
                            f"({type(x.sharding).__name__}), but {jax.process_count()} processes save one checkpoint; "
                            "place it on the mesh, replicated: jax.device_put(x, NamedSharding(mesh, P()))")


async def _settled(coro):
    """Await `coro`; if it raises, first wait for the tasks it started that are still running, then re-raise.

    orbax reads a tree's arrays (their metadata, then their data) all at once, asyncio.gather over tensorstore
    futures, in an event loop of its own that it closes as soon as the read raises; gather leaves the other reads
    running. A corrupt step fails one of them, and each read still in flight completes later into the closed loop:
    tensorstore prints a 'RuntimeError: Event loop is closed' traceback per array (from its own thread, at any time
    after), and reads that failed meanwhile log 'Task exception was never retrieved': 80-550 lines around the
    one-line fallback warning. Waited for here, while the loop still runs, each completes normally: until none is
    left, since reads still running start more (waiting once for those running at the failure left ~30 to the closed
    loop in half the restores of a corrupt step)."""
    before = asyncio.all_tasks()
    try:
        return await coro
    except BaseException:
        # waited for, not cancelled: a cancelled tensorstore read may still be posting its result from its own
        # thread after the task is done; none waits on the failed one (orbax frees its byte budget in `finally`).
        # return_exceptions: their errors are read here, not logged as never retrieved
        while running := [t for t in asyncio.all_tasks() - before if not t.done()]:
            await asyncio.gather(*running, return_exceptions=True)
        raise


class _SettlingArrayHandler(ocp.type_handlers.ArrayHandler):
    """orbax's ArrayHandler whose failed reads (a corrupt step) leave no read of theirs running: `_settled`."""

    async def metadata(self, infos):
        return await _settled(super().metadata(infos))

    async def deserialize(self, infos, args=None):
        return await _settled(super().deserialize(infos, args))


def array_tree_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's pytree handler (what StandardSave writes), each array shard written whole by one replica except on TPU;
    a failed read of a damaged step leaves none of its other reads running (`_settled`).

    orbax's default splits every replicated shard among its replicas and slices it on the device, one eager op per
    piece: on a CPU mesh of 8 devices that took 19 s before the first save of a 60-array tree (0.15 s written
    whole; `benchmarks/checkpoint_save.py`). Replica-parallel writes pay on pods where each host writes its own
    piece; orbax already turns them off on GPU."""
    th, scalar = ocp.type_handlers, ocp.type_handlers.ScalarHandler()
    registry = th.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar), (np.ndarray, th.NumpyHandler()),
        (jax.Array, _SettlingArrayHandler(use_replica_parallel=jax.default_backend() == "tpu")),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def tree_restore_args(abstract, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args reading a saved pytree onto the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs);
    partial: `abstract` holds only some of the saved entries, the others are not read."""
    return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def abstract_of(tree):
    """ShapeDtypeStructs carrying the shardings of `tree` (arrays, or already ShapeDtypeStructs with shardings): the
    restore target on the *current* mesh."""
    _jax_leaves(tree, "restore template", abstract_ok=True)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """`ocp.CheckpointManager` over `directory` with the trainer's policies.

    keep: the last N steps are kept; keep_best: also the step with the lowest eval loss (saved as a metric; of equal
    losses the newest; a save without one, or with a NaN / inf one, is never the best).
    async_save: saves return after the device→host copy and write in a background thread. read_only: for readers
    beside a training job (`experiments.train_lm.load_model`): nothing is created, cleaned up or moved (a writer's
    in-progress temporary directory stays), and saving is refused.
    """

    def __init__(self, directory, keep: int = 2, keep_best: bool = True, async_save: bool = True, log=print,
                 read_only: bool = False):
        # orbax's LatestN(0) deletes every save; a NumPy int is an int (numbers.Integral, as elsewhere)
        if isinstance(keep, bool | np.bool_) or not isinstance(keep, numbers.Integral) or keep < 1:
            raise ValueError(f"Checkpoints keep={keep!r}: must be an int >= 1 (the newest N steps kept)")
        keep = int(keep)
        # ~ expanded; gs://... refused: orbax would write a bucket, but this class's own pathlib calls made gs:/...
        self.dir = pathlib.Path(local_path(directory)).absolute()
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        self.read_only = read_only
        # keyed by the resolved path: another spelling of the directory (relative with '..', a symlink) missed the
        # first manager and cleaned up its save in flight as before
        self._writer_key = str(self.dir.resolve())
        # a file in the way: orbax opened the manager and failed the first (async) save, a save interval later
        if not read_only and (blocker := next((p for p in (self.dir, *self.dir.parents) if p.exists()), None)) \
                and not blocker.is_dir():
            raise NotADirectoryError(f"checkpoint: {blocker} is a file, where the checkpoint directory {self.dir} "
                                     "should be; move it away or save into another directory")
        if not read_only and (earlier := _WRITERS.get(self._writer_key)) is not None:
            try:  # its save finishes first (a step, not a temporary folder to clean up)
                earlier.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - its own failure: this manager opens as after a crash
                self.log(f"checkpoint: the save still writing in {self.dir} from an earlier Checkpoints failed "
                         f"({_reason(e)})")
        self._report_incomplete()
        self._handlers = handlers = {"state": array_tree_handler(), "meta": ocp.JsonCheckpointHandler(),
                                     "loader": grain.checkpoint.CheckpointHandler()}
        if read_only:
            if not self.dir.is_dir():
                raise FileNotFoundError(f"{self.dir} does not exist: pass a run's --out directory")
            # (not orbax's read_only=True, which logs two warnings at every open: this never saves or deletes).
            # lightweight: no metrics are read at the open (a reader keeps no best step), so a metrics file a power
            # loss left empty, which a reader may not set aside, does not stop it with a JSONDecodeError
            opts = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False,
                                                enable_async_checkpointing=False, lightweight_initialize=True)
            self.mgr = ocp.CheckpointManager(self.dir, options=opts, item_handlers=handlers)
            return
        self._set_aside_unreadable_metrics()  # with keep_best or not: orbax reads every metrics file at the open
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                                          keep_checkpoints_without_metrics=False))
        # best_fn makes orbax write the metrics to disk: without it a restarted run reads every old checkpoint
        # back without metrics, and BestN (keep_checkpoints_without_metrics=False) dropped the best at the next save
        best = dict(best_fn=lambda m: m["eval_loss"], best_mode="min") if keep_best else {}
        opts = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save, **best)
        # explicit handlers: item metadata (saved shapes) is readable before anything is restored
        self.mgr = ocp.CheckpointManager(self.dir, options=opts, item_handlers=handlers)
        _WRITERS[self._writer_key] = _WRITER_DIRS[str(self.dir)] = self.mgr
        if async_save:
            _finish_at_exit(self)

    def _report_incomplete(self):
        if jax.process_index() == 0 and self.dir.is_dir():
            tmp = sorted(p.name for p in self.dir.iterdir() if ".orbax-checkpoint-tmp" in p.name)
            if tmp:  # a reader runs beside a writer: there it is usually the writer's save in progress
                why = "the run's save in progress, or one cut short" if self.read_only else "interrupted while writing"
                self.log(f"checkpoint: ignoring incomplete save(s) {', '.join(tmp)} ({why})")

    def _set_aside_unreadable_metrics(self):
        """A step whose metrics file does not parse (zero-length after a power loss) stopped every restart: orbax
        reads all of them when the manager opens. The file is moved aside; the step stays restorable, but without
        its eval loss it no longer counts as the best. So is a NaN eval loss (saved before `save` kept non-finite
        ones out): BestN ranked it best and deleted the real best step."""
        if jax.process_index() == 0 and self.dir.is_dir():
            for f in sorted(self.dir.glob("*/metrics/metrics")):
                try:
                    m = json.loads(f.read_text(encoding="utf-8"))
                    ok = isinstance(m, dict) and not (isinstance(m.get("eval_loss"), float) and math.isnan(
                        m["eval_loss"]))
                except (ValueError, OSError):
                    ok = False
                if not ok:
                    step, dst = f.parent.parent.name, self._corrupt_path(f"{f.parent.parent.name}-metrics")
                    self.log(f"checkpoint: step {step}'s saved eval metrics are unreadable or NaN; set aside in {dst} "
                             "(the step stays restorable, no longer as best)")
                    os.replace(f.parent, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint-metrics")

    def _corrupt_path(self, name: str) -> pathlib.Path:
        """A free path `<dir>-corrupt/<name>[-n]` (an earlier one of the same name is kept)."""
        root = self.dir.parent / f"{self.dir.name}-corrupt"
        root.mkdir(parents=True, exist_ok=True)
        dst, n = root / name, 1
        while dst.exists():
            dst, n = root / f"{name}-{n}", n + 1
        return dst

    # ---- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, state, meta: dict, eval_loss: float | None = None, loader=None) -> None:
        """Start an async save of `state` (+ JSON `meta`, + this process's `loader` state) at `step`; raises
        NonFiniteState instead of saving NaN/Inf, and ValueError for a step not past every step already saved (or not
        a whole number: a float step's directory was never listed again).
        Returns once the arrays are copied off the devices (training may then donate them) and the loader state is
        written."""
        if self.read_only:
            raise PermissionError(f"checkpoint: {self.dir} was opened read_only; open it without to save")
        step = _step_number(step, "Checkpoints.save")
        # a loop rewound to an older step (restore(step=...)) saved below the steps it gave up: restore() then
        # resumed from the newest of those, not from this save, and keep-N (by save order) had deleted the older
        # steps and kept the newer ones. The same step again failed in orbax ("Checkpoint for step 8 already exists")
        if newer := sorted(s for s in self.mgr.all_steps() if s >= step):
            raise ValueError(f"Checkpoints.save: step {step} is not past the steps already saved in {self.dir} "
                             f"({newer}); restore() resumes from the newest step, so this save would be passed over. "
                             "To train on from an older step, move the newer steps out of that directory first "
                             "(or save into another one)")
        # a jax / numpy scalar (a hand-written loop's eval loss) as a number: orbax's JSON writer refused it
        eval_loss = None if eval_loss is None else _loss_number(eval_loss)
        pure = to_pure(state)
        _jax_leaves(pure, "save state")
        _global_leaves(pure, "save state")
        if not bool(all_finite(state)):
            raise NonFiniteState(f"checkpoint: refusing to save step {step}: the state has NaN/Inf values")
        whole, parts = part_fingerprints(pure)
        meta = dict(meta, step=int(step), fingerprint=whole, part_fingerprints=parts, eval_loss=eval_loss,
                    loader_saved=loader is not None)
        # only a finite eval loss competes for best: orbax's BestN sorted a NaN one (a diverged model whose
        # parameters are still finite) as the best and deleted the real best step
        metrics = None if eval_loss is None or not math.isfinite(eval_loss) else {"eval_loss": float(eval_loss)}
        items = dict(state=ocp.args.PyTreeSave(pure), meta=ocp.args.JsonSave(meta))
        if loader is not None:
            items["loader"] = grain.checkpoint.CheckpointSave(_LoaderItem(loader))
        with self._save_errors():  # orbax waits here for the previous async save, which may have failed
            self.mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    @contextlib.contextmanager
    def _save_errors(self):
        """A failed write (raised by orbax once, at the next save or wait) as one CheckpointSaveFailed line: it was
        a ValueError from deep inside orbax's writer, naming a tensorstore chunk file, whose cause (ENOSPC) was
        the last words of a 700-character line."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - whatever orbax's writer raised: the save did not complete
            inner = e
            while inner.__cause__ is not None:
                inner = inner.__cause__
            why, tail = _reason(e), str(inner).strip().rsplit(": ", 1)[-1][:120]  # (tensorstore's os error: last)
            good = self.steps()  # finalised steps only: the failed one is a temporary directory
            raise CheckpointSaveFailed(
                f"checkpoint: a save into {self.dir} failed ({why}{'' if tail in why else f' ... {tail}'}); a rerun "
                f"resumes from {f'step {good[-1]}' if good else 'scratch (no step was saved)'}: first mend the cause "
                "(a full disk: free space there; read-only: make it writable)") from e

    def wait(self):
        with self._save_errors():
            self.mgr.wait_until_finished()

    def close(self):
        try:
            with self._save_errors():
                self.mgr.wait_until_finished()
        finally:
            self.mgr.close()
            if _WRITERS.get(self._writer_key) is self.mgr:
                del _WRITERS[self._writer_key]
            if _WRITER_DIRS.get(str(self.dir)) is self.mgr:
                del _WRITER_DIRS[str(self.dir)]

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    # ---- restore ---------------------------------------------------------------------------------------------
    def restore(self, template, step: int | None = None, check=None, loader=None, quarantine: bool = True,
                other=None):
        """Restore the newest good checkpoint (or `step`) onto the shardings of `template` (the state on the current
        mesh, any device count: freshly initialised arrays, or ShapeDtypeStructs with shardings, so that no
        throwaway state is allocated beside the restored one). Returns (state, meta) or None.

        A dict template may hold only some of the saved state's top-level entries (a model's params without its
        optimizer state, say): only those are read, each verified by its own checksum.
        Dtypes: arrays are read and verified as saved, then cast to the template's (bf16 saved, float32 template: exact;
        float32 saved, bf16 template: rounded); a cast that would turn finite values into inf (float32 beyond 65504
        into float16; NaN in float8_e4m3fn, which has no inf) raises CheckpointMismatch naming the array, and the
        checkpoint stays where it is.
        check(meta): called with the saved meta before any array is read; raise CheckpointMismatch to refuse.
        loader: also set its state to this process's saved one (older checkpoints: `meta["loader"]`, process 0's
        alone, refused with several processes); a step saved with a loader state that is now missing is corrupt, one
        saved without raises CheckpointMismatch, one saved by another process count too.
        An unreadable checkpoint or one whose fingerprint differs is reported, moved aside (unless `quarantine` is
        False: a reader beside a running job must not move its files), and the previous one is tried; a readable
        one that does not fit (other array paths or shapes) raises CheckpointMismatch and stays where it is. The
        arrays are placed by path: a saved tree whose empty nodes (optax's EmptyState, MaskedState of one, None)
        sit elsewhere, or whose namedtuple fields come in another order, restores into `template`'s tree.
        other(step): reads a step saved in an older layout this class does not (the video trainer's one item per
        tree), returning (state, meta), or None for a step of this layout; such a step is tried in its turn (a
        fallback from a corrupt newer step reaches it) and never set aside."""
        quarantine = quarantine and not self.read_only
        step = None if step is None else _step_number(step, "Checkpoints.restore")
        abstract = _onto_one_mesh(abstract_of(to_pure(template)))
        if step is not None and step not in self.mgr.all_steps():
            return None
        candidates = [step] if step is not None else sorted(self.mgr.all_steps(), reverse=True)
        fallback = None if step is not None else candidates  # a step asked for by number: no other is tried
        for s in candidates:
            try:  # an older-layout step that fails to read is corrupt too: its raw orbax error ended the run
                got = None if other is None else other(s)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - as below: do not use it, fall back
                self._corrupt(s, fallback, e, quarantine)
                continue
            if got is not None:
                return got
            try:
                meta = dict(self.mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
                if meta.get("step") != s:  # another step's checkpoint copied here: good arrays, the wrong step
                    raise ValueError(f"its meta is step {meta.get('step')}'s, not {s}'s")
                if (item := self.mgr.item_metadata(s)["state"]) is None:  # orbax's for a state/ without _METADATA
                    raise FileNotFoundError(f"{self.dir / str(s) / 'state'} has no readable array metadata")
                saved = item.tree
                has_loader = (self.dir / str(s) / "loader").is_dir()
            except Exception as e:  # noqa: BLE001 - no readable meta or metadata: not a checkpoint to use
                self._corrupt(s, fallback, e, quarantine)
                continue
            if check is not None:
                check(meta)
            partial = (isinstance(abstract, dict) and isinstance(saved, dict) and set(abstract) < set(saved)
                       and isinstance(meta.get("part_fingerprints"), dict))
            if partial:
                saved = {k: saved[k] for k in abstract}
            check_fits(saved, abstract, self.dir / str(s))
            if loader is not None and not has_loader and "loader" not in meta:  # (older: the state in meta)
                if meta.get("loader_saved") is False:
                    raise CheckpointMismatch(f"{self.dir / str(s)} was saved without a data loader state; restore "
                                             "it with loader=None (and position the loader yourself)")
                self._corrupt(s, fallback, FileNotFoundError(f"{self.dir / str(s) / 'loader'} is missing"),
                              quarantine)
                continue
            if loader is not None and has_loader:
                self._check_processes(s)
            elif loader is not None and jax.process_count() > 1:  # one state (in meta) for every process's loader
                raise CheckpointMismatch(
                    f"{self.dir / str(s)}: its data loader state predates per-process loader states (one state, "
                    f"process 0's), which cannot position the loaders of this run's {jax.process_count()} processes "
                    "(each reads its own documents); resume it on one process if it was saved by one, or use a "
                    "new checkpoint directory")
            try:
                # read in the saved tree's own structure, then placed by path: orbax refuses a template whose empty
                # nodes (EmptyState, MaskedState of one, None) sit elsewhere, a regrouped optax chain of the same arrays
                item = _by_paths(_with_saved_dtypes(abstract, saved), saved)
                out = {"state": _by_paths(self._read_agreed(s, "state", tree_restore_args(item, partial=partial)),
                                          abstract)}
                whole, parts = part_fingerprints(out["state"], _saved_order(self.dir / str(s) / "state", abstract))
                got, want = (parts, {k: meta["part_fingerprints"].get(k) for k in parts}) if partial else (
                    whole, meta.get("fingerprint"))
                if got != want:
                    raise ValueError(f"checksum {got} != saved {want}")
                overflow = _overflowing_casts(out["state"], abstract)
                out = {"state": jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype),
                                             out["state"], abstract)}
                # the loader only once the state is known good: a bad step must not move the data stream
                if loader is not None and has_loader and not overflow:
                    before = loader.get_state()
                    try:
                        self._read_agreed(s, "loader", grain.checkpoint.CheckpointRestore(_LoaderItem(loader)))
                    except Exception:
                        loader.set_state(before)  # moved here, but another process's file failed: not this step's
                        raise
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: do not use it
                if mismatch := _stream_mismatch(e):  # a good checkpoint of another data stream: the run's error
                    raise CheckpointMismatch(f"{self.dir / str(s)}: {mismatch}") from None
                self._corrupt(s, fallback, e, quarantine)
                continue
            if overflow:  # a good checkpoint that this template's dtypes cannot hold: the caller's error, kept
                # what the casts make: inf (float16), NaN (float8_e4m3fn, which has no inf), or both
                made = " or ".join(w for w in ("inf", "NaN") if any(b.endswith(f"be {w})") for b in overflow))
                wraps = any(b.endswith("around)") for b in overflow)
                what = " and ".join(([f"turn finite values into {made}"] if made else [])
                                    + (["wrap integers around"] if wraps else []))
                raise CheckpointMismatch(f"{self.dir / str(s)}: restoring into this template's dtypes would {what}: "
                                         f"{'; '.join(overflow[:3])}; restore into a template of the saved dtypes (or "
                                         "bfloat16, of float32's range)")
            if loader is not None and not has_loader:
                try:
                    loader.set_state(meta["loader"])  # written before per-process loader states (one process)
                except StreamMismatch as e:
                    raise CheckpointMismatch(f"{self.dir / str(s)}: {e}") from None
            return from_pure(template, out["state"]), meta
        return None

    def _read_agreed(self, step: int, item: str, args):
        """Read `item` of `step` with its handler, then agree across processes that every one read its part.
        Each process reads only its own shards (and its own loader file), so one damaged file fails one process's
        read: through the manager (whose restore ends in a barrier) that process went on to `_quarantine`'s barrier
        while the others waited in orbax's, both hung for good (measured: > 200 s). The handler has no barrier:
        the processes agree here by all-gathering each one's error text, and every process raises the same error: a
        StreamMismatch if any process's loader state is another stream's (a config error: the others had fallen
        back, set the good step aside and hung in `_quarantine`'s barrier), else a _ReadFailed naming each failing
        process and why (the primary logs it; a process's own reason was logged nowhere)."""
        error = None
        try:
            got = self._handlers[item].restore(self.dir / str(step) / item, args=args)
        except Exception as e:  # noqa: BLE001 - raised below, once every process knows
            error = e
        if jax.process_count() > 1:
            from parallel.distributed import process_texts

            mismatch = _stream_mismatch(error)
            # "" read; "M<text>" another stream; "E<reason>" a failed read
            texts = process_texts("" if error is None else f"M{mismatch}" if mismatch else f"E{_reason(error)}")
            if mismatched := [p for p, t in enumerate(texts) if t.startswith("M")]:
                raise StreamMismatch(f"process {mismatched[0]}: {texts[mismatched[0]][1:]}")
            if failed := [p for p, t in enumerate(texts) if t]:
                raise _ReadFailed(f"{item}: the read failed on processes {failed} (" + "; ".join(
                    f"process {p}: {texts[p][1:]}" for p in failed) + "); every process falls back with them")
        if error is not None:
            raise error
        return got

    def _check_processes(self, step: int):
        n = jax.process_count()
        names = sorted(p.name for p in (self.dir / str(step) / "loader").glob("process_*.json"))
        if names and not any(x.endswith(f"-of-{n}.json") for x in names):
            saved = names[0].split("-of-")[1][:-5]
            raise CheckpointMismatch(
                f"{self.dir / str(step)}: the data loader states were saved by {saved} process"
                f"{'es' * (saved != '1')}, this run has {n}; resume with the same number of processes")

    def _corrupt(self, s: int, candidates: list[int] | None, e: Exception, quarantine: bool = True):
        """Report (and unless `quarantine` is off, set aside) bad step `s`; candidates: the steps restore tries
        in turn, None for a step asked for by number."""
        older = [x for x in candidates or [] if x < s]
        nxt = ("not restored (the step asked for: no other step is tried)" if candidates is None else
               f"falling back to step {older[0]}" if older else "no older checkpoint: starting fresh")
        nxt = nxt if quarantine else "left in place"
        # an agreed error is already each process's short reason (not cut again: the later ones were lost)
        why = f"OSError: {e}" if isinstance(e, _ReadFailed) else _reason(e)
        self.log(f"checkpoint: step {s} is corrupt or incomplete ({why}); {nxt}")
        if quarantine:
            self._quarantine(s)

    def _quarantine(self, step: int):
        """Move a bad step out of the manager's directory, so it is never listed or overwritten again. An earlier
        quarantined copy of the same step number is kept: the new one gets the next free `<step>-<n>` name."""
        if jax.process_index() == 0:
            src = self.dir / str(step)
            if src.exists():
                os.replace(src, self._corrupt_path(str(step)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.mgr.reload()


def _finish_at_exit(ckpt: Checkpoints) -> None:
    """Wait for `ckpt`'s async save still writing when the interpreter shuts down (a script that never called
    close()): orbax's writer thread then failed with 'cannot schedule new futures after interpreter shutdown' and the
    step was lost, left as `<step>.orbax-checkpoint-tmp`. atexit runs too late (after concurrent.futures stops
    taking work); threading's own exit hooks run before, newest first. Holds the orbax manager weakly, not `ckpt`:
    its writer keeps it alive while a save is in flight, also after a `Checkpoints` dropped without close(); a closed
    one is not kept alive. A failed save is reported, not raised: that ended threading's exit hooks, and the
    saves of the managers made before it were lost."""
    ref, log, where = weakref.ref(ckpt.mgr), ckpt.log, ckpt.dir

    def finish():
        if (mgr := ref()) is not None:
            try:
                mgr.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - the other managers' hooks must still run
                log(f"checkpoint: the save still writing in {where} at exit failed ({_reason(e)})")

    getattr(threading, "_register_atexit", lambda fn: None)(finish)


class _ReadFailed(OSError):
    """A read that failed on some processes, agreed on every process (`Checkpoints._read_agreed`)."""


def _step_number(step, who: str) -> int:
    """`step` as an int (a Python / numpy integer, or a 0-d integer array: the state's own step); a ValueError naming
    it and `who` (the caller, e.g. "Checkpoints.save") otherwise. orbax names a step's directory str(step): a float
    step wrote '4.0', which no manager lists again (the resumed run started fresh), and a str or bool one was never
    found."""
    if getattr(step, "ndim", None) == 0 and not isinstance(step, numbers.Number):
        step = step.item()  # a 0-d float array stays a float (refused below)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{who}: step={step!r} must be a whole number >= 0 (an int, numpy integer or "
                         "0-d integer array); a step from a division is a float: pass int(step) or use //")
    return int(step)


def _loss_number(loss) -> float:
    """`loss` (a number or a 0-d array) as a float; a ValueError naming it otherwise: a [1] array failed in float()
    naming neither, and a bool was ranked as a loss of 0 or 1."""
    x = loss.item() if getattr(loss, "ndim", None) == 0 and not isinstance(loss, numbers.Number) else loss
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        shape = f" of shape {tuple(loss.shape)}" if hasattr(loss, "shape") else ""
        raise ValueError(f"Checkpoints.save: eval_loss={loss!r}{shape} must be one number (a float or 0-d array), "
                         "or None; pass the mean eval loss, e.g. float(losses.mean())")
    return float(x)


def _reason(e: BaseException) -> str:
    """'Type: first line' of the innermost cause of `e`, at most 160 characters of text."""
    while e.__cause__ is not None:  # orbax wraps a failed chunk read in an Exception naming only a slice
        e = e.__cause__  # ('... See full TensorStore details: <bound method ...'): tensorstore's error names both
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


def _path_keys(path) -> tuple[str, ...]:
    # each key as text: orbax stores namedtuples (optax states) as dicts and may stringify int keys. Not joined: a key
    # "a/b" beside {"a": {"b": ...}} made one name, and their arrays were swapped or the checksum failed
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _path_name(path) -> str:
    return "/".join(_path_keys(path))


@jax.jit
def _leaf_peaks(leaves):
    return [jnp.max(jnp.abs(x)) for x in leaves]


def _leaf_ranges(leaves):
    return [jnp.stack([jnp.min(x), jnp.max(x)]) for x in leaves]


def _overflowing_casts(restored, abstract) -> list[str]:
    """'path: saved dtype (max |value|), now dtype ...' for each restored floating array whose cast to the template's
    narrower-ranged dtype (float32 -> float16) would turn a finite value into inf (NaN in a float8 without inf), and
    each integer array whose values the template's integer dtype cannot hold (int64 beyond int32, saved under
    jax_enable_x64: the cast wraps them around); [] when none. The maxima (integers: min and max) are taken where the
    arrays live; one or two numbers per such array come to the host."""
    wider = lambda a, b: jnp.iinfo(a).min < jnp.iinfo(b).min or jnp.iinfo(a).max > jnp.iinfo(b).max  # noqa: E731
    ints = [(_path_name(p), x, a.dtype) for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                                            jax.tree.leaves(abstract))
            if jnp.issubdtype(x.dtype, jnp.integer) and jnp.issubdtype(a.dtype, jnp.integer) and x.size
            and wider(x.dtype, a.dtype)]
    wrapped = []
    for (name, x, to), (lo, hi) in zip(ints, per_device_set(_leaf_ranges, [x for _, x, _ in ints]) if ints else []):
        if lo < jnp.iinfo(to).min or hi > jnp.iinfo(to).max:
            wrapped.append(f"{name}: saved {x.dtype} (values {lo} to {hi}), now {jnp.dtype(to).name}, which holds "
                           f"{jnp.iinfo(to).min} to {jnp.iinfo(to).max} (it would wrap around)")
    pairs = [(_path_name(p), x, a.dtype) for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                                             jax.tree.leaves(abstract))
             if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(a.dtype, jnp.floating) and x.size
             and jnp.finfo(x.dtype).max > jnp.finfo(a.dtype).max]
    if not pairs:
        return wrapped
    peaks = per_device_set(_leaf_peaks, [x for _, x, _ in pairs])
    bad = wrapped
    for (name, x, to), peak in zip(pairs, peaks):
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what we look for
            # not isinf: float8_e4m3fn has no inf, and a value beyond its 448 became NaN, silently
            if np.isfinite(peak) and not np.isfinite(cast := np.asarray(peak).astype(to)):
                bad.append(f"{name}: saved {x.dtype} (max |value| {float(peak):.6g}), now {jnp.dtype(to).name}, "
                           f"whose largest is {float(jnp.finfo(to).max):.6g} (it would be "
                           f"{'inf' if np.isinf(cast) else 'NaN'})")
    return bad


def _by_paths(tree, like):
    """`like`'s tree (its empty nodes included) holding the leaves of `tree` at the same paths."""
    got = {_path_keys(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return jax.tree_util.tree_map_with_path(lambda path, _: got[_path_keys(path)], like)


def _saved_order(state_dir: pathlib.Path, abstract) -> list[tuple[str, ...]]:
    """The paths (`_path_keys`) of `abstract`'s leaves in the order the saved tree flattened (its checksum's order).
    orbax's array metadata is a tree of dicts, sorted; its `_METADATA` lists the saved keys in order. `abstract`'s own
    order when that does not name exactly these arrays."""
    names = [_path_keys(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    try:
        saved = [tuple(str(k["key"]) for k in v["key_metadata"])
                 for v in json.loads((state_dir / "_METADATA").read_text(encoding="utf-8"))["tree_metadata"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return names
    want = set(names)
    order = [n for n in saved if n in want]
    return order if sorted(order) == sorted(names) else names


def _with_saved_dtypes(abstract, saved):
    """`abstract` with each array's dtype as saved: the checksum is over the saved bits, so a state whose dtype
    changed since (e.g. an MoE router bias now kept in float32) is verified as saved, then cast."""
    dtypes = {_path_name(path): getattr(v, "dtype", None) for path, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    return jax.tree_util.tree_map_with_path(lambda path, a: jax.ShapeDtypeStruct(
        a.shape, dtypes.get(_path_name(path)) or a.dtype, sharding=a.sharding), abstract)


def _onto_one_mesh(abstract):
    """Template leaves on one device (scalars made with jnp.zeros, say) beside leaves on a mesh: replicated on that
    mesh, so the restored state steps there (restored as they are, they stay committed to device 0)."""
    meshes = [a.sharding.mesh for a in jax.tree.leaves(abstract) if isinstance(a.sharding, NamedSharding)]
    if not meshes:
        return abstract
    rep = NamedSharding(meshes[0], P())
    return jax.tree.map(lambda a: a if isinstance(a.sharding, NamedSharding) else
                        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)


def check_fits(saved, abstract, where) -> None:
    """Raise CheckpointMismatch unless the saved arrays (orbax metadata) have the template's paths and shapes
    (not dtypes: they are restored as saved and cast)."""
    def table(tree):
        return {_path_name(path): tuple(v.shape) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = table(saved), table(abstract)
    differ = [f"{k}: saved {have.get(k, 'missing')}, now {want.get(k, 'missing')}"  # the model's before the
              for k in sorted(set(have) | set(want), key=lambda k: (k.startswith("opt_state"), k))  # optimizer's
              if have.get(k) != want.get(k)]
    kinds = {_path_name(p): v.dtype for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    differ += [f"{_path_name(p)}: saved {kinds[_path_name(p)]}, now {v.dtype} (a cast would truncate it)"
               for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]
               if _path_name(p) in kinds and jnp.issubdtype(kinds[_path_name(p)], jnp.floating)
               and not jnp.issubdtype(v.dtype, jnp.inexact)]
    # float64 / int64 arrays (saved under jax_enable_x64) read as float32 / int32 without it: their checksum then
    # differed and a good checkpoint was set aside as corrupt
    if wide := [f"{k}: saved {d}" for k, d in kinds.items() if jax.dtypes.canonicalize_dtype(d) != d]:
        raise CheckpointMismatch(f"{where} holds arrays saved under jax_enable_x64 ({'; '.join(wide[:3])}), which "
                                 "this process, without it, cannot read as saved (nor verify); restore it with "
                                 "jax.config.update('jax_enable_x64', True) (they are then cast to this template's "
                                 "dtypes)")
    strip = lambda names: {k.removesuffix("/value") for k in names}  # noqa: E731  (an nnx.Variable's own step)
    if differ and set(have) != set(want) and strip(have) == strip(want):
        raise CheckpointMismatch(f"{where} holds the same arrays as this template, but one of them is a built model "
                                 "(nnx.Module / Variables) and the other its state: save and restore the same kind, "
                                 "e.g. nnx.state(model) (restore(nnx.state(model)) for a model saved as its state)")
    if differ:
        raise CheckpointMismatch(f"{where} does not fit this run's state ({len(differ)} arrays differ, e.g. "
                                 f"{'; '.join(differ[:3])}); use another checkpoint directory (train.out in "
                                 "experiments.train_lm, --out in experiments.train_video), or the settings it was "
                                 "saved with")


def read_meta(directory, step: int) -> dict:
    """The JSON meta of a saved step, without restoring arrays (for tools and tests)."""
    path = pathlib.Path(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text(encoding="utf-8"))


def mesh_axes(mesh) -> dict[str, int]:
    """The mesh's axis sizes, those of 1 left out (they split nothing), as the trainers record it in a checkpoint's
    meta."""
    return {k: int(v) for k, v in mesh.shape.items() if v > 1}


def other_mesh_note(meta: dict, mesh, dtype: str = "float32") -> str:
    """A note when a run resumes on another mesh (device count or axis sizes) than its checkpoint was saved on:
    the sharded sums reduce in another order, so the run goes on differing from an uninterrupted one in the last
    digits of its compute `dtype` (float32; bfloat16 compute rounds each sum to bfloat16: measured on the tiny LM,
    losses up to 5e-5 apart, float32's up to 1e-6, 2 ulps of its losses near 5, resumed on 1 or 4 devices); a
    checkpoint saved before the mesh was recorded: no note."""
    was, now = meta.get("mesh"), mesh_axes(mesh)
    if was is None or dict(was) == now:
        return ""
    def words(axes: dict) -> str:
        n = math.prod(axes.values())
        return f"{axes} ({n} device{'s' * (n != 1)})" if axes else "one device"
    return (f"; note: saved on {'mesh ' * bool(was)}{words(dict(was))}, resumed on {words(now)}: sums over the sharded "
            "axes reduce in another order, so from here on this run differs from an uninterrupted one in the last "
            f"{dtype} digits" + ("" if dtype == "float32" else " (its compute dtype)"))
