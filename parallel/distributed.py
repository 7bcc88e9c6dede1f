"""Multi-process set-up: initialise `jax.distributed`, split the data per process, write once.

One process per host (TPU VM, GPU node) or per GPU. The coordinator comes from, in order: explicit
arguments; the environment (`JAXSCALE_COORDINATOR`, `JAXSCALE_NUM_PROCESSES`, `JAXSCALE_PROCESS_ID`);
JAX's own cluster detection (TPU pods, SLURM, Open MPI); otherwise this is a single process.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from parallel.sharding import batch_sharding

_CLUSTER_MARKERS = ("OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
# What JAX's SLURM detection reads. SLURM_JOB_ID alone is a shell inside an allocation (salloc, sbatch script
# without srun): one process, and JAX would find no coordinator address.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 60, init_timeout_s: int = 300) -> bool:
    """Start `jax.distributed` when this job has several processes; returns True if it did.

    Must run before any other JAX call. If a peer dies, JAX's coordination service notices the
    missing heartbeats within `heartbeat_timeout_s` and terminates this process with a message
    naming the unhealthy task, so a job never hangs on a dead peer.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAXSCALE_COORDINATOR")
    num_processes = num_processes or (int(env["JAXSCALE_NUM_PROCESSES"]) if "JAXSCALE_NUM_PROCESSES" in env else None)
    if process_id is None and "JAXSCALE_PROCESS_ID" in env:
        process_id = int(env["JAXSCALE_PROCESS_ID"])
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_s, initialization_timeout=init_timeout_s)
    if coordinator is not None:
        missing = [n for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"coordinator {coordinator!r} given without {missing}; pass them or set "
                             "JAXSCALE_NUM_PROCESSES / JAXSCALE_PROCESS_ID")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        return True
    slurm = all(v in env for v in _SLURM_STEP)
    if (slurm or any(m in env for m in _CLUSTER_MARKERS)) and int(env.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize(**timeouts)  # JAX detects TPU pods, SLURM and Open MPI itself
        return True
    return False


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


def process_rows(global_batch: int) -> slice:
    """This process's rows of a global batch (contiguous, equal shares)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} must be divisible by the process count {n}")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch_from_local(local_batch, mesh, rules=None):
    """Assemble global [B, T, ...] arrays from each process's [B / processes, T, ...] rows."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x), rules), np.asarray(x)),
        local_batch)
