"""MoE Transformer train step vs a dense Transformer with the same active parameters, and expert load balance.

    python -m benchmarks.moe_train [--rounds 7] [--steps 2] [--balance-steps 150] [--json out.json]

Part 1, speed (interleaved rounds, ratios are medians of per-round ratios, so a noisy machine slows all alike):
the reference shape of benchmarks/train_step.py (d 256, 4 layers, 4 heads × 64, vocab 8192, batch 8 × seq 256,
AdamW, float32; the trainer's step, `experiments.lm_step.make_state_step`) with every MLP replaced by
a top-2-of-8 MoE of expert width 512 — the same 1024 active MLP width
per token as the dense SwiGLU 1024 — for each dispatch path: dropless sorted grouped matmul (`gmm`, the CPU
default; and with `gmm_tile_rows=(512, 128, 32)`, the default before the seventeenth session), dropless one-hot `dense`
(every expert computes every token), `ragged_dot`, and capacity dispatch (CF 1.25, may drop). Target: the default
MoE step ≤ 1.2× the dense step.

Part 2, load balance: a small MoE LM (8 experts, top-2, every layer) trained `--balance-steps` steps on the
embedded byte corpus three ways — no balancing, the Switch load-balancing loss (weight 0.01), and DeepSeek-V3
sigmoid routing with the bias update and no loss — then the fraction of routed assignments per expert on held-out
batches, per layer; plotted as docs/moe_load.png by the documented run (`--balance-steps 150`, the default) unless
--plot says otherwise; any other run plots moe_load.png here, so a smoke run never replaces the documented figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks.rounds import out_path, plot_path, write_json
from data.cli import cli_parser, path_arg, run_main
from experiments.config import at_least
from experiments.lm_step import make_optimizer, make_state_step
from models import Transformer, TransformerConfig
from models.moe import MoEConfig
from parallel.host import tune_cpu_allocator

DENSE = TransformerConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, mlp_dim=1024, max_seq_len=256)
MOE = MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=512)
PATHS = {"moe_gmm": dict(dropless_impl="gmm"),
         "moe_gmm_tiles512,128,32": dict(dropless_impl="gmm", gmm_tile_rows=(512, 128, 32)),
         "moe_dense_onehot": dict(dropless_impl="dense"),
         "moe_ragged_dot": dict(dropless_impl="ragged_dot"),
         "moe_capacity_cf1.25": dict(dispatch="capacity", capacity_factor=1.25)}


def train_step(cfg: TransformerConfig, lr=3e-3, steps=1000):
    """(graphdef, initial train state, jitted step) — the trainer's step (experiments.lm_step.make_state_step):
    AdamW with warmup + cosine, MoE aux losses added with their weights, the router bias moved outside it."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=steps // 10)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    return graphdef, state, make_state_step(graphdef, opt, moe_cfg=cfg.moe)


def timed(cfg, batch):
    _, state, step = train_step(cfg)
    box = [state]

    def call():
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready(metrics["loss"])

    return call


