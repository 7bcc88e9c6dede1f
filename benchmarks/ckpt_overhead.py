"""Checkpoint cost of the LM trainer (experiments/checkpoint.py) on the demo's 8 fake CPU devices.

    python -m benchmarks.ckpt_overhead [--pairs 8] [--chunk 5] [--big-dtype bfloat16] [--demo]

1. Async-save overhead, side by side in one process: interleaved chunks of `--chunk` demo train steps, one chunk
   starting with an async save (with) and one without; the extra time per save, over `save_every` (50) demo
   steps, is the overhead at the demo's interval (median of the per-pair differences). A "with" chunk ends when its
   save is written (at the default --chunk 5 every write had ended with its chunk in a run here; one outlasting a
   shorter chunk is counted whole, an upper bound, as in training it would overlap later steps).
2. Time and peak extra host memory (RSS sampled every 5 ms) of a blocking save and of a restore, for the demo's
   train state and for a ~1B-parameter state (the demo's pytree layout scaled to d_model 2048, 18 layers; params
   only, `--big-dtype`: bfloat16 = 2.1 GB, float32 = 4.2 GB of random values, so compression cannot cheat).
3. `--demo`: the demo run itself (`python -m experiments.train_lm`, fresh output dir): wall time to its eval target.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.rounds import out_path, run_child, write_json  # noqa: E402
from data.cli import cli_parser, run_main  # noqa: E402
from experiments.config import at_least  # noqa: E402
from experiments.run_log import read_curves  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the level at entry, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def save_restore(state, directory, label):
    from experiments.checkpoint import Checkpoints

    ck = Checkpoints(directory, keep=1, keep_best=False, log=lambda *a: None)
    with PeakRSS() as s:
        ck.save(1, state, {"config": "{}"})
        ck.wait()
    with PeakRSS() as r:
        out = ck.restore(state)
        jax.block_until_ready(out)
    ck.close()
    assert out is not None and out[1]["step"] == 1
    size = sum(f.stat().st_size for f in __import__("pathlib").Path(directory).rglob("*") if f.is_file())
    row = {"state": label, "state_gb": nbytes(state) / 1e9, "disk_gb": size / 1e9, "save_s": s.seconds,
           "save_extra_rss_gb": s.extra / 1e9, "restore_s": r.seconds, "restore_extra_rss_gb": r.extra / 1e9}
    print(json.dumps(row), flush=True)
    return row


def overhead(cfg, pairs: int, chunk: int, directory):
    from experiments.checkpoint import Checkpoints
    from experiments.lm_step import make_state_step
    from experiments.train_lm import init_state
    from parallel import batch_sharding, make_mesh

    mesh = make_mesh(cfg.mesh)
    graphdef, opt, sched, state = init_state(cfg, mesh)
    step = make_state_step(graphdef, opt, sched, cfg.model.moe, 1, jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    t = cfg.train
    tok = rng.integers(0, 256, (t.batch, t.seq + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, batch_sharding(mesh, 2))
    ck = Checkpoints(directory, keep=2, keep_best=False, log=lambda *a: None)
    n = 0

    def run(save: bool):
        nonlocal state, n
        t0 = time.perf_counter()
        for i in range(chunk):
            state, m = step(state, batch)
            jax.block_until_ready(m["loss"])  # the trainer syncs every step (NaN policy, metrics)
            if save and i == 0:
                n += 1
                ck.save(n, state, {"config": "{}"})
        if save:  # a write outlasting the chunk slowed the next one (half the time the 'without' chunk): counted here
            ck.wait()
        return time.perf_counter() - t0

    with jax.set_mesh(mesh):
        run(False)  # compile
        run(True)
        with_s, without_s = [], []
        for p in range(pairs):
            order = (True, False) if p % 2 else (False, True)
            for save in order:
                (with_s if save else without_s).append(run(save))
    ck.close()
    step_s = statistics.median(without_s) / chunk
    per_save = statistics.median(w - o for w, o in zip(with_s, without_s))
    row = {"state": "demo", "step_s": step_s, "extra_s_per_save": per_save, "save_every": t.save_every,
           "overhead_pct": 100 * per_save / (t.save_every * step_s),
           "chunk_with_s": statistics.median(with_s), "chunk_without_s": statistics.median(without_s),
           "pairs": pairs, "chunk": chunk}
    print(json.dumps(row), flush=True)
    return row, state


def big_state(dtype: str):
    """~1.06B parameters in the Transformer's layout (d 2048, 18 layers, SwiGLU 5632, vocab 32000), random."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from parallel import make_mesh

    d, L, f, v = 2048, 18, 5632, 32000
    shapes = {"embed": (v, d), "lm_head": (d, v), "final_norm": (d,),
              "blocks": {"wq": (L, d, d), "wk": (L, d, d), "wv": (L, d, d), "wo": (L, d, d),
                         "w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d),
                         "attn_norm": (L, d), "mlp_norm": (L, d)}}
    mesh = make_mesh({"fsdp": -1})

    def spec(shape):  # FSDP: the d_model-sized dimension over the 8 devices
        dims = [None] * len(shape)
        for i, s in enumerate(shape):
            if s == d:
                dims[i] = "fsdp"
                break
        return NamedSharding(mesh, P(*dims))

    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    dt = jnp.dtype(dtype)
    arrays = []
    for i, s in enumerate(leaves):
        init = jax.jit(lambda k, s=s: jax.random.normal(k, s, dt), out_shardings=spec(s))
        arrays.append(init(jax.random.key(i)))
    tree = jax.tree.unflatten(treedef, arrays)
    return {"params": tree, "step": jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))}


