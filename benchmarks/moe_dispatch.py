"""MoE layer forward+backward on CPU: every dispatch implementation vs a dense SwiGLU with the same active params.

    python -m benchmarks.moe_dispatch [--rounds 9] [--steps 1] [--shapes mixtral,fine] [--json results.json]

A contender is one jitted call of value_and_grad of <y, g> with respect to (layer params, x), routing and aux losses
included, on B=8 rows × T=256 tokens (2048 tokens, the train_step benchmark's batch), D=256, float32. The dense
baseline is a SwiGLU of width K·F (the MoE's active parameters per token, less the router's D·E). The machine is
shared and noisy, so every measurement of a contender is paired with a baseline measurement taken right before it
(contender order shuffled each round); the reported ratio is the median over rounds of these paired ratios, both for
wall time and for process CPU time (all threads; less disturbed by other processes than wall time).
`gmm/tiles=...` fixes the tile sizes of the grouped-matmul loops (default: `models.moe_dispatch.default_tile_rows`,
512,256,128,64 for both shapes here; `128` is a single tile size);
`capacity_cf1.25` may drop tokens (capacity dispatch); every other contender is exact (dropless).
See docs/benchmarks.md, "Mixture of Experts".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.rounds import out_path, write_json
from data.cli import cli_parser, run_main
from experiments.config import at_least
from models import moe_dispatch
from models.moe import MoE, MoEConfig
from models.moe_dispatch import swiglu
from parallel.host import tune_cpu_allocator

SHAPES = {  # name: (MoEConfig, description)
    "mixtral": (MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=512), "top-2 of 8, F=512"),
    "fine": (MoEConfig(n_experts=32, top_k=8, expert_mlp_dim=128), "fine-grained top-8 of 32, F=128"),
}
B, T, D = 8, 256, 256
DEFAULT_TILE_ROWS = moe_dispatch.default_tile_rows


def timed_call(fn, *args):
    f = jax.jit(fn)
    return lambda: jax.block_until_ready(f(*args))


def dense_contender(cfg: MoEConfig, x, g):
    f = cfg.top_k * cfg.expert_mlp_dim
    ks = jax.random.split(jax.random.key(1), 3)
    params = (0.02 * jax.random.normal(ks[0], (D, f)), 0.02 * jax.random.normal(ks[1], (D, f)),
              0.02 * jax.random.normal(ks[2], (f, D)))

    def loss(p, x):
        return jnp.vdot(swiglu(x.reshape(B * T, D), *p).reshape(B, T, D), g)

    return timed_call(jax.value_and_grad(loss, argnums=(0, 1)), params, x)


def moe_contender(cfg: MoEConfig, x, g, tiles=None):
    graphdef, params = nnx.split(MoE(D, cfg, rngs=nnx.Rngs(0)))

    def loss(p, x):
        # patched while tracing (inside jit), so only this contender sees the fixed tile sizes
        with mock.patch.object(moe_dispatch, "default_tile_rows", lambda a, e: tiles or DEFAULT_TILE_ROWS(a, e)):
            y, aux = nnx.merge(graphdef, p)(x)
        return jnp.vdot(y, g) + 0.01 * aux["lb_loss"] + 0.001 * aux["z_loss"]

    return timed_call(jax.value_and_grad(loss, argnums=(0, 1)), params, x)


def contenders(cfg: MoEConfig, x, g, tile_variants=((128,), (256, 64, 16))):
    dl = lambda impl: dataclasses.replace(cfg, dispatch="dropless", dropless_impl=impl)
    out = {"gmm": moe_contender(dl("gmm"), x, g)}
    out.update({"gmm/tiles=" + ",".join(map(str, t)): moe_contender(dl("gmm"), x, g, t) for t in tile_variants})
    out.update({impl: moe_contender(dl(impl), x, g) for impl in ("blocks", "dense", "capacity", "ragged_dot")})
    out["capacity_cf1.25"] = moe_contender(dataclasses.replace(cfg, dispatch="capacity", capacity_factor=1.25), x, g)
    return out


def shape_names(text: str) -> list[str]:
    """'mixtral,fine' → ['mixtral', 'fine'], each a key of SHAPES (a mistyped one raised a KeyError only after the
    shapes before it had been timed)."""
    names = text.split(",")
    for name in names:
        if name not in SHAPES:
            raise argparse.ArgumentTypeError(f"unknown shape {name!r}; choose from {list(SHAPES)}")
    if len(set(names)) < len(names):  # the results are keyed by shape: 'mixtral,mixtral' timed it twice, reported once
        raise argparse.ArgumentTypeError(f"{text!r} repeats a shape; list each once")
    return names


def timed(call, steps):
    """(wall seconds, process CPU seconds summed over threads) per call."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        call()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(2), default=9, help="at least 2: the results give quartiles")
    ap.add_argument("--steps", type=at_least(1), default=1, help="timed calls per measurement")
    ap.add_argument("--shapes", type=shape_names, default="mixtral,fine", help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--json", type=out_path, metavar="OUT")
    args = ap.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)
    g = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    rng = random.Random(0)
    results = {}
    for shape in args.shapes:
        cfg, desc = SHAPES[shape]
        base = dense_contender(cfg, x, g)
        calls = contenders(cfg, x, g)
        for call in [base, *calls.values()]:  # compile + warm up
            call()
            call()
        times = {name: [] for name in calls}  # (wall, cpu) per measurement
        base_times = {name: [] for name in calls}  # the baseline measured right before
        for _ in range(args.rounds):
            for name in rng.sample(list(calls), len(calls)):
                base_times[name].append(timed(base, args.steps))
                times[name].append(timed(calls[name], args.steps))
        med = lambda xs: statistics.median(xs)
        # inclusive: within the rounds' range; the default ('exclusive') extrapolates past it for few rounds
        # (2 rounds of ratios 0.42 and 2.98 gave the quartiles -0.22-3.62)
        quartiles = lambda xs: statistics.quantiles(xs, n=4, method="inclusive")[::2]
        all_base = [t for ts in base_times.values() for t in ts]
        res = {"dense_mlp": {"ms_median": 1e3 * med(w for w, _ in all_base), "vs_dense_mlp": 1.0,
                             "cpu_ms_median": 1e3 * med(c for _, c in all_base), "cpu_vs_dense_mlp": 1.0}}
        for name in calls:
            wall = [t[0] / b[0] for t, b in zip(times[name], base_times[name])]
            cpu = [t[1] / b[1] for t, b in zip(times[name], base_times[name])]
            res[name] = {"ms_median": 1e3 * med(t[0] for t in times[name]), "vs_dense_mlp": med(wall),
                         "vs_dense_mlp_quartiles": quartiles(wall),
                         "cpu_ms_median": 1e3 * med(t[1] for t in times[name]), "cpu_vs_dense_mlp": med(cpu),
                         "cpu_vs_dense_mlp_quartiles": quartiles(cpu)}
        tiles = moe_dispatch.default_tile_rows(B * T * cfg.top_k, cfg.n_experts)
        results[shape] = {"config": dataclasses.asdict(cfg), "description": desc, "results": res,
                          "default_tile_rows": tiles}
        print(f"\n{shape}: {desc}; B={B} T={T} D={D}; dense_mlp F={cfg.top_k * cfg.expert_mlp_dim}; "
              f"gmm tiles {tiles}")
        print(f"{'contender':18s} {'wall ms':>8s} {'x dense_mlp':>11s} {'quartiles':>11s} "
              f"{'CPU ms':>8s} {'x dense_mlp':>11s} {'quartiles':>11s}")
        for name, r in res.items():
            q = lambda k: "{:.2f}-{:.2f}".format(*r[k]) if k in r else ""
            print(f"{name:18s} {r['ms_median']:8.1f} {r['vs_dense_mlp']:11.2f} {q('vs_dense_mlp_quartiles'):>11s} "
                  f"{r['cpu_ms_median']:8.1f} {r['cpu_vs_dense_mlp']:11.2f} {q('cpu_vs_dense_mlp_quartiles'):>11s}")
    out = {"machine": {"cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
           "shape": {"B": B, "T": T, "D": D}, "rounds": args.rounds, "steps": args.steps, "shapes": results}
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