def speed(rounds: int, steps: int):
    tok = np.random.default_rng(0).integers(0, DENSE.vocab_size, (8, 257), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
    cfgs = {"dense": DENSE} | {name: dataclasses.replace(DENSE, moe=dataclasses.replace(MOE, **kw))
                               for name, kw in PATHS.items()}
    calls = {}
    for name, cfg in tqdm(cfgs.items(), desc="compile"):
        calls[name] = timed(cfg, batch)
        calls[name]()
    wall = {n: [] for n in calls}
    for _ in tqdm(range(rounds), desc="rounds"):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                call()
            wall[name].append((time.perf_counter() - t0) / steps)
    med = statistics.median
    return {n: {"step_ms": 1e3 * med(ts), "vs_dense": med(t / d for t, d in zip(ts, wall["dense"])),
                "active_matmul_params": cfgs[n].matmul_params(), "params": cfgs[n].param_count()}
            for n, ts in wall.items()}


def balance(steps: int):
    from data.corpus import BYTE_VOCAB, ByteWindows, encode_bytes, stdlib_text, train_eval_split

    base = TransformerConfig(vocab_size=BYTE_VOCAB, d_model=128, n_layers=2, n_heads=4, mlp_dim=256,
                             max_seq_len=128)
    moe = MoEConfig(n_experts=8, top_k=2, expert_mlp_dim=128)
    variants = {"no balancing": dataclasses.replace(moe, lb_loss_weight=0.0, z_loss_weight=0.0),
                "Switch LB loss 0.01": moe,
                "sigmoid + bias update (no loss)": dataclasses.replace(
                    moe, router="sigmoid", lb_loss_weight=0.0, bias_update_rate=0.01)}
    train_tok, eval_tok = train_eval_split(encode_bytes(stdlib_text(1_000_000)))
    train, held = ByteWindows(train_tok, 128, 16, 0), ByteWindows(eval_tok, 128, 32, 1)
    out = {}
    for name, m in variants.items():
        cfg = dataclasses.replace(base, moe=m)
        graphdef, state, step = train_step(cfg, lr=3e-3, steps=steps)
        for i in tqdm(range(1, steps + 1), desc=name):
            state, metrics = step(state, {k: jnp.asarray(v) for k, v in train.batch(i).items()})
        model = nnx.merge(graphdef, state["params"])
        loads = [np.asarray(model(jnp.asarray(held.batch(i)["inputs"]), return_aux=True)[1]["load"]) for i in range(4)]
        load = np.mean(loads, 0)  # [L, E]
        out[name] = {"load": load.tolist(), "max_over_mean": float((load.max(-1) * moe.n_experts).mean()),
                     "cv": float((load.std(-1) * moe.n_experts).mean()), "final_loss": float(metrics["loss"])}
    return out


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res)
    L = len(res[names[0]]["load"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), sharey=True)
    for ax, name in zip(axes, names):
        load = np.asarray(res[name]["load"])
        E = load.shape[-1]
        for layer in range(L):
            ax.bar(np.arange(E) + (layer - (L - 1) / 2) * 0.8 / L, load[layer], width=0.8 / L, label=f"layer {layer}")
        ax.axhline(1 / E, color="k", ls="--", lw=1)
        ax.set_title(f"{name}\nmax/mean {res[name]['max_over_mean']:.2f}", fontsize=9)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("fraction of routed assignments")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=7)
    ap.add_argument("--steps", type=at_least(1), default=2)
    ap.add_argument("--balance-steps", type=at_least(0), default=150)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--plot", type=path_arg, default=None, help="the load plot (default: see above)")
    ap.add_argument("--json", type=out_path)
    args = ap.parse_args(argv)
    if args.plot is None:  # a short smoke run replaced the committed figure
        documented = args.balance_steps == ap.get_default("balance_steps")
        args.plot = str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "moe_load.png") if documented \
            else "moe_load.png"
    if args.balance_steps:  # the plot is drawn only after both parts (minutes): its file name checked first
        try:
            plot_path(args.plot)
        except argparse.ArgumentTypeError as e:
            ap.error(f"argument --plot: {e}")
    res = {}
    if not args.skip_speed:
        res["speed"] = speed(args.rounds, args.steps)
        for n, r in res["speed"].items():
            print(f"{n:22s} {r['step_ms']:8.1f} ms  {r['vs_dense']:.2f}x dense  "
                  f"active matmul params {r['active_matmul_params']:,}  total {r['params']:,}")
    if args.balance_steps:
        res["balance"] = balance(args.balance_steps)
        for n, r in res["balance"].items():
            print(f"{n:34s} max/mean load {r['max_over_mean']:.2f}  cv {r['cv']:.2f}  loss {r['final_loss']:.3f}")
    write_json(args.json, res)  # before the plot: a plot that fails must not take the results with it
    if args.balance_steps:
        plot(res["balance"], args.plot)
        print("plot:", args.plot)
    return res


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
