"""Every test sees 8 fake CPU devices; compiled models are shared through session fixtures."""

import gc
import os
import shutil
import tempfile
from importlib.metadata import version

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound (thousands of small programs, each run a few times), so it compiles for speed of
# compiling. Neither flag changes semantics (XLA's HLO passes, fusion, buffer assignment and cost / memory analyses
# are the same), only how each fusion becomes machine code (a t2v gradient came out bit-identical). LLVM at -O0
# halves the wall time (test_moe_transformer: 76 -> 33 s). XLA:CPU's MLIR fusion emitters took 3.0 of a t2v
# gradient's 3.7 s compile; the classic elemental emitters take 1.5 s in all (an unknown XLA flag aborts the
# process: set only on the jaxlib it was measured on). XLA:CPU also splits each program's LLVM module into up to 32
# parts compiled on a thread pool: with the two xdist workers already on both cores that only adds the split's own
# work (one part: a set of test programs' compile CPU 16-17 -> 13-14 s; the same machine code, bit-equal losses).
# Subprocesses started by tests inherit these. Benchmarks and experiments keep XLA's defaults; set any of these
# flags yourself in XLA_FLAGS to override.
_FLAGS = {"xla_backend_optimization_level": "0"}
if version("jaxlib").startswith("0.10."):
    _FLAGS["xla_cpu_use_fusion_emitters"] = "false"
    _FLAGS["xla_cpu_parallel_codegen_split_count"] = "1"
for _name, _value in _FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()
# One persistent compilation cache per run, shared by the xdist workers (and the trainers tests start): a program
# compiled by one test is loaded by every later test that builds the same one (about 12 % of the compiles). A fresh
# directory each run, so a run never reads programs compiled by another; removed when the run ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxscale-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # (no size limit: one turns on jax's file lock, but also a scan of every entry on every write, which made the
    # suite slower than without the cache; without the lock a worker could read an entry another is still writing,
    # so the workers write each entry whole, below)
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # made here: the xdist controller or a plain run
else:
    _OWN_CACHE = None
import jax  # noqa: E402

# Tracing allocates millions of short-lived Python objects, so at its default threshold (700 allocations) Python's
# cyclic collector ran 2741 times in tests/test_moe_transformer.py, 5.0 of its ~85 CPU-seconds, each pass walking
# the whole heap jax, torch and transformers leave behind; at 50 000 it ran 17 times (0.7 s), the same peak RSS.
# Tests that count live objects call gc.collect() themselves.
gc.set_threshold(50_000, 20, 100)
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


def _atomic_cache_writes():
    """jax's unlocked cache (no size limit) writes an entry in place, so a worker compiling the same program could
    read it half-written: a warning and a recompile, or a failure in a test that turns warnings into errors. Write
    it beside, then rename (atomic on one filesystem). Trainers that tests start in subprocesses still write in
    place (their programs are their own)."""
    try:
        from jax._src import lru_cache
    except ImportError:  # another jax layout: keep its own writes
        return
    put = lru_cache.LRUCache.put

    def atomic_put(self, key, value):
        if self.eviction_enabled or not key:
            return put(self, key, value)
        path = os.fspath(self.path / f"{key}{lru_cache._CACHE_SUFFIX}")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(value)
            os.replace(tmp, path)

    atomic_put.atomic = True
    lru_cache.LRUCache.put = atomic_put


_atomic_cache_writes()


# The files that take longest (seconds of one worker on a 2-core machine, session 58), in that order. `make test`
# hands whole files to its two xdist workers (--dist loadfile, shared module fixtures) in collection order, with
# xdist's own reordering (by number of tests) turned off: longest first, so that the last files handed out are
# short and both workers end within seconds of each other (with few-test, long files such as test_multihost last,
# one worker ran alone for the last ~40 s). A file missing here just runs after these, in its usual order.
_LONGEST_FIRST = ("test_train_resume", "test_scaling_memory", "test_multihost", "test_moe_transformer",
                  "test_video_models", "test_video_train", "test_video_sharding", "test_generate", "test_hf",
                  "test_parallel", "test_transformer", "test_scaling_dit_memory", "test_moe", "test_train_config",
                  "test_custom_vjps", "test_sliding_window", "test_scaling_flops", "test_local_layers",
                  "test_attention", "test_scaling_ladder", "test_residuals", "test_mup", "test_train_checkpoint",
                  "test_data_pipeline", "test_video_align", "test_readme", "test_sharding")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its own order


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(prefix): from then on, pathlib.Path.write_text of a file whose name starts with `prefix` writes its
    first 3 characters, then raises ENOSPC, as a disk that fills up mid-write; other files are written as usual."""
    import pathlib

    real = pathlib.Path.write_text

    def arm(prefix: str):
        def write_text(self, text, *a, **k):
            if self.name.startswith(prefix):
                real(self, text[:3], *a, **k)
                raise OSError(28, "No space left on device")
            return real(self, text, *a, **k)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)

    return arm


@pytest.fixture
def closed_stdout():
    """closed_stdout(module, *args) -> (exit status, stderr) of `python -m module args` whose reader closed its stdout
    before it printed a line (`... | head -1`)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]

    def run(module: str, *args: str):
        # stdout block-buffered, Python's default: under PYTHONUNBUFFERED=1 every print raised, and the case of
        # output buffered until the interpreter's exit (a flush run_main left out) went untested
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(root)})
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return proc.wait(), err

    return run
