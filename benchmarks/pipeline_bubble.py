"""Pipeline bubble: measured GPipe idle fraction vs the (S - 1) / (M + S - 1) formula.

    python -m benchmarks.pipeline_bubble [--stages 4] [--micro 1 2 4 8 16]

On fake CPU devices every stage shares the same cores, so idle stages cannot be seen as idle
time. Instead each stage does real work at every tick (as our GPipe does: bubble ticks compute on
zeros), so wall time grows with the tick count M + S - 1 while useful work grows with M. We time
the pipelined forward+backward for each M at a fixed microbatch size, fit time = a + b · ticks,
and report the measured bubble 1 - M·b / time(M) next to the formula.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from parallel import make_mesh  # noqa: E402
from parallel.pipeline import bubble_fraction, gpipe  # noqa: E402


def layer(w_DD, h_bTD, _):
    return jnp.tanh(h_bTD @ w_DD)


def time_step(stages: int, micro: int, mb: int, T: int, D: int, L: int, reps: int) -> float:
    mesh = make_mesh({"stage": stages, "data": -1})
    with jax.set_mesh(mesh):
        w = jax.device_put(jax.random.normal(jax.random.key(0), (L, D, D)) / D ** 0.5, NamedSharding(mesh, P("stage")))
        x = jax.random.normal(jax.random.key(1), (micro * mb, T, D))
        step = jax.jit(jax.grad(lambda w, x: (gpipe(layer, w, x, None, n_microbatches=micro) ** 2).mean()))
        jax.block_until_ready(step(w, x))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(w, x))
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--mb", type=int, default=8, help="examples per microbatch")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    S, Ms = args.stages, args.micro
    t = {M: time_step(S, M, args.mb, 64, 256, 2 * S, args.reps) for M in tqdm(Ms, desc="microbatch counts")}
    ticks = np.array([M + S - 1 for M in Ms], float)
    b, a = np.polyfit(ticks, np.array([t[M] for M in Ms]), 1)
    print(f"stages={S}, microbatch={args.mb}x64 tokens, fit: time = {a * 1e3:.1f} ms + {b * 1e3:.2f} ms/tick")
    print("| M | ticks | step ms | measured bubble | formula (S-1)/(M+S-1) |")
    print("|---|---|---|---|---|")
    for M in Ms:
        measured = 1 - M * b / t[M]
        print(f"| {M} | {M + S - 1} | {t[M] * 1e3:.1f} | {measured:.3f} | {bubble_fraction(S, M):.3f} |")


if __name__ == "__main__":
    main()
