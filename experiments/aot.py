"""Ahead-of-time "will it fit": compile the sharded train step against a mesh without allocating.

Inputs are `jax.ShapeDtypeStruct`s carrying their shardings, so a 70B model compiles on a laptop's
fake devices; `compiled.memory_analysis()` then gives XLA's per-device bytes, reported next to the
analytic estimate of `scaling.memory.memory_per_device`.

    python -m experiments.aot --model 7b --devices 64 --mesh fsdp=-1 --mesh fsdp=16,tensor=4 --chip h100
    python -m experiments.aot --model 7b --devices 8 --mesh stage=8 --microbatches 4 --batch 8
    python -m experiments.aot --preset demo --set model.n_layers=8 --set optim.grad_accum=2 --mesh fsdp=8

--preset (train_lm's run config: experiments.config's presets, --set, --init-from) compiles the trainer's own step
(`run_report`): its optimizer, grad_accum, MoE loss, packed batch of train.batch x train.seq and mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from data.cli import at_least, cli_parser, run_main
from models.transformer import pattern_period
from parallel.mesh import _fill, make_mesh, parse_mesh
from parallel.pipeline import pipeline_problem
from parallel.sharding import abstract_sharded, batch_sharding, optimizer_shardings


def abstract_state(model_fn, optimizer, mesh):
    """(graphdef, params, opt_state) as ShapeDtypeStructs sharded by the rules table (the optimizer's moments like
    their parameters, its scalars replicated): nothing is allocated."""
    graphdef, params = abstract_sharded(model_fn, mesh)
    abs_opt = jax.eval_shape(optimizer.init, params)
    # init_optimizer's rule: each parameter's sharding on it had failed for Adafactor's factored leaves and for
    # optax.masked's (Muon's) masked-out ones
    opt_sh = optimizer_shardings(optimizer, abs_opt, params)
    return graphdef, params, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt,
                                          opt_sh)


def abstract_train_inputs(model_fn, optimizer, mesh, batch: int, seq_len: int):
    """(graphdef, params, opt_state, batch) as sharded ShapeDtypeStructs: nothing is allocated."""
    graphdef, params, opt_state = abstract_state(model_fn, optimizer, mesh)
    tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding(mesh, 2))
    return graphdef, params, opt_state, {"inputs": tok, "targets": tok}


@dataclasses.dataclass(frozen=True)
class AotReport:
    """Per-device bytes of one compiled train step (XLA's `memory_analysis`) beside the analytic estimate."""

    mesh: dict
    argument_bytes: int  # per device: params + optimizer state + batch
    temp_bytes: int  # per device: activations, gradients, workspace
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs
    estimate: object  # scaling.memory.MemoryBreakdown

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def compile_report(cfg, mesh_shape: dict, batch: int, seq_len: int, devices=None) -> AotReport:
    """Lower + compile the train step for `cfg` on `mesh_shape`; XLA's and the analytic memory."""
    from experiments.lm_step import make_optimizer, make_train_step
    from models import Transformer
    from scaling.memory import memory_per_device

    mesh = make_mesh(mesh_shape, devices=devices)
    opt = make_optimizer()
    graphdef, params, opt_state, b = abstract_train_inputs(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), opt,
                                                           mesh, batch, seq_len)
    with jax.set_mesh(mesh):
        m = make_train_step(graphdef, opt).lower(params, opt_state, b).compile().memory_analysis()
    # the backend models.linear traced the products for (a bf16 model's saved projections are float32 on CPU)
    est = memory_per_device(cfg, dict(mesh.shape), batch, seq_len, backend=jax.default_backend())
    return AotReport(dict(mesh.shape), m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes,
                     m.alias_size_in_bytes, est)


