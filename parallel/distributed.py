"""Multi-process set-up: initialise `jax.distributed`, split the data per process, write once.

One process per host (TPU VM, GPU node) or per GPU. The coordinator comes from, in order: explicit
arguments; the environment (`JAXSCALE_COORDINATOR`, `JAXSCALE_NUM_PROCESSES`, `JAXSCALE_PROCESS_ID`);
JAX's own cluster detection (TPU pods, SLURM, Open MPI); otherwise this is a single process.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import jax
import numpy as np

from parallel.sharding import batch_sharding, check_fits_x32

_CLUSTER_MARKERS = ("OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
# What JAX's SLURM detection reads. SLURM_JOB_ID alone is a shell inside an allocation (salloc, sbatch script
# without srun): one process, and JAX would find no coordinator address.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 60, init_timeout_s: int = 300) -> bool:
    """Start `jax.distributed` when this job has several processes; returns True if it did. Called again once it
    runs (train_lm.main twice in one job, or after the caller's own jax.distributed.initialize): starts nothing,
    returns whether the job has several processes, and raises if num_processes / process_id are not the running ones.

    Must run before any other JAX call. Every process must ask for the same num_processes: JAX reads process 0's
    alone, so once the job runs each process compares the others' and all raise, naming the fix. If a peer dies,
    JAX's coordination service notices the missing heartbeats within `heartbeat_timeout_s` and terminates this
    process with a message naming the unhealthy task, so a job never hangs on a dead peer.
    """
    env = os.environ

    def from_env(name):
        try:
            return int(env[name]) if name in env else None
        except ValueError:
            raise ValueError(f"{name}={env[name]!r} must be an integer") from None

    explicit = {"num_processes": num_processes, "process_id": process_id}
    explicit_coordinator = coordinator or None
    coordinator = coordinator or env.get("JAXSCALE_COORDINATOR")
    num_processes = from_env("JAXSCALE_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = from_env("JAXSCALE_PROCESS_ID") if process_id is None else process_id
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_s, initialization_timeout=init_timeout_s)
    if coordinator is not None:
        missing = [n for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"coordinator {coordinator!r} given without {missing}; pass them or set "
                             "JAXSCALE_NUM_PROCESSES / JAXSCALE_PROCESS_ID")
        # numbers.Integral: a count computed with numpy (np.int64) was refused as if it were < 1; a bool is no count
        if not (all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (num_processes, process_id))
                and num_processes >= 1 and 0 <= process_id < num_processes):
            # each value by where it came from: an argument, or the environment's variable
            given = ", ".join(f"{arg if explicit[arg] is not None else var}={value!r}" for arg, var, value in (
                ("num_processes", "JAXSCALE_NUM_PROCESSES", num_processes),
                ("process_id", "JAXSCALE_PROCESS_ID", process_id)))
            raise ValueError(f"{given}: need ints with num_processes >= 1 and 0 <= process_id < num_processes "
                             "(process ids 0 .. N-1, each once)")
        num_processes, process_id = int(num_processes), int(process_id)
    if jax.distributed.is_initialized():  # a second call (train_lm.main run twice in one job, or after jax's own)
        return _started_as(num_processes, process_id)
    if coordinator is not None:
        if num_processes == 1:
            return False
        # on every process: process 1 of 'host' (no port) died in jax with an IndexError, and of 'host:abc' /
        # 'host:0' / 'host:70000' waited init_timeout_s (300 s) for a service process 0 never started
        port = _coordinator_port(coordinator, "JAXSCALE_COORDINATOR" if explicit_coordinator is None else "coordinator")
        if process_id == 0:  # jax's 'Failed to start RPC server' names no port; the others would wait 300 s
            _check_port_free(coordinator, port)
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        _check_counts(num_processes, "num_processes" if explicit["num_processes"] is not None
                      else "JAXSCALE_NUM_PROCESSES")
        return True
    slurm = all(v in env for v in _SLURM_STEP)
    # from_env: a SLURM_NTASKS that is no integer named (int() raised a bare "invalid literal for int()").
    # Open MPI's rank count first: `mpirun -n 1` (inside an allocation too, whose SLURM_NTASKS counts its slots)
    # is one process, but was started as a job: under Open MPI 5, whose mpirun sets no OMPI_MCA_orte_hnp_uri,
    # jax.distributed.initialize() found no coordinator and raised "coordinator_address should be defined"
    ntasks = from_env("OMPI_COMM_WORLD_SIZE" if "OMPI_COMM_WORLD_SIZE" in env else "SLURM_NTASKS")
    # (absent: TPU pods and multislice, whose markers name no count)
    if (slurm or any(m in env for m in _CLUSTER_MARKERS)) and (2 if ntasks is None else ntasks) > 1:
        jax.distributed.initialize(**timeouts)  # JAX detects TPU pods, SLURM and Open MPI itself
        return True
    if (num_processes or 1) > 1 or (process_id or 0) > 0:  # every process would train alone, each "primary"
        raise ValueError(f"num_processes={num_processes}, process_id={process_id} given without a coordinator; "
                         "pass coordinator='host:port' or set JAXSCALE_COORDINATOR (the address of process 0)")
    return False


def _started_as(num_processes: int | None, process_id: int | None) -> bool:
    """jax.distributed already runs in this process: whether it is a job of several processes, or a ValueError
    if it is not the one asked for. Started again, process 0 named its own coordinator's port as taken ("another
    job"), the others failed in jax ("should only be called once")."""
    for name, asked, running in (("num_processes", num_processes, jax.process_count()),
                                 ("process_id", process_id, jax.process_index())):
        if asked is not None and asked != running:
            raise ValueError(f"{name}={asked}, but jax.distributed already runs here with {name}={running} (started "
                             "earlier in this process); pass the values it was started with")
    return jax.process_count() > 1


def _check_counts(asked: int, name: str) -> None:
    """Once jax.distributed runs: a ValueError on every process unless every process asked for the job's process
    count (process 0's). JAX takes the count from process 0's coordinator alone, so a process started with another
    `name` (a typo on one host, 3 where process 0 has 2) joined and trained silently. Every process calls it."""
    n = jax.process_count()
    if n == 1:  # nothing joined (a stand-in for jax.distributed): nothing to compare
        return
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.int32(asked)))  # [processes]
    if others := [p for p in range(every.shape[0]) if every[p] != n]:
        raise ValueError(f"{name}: processes {others} were started with "
                         f"{', '.join(str(int(every[p])) for p in others)} processes, but the job's coordinator "
                         f"(process 0) has {n}; start every process with {name}={n}")


