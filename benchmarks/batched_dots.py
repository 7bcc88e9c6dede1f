"""Do XLA:CPU's kernels use every core? The reference step's attention products against its projections, and its
elementwise passes.

    python -m benchmarks.batched_dots [--rounds 5]

Times each product shape of the reference train step (d_model 256, 4 heads × 64, batch 8 × seq 256: attention's
batched [B·N = 32] products of the block-causal kernel, and the 2-D projections) in this process on every core,
then again in a child process pinned to one core (`os.sched_setaffinity` before jax starts, so XLA sizes its
thread pool to that core). speed-up = one-core time / all-core time: ~ the core count where XLA splits the product
over its threads, ~1 where one thread runs it whatever the cores. The elementwise passes (SiLU gate, residual add,
attention's softmax rows, an activation transpose) are timed the same way, in GB/s of their inputs and output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from data.cli import cli_parser, run_main

# (name, batch, M, K, N): out[b] = x[b] [M, K] @ y[b] [K, N]; batch 1: a plain 2-D product
SHAPES = (
    ("attention QKᵀ, one 64-row block against 256 keys", 32, 64, 64, 256),
    ("attention QKᵀ, all 256 rows (a dense kernel)", 32, 256, 64, 256),
    ("attention PV, one 64-row block", 32, 64, 256, 64),
    ("projection q/k/v/o  [2048 × 256] · [256 × 256]", 1, 2048, 256, 256),
    ("projection gate/up  [2048 × 256] · [256 × 1024]", 1, 2048, 256, 1024),
    ("LM head  [2048 × 256] · [256 × 8192]", 1, 2048, 256, 8192),
)


# (name, input shapes, function): float32 passes of the step's shapes, fused by XLA into one kernel each
def _passes():
    import jax
    import jax.numpy as jnp

    return (("SiLU(gate) · up  [2048 × 1024]", ((2048, 1024),) * 2, lambda g, u: jax.nn.silu(g) * u),
            ("residual add  [2048 × 256]", ((2048, 256),) * 2, lambda x, y: x + y),
            ("softmax rows  [32 × 256 × 256]", ((32, 256, 256),), lambda s: jax.nn.softmax(s, axis=-1)),
            ("transpose  [2048 × 1024]", ((2048, 1024),), lambda x: jnp.transpose(x)))


def _best(f, args, reps: int, rounds: int) -> float:
    """Best-of-rounds seconds per call of `f(*args)`."""
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            r = f(*args)
        r.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure(rounds: int) -> dict[str, float]:
    """{shape name: best-of-rounds GFLOP/s (products) or GB/s (elementwise passes)} in this process."""
    import jax
    import jax.numpy as jnp

    out = {}
    for name, b, m, k, n in SHAPES:
        x = jax.random.normal(jax.random.key(0), (b, m, k))
        y = jax.random.normal(jax.random.key(1), (b, k, n))
        f = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y))
        reps = max(1, int(2e9 / (2 * b * m * k * n)))  # ~2 GFLOP per timing
        out[name] = 2 * b * m * k * n / _best(f, (x, y), reps, rounds) / 1e9
    for name, shapes, fn in _passes():
        args = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)]
        nbytes = 4 * (sum(a.size for a in args) + args[0].size)  # read every input, write one output
        out[name] = nbytes / _best(jax.jit(fn), args, max(1, int(4e8 / nbytes)), rounds) / 1e9
    return out


def main(argv=None):
    from benchmarks.rounds import out_path, run_child, save
    from experiments.config import at_least
    from parallel.host import tune_cpu_allocator

    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=5)
    ap.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)  # the child: pinned, prints JSON
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    tune_cpu_allocator()  # as the train step's benchmark: an elementwise pass's fresh output is otherwise page-faulted
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(measure(args.rounds)))
        return None
    cores = len(os.sched_getaffinity(0))
    child = run_child([sys.executable, "-m", "benchmarks.batched_dots", "--one-core", "--rounds", str(args.rounds)],
                      env=dict(os.environ, JAX_PLATFORMS="cpu"))
    one = json.loads(child.stdout.strip().splitlines()[-1])
    every = measure(args.rounds)
    print(f"best of {args.rounds}: {cores} cores | 1 core | speed-up   (products: GFLOP/s; elementwise passes: GB/s)")
    for name in every:
        print(f"  {every[name]:7.1f} | {one[name]:7.1f} | {every[name] / one[name]:4.2f}x  {name}")
    # the passes' rates are GB/s: in dicts keyed *_gflops, a residual add read as 110 GFLOP/s
    units = {name: "GFLOP/s" for name, *_ in SHAPES} | {name: "GB/s" for name, *_ in _passes()}
    res = {"cores": cores, "units": units, "all_cores": every, "one_core": one}
    save(args.json, args.rounds, res)
    return res


if __name__ == "__main__":
    run_main(main)
