"""Loader throughput: tokens/s of data.loader.LMLoader on the cleaned stdlib corpus vs what training eats.

    python -m benchmarks.loader_throughput [--steps 400] [--consumed 40000]

Training consumes far less than 40 k tokens/s on a 2-core CPU (the reference config, batch 8 x seq 256, trains
at 3.4-4.0 k tokens/s on the Zen 3 / Zen 4 machines and ~8 k on Zen 5, `benchmarks.train_step`; the demo
preset, a smaller model, ~9 k): --consumed keeps 40 k, a 4-10x margin, and the target is 10x that. Measured for
the byte tokenizer and a byte-level BPE (vocab 8192, trained here on the same corpus; tokenizing on the fly, or
reading a `data.tokenizer.pretokenize` copy), with 0 and 2 grain worker processes, and with placement on the device
mesh (all local devices, batch sharding). Tokens counted are real targets
(weights == 1), so padding does not inflate the figure.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time

from data.cli import cli_parser, run_main
from data.corpus import default_corpus
from data.loader import LMLoader, LoaderConfig, Source
from data.tokenizer import ByteTokenizer, pretokenize, tier_texts, train_bpe
from experiments.config import at_least


def measure(loader, steps: int) -> float:
    # start-up (worker processes, first reads) is not throughput, nor compiling the count's sum, a device reduction
    # once batches are placed on the mesh: timed, it put the bytes-on-mesh row at 0.35-2.1 M tokens/s, not 2.7-3.2 M
    float(next(loader)["weights"].sum())
    t0, n = time.perf_counter(), 0.0
    for _ in range(steps):
        b = next(loader)
        n += float(b["weights"].sum())
    return n / (time.perf_counter() - t0)


def positive_rate(text: str) -> float:
    """--consumed: a finite rate > 0 (0 divided the first table row, after the BPE and the pre-tokenized copy)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (tokens/s), got {text}")
    return value


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--steps", type=at_least(1), default=400)
    ap.add_argument("--consumed", type=positive_rate, default=40_000, help="tokens/s the training config eats")
    args = ap.parse_args(argv)
    import jax

    from parallel import make_mesh

    tier = default_corpus(progress=False)
    t0 = time.perf_counter()
    bpe = train_bpe(tier_texts(tier), vocab_size=8192, show_progress=False)
    t1 = time.perf_counter()
    pre = pretokenize(tier, bpe, tempfile.mkdtemp(prefix="pretok-"), progress=False)
    print(f"corpus: {tier}; BPE 8192 trained in {t1 - t0:.1f} s, corpus pre-tokenized in "
          f"{time.perf_counter() - t1:.1f} s")
    mesh = make_mesh({"data": -1})
    print(f"| tokenizer | source | grain workers | placement | tokens/s | x training ({args.consumed:,.0f}) |")
    print("|---|---|---|---|---|---|")
    runs = [("bytes", ByteTokenizer(add_eos=True), tier, w, p) for w, p in ((0, False), (2, False), (0, True))]
    runs += [("BPE 8192", bpe, tier, w, p) for w, p in ((0, False), (2, False), (0, True))]
    runs += [("BPE 8192", bpe, pre, w, p) for w, p in ((0, False), (0, True))]
    try:
        for tok_name, tok, src, workers, on_mesh in runs:
            cfg = LoaderConfig(seq_len=256, global_batch_size=8, worker_count=workers)
            loader = LMLoader([Source(src)], tok, cfg, mesh=mesh if on_mesh else None,
                              process_index=jax.process_index(), process_count=jax.process_count())
            try:
                rate = measure(loader, args.steps)
            finally:
                loader.close()
            print(f"| {tok_name} | {'pre-tokenized' if src == pre else 'cleaned tier'} | {workers} | "
                  f"{f'mesh {dict(mesh.shape)}' if on_mesh else 'host'} | {rate:,.0f} | {rate / args.consumed:.0f} |")
    finally:
        shutil.rmtree(pre, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
