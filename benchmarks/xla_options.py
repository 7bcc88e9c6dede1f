"""XLA:CPU compiler options, A/B'd side by side in one process: the reference train step and one layer's attention.

    python -m benchmarks.xla_options --rounds 16
    python -m benchmarks.xla_options --option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT

Each option set (`--option`, repeatable; `;` joins several options in one set) compiles the same lowered programs
through `compile(compiler_options=...)` next to XLA's defaults, so only the options differ. Rounds interleave
the variants; a ratio is the median over rounds of variant / default time (< 1: the option set is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from benchmarks.train_step import CFG, setup
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import lm_loss
from models.attention import attention
from parallel.host import tune_cpu_allocator

YNN = "xla_cpu_experimental_ynn_fusion_type"
DEFAULT_SETS = [f"{YNN}=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE", f"{YNN}=LIBRARY_FUSION_TYPE_DOT"]


def programs(batch: int, seq: int):
    """{name: (lowered, args)}: the train step of benchmarks/train_step.py and one attention layer fwd + bwd."""
    graphdef, params, opt, data = setup(CFG, batch, seq)
    opt_state = jax.jit(opt.init)(params)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    q, k, v, ct = (jax.random.normal(key, (batch, seq, CFG.n_heads, CFG.hd)) for key in
                   jax.random.split(jax.random.key(0), 4))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, 1, seq, seq))
    attn = jax.value_and_grad(lambda q, k, v: (attention(q, k, v, mask, causal_block=CFG.attn_block) * ct).sum(),
                              argnums=(0, 1, 2))
    # the step is not donated here: every variant runs on the same arrays
    return {"train_step": (jax.jit(step).lower(params, opt_state, data), (params, opt_state, data)),
            "attention_fwd_bwd": (jax.jit(attn).lower(q, k, v), (q, k, v))}


def _option(text: str) -> tuple[str, object]:
    """'name=value' -> (name, value); compile() wants Python bools and ints, not their spellings."""
    name, value = text.split("=", 1)
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def option_set(text: str) -> tuple[str, dict]:
    """argparse type of --option: 'a=1;b=x' -> (text, {a: 1, b: 'x'}); a part without '=' failed with a bare
    unpacking ValueError."""
    parts = text.split(";")
    if bad := [p for p in parts if "=" not in p]:  # one is named alone: "['a'] have no '='" read as a list's fault
        raise argparse.ArgumentTypeError((f"{bad[0]!r} has no '='" if len(bad) == 1 else f"{bad} have no '='")
                                         + "; write NAME=VALUE, e.g. xla_cpu_use_onednn=true")
    opts = dict(_option(p) for p in parts)
    if bad := [o for o in opts if not o.startswith("xla_")]:
        raise argparse.ArgumentTypeError((f"{bad[0]!r} is not an XLA option" if len(bad) == 1 else
                                          f"{bad} are not XLA options") + " (names start with xla_)")
    return text, opts


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--option", type=option_set, action="append", metavar="NAME=VALUE[;NAME=VALUE]",
                    help=f"an option set to compare with the defaults (default: {DEFAULT_SETS})")
    ap.add_argument("--rounds", type=at_least(1), default=16)
    ap.add_argument("--batch", type=at_least(1), default=8)
    ap.add_argument("--seq", type=at_least(1), default=256)
    args = ap.parse_args(argv)
    sets = {"default": {}} | dict(args.option or map(option_set, DEFAULT_SETS))
    for name, opts in sets.items():
        # XLA checks option names and values only when it compiles: a bad one failed after the train step had been
        # lowered and compiled with the defaults, naming no flag; a scalar program checks them in ~0.1 s
        try:
            jax.jit(lambda x: x + 1).lower(0.0).compile(compiler_options=opts or None)
        except jax.errors.JaxRuntimeError as e:
            ap.error(f"argument --option: {name}: {e}")
    for prog, (lowered, xs) in programs(args.batch, args.seq).items():
        calls = {}
        for name, opts in tqdm(sets.items(), desc=f"{prog}: compile"):
            compiled = lowered.compile(compiler_options=opts or None)
            calls[name] = lambda c=compiled: jax.block_until_ready(c(*xs))
            calls[name]()
        t = {name: [] for name in calls}
        for _ in tqdm(range(args.rounds), desc=f"{prog}: rounds"):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                t[name].append(1e3 * (time.perf_counter() - t0))
        print(f"\n{prog}: median / min ms, and the paired ratio to the defaults")
        for name, ts in t.items():
            ratio = statistics.median(a / b for a, b in zip(ts, t["default"]))
            print(f"  {statistics.median(ts):7.1f} / {min(ts):7.1f}  x{ratio:.3f}  {name}")


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
