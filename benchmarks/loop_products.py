"""Weight gradients inside layer scans on CPU: the narrower of x and the cotangent transposed (`models.linear`) vs
what the library did before, side by side.

    python -m benchmarks.loop_products [--rounds 10] [--json results.json]

Contenders (each "before" is the library's step with the old rule patched in at trace time):
- reference train step of benchmarks/train_step.py (d_model 256, SwiGLU 1024, 4 layers, batch 8 × 256, AdamW),
  float32, layers in a real `lax.scan`: before, the blocks' products were plain `x @ w` in a loop (their weight
  gradients Eigen dots contracting both operands' token dims; the LM head, outside the loop, transposed x);
- the same step in bf16 compute (float32 params), scanned: before, xᵀ was always the transposed operand (the down
  projection's x, a dynamic slice of the stacked residuals, transposed inside a slow loop fusion);
- the same float32 step fully unrolled: before, xᵀ always (there every x is a plain array);
- the DiT train step of `python -m experiments.train_video`'s default preset (factorized attention, float32):
  before, every DiT and text-encoder product was plain;
- the reference step with every MLP a top-2-of-8 MoE (benchmarks/moe_train.py's, grouped SwiGLU), scanned, float32
  and bf16 compute: before, the expert weight gradients contracted the rows of both tile operands (Eigen dots;
  `models.moe_dispatch.weight_grad_columns` off).
Rounds interleave every contender; a ratio is the median over rounds of new / before. Temp memory is XLA's
`memory_analysis()` of the compiled step. See docs/benchmarks.md, "Transformer train step", twentieth session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp

import models.glu as glu_mod
import models.linear as ml
from benchmarks.moe_train import MOE
from benchmarks.rounds import interleaved, out_path, pair_row, save
from benchmarks.train_step import CFG, setup
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import make_train_step
from parallel.host import tune_cpu_allocator

_PRODUCT_GRADS = ml.product_grads  # the library's, before any patch


def _grads_x_always(x_MD, w_DF, g_MF, transposed_grad: bool):
    """The rule before: dw from xᵀ whatever the shapes."""
    if not transposed_grad:
        return _PRODUCT_GRADS(x_MD, w_DF, g_MF, False)
    g_MF = g_MF.astype(jnp.result_type(x_MD, w_DF))
    dw_DF = ml.product(ml.transposed(x_MD), g_MF, out=w_DF.dtype)
    return ml._dot(g_MF, w_DF, (((1,), (1,)), ((), ())), out=x_MD.dtype), dw_DF


def _plain_unless_out_dtype(x, w, impl="auto", out_dtype=None, **kw):
    """Before, a float32 layer loop's products were plain; the LM head (the one call with out_dtype) was not."""
    return ml.linear(x, w, "plain" if out_dtype is None else impl, out_dtype, **kw)


def _plain_glu_linear(g, u, w, act="silu", impl="auto", flatten=True):
    """The gated MLP's down projection (models.glu, since the twenty-first session) with plain products too."""
    return glu_mod.glu_linear(g, u, w, act, "plain", flatten)


BEFORE = {
    # models.glu imports product_grads by name (the MLP's down projection runs there): both names are patched
    "x_always": [("models.linear.product_grads", _grads_x_always), ("models.glu.product_grads", _grads_x_always)],
    "plain_in_loops": [("models.transformer.linear", _plain_unless_out_dtype),
                       ("models.transformer.glu_linear", _plain_glu_linear)],
    "plain_dit": [("models.transformer.linear", _plain_unless_out_dtype),
                  ("models.transformer.glu_linear", _plain_glu_linear),
                  ("models.video.layers.linear", _plain_unless_out_dtype),
                  ("models.video.layers.glu_linear", _plain_glu_linear)],
    "moe_row_tiles": [("models.moe_dispatch.weight_grad_columns", lambda: False)],
}


def _patched(before: str | None):
    stack = contextlib.ExitStack()
    for target, new in BEFORE[before] if before else ():
        stack.enter_context(mock.patch(target, new))
    return stack


def lm_contender(cfg, before: str | None):
    """(a call running one train step to completion, temp MiB); traced and compiled under the `before` patches."""
    graphdef, params, opt, data = setup(cfg, 8, 256)
    state = [params, jax.jit(opt.init)(params)]
    with _patched(before):
        lowered = make_train_step(graphdef, opt).lower(state[0], state[1], data)
    if before and lowered.as_text() == make_train_step(graphdef, opt).lower(state[0], state[1], data).as_text():
        raise RuntimeError(f"the {before!r} patches change nothing in this step: they no longer reach the code "
                           "they stand for (a module imports the patched function under another name?)")
    compiled = lowered.compile()

    def call():
        state[0], state[1], metrics = compiled(state[0], state[1], data)
        jax.block_until_ready(metrics)

    return call, compiled.memory_analysis().temp_size_in_bytes / 2**20


def dit_contender(before: str | None):
    """(a call running one DiT train step of the default video preset, None): jit traces on the first call,
    which runs under the patches."""
    from benchmarks.video_bench import train_step_case
    from experiments.train_video import PRESETS

    run, _ = train_step_case(PRESETS["default"], "factorized")
    with _patched(before):
        jax.block_until_ready(run())
    return lambda: jax.block_until_ready(run()), None


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--rounds", type=at_least(1), default=10, help="interleaved measurement rounds")
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    tune_cpu_allocator()
    variants = {
        "f32 scanned": (lambda b: lm_contender(dataclasses.replace(CFG, scan_unroll=1), b), "plain_in_loops"),
        "bf16 scanned": (lambda b: lm_contender(dataclasses.replace(CFG, scan_unroll=1, dtype="bfloat16"), b),
                         "x_always"),
        "f32 unrolled": (lambda b: lm_contender(dataclasses.replace(CFG, scan_unroll=True), b), "x_always"),
        "DiT f32 (video default)": (dit_contender, "plain_dit"),
        "MoE f32 scanned": (lambda b: lm_contender(dataclasses.replace(CFG, scan_unroll=1, moe=MOE), b),
                            "moe_row_tiles"),
        "MoE bf16 scanned": (lambda b: lm_contender(dataclasses.replace(CFG, scan_unroll=1, moe=MOE,
                                                                         dtype="bfloat16"), b), "moe_row_tiles"),
    }
    times, temp = interleaved({(name, label): functools.partial(make, b) for name, (make, before) in variants.items()
                               for label, b in (("new", None), ("before", before))}, args.rounds)
    rows = {}
    print(f"{'variant':24s} {'before ms':>9s} {'new ms':>8s} {'new/before':>10s}  temp MiB before → new")
    for name, (_, before) in variants.items():
        rows[name] = r = {"before": before} | pair_row(times, temp, name, "before", "new")
        mem = "" if r["temp_mib_new"] is None else f"{r['temp_mib_before']:.0f} → {r['temp_mib_new']:.0f}"
        print(f"{name:24s} {r['before_ms']:9.1f} {r['new_ms']:8.1f} {r['ratio']:10.3f}  {mem}")
    save(args.json, args.rounds, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
