"""μP learning-rate transfer: loss vs learning rate for three widths, standard parametrisation vs μP.

    python -m experiments.mup_transfer [--steps 150] [--widths 64 128 256] [--out mup_transfer.png] [--json F]

The documented sweep (every default) writes docs/mup_transfer.png unless --out says otherwise; any other sweep
writes mup_transfer.png here, so a smoke run never replaces the documented figure (so does every sweep of an
installed package, which has no docs/).

Each width (d_model; head_dim 32, heads = d / 32, SwiGLU 4·d, 2 layers, untied) is trained on the same
byte-corpus batches for every learning rate 2^-12 … 2^-4 (AdamW, warmup + cosine). Under the standard
parametrisation the best learning rate moves with the width; under μP (`TransformerConfig(mup_base_width=64)`,
`make_optimizer(width_mult=cfg.width_mult)`) it should stay put, so a rate tuned on the smallest model transfers.
Reported loss: the mean train loss of the last 10 steps. One compile per (parametrisation, width): the learning
rate enters the step as an argument (the optimizer runs at lr 1 and its update is scaled by lr, which is the same
AdamW: the schedule, the weight decay and μP's 1/m factor are all linear in lr).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from data.cli import cli_parser, path_arg, run_main
from data.corpus import BYTE_VOCAB, ByteWindows, encode_bytes, stdlib_text
from experiments.config import at_least
from experiments.lm_step import lm_loss, make_optimizer
from experiments.run_log import _finite_or_null
from models import Transformer, TransformerConfig

# the documented figure's folder: in a source checkout only (an installed wheel has no docs/; the default was a path
# inside site-packages, refused as "the directory of .../site-packages/docs/mup_transfer.png does not exist")
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

LOG2_LRS = tuple(range(-12, -3))


def config(width: int, mup: bool, seq: int) -> TransformerConfig:
    """The sweep's 2-layer model at `width` (heads of 32), μP with base width 64 when `mup`, else standard."""
    return TransformerConfig(vocab_size=BYTE_VOCAB, d_model=width, n_layers=2, n_heads=width // 32, head_dim=32,
                             mlp_dim=4 * width, max_seq_len=seq, mup_base_width=64 if mup else None)


def sweep(cfg: TransformerConfig, batches, steps: int, log2_lrs) -> dict[int, float]:
    """{log2 lr: mean train loss of the last 10 steps} (inf when the run diverged; null in --json)."""
    graphdef, params0 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(1.0, total_steps=steps, warmup_steps=steps // 10, width_mult=cfg.width_mult)

    @jax.jit
    def step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates)), opt_state, loss

    out = {}
    for e in log2_lrs:
        params, opt_state, losses = params0, opt.init(params0), []
        for b in batches[:steps]:
            params, opt_state, loss = step(params, opt_state, b, jnp.float32(2.0 ** e))
            losses.append(loss)
        tail = float(np.mean(jax.device_get(losses[-10:])))
        out[e] = tail if np.isfinite(tail) else float("inf")
    return out


