"""First and second save of the demo LM train state on 8 fake CPU devices: orbax's default array handler
(replica-parallel: each replicated shard split among its replicas and sliced on the device) against
`experiments.checkpoint.array_tree_handler` (each shard written whole by one replica off TPU).

    python -m benchmarks.checkpoint_save [--rounds 3] [--mesh data=2,fsdp=2,tensor=2] [--json out.json]

Each save runs in a fresh process (the slices' executables are cached per process, so only a first save pays for
them), the two handlers alternating round by round; medians and the default/ours ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from data.cli import cli_parser, run_main


def child(handler: str, mesh_text: str, directory: str) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import time

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import orbax.checkpoint as ocp

    from experiments.checkpoint import array_tree_handler, to_pure
    from experiments.config import parse_mesh, preset
    from experiments.train_lm import init_state
    from parallel import make_mesh

    cfg = preset("demo")
    state = to_pure(init_state(cfg, make_mesh(parse_mesh(mesh_text)))[3])
    h = array_tree_handler() if handler == "ours" else ocp.StandardCheckpointHandler()
    save = ocp.args.PyTreeSave if handler == "ours" else ocp.args.StandardSave
    mgr = ocp.CheckpointManager(directory, item_handlers={"state": h})
    row = {"handler": handler, "mesh": mesh_text, "arrays": len(jax.tree.leaves(state))}
    for i, key in ((1, "first_s"), (2, "second_s")):
        t0 = time.perf_counter()
        mgr.save(i, args=ocp.args.Composite(state=save(state)), force=True)
        mgr.wait_until_finished()
        row[key] = time.perf_counter() - t0
    mgr.close()
    return row


def eight_device_mesh(text: str) -> str:
    """--mesh: checked here, as the children make it on 8 devices (their error was lost in a CalledProcessError)."""
    from experiments.config import ConfigError, parse_mesh, resolved_mesh

    try:
        resolved_mesh(parse_mesh(text), 8)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("mesh: ")) from None
    return text


def main(argv=None):
    from benchmarks.rounds import out_path, run_child
    from experiments.config import at_least

    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=3)
    ap.add_argument("--mesh", type=eight_device_mesh, default="data=2,fsdp=2,tensor=2",
                    help="the demo state's mesh (8 devices)")
    ap.add_argument("--json", type=out_path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mesh, args.dir)))
        return None
    rows = []
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        runs = [(r, h) for r in range(args.rounds) for h in (("ours", "default") if r % 2 else ("default", "ours"))]
        for r, h in tqdm(runs, desc="saves", unit="process"):
            out = run_child([sys.executable, "-m", "benchmarks.checkpoint_save", "--child", h, "--mesh", args.mesh,
                             "--dir", os.path.join(tmp, f"{h}{r}")])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {h: {k: statistics.median(x[k] for x in rows if x["handler"] == h) for k in ("first_s", "second_s")}
           for h in ("default", "ours")}
    summary = {"mesh": args.mesh, "arrays": rows[0]["arrays"], "rounds": args.rounds, "median": med,
               "first_save_ratio": med["default"]["first_s"] / med["ours"]["first_s"],
               "second_save_ratio": med["default"]["second_s"] / med["ours"]["second_s"]}
    from benchmarks.rounds import report

    return report(args.json, rows, summary)


if __name__ == "__main__":
    run_main(main)