def run_report(run, mesh_shape: dict, devices=None) -> AotReport:
    """`compile_report` of train_lm's own step for a RunConfig (experiments.config): its optimizer, schedule,
    grad_accum and MoE loss (lm_step.make_state_step) on the loader's packed batch of train.batch x train.seq."""
    from experiments.lm_step import make_state_step
    from experiments.train_lm import abstract_train_state
    from scaling.memory import memory_per_device

    mesh, (B, T) = make_mesh(mesh_shape, devices=devices), (run.train.batch, run.train.seq)
    graphdef, optimizer, schedule, state = abstract_train_state(run, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    arr = lambda dt: jax.ShapeDtypeStruct((B, T), dt, sharding=batch_sharding(mesh, 2))  # noqa: E731
    b = {k: arr(jnp.int32) for k in ("inputs", "targets", "positions", "segment_ids")} | {"weights": arr(jnp.float32)}
    step = make_state_step(graphdef, optimizer, schedule, run.model.moe, run.optim.grad_accum, shardings)
    with jax.set_mesh(mesh):
        m = step.lower(state, b).compile().memory_analysis()
    A = run.optim.grad_accum  # one microbatch of B / A rows differentiated at a time, beside the float32 sum
    est = memory_per_device(run.model, dict(mesh.shape), B // A, T, grad_accum=A, backend=jax.default_backend())
    return AotReport(dict(mesh.shape), m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes,
                     m.alias_size_in_bytes, est)


PRESETS = {  # Llama-2 shapes
    "7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, mlp_dim=11008),
    "70b": dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=28672),
}


def mesh_problem(cfg, shape: dict, n_devices: int, batch: int, seq_len: int, grad_accum: int = 1) -> str | None:
    """What stops `shape` from sharding this train step (None: nothing), checked before any compile: a bad mesh
    among several otherwise fails only after the earlier ones compiled (minutes each at 70B)."""
    from experiments.config import expert_axis_problem
    from parallel.rules import ACTIVATION_RULES

    try:
        mesh = _fill(dict(shape), n_devices, "devices")
    except ValueError as e:
        return f"{str(e).removeprefix('mesh: ')} (--devices {n_devices})"
    if problem := expert_axis_problem(cfg, mesh):  # train_lm refuses it: a dense model's expert axis
        return problem
    rows = math.prod(mesh.get(a, 1) for a in ACTIVATION_RULES["batch"])
    tp, sp = mesh.get("tensor", 1), mesh.get("sequence", 1)
    dense = not all(cfg.moe_layers())  # a model of MoE layers only has no dense MLP: its mlp_dim sizes nothing
    for value, what, n, axes in ((batch, "--batch", rows, "batch axes"), (seq_len, "--seq", sp, "sequence axis"),
                                 (cfg.n_heads, "the model's heads", tp, "tensor axis"),
                                 (cfg.mlp_dim, "the model's mlp_dim", tp if dense else 1, "tensor axis"),
                                 (cfg.vocab_size, "the model's vocab", tp, "tensor axis")):
        if value % n:  # the fix: a flag's value that divides, or (a preset's fixed size) a smaller axis
            fix = f"use a multiple of {n}" if what.startswith("--") else f"use a {axes} that divides {value}"
            return f"{what}={value} is not divisible by the {axes} of {mesh} (= {n}); {fix}"
    from scaling.memory import lm_param_table, shard_factor

    for p in lm_param_table(cfg):  # every parameter's sharded dims (d_model over fsdp, layers over stage, ...)
        try:
            shard_factor(p.axes, p.shape, mesh)
        except ValueError as e:
            return f"the model's {p.path}: {e}"
    if batch % (grad_accum * rows):  # lm_step.make_state_step's, at trace time (a traceback after earlier compiles)
        return (f"--batch={batch} does not split into grad_accum={grad_accum} microbatches whose rows divide the batch "
                f"axes of {mesh} (= {rows}); use a batch that is a multiple of {grad_accum * rows}")
    M = cfg.pipeline_microbatches
    # the pipeline splits each grad_accum microbatch (the rows the model sees), not the whole batch: 8 rows at
    # grad_accum 2 in 4 microbatches over data=2 passed here and failed in the model at trace time
    micro, of = batch // grad_accum, (f" / grad_accum {grad_accum}" if grad_accum > 1 else "")
    if mesh.get("stage", 1) > 1 and (micro % M or (micro // M) % rows):
        return (f"--batch={batch}{of} does not split into --microbatches={M} whose rows divide the batch axes of "
                f"{mesh} (= {rows}); use a batch that is a multiple of {grad_accum * M * rows}"
                + (" or a smaller grad_accum" if grad_accum > 1 else ""))
    # what models.Transformer refuses under a pipeline at trace time, after the earlier meshes compiled
    if mesh.get("stage", 1) > 1 and (problem := pipeline_problem(
            cfg.n_layers, pattern_period(cfg), mesh["stage"], micro, M, rows, sum(cfg.moe_layers()), cfg.scan_layers)):
        return problem
    others = {a: n for a, n in mesh.items() if a != "stage" and n > 1}
    if mesh.get("stage", 1) > 1 and others and cfg.dtype == "bfloat16":  # parallel.pipeline.gpipe, at compile time
        return (f"a pipeline ('stage') beside {others} does not compile in bfloat16 on XLA:CPU, where this tool "
                "compiles; size it with --dtype float32 (activations then count 4 bytes), or pipeline over 'stage' "
                "alone")
    return None


# the TransformerConfig field each flag sets
FLAGS = {"remat": "--remat", "dtype": "--dtype", "pipeline_microbatches": "--microbatches"}


def _mesh_arg(text: str) -> dict[str, int]:
    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("mesh: ")) from None


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--model", choices=sorted(PRESETS), help="a Llama-2 shape (default 7b)")
    ap.add_argument("--preset", help="instead of --model, train_lm's run config (experiments.config's presets, "
                    "--set and --init-from as train_lm reads them): its model, optimizer, grad_accum, train.batch x "
                    "train.seq and mesh, compiled as the trainer's step")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --preset: e.g. "
                    "model.n_layers=8 or train.batch=32")
    ap.add_argument("--init-from", metavar="HF_FOLDER", help="with --preset: the model of a Hugging Face config.json")
    ap.add_argument("--devices", type=at_least(1), default=8, help="fake CPU devices to compile for")
    ap.add_argument("--mesh", action="append", type=_mesh_arg,
                    help="e.g. fsdp=-1 or data=2,fsdp=16,tensor=4 (repeatable)")
    ap.add_argument("--batch", type=at_least(1), default=None, help="global sequences (default: one per device)")
    ap.add_argument("--seq", type=at_least(1), help="default 4096")
    ap.add_argument("--remat", help="default full")
    ap.add_argument("--dtype", help="default bfloat16")
    ap.add_argument("--microbatches", type=at_least(1),
                    help="GPipe microbatches on a mesh with a 'stage' axis (TransformerConfig.pipeline_microbatches)")
    ap.add_argument("--chip", help="an accelerator of scaling.hardware (h100, h200, a100, tpu-v5p, ...): say whether "
                    "each mesh's XLA peak fits its HBM (scaling.plan's usable share) and, when not, which knob to turn")
    args = ap.parse_args(argv)
    if args.chip is not None:  # a typo named before minutes of compiling
        from scaling.hardware import chip

        try:
            args.chip = chip(args.chip)
        except ValueError as e:
            ap.error(f"argument --chip: {e}")
    # the CPU as the default backend, before it starts: models.linear traces its products for the default backend
    # and the estimate counts for it, while the step compiles for the fake CPU devices (on a GPU host it traced GPU
    # products, XLA:CPU compiled them and the accelerator's estimate sat beside: 1.33x apart, a step neither runs)
    jax.config.update("jax_platforms", "cpu")
    from jax._src import xla_bridge

    # (a notebook or script that touched JAX first has its count fixed: jax's RuntimeError named neither the flag
    # nor the count; a backend with too few devices is named below, once the meshes are checked)
    if jax.config.jax_num_cpu_devices != args.devices and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", args.devices)
    from experiments.config import ConfigError, load
    from models import TransformerConfig

    own = {"--model": args.model, "--seq": args.seq, "--batch": args.batch, "--remat": args.remat,
           "--dtype": args.dtype, "--microbatches": args.microbatches}
    run, flags = None, [f for f, v in own.items() if v is not None]
    if args.preset is not None:  # the run config sets them all: a flag beside it was ignored, or overrode it unsaid
        if flags:
            ap.error(f"argument {flags[0]}: --preset's run config sets it; use --set (model.remat, model.dtype, "
                     "model.pipeline_microbatches, train.batch, train.seq)")
        try:
            run = load(["--preset", args.preset, *(["--init-from", args.init_from] if args.init_from else []),
                        *(x for kv in args.set for x in ("--set", kv))])
        except ConfigError as e:
            ap.error(str(e))
        cfg, batch, args.seq, name = run.model, run.train.batch, run.train.seq, f"preset {args.preset}"
        args.microbatches, args.mesh = cfg.pipeline_microbatches, args.mesh or [run.mesh]
    elif args.set or args.init_from:
        ap.error(f"argument {'--set' if args.set else '--init-from'}: needs --preset (train_lm's run config)")
    else:
        name, args.seq, args.remat = args.model or "7b", args.seq or 4096, args.remat or "full"
        args.dtype, args.microbatches = args.dtype or "bfloat16", args.microbatches or 1
        batch = args.batch or args.devices
    try:  # --remat / --dtype / --microbatches are config fields: their errors name the flag, before any compile
        cfg = cfg if run else TransformerConfig(**PRESETS[name], max_seq_len=args.seq, remat=args.remat,
                                                dtype=args.dtype, pipeline_microbatches=args.microbatches)
    except ValueError as e:  # the config names its field (TransformerConfig.remat: ...); name the flag too
        flag = next((f for field, f in FLAGS.items() if str(e).startswith(f"TransformerConfig.{field}")), None)
        ap.error(f"argument {flag}: {e}" if flag else str(e))
    meshes = args.mesh or [{"fsdp": -1}]
    for shape in meshes:
        if problem := mesh_problem(cfg, shape, args.devices, batch, args.seq, run.optim.grad_accum if run else 1):
            if run:  # the run config's names for the flags
                problem = problem.replace("--batch=", "train.batch=").replace("--seq=", "train.seq=").replace(
                    "--microbatches=", "model.pipeline_microbatches=")  # a flag --preset refuses beside it
            ap.error(f"argument --mesh {shape}: {problem}")
    # the filled sizes: stage=-1 beside fsdp=8 on 8 devices is a one-stage mesh, which ignored the microbatches
    filled = [_fill(dict(shape), args.devices, "devices") for shape in meshes]
    if args.microbatches > 1 and not any(shape.get("stage", 1) > 1 for shape in filled):
        # the example: every device a stage, one row per microbatch (stage=4,fsdp=2 was, which mesh_problem refuses
        # in bf16, and beside fsdp the default batch's microbatch rows do not divide the batch axes)
        ap.error(f"argument --microbatches: {args.microbatches} microbatches need a pipeline, a mesh with a 'stage' "
                 "axis (e.g. --mesh stage=-1); without one they would be ignored")
    # the CPU backend's fake devices, also on a GPU / TPU host whose default backend has only a few real ones; the
    # first --devices of a backend already started with more (the step compiled on all of them, headed "4 devices").
    # Started after the flags and meshes are checked: --devices 100000 beside a mesh it refuses spent minutes making
    # the devices first
    devices = jax.devices("cpu")[:args.devices]
    if len(devices) < args.devices:
        ap.error(f"argument --devices: JAX already runs in this process with {len(devices)} CPU device"
                 f"{'s' * (len(devices) != 1)}, and the count is fixed once it starts: run jax.config.update("
                 f"'jax_num_cpu_devices', {args.devices}) before anything touches JAX, or pass --devices "
                 f"{len(devices)} or fewer")
    gib = lambda b: f"{b / 2**30:.1f}" if b >= 2**30 / 10 else f"{b / 2**30:.2g}"  # noqa: E731 (a small model's too)
    # the batch the XLA bytes are for (by default one sequence per device, which the header did not say)
    M, A = args.microbatches, run.optim.grad_accum if run else 1
    # each grad_accum microbatch is what the pipeline splits: "batch 8 (4 microbatches of 2)" ran rows of 1 at A 2
    rows = f"batch {batch}" + (f" ({M} microbatches of {batch // A // M}{' per grad_accum step' * (A > 1)})"
                               if M > 1 else "")
    n = cfg.param_count()  # a small preset's in millions (the tiny one read "0.00 B")
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    print(f"{name}: {size} params, {rows}, seq {args.seq}, remat {cfg.remat}, "
          f"compute {cfg.dtype}, {args.devices} device{'s' * (args.devices != 1)}"
          + (f", grad_accum {run.optim.grad_accum}" if run else ""))
    fits = ""
    if args.chip is not None:
        from scaling.plan import HEADROOM

        usable = HEADROOM * args.chip.hbm_bytes
        fits = f" fits {args.chip.name} ({gib(usable)} GiB usable)? |"
    print("| mesh | XLA args GiB | XLA temp GiB | XLA peak GiB | est. params+opt GiB | est. peak GiB |" + fits)
    print("|---|---|---|---|---|---|" + "---|" * bool(fits))
    advice = []
    for shape in meshes:
        r = run_report(run, shape, devices) if run else compile_report(cfg, shape, batch, args.seq, devices=devices)
        verdict = ""
        if args.chip is not None:
            verdict = " yes |" if r.peak_bytes <= usable else " **no** |"
            if r.peak_bytes > usable:
                advice.append(_advice(r, usable, cfg, bool(run), gib))
        print(f"| {r.mesh} | {gib(r.argument_bytes)} | {gib(r.temp_bytes)} | {gib(r.peak_bytes)} | "
              f"{gib(r.estimate.state)} | {gib(r.estimate.total)} |" + verdict, flush=True)
    moe = "; with sorted dropless MoE experts on one CPU device XLA keeps 12-24% more" if cfg.moe is not None else ""
    print("est.: scaling.memory's model, the largest of the backward pass, the optimizer update (gradients + their "
          "clipped float32 copy) and, on XLA:CPU, the forward pass at the token lookup (docs/scaling.md)" + moe)
    if args.chip is not None:
        print(f"fits: XLA:CPU's compiled peak against {HEADROOM:.0%} of the chip's HBM (a GPU / TPU compile differs by "
              "its kernels and fusions: leave a margin)" + "".join(f"\n{a}" for a in advice))


def _advice(r: AotReport, usable: float, cfg, preset: bool, gib) -> str:
    """What to turn when a mesh's step does not fit `usable` bytes: the sharded state first, then the activations."""
    over = f"{r.mesh} does not fit: XLA peak {gib(r.peak_bytes)} GiB > {gib(usable)} GiB usable"
    if r.estimate.state > usable:  # no activation knob can help: the parameters and moments alone are too big
        return (f"{over}; its parameters + optimizer state alone take {gib(r.estimate.state)} GiB a device: shard "
                "them over more devices (a larger fsdp axis, tensor or stage) or use more chips")
    knobs = [] if cfg.remat == "full" else [f"remat full (now {cfg.remat}: "
                                            + ("--set model.remat=full)" if preset else "--remat full)")]
    knobs.append("fewer sequences a device (" + ("train.batch, or optim.grad_accum to split them into microbatches)"
                                                  if preset else "--batch, or a larger mesh)"))
    knobs.append("a larger fsdp axis (its state: " + f"{gib(r.estimate.state)} GiB a device)")
    return f"{over}; the activations and working set take {gib(r.peak_bytes - r.argument_bytes)} GiB: " + \
        ", ".join(knobs)


if __name__ == "__main__":
    run_main(main)