def demo_run(out):
    t0 = time.time()
    # a failed run raises with its stderr: it went on to a FileNotFoundError on metrics.jsonl, the cause unseen
    p = run_child([sys.executable, "-m", "experiments.train_lm", "--out", out, "--set", "train.progress=False"])
    wall = time.time() - t0
    # the last record of a step (run_log.read_curves): a step replayed after a resume is logged again, and its last
    # record is the one the checkpoint kept; of the target records the last written (a run killed after crossing
    # the target, before its next save, crosses it again when resumed: the first was the killed attempt's time)
    evals = [r for _, r in sorted(read_curves(pathlib.Path(out) / "metrics.jsonl").get("eval", {}).items())]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        target = [r for r in map(json.loads, f) if r["kind"] == "target"]
    hit = target[-1] if target else {}
    row = {"state": "demo run", "returncode": p.returncode, "wall_s": wall, "eval_target": hit.get("eval_target"),
           "target_wall_s": hit.get("wall_s"), "target_step": hit.get("step"),
           "eval_first": evals[0]["loss"], "eval_last": evals[-1]["loss"]}
    print(p.stdout[-600:])
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--pairs", type=at_least(1), default=8)
    ap.add_argument("--chunk", type=at_least(1), default=5)
    ap.add_argument("--big-dtype", default="bfloat16", choices=["bfloat16", "float32", "none"])
    ap.add_argument("--demo", action="store_true", help="also time the demo run to its eval target")
    ap.add_argument("--json", type=out_path, default=None)
    args = ap.parse_args(argv)
    from experiments.config import preset

    cfg = preset("demo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        row, state = overhead(cfg, args.pairs, args.chunk, os.path.join(tmp, "overhead"))
        rows.append(row)
        rows.append(save_restore(state, os.path.join(tmp, "demo"), "demo train state (params + AdamW, f32)"))
        del state
        if args.big_dtype != "none":
            big = big_state(args.big_dtype)
            n = sum(x.size for x in jax.tree.leaves(big))
            rows.append(save_restore(big, os.path.join(tmp, "big"), f"{n / 1e9:.2f}B params, {args.big_dtype}"))
            del big
        if args.demo:
            rows.append(demo_run(os.path.join(tmp, "demo-run")))
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
