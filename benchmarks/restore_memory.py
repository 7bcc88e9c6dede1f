"""Peak host memory of resuming the trainer's state: restoring onto a freshly initialised (random) state, as the
trainer did until the twenty-ninth session, against restoring onto `experiments.train_lm.abstract_train_state`
(ShapeDtypeStructs: nothing allocated before the read).

    python -m benchmarks.restore_memory [--rounds 2] [--d-model 512 --layers 8 --vocab 32000] [--json out.json]

A first process saves one train state (float32 params + AdamW) with the trainer's `Checkpoints`; then each restore
runs in a fresh process (alternating the two ways round by round), reporting its peak RSS above the level reached
once jax is up and the mesh made (`ru_maxrss`). On 8 fake CPU devices the devices' memory is the process's, so the
difference is the throwaway random state the old way allocated beside the restored one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile

import jax

from data.cli import cli_parser, run_main


def _cfg(args):
    from experiments.config import load

    sets = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.mlp_dim={4 * args.d_model}",
            f"model.vocab_size={args.vocab}", "model.n_heads=8", "model.n_kv_heads=8", "model.moe=None",
            "model.attn_pattern=global", "model.sliding_window=None"]
    return load(["--preset", "tiny", *[x for s in sets for x in ("--set", s)]])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(way: str, args) -> dict:
    from experiments.checkpoint import Checkpoints
    from experiments.train_lm import abstract_train_state, init_state
    from parallel import make_mesh

    cfg = _cfg(args)
    mesh = make_mesh({"fsdp": -1})
    ckpt = Checkpoints(args.dir, keep_best=False, async_save=False, log=lambda _: None)
    if way == "save":
        state = init_state(cfg, mesh)[3]
        ckpt.save(1, state, {"config": cfg.to_json()})
        ckpt.close()
        n = sum(x.size for x in jax.tree.leaves(state["params"]))
        return {"params": int(n), "state_mib": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20}
    base = _rss_mib()
    template = (init_state if way == "random" else abstract_train_state)(cfg, mesh)[3]
    state, _ = ckpt.restore(template)
    jax.block_until_ready(state)
    ckpt.close()
    return {"way": way, "peak_extra_mib": _rss_mib() - base}


def main(argv=None):
    from benchmarks.rounds import out_path, run_child
    from experiments.config import ConfigError, at_least

    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=2)
    ap.add_argument("--d-model", type=at_least(1), default=512)
    ap.add_argument("--layers", type=at_least(1), default=8)
    ap.add_argument("--vocab", type=at_least(1), default=32000)
    ap.add_argument("--json", type=out_path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        jax.config.update("jax_num_cpu_devices", 8)
        print(json.dumps(child(args.child, args)))
        return None
    try:  # before the children, which failed on it with a CalledProcessError that named no flag
        _cfg(args)
    except ConfigError as e:
        ap.error(f"argument --d-model / --layers / --vocab: {e}")
    from tqdm import tqdm

    shape = ["--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    run = lambda way, d: json.loads(run_child(  # noqa: E731
        [sys.executable, "-m", "benchmarks.restore_memory", "--child", way, "--dir", d, *shape]
    ).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        saved = run("save", tmp)
        order = (("random", "abstract"), ("abstract", "random"))
        ways = [w for r in range(args.rounds) for w in order[r % 2]]
        rows = [run(w, tmp) for w in tqdm(ways, desc="restores", unit="process")]
    med = {w: statistics.median(r["peak_extra_mib"] for r in rows if r["way"] == w) for w in ("random", "abstract")}
    summary = {**saved, "rounds": args.rounds, "median_peak_extra_mib": med, "random_over_abstract": med["random"] /
               med["abstract"], "saved_mib_per_state_mib": (med["random"] - med["abstract"]) / saved["state_mib"]}
    from benchmarks.rounds import report

    return report(args.json, rows, summary)


if __name__ == "__main__":
    run_main(main)