def _coordinator_port(coordinator: str, name: str) -> int:
    """The port of `coordinator` ('host:port', the value of `name`): a ValueError unless it is one in 1..65535
    (port 0 would let process 0's OS pick one that no other process knows)."""
    _, sep, port = coordinator.rpartition(":")
    if not (sep and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{name}={coordinator!r}: give the coordinator as host:port, a port in 1..65535 "
                         "(JAXSCALE_COORDINATOR=host0:1234)")
    return int(port)


def _check_port_free(coordinator: str, port: int) -> None:
    """Process 0 serves the coordinator on `port`: a ValueError naming it if it is taken here."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as e:
            raise ValueError(f"coordinator {coordinator!r}: port {port} is in use on process 0's host ({e.strerror}: "
                             "another job, or an earlier run still exiting); choose another port") from None


def check_same_settings(settings: dict[str, str], what: str = "settings",
                        fix: str = "start every process with the same command line") -> None:
    """Every process must be started with the same `settings` (name -> canonical text, e.g. a run config's fields):
    a ValueError on every process naming the ones that differ and `fix`. Otherwise another mesh on one process hangs
    in the first collective, and another batch or learning rate trains on silently with each process's own. The
    field counts are all-gathered first, then each field's and each name's 4-byte hash, and the names themselves
    only where those differ (every process calls it at the same point)."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    names = sorted(settings)
    # the counts first: an all-gather of hash arrays of other lengths (another version of the code on one host)
    # aborted the process in Gloo ("Received data size doesn't match expected size") instead of raising
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(names))))  # [processes]
    if (counts != counts[0]).any():
        others = [p for p in range(counts.shape[0]) if counts[p] != counts[0]]
        raise ValueError(f"processes {others} were started with other {what} than process 0: their field lists "
                         f"differ ({', '.join(f'process {p} has {int(c)} fields' for p, c in enumerate(counts))}); "
                         "start every process with the same command line and the same version of the code")
    if not names:  # (on every process: the counts agree) nothing to compare, and no empty all-gather
        return

    def digest(text):
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little", signed=True)

    # each field's name=value, then its name: names of their own on each process (a renamed field) named each only
    # its own ("b differ" on process 0, "c differ" on process 1)
    mine = np.array([digest(f"{k}={settings[k]}") for k in names] + [digest(k) for k in names], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2 * fields]
    if (every[:, len(names):] != every[0, len(names):]).any():  # (every process gathered the same: all come here)
        lists = [set(t.split("\n")) for t in process_texts("\n".join(names), limit=None)]
        common = set.intersection(*lists)
        others = [p for p in range(len(lists)) if lists[p] != lists[0]]
        raise ValueError(f"processes {others} were started with other {what} than process 0: their field names "
                         "differ (" + "; ".join(f"process {p} has {', '.join(sorted(x - common)[:8])}"
                                                for p, x in enumerate(lists) if x - common)
                         + "); start every process with the same command line and the same version of the code")
    if differ := [k for j, k in enumerate(names) if (every[:, j] != every[0, j]).any()]:
        others = [p for p in range(every.shape[0]) if (every[p, :len(names)] != every[0, :len(names)]).any()]
        raise ValueError(f"processes {others} were started with other {what} than process 0: "
                         f"{', '.join(differ[:8])} differ; {fix}")


