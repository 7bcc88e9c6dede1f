"""Sliding-window attention: blocked O(T·W) kernel vs dense masked vs full causal, one run.

    python -m benchmarks.swa [--lengths 1024 2048 4096 8192 16384 32768] [--windows 1024 4096]
                             [--plot docs/swa.png] [--train-step]

One attention layer (B=1, 4 heads, head_dim 64, float32), forward + backward. Peak memory is XLA's
compiled temp + argument + output bytes (`memory_analysis`) in GiB (2**30 bytes; so is --max-gb), which is what
the process must hold; dense kernels whose compiled footprint exceeds --max-gb, or longer than --dense-max, are
compiled but not run (reported with their compiled footprint); so is any kernel whose footprint may not fit in
the memory left.
`--train-step` also runs one full Transformer train step (all layers local, W=1024) at 32K tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import numpy as np
from tqdm import tqdm

from benchmarks.rounds import out_path, plot_path, write_json
from data.cli import cli_parser, run_main
from experiments.config import at_least
from models.sliding_window import sliding_window_attention
from parallel.host import tune_cpu_allocator

N_HEADS, HEAD_DIM = 4, 64


def kernels(window):
    return {
        "swa_blocked": lambda q, k, v: sliding_window_attention(q, k, v, window, block=512),
        "dense_masked": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                      local_window_size=(window - 1, 0)),
        "full_causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    }


def measure(fn, T, reps, max_gb):
    shape = (1, T, N_HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    step = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    m = compiled.memory_analysis()
    gb = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**30
    if gb > max_gb:
        return None, gb
    # tune_cpu_allocator (no mmap, no trim) keeps freed blocks, fragmented around newer ones: the default sweep's
    # process reached 24 GB, ~3x its largest program, and was killed on a 23 GB machine with every row lost.
    # A cell that may not fit in what is left is reported, not run.
    left = memory_left_gb()
    if HEAP_FACTOR * gb > left:
        tqdm.write(f"T={T}: not run: its {gb:.2f} GiB program may not fit in the {left:.1f} GiB of memory left "
                   f"(the tuned allocator keeps freed blocks); run the longest --lengths alone, or set "
                   f"JAXSCALE_MALLOC_TUNING=0")
        return None, gb
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), gb


HEAP_FACTOR = 2.0  # room a run needs beside what the process already holds, per GB of the program's footprint


def memory_left_gb() -> float:
    """GiB the kernel says can still be allocated (/proc/meminfo MemAvailable); inf where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return math.inf


