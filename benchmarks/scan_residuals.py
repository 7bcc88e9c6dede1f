"""bf16 loops on CPU: arrays kept as uint16 bits across iterations (`models.residuals`) vs as bf16, side by side.

    python -m benchmarks.scan_residuals [--rounds 8] [--layers 4,8,16] [--json results.json]

The reference train step of benchmarks/train_step.py (d_model 256, 4 heads, SwiGLU 1024, vocab 8192, batch 8 × seq
256, AdamW) with bf16 compute (float32 params), layers in a real `lax.scan` (scan_unroll=1), at each layer count;
the fully unrolled stack at the first count, where nothing is stacked in a loop; and the same scanned step with
every MLP a top-2-of-8 MoE (expert width 512, benchmarks/moe_train.py's), whose tile loops slice and update row
arrays. "bits" is the library's step; "bf16" the same step with the bits patched out at trace time
(`models.transformer.bits_residuals` for the layer scans, `models.moe_dispatch.packs` for the MoE's tile loops).
Rounds interleave every contender; a ratio is the median over rounds of bits / bf16. Temp memory is XLA's
`memory_analysis()` of the compiled step. See docs/benchmarks.md, "Transformer train step".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from unittest import mock

import jax

from benchmarks.moe_train import MOE
from benchmarks.rounds import interleaved, out_path, pair_row, save
from benchmarks.train_step import CFG, setup
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import make_train_step
from parallel.host import tune_cpu_allocator

UNPACKED = {"scan": ("models.transformer.bits_residuals", lambda fn, dtype: fn),
            "moe": ("models.moe_dispatch.packs", lambda dtype: False)}


def contender(cfg, unpacked: str | None):
    """(a call running one train step to completion, the compiled step's temp memory in MiB); unpacked: the bits
    patched out of the layer scan ('scan') or of the MoE's tile loops ('moe')."""
    graphdef, params, opt, data = setup(cfg, 8, 256)
    state = [params, jax.jit(opt.init)(params)]
    with mock.patch(*UNPACKED[unpacked]) if unpacked else contextlib.nullcontext():
        compiled = make_train_step(graphdef, opt).lower(state[0], state[1], data).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20

    def call():
        state[0], state[1], metrics = compiled(state[0], state[1], data)
        jax.block_until_ready(metrics)

    return call, temp


def layer_counts(text: str) -> list[int]:
    """'4,8,16' → [4, 8, 16]; each an integer >= 1 (argparse names the flag on error), none repeated: the results
    are keyed by count, so '4,4' ran and reported L=4 once."""
    counts = [at_least(1)(n) for n in text.split(",")]
    if len(set(counts)) < len(counts):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a layer count; list each once")
    return counts


layer_counts.__name__ = "comma-separated integers >= 1"


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=8, help="interleaved measurement rounds")
    ap.add_argument("--layers", type=layer_counts, default=[4, 8, 16], help="layer counts, comma-separated")
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    tune_cpu_allocator()
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    variants = {f"scan L={n}": (dataclasses.replace(bf16, n_layers=n, scan_unroll=1), "scan") for n in args.layers}
    variants[f"unrolled L={args.layers[0]}"] = (dataclasses.replace(bf16, n_layers=args.layers[0]), "scan")
    variants["MoE scan L=4"] = (dataclasses.replace(bf16, scan_unroll=1, moe=MOE), "moe")
    times, temp = interleaved({(name, label): functools.partial(contender, cfg, unpacked)
                               for name, (cfg, part) in variants.items()
                               for label, unpacked in (("bits", None), ("bf16", part))}, args.rounds)
    rows = {}
    print(f"{'variant':16s} {'bf16 ms':>8s} {'bits ms':>8s} {'bits/bf16':>9s} {'temp MiB bf16 → bits':>22s}")
    for name in variants:
        rows[name] = r = pair_row(times, temp, name, "bf16", "bits")
        print(f"{name:16s} {r['bf16_ms']:8.1f} {r['bits_ms']:8.1f} {r['ratio']:9.3f} "
              f"{r['temp_mib_bf16']:10.1f} → {r['temp_mib_bits']:.1f}")
    save(args.json, args.rounds, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
