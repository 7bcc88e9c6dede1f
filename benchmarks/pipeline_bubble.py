"""Pipeline bubble: measured GPipe overhead vs the (S - 1) / (M + S - 1) formula.

    python -m benchmarks.pipeline_bubble [--stages 4] [--micro 1 2 4 8 16] [--reps 5]

On fake CPU devices every stage shares the same cores, so an idle stage cannot show up as idle wall
time. What can be measured is the work: our GPipe computes at every tick (bubble ticks run on real rows,
whose outputs are dropped), so a step of M microbatches costs (M + S - 1) stage-ticks per stage where only M
are useful. We time (process CPU time, all threads: the total work, robust to other jobs' load) the pipelined
forward + backward for each M at a fixed microbatch size, and an independent reference: the same
layers' forward + backward for one microbatch on one device, times M (the work without any bubble).
measured bubble = 1 - reference / pipelined, which also counts ppermute and scheduling overheads.
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.cli import cli_parser, run_main  # noqa: E402
from experiments.config import at_least  # noqa: E402
from parallel import make_mesh  # noqa: E402
from parallel.pipeline import bubble_fraction, gpipe  # noqa: E402


def layer(w_DD, h_bTD, _):
    return jnp.tanh(h_bTD @ w_DD)


def _cpu_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - t0)
    return float(np.median(times))


def pipelined(stages: int, micro: int, mb: int, T: int, D: int, L: int, reps: int) -> float:
    # stage alone: an extra data axis would replicate every microbatch (gpipe splits only over stage), doubling the
    # work measured
    mesh = make_mesh({"stage": stages}, devices=jax.devices()[:stages])
    with jax.set_mesh(mesh):
        w = jax.device_put(jax.random.normal(jax.random.key(0), (L, D, D)) / D ** 0.5, NamedSharding(mesh, P("stage")))
        x = jax.random.normal(jax.random.key(1), (micro * mb, T, D))
        step = jax.jit(jax.grad(lambda w, x: (gpipe(layer, w, x, None, n_microbatches=micro) ** 2).mean()))
        return _cpu_time(step, w, x, reps=reps)


def reference(mb: int, T: int, D: int, L: int, reps: int) -> float:
    """Forward + backward of all L layers on one microbatch, one device, no pipeline."""
    w = jax.random.normal(jax.random.key(0), (L, D, D)) / D ** 0.5
    x = jax.random.normal(jax.random.key(1), (mb, T, D))
    run = lambda w, x: (jax.lax.scan(lambda h, wl: (layer(wl, h, None), None), x, w)[0] ** 2).mean()  # noqa: E731
    return _cpu_time(jax.jit(jax.grad(run)), w, x, reps=reps)


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--stages", type=at_least(1), default=4)
    ap.add_argument("--micro", type=at_least(1), nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--mb", type=at_least(1), default=8, help="examples per microbatch")
    ap.add_argument("--reps", type=at_least(1), default=5)
    args = ap.parse_args(argv)
    if args.stages > len(jax.devices()):  # else refused by make_mesh after the reference had run, naming no flag
        ap.error(f"argument --stages: {args.stages} stages need as many devices, {len(jax.devices())} here")
    S, Ms, L = args.stages, args.micro, 2 * args.stages
    ref = reference(args.mb, 64, 256, L, args.reps)
    t = {M: pipelined(S, M, args.mb, 64, 256, L, args.reps) for M in tqdm(Ms, desc="microbatch counts")}
    print(f"stages={S}, layers={L}, microbatch={args.mb}x64 tokens x 256, no-pipeline reference "
          f"{ref * 1e3:.1f} CPU-ms per microbatch")
    print("| M | ticks M+S-1 | pipelined CPU-ms | M x reference | measured bubble | formula (S-1)/(M+S-1) |")
    print("|---|---|---|---|---|---|")
    for M in Ms:
        print(f"| {M} | {M + S - 1} | {t[M] * 1e3:.1f} | {M * ref * 1e3:.1f} | {1 - M * ref / t[M]:.3f} | "
              f"{bubble_fraction(S, M):.3f} |")


if __name__ == "__main__":
    run_main(main)