def is_primary() -> bool:
    """True on exactly one process: the one that logs and writes files."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (one 4-byte all-gather; no communication with one process).
    Every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def process_texts(text: str, limit: int | None = 4000) -> list[str]:
    """Every process's `text` (its first `limit` UTF-8 bytes; None: all), in process order, on every process: one
    all-gather of the lengths, then one of the bytes padded to the longest (none when every text is empty). Every
    process must call it at the same point."""
    data = text.encode()[:limit]
    if jax.process_count() == 1:
        return [data.decode(errors="ignore")]
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))  # [processes]
    if not lengths.any():
        return [""] * lengths.shape[0]
    mine = np.zeros(int(lengths.max()), np.uint8)  # one shape on every process: Gloo aborts on others
    mine[:len(data)] = np.frombuffer(data, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, longest]
    # errors="ignore": a character cut by `limit` is dropped, not a UnicodeDecodeError
    return [bytes(row[:n]).decode(errors="ignore") for row, n in zip(every, lengths)]


def check_shared_dir(path, what: str = "directory") -> None:
    """Every process must see `path` as one directory (orbax writes each process's shards into the checkpoint
    directory process 0 creates and commits; on a host's own disk the first save failed on the others and every
    process hung in it): a ValueError on every process naming the ones that do not see process 0's file there.
    Process 0 writes a file of a fresh random name (no host has a cached lookup of it) and removes it again; every
    process must call it at the same point, after process 0 created `path` (a `path` process 0 cannot write in,
    missing or read-only there, is a ValueError on every process naming process 0's error)."""
    if jax.process_count() == 1:
        return
    import secrets

    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    probe = os.path.join(path, f".jaxscale-shared-{token}")
    failed = ""
    if is_primary():
        try:
            with open(probe, "w", encoding="utf-8"):
                pass
        except OSError as e:  # raised on process 0 alone, it left the others in the barrier below, for good
            failed = f"{type(e).__name__}: {e.strerror or e}"
    # process 0's outcome, on every process: the all-gather is also the barrier before the others look
    if failed := process_texts(failed, limit=400)[0]:
        raise ValueError(f"{what} {path}: process 0 cannot write a file there ({failed}); create it on process 0, "
                         "writable by this job, before every process checks it")
    every = np.asarray(multihost_utils.process_allgather(np.int32(os.path.exists(probe))))  # once all have looked
    if is_primary():
        os.remove(probe)
    if missing := [p for p in range(every.shape[0]) if not every[p]]:
        raise ValueError(f"{what} {path}: processes {missing} do not see process 0's files there; every process "
                         "must write into one directory (a shared filesystem: NFS, Lustre, a bucket mount)")


def process_rows(global_batch: int, mesh=None, rules=None, local_devices=None) -> slice:
    """This process's rows of a global batch (contiguous, equal shares): with `mesh`, the rows its devices hold of
    a [global_batch, ...] batch (what `global_batch_from_local` puts them at); without, rows [i·B/n, (i+1)·B/n) of
    process i, the same only where the mesh orders the processes by index along the batch axes (make_mesh's dcn=
    does; a mesh over devices in another order, or a TPU pod's physical layout, need not: the global batch is then
    a silent permutation of the host batch, its rows no longer beside the host's labels or prompts).
    local_devices: this process's (default), or a layout to check."""
    n, i = jax.process_count(), jax.process_index()
    # numbers.Integral: a size computed with numpy (np.int64) is an int here, as make_mesh's axis sizes are
    if isinstance(global_batch, bool) or not isinstance(global_batch, numbers.Integral) or global_batch < 1:
        raise ValueError(f"process_rows: global_batch={global_batch!r} must be an int >= 1")
    global_batch = int(global_batch)
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} must be divisible by the process count {n}")
    per = global_batch // n
    if mesh is None:
        return slice(i * per, (i + 1) * per)
    local = set(jax.local_devices() if local_devices is None else local_devices)
    indices = [ix for d, ix in batch_sharding(mesh, 1, rules, shape=(global_batch,)).devices_indices_map(
        (global_batch,)).items() if d in local]
    check_process_share(indices, (global_batch,), per, dict(mesh.shape))  # contiguous, exactly `per` rows
    start = min(ix[0].start or 0 for ix in indices)
    return slice(start, start + per)


