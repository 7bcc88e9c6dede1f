"""Time to initialise a model on CPU (one jitted init: compile + run), parameters drawn flat and reshaped
(`models.params`, the default on CPU) against drawn in their shapes (`FLAT_DRAW_BACKENDS = ()`), side by side in
one process, alternating; the two give the same bits (tests/test_transformer.py).

    python -m benchmarks.init_compile [--rounds 3] [--json out.json]

Models: the video `tiny` preset's VAE (5-D conv kernels) and text-to-video model, the LM demo's Transformer.
Each init is a fresh `jax.jit` (a new compile each time: the model function is re-created).
"""

from __future__ import annotations

import json
import statistics
import time

from data.cli import cli_parser, run_main


def main(argv=None):
    from benchmarks.rounds import out_path, write_json
    from experiments.config import at_least

    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--json", type=out_path, default=None)
    args = ap.parse_args(argv)
    import jax
    from flax import nnx
    from tqdm import tqdm

    import models.params
    from experiments.config import preset
    from experiments.train_video import PRESETS
    from models import Transformer
    from models.video import TextToVideo, VideoVAE

    tiny = PRESETS["tiny"]
    makers = {"video VAE (tiny)": lambda: VideoVAE(tiny.vae, rngs=nnx.Rngs(0)),
              "text-to-video (tiny)": lambda: TextToVideo(tiny.t2v, rngs=nnx.Rngs(0)),
              "LM (demo)": lambda: Transformer(preset("demo").model, rngs=nnx.Rngs(0))}
    times = {(m, mode): [] for m in makers for mode in ("shaped", "flat")}
    runs = [(r, m, mode) for r in range(args.rounds) for m in makers
            for mode in (("flat", "shaped") if r % 2 else ("shaped", "flat"))]
    for _, m, mode in tqdm(runs, desc="inits", unit="init"):
        models.params.FLAT_DRAW_BACKENDS = ("cpu",) if mode == "flat" else ()
        make = makers[m]
        t0 = time.perf_counter()
        jax.block_until_ready(jax.jit(lambda make=make: nnx.split(make())[1])())
        times[(m, mode)].append(time.perf_counter() - t0)
    models.params.FLAT_DRAW_BACKENDS = ("cpu",)
    rows = []
    for m in makers:
        shaped, flat = statistics.median(times[(m, "shaped")]), statistics.median(times[(m, "flat")])
        rows.append({"model": m, "shaped_s": round(shaped, 2), "flat_s": round(flat, 2),
                     "ratio": round(shaped / flat, 2)})
        print(json.dumps(rows[-1]))
    write_json(args.json, {"rounds": args.rounds, "rows": rows,
                           "times": {f"{m} / {k}": v for (m, k), v in times.items()}})
    return rows


if __name__ == "__main__":
    run_main(main)