def memory_cap(text: str) -> float:
    """--max-gb: a number >= 0 (0: footprints only, nothing run; inf: no cap). `gb > nan` is False, so nan ran every
    kernel whatever its footprint, and a negative cap ran none, as 0 does, without saying so."""
    value = float(text)
    if not (value >= 0 and not math.isnan(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (GiB; 0 runs nothing), got {text}")
    return value


memory_cap.__name__ = "number >= 0"


def train_step_32k(window=1024, T=32768):
    """One AdamW step of a 4-layer, all-local Transformer on a single 32K-token row."""
    from flax import nnx

    from experiments.lm_step import make_optimizer, make_train_step
    from models import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, mlp_dim=1024, max_seq_len=T,
                            attn_pattern="local", sliding_window=window, swa_block=512, remat="full")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(1e-3, total_steps=10, warmup_steps=1)
    opt_state = opt.init(params)
    tok = jax.random.randint(jax.random.key(0), (1, T + 1), 0, 256)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:]}
    step = make_train_step(graphdef, opt)
    m = step.lower(params, opt_state, batch).compile().memory_analysis()
    t0 = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch)
    loss = float(metrics["loss"])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready(metrics["loss"])
    return dict(tokens=T, window=window, loss=loss, step_s=time.perf_counter() - t0, first_step_s=first,
                temp_gib=m.temp_size_in_bytes / 2**30)


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--lengths", type=at_least(1), nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--windows", type=at_least(1), nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=at_least(1), default=3)
    ap.add_argument("--max-gb", type=memory_cap, default=8.0, help="largest footprint run, GiB (default 8)")
    ap.add_argument("--dense-max", type=at_least(1), default=8192, help="longest sequence the quadratic kernels run at")
    ap.add_argument("--plot", type=plot_path, default=None)
    ap.add_argument("--json", type=out_path, default=None)
    ap.add_argument("--train-step", action="store_true")
    args = ap.parse_args(argv)
    # rows are matched by (window, kernel) and T: a repeated window printed each of its rows twice, with twice as many
    # cells as the header has lengths
    for flag, values in (("--windows", args.windows), ("--lengths", args.lengths)):
        if len(set(values)) < len(values):
            ap.error(f"argument {flag}: {' '.join(map(str, values))} repeats a value; list each once")

    rows = []
    jobs = [(w, name, T) for w in args.windows for T in args.lengths for name in kernels(w)
            if not (name == "full_causal" and w != args.windows[0])]
    for w, name, T in tqdm(jobs, desc="attention fwd+bwd"):
        quadratic = name != "swa_blocked"
        sec, gb = measure(kernels(w)[name], T, args.reps, 0.0 if quadratic and T > args.dense_max else args.max_gb)
        rows.append(dict(window=w, kernel=name, T=T, seconds=sec, peak_gib=gb))  # bytes / 2**30, once keyed peak_gb
    print(f"\nB=1, {N_HEADS} heads x {HEAD_DIM}, float32, forward+backward; peak = XLA temp+args+outputs (GiB)")
    label = lambda T: f"{T // 1024}K" if T % 1024 == 0 else str(T)  # noqa: E731  (short runs use T < 1024)
    print("| W | kernel | " + " | ".join(label(T) for T in args.lengths) + " |")
    print("|---|---|" + "---|" * len(args.lengths))
    for w in args.windows:
        for name in kernels(w):
            cells = [r for r in rows if r["window"] == w and r["kernel"] == name]
            if not cells:
                continue
            fmt = lambda r: f"{r['seconds']:.2f} s / {r['peak_gib']:.2f} GiB" if r["seconds"] is not None \
                else f"not run ({r['peak_gib']:.2f} GiB)"  # as precise as a run cell: '.0f' printed 0.06 as 0
            print(f"| {w} | {name} | " + " | ".join(fmt(r) for r in cells) + " |")
    for w in args.windows:
        t = {r["T"]: r["seconds"] for r in rows if r["window"] == w and r["kernel"] == "swa_blocked"}
        d = {r["T"]: r["seconds"] for r in rows if r["window"] == w and r["kernel"] == "dense_masked"}
        if t.get(32768) and t.get(4096):
            print(f"W={w}: swa time(32K)/time(4K) = {t[32768] / t[4096]:.2f}")
        ran = [T for T in d if d[T] is not None and t.get(T)]
        if ran:
            T = max(ran)
            # the extrapolation needs the blocked kernel measured at 32K
            extra = "" if T == 32768 or not t.get(32768) else \
                f"; quadratic extrapolation to 32K: {d[T] * (32768 / T) ** 2 / t[32768]:.0f}x"
            print(f"W={w}: dense/swa at {label(T)} = {d[T] / t[T]:.1f}x{extra}")
    out = {"rows": rows}
    if args.train_step:
        out["train_step_32k"] = train_step_32k()
        print("train step at 32K tokens:", json.dumps(out["train_step_32k"]))
    if args.json:
        write_json(args.json, out)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for w in args.windows:
            for name in kernels(w):
                r = [x for x in rows if x["window"] == w and x["kernel"] == name and x["seconds"] is not None]
                if not r:
                    continue
                label = name if name == "full_causal" else f"{name} W={w}"
                axes[0].loglog([x["T"] for x in r], [x["seconds"] for x in r], "o-", label=label)
                axes[1].loglog([x["T"] for x in r], [x["peak_gib"] for x in r], "o-", label=label)
        for ax, what in zip(axes, ("fwd+bwd seconds", "peak GiB (XLA)")):
            ax.set_xlabel("sequence length")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