def global_batch_from_local(local_batch, mesh, rules=None):
    """Assemble global [B, T, ...] arrays from each process's [B / processes, T, ...] rows.

    The mesh must give every process a slice of its own along the batch axes and all of T (processes on the
    batch axes, e.g. `make_mesh(..., dcn={'data': n})`); otherwise, e.g. with 'tensor' or 'sequence' across
    processes, the processes' different rows would be replicated or concatenated along T: a ValueError says so.
    Every process must pass as many rows (one global shape); nothing here compares them (that takes a collective).
    With other counts (a partial last batch on one process) the processes build arrays of other global shapes:
    measured, a wrong sum on one process, then a Gloo abort or time-out in the next collective.
    """
    n = jax.process_count()

    def one(x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"global_batch_from_local: a scalar {x!r}; every entry needs this process's rows [b, ...]")
        check_fits_x32(x, f"global_batch_from_local: a local array {x.shape}")
        global_shape = (x.shape[0] * n, *x.shape[1:])
        try:  # the library's named error, not JAX's IndivisibleError
            sharding = batch_sharding(mesh, x.ndim, rules, shape=global_shape)
        except ValueError as e:
            raise ValueError(f"global_batch_from_local: a local array {x.shape} ({n} processes): {e}") from None
        _check_sharding_share(sharding, global_shape, x.shape[0])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local_batch)


def check_batch_layout(mesh, global_batch: int, seq: int, n_processes: int | None = None, local_devices=None,
                       hint: str | None = None, rules=None) -> None:
    """Before anything compiles: raise (as `check_process_share`) unless this process's devices of `mesh` hold a
    contiguous 1/n of a [global_batch, seq] batch's rows, the rows it loads itself (a `stage` or `tensor` axis
    outside the batch axes across processes fails in the loader's first step otherwise). n_processes /
    local_devices: this job's (default), or a layout to check; hint: the fix the error suggests (default: make_mesh's
    dcn=); rules: the overrides the batch is placed with, as process_rows' / global_batch_from_local's (without
    them, a table that maps 'batch' elsewhere was checked against the default layout: a false pass or refusal)."""
    n = jax.process_count() if n_processes is None else n_processes
    if n == 1:
        return
    local = set(jax.local_devices() if local_devices is None else local_devices)
    shape = (global_batch, seq)
    sharding = batch_sharding(mesh, 2, rules, shape=shape)
    indices = [ix for d, ix in sharding.devices_indices_map(shape).items() if d in local]
    check_process_share(indices, shape, global_batch // n, dict(mesh.shape), hint)


@functools.lru_cache(maxsize=64)
def _check_sharding_share(sharding, global_shape: tuple, rows: int) -> None:
    """`check_process_share` once per (sharding, shape): the loader calls this every step."""
    check_process_share(sharding.addressable_devices_indices_map(global_shape).values(), global_shape, rows,
                        dict(sharding.mesh.shape))


_SHARE_HINT = ("put the processes on the outermost batch axis (make_mesh(..., dcn={'data': n_processes})) and keep "
               "'tensor' / 'sequence' within a process")


def check_process_share(indices, global_shape, rows: int, mesh_shape: dict, hint: str | None = None) -> None:
    """Raise unless the index slices this process's devices hold span exactly `rows` rows and every other dim
    whole: the share of a [B, T, ...] batch that one process's local rows can fill (hint: the fix to suggest)."""
    def span(sl, size):
        return (sl.start or 0, size if sl.stop is None else sl.stop)

    # distinct boxes (replicas repeat one); a sharding's boxes tile a grid, so they fill their bounding box
    # [lo, hi) x every other dim whole exactly when their volumes add up to its volume
    boxes = {tuple(span(sl, size) for sl, size in zip(ix, global_shape)) for ix in indices}
    if not boxes:  # a mesh over other processes' devices only: min() of nothing below ("empty sequence")
        raise ValueError(f"none of this process's devices is in the mesh {mesh_shape}, so it holds no rows of the "
                         f"global batch of {global_shape[0]}, but it loads {rows} rows of its own: build the mesh over "
                         "every process's devices (make_mesh(..., devices=None) spans jax.devices())")
    lo, hi = min(b[0][0] for b in boxes), max(b[0][1] for b in boxes)
    volume = sum(math.prod(e - s for s, e in b) for b in boxes)
    rest_whole = all(min(b[d][0] for b in boxes) == 0 and max(b[d][1] for b in boxes) == size
                     for d, size in enumerate(global_shape) if d > 0)
    whole = rest_whole and volume == (hi - lo) * math.prod(global_shape[1:])
    if hi - lo != rows or not whole:
        # boxes that cover every other dim but not their rows' bounding box: rows with gaps between them
        what = "" if whole else " and only part of T" if not rest_whole else ", not contiguously"
        raise ValueError(f"mesh {mesh_shape}: this process's devices hold rows [{lo}, {hi}) of the global batch "
                         f"of {global_shape[0]}{what}, but it loads {rows} contiguous rows of its own: "
                         f"{hint or _SHARE_HINT}")