def plot(res, widths, path):
    """Train loss (last 10 steps) against log2 learning rate, one curve per width, standard vs μP, saved to `path`;
    each width's legend entry names its best rate and the rates that diverged (inf: not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (name, title) in zip(axes, (("sp", "standard parametrisation"), ("mup", "μP (base width 64)"))):
        for w in widths:
            curve = res[name][str(w)]
            xs = sorted(int(k) for k in curve)
            ys = [curve[str(x)] if np.isfinite(curve[str(x)]) else np.nan for x in xs]
            if np.all(np.isnan(ys)):  # nanargmin raised here, after the whole sweep, losing the figure
                ax.plot([], [], "o-", ms=3, label=f"width {w} (diverged at every rate)")
                continue
            best = xs[int(np.nanargmin(ys))]
            # a diverged rate is a gap in the curve: at the end of the sweep it looked like a rate never tried
            diverged = [f"2^{x}" for x, y in zip(xs, ys) if np.isnan(y)]
            gone = f"; diverged at {', '.join(diverged)}" if diverged else ""
            ax.plot(xs, ys, "o-", ms=3, label=f"width {w} (best 2^{best}{gone})")
        ax.set_title(title)
        ax.set_xlabel("log2 learning rate")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train loss, last 10 steps (nats/byte)")
    lo = min((v for r in res.values() for c in r.values() for v in c.values() if np.isfinite(v)), default=2.0)
    axes[0].set_ylim(lo - 0.1, lo + 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_formats() -> set[str]:
    """The file extensions `plot` can write (matplotlib's Agg canvas: png, pdf, svg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return set(FigureCanvasAgg.get_supported_filetypes())


def multiple_of_32(text: str) -> int:
    """--widths: a positive multiple of 32 (the sweep's heads are 32 wide: heads = width / 32)."""
    try:
        w = at_least(1)(text)
    except ValueError:  # not an int: argparse said "invalid multiple_of_32 value", naming this function, no fix
        raise argparse.ArgumentTypeError(f"must be a whole multiple of 32, e.g. 64, got {text}") from None
    if w % 32:
        near = sorted({max(32, w // 32 * 32), (w // 32 + 1) * 32})  # below 32 both were 32: 'use e.g. 32 or 32'
        raise argparse.ArgumentTypeError(f"{w} is not a multiple of 32 (heads of 32: heads = width / 32); "
                                         f"use e.g. {' or '.join(map(str, near))}")
    return w


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--steps", type=at_least(1), default=150)
    ap.add_argument("--widths", type=multiple_of_32, nargs="+", default=[64, 128, 256])
    ap.add_argument("--batch", type=at_least(1), default=16)
    ap.add_argument("--seq", type=at_least(1), default=64)
    ap.add_argument("--out", type=path_arg, default=None, help="the plot (default: see above)")
    ap.add_argument("--json", type=path_arg, default=None)
    args = ap.parse_args(argv)
    if twice := sorted({w for w in args.widths if args.widths.count(w) > 1}):  # trained and drawn twice
        ap.error(f"argument --widths: {', '.join(map(str, twice))} given more than once; name each width once")
    if args.out is None:
        documented = all(getattr(args, k) == ap.get_default(k) for k in ("steps", "widths", "batch", "seq"))
        args.out = str(DOCS / "mup_transfer.png") if documented and DOCS.is_dir() else "mup_transfer.png"
    for flag, path in (("--out", args.out), ("--json", args.json)):  # before the sweep, not after it
        if path is not None and not pathlib.Path(path).resolve().parent.is_dir():
            ap.error(f"argument {flag}: the directory of {path} does not exist")
        # (one this user may not write in failed in savefig / open() after the whole sweep, losing it)
        if path is not None and not os.access(pathlib.Path(path).resolve().parent, os.W_OK):
            ap.error(f"argument {flag}: the directory of {path} is not writable; name a file in one you can write")
    if args.json is not None and pathlib.Path(args.json).is_dir():  # open() failed after the sweep, losing the plot
        ap.error(f"argument --json: {args.json} is a directory; name the results file, e.g. "
                 f"{pathlib.Path(args.json) / 'mup_transfer.json'}")
    # matplotlib names the file by its extension: a directory or a name without one (--out runs/mup) was written
    # to runs/mup.png while 'plot: runs/mup' was printed; an extension it cannot write failed after the sweep
    out = pathlib.Path(args.out)
    if out.is_dir() or out.suffix[1:].lower() not in plot_formats():
        ap.error(f"argument --out: {args.out} is {'a directory' if out.is_dir() else 'not an image file name'}; "
                 f"name the plot's file, e.g. {out / 'mup_transfer.png' if out.is_dir() else out.with_suffix('.png')}"
                 f" ({', '.join(sorted(plot_formats()))})")
    try:  # a --seq past the corpus was ByteWindows' traceback, naming no flag
        data = ByteWindows(encode_bytes(stdlib_text(1_000_000)), args.seq, args.batch, 0)
    except ValueError as e:
        ap.error(f"argument --seq: {e}; use a shorter --seq")
    batches = [{k: jnp.asarray(v) for k, v in data.batch(i).items()} for i in range(args.steps)]
    res = {"sp": {}, "mup": {}}
    runs = [(name, w) for name in res for w in args.widths]
    for name, w in tqdm(runs, desc="parametrisation × width"):
        res[name][str(w)] = {str(k): v for k, v in sweep(config(w, name == "mup", args.seq), batches, args.steps,
                                                          LOG2_LRS).items()}
    for name in res:
        for w in args.widths:
            curve = res[name][str(w)]
            best = min(curve, key=curve.get)
            # all inf: min() named the first rate 'best', which the figure and the JSON (all null) do not
            head = f"best log2 lr {best:>4s}, loss {curve[best]:.3f}" if np.isfinite(curve[best]) else \
                "diverged at every rate"
            print(f"{name:4s} width {w:4d}: {head}   " + " ".join(f"{float(v):.2f}" for v in curve.values()))
    if args.json:  # the numbers first: they are what the sweep cost
        # a diverged rate (inf) as null: bare Infinity is no JSON to strict readers
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite_or_null(res), f, indent=1, allow_nan=False)
    plot(res, args.widths, args.out)
    print("plot:", args.out)
    return res


if __name__ == "__main__":
    run_main(main)
