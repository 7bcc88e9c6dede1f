"""Where the reference train step's wall time goes on XLA:CPU, from a `jax.profiler` trace of the compiled step.

    python -m benchmarks.step_profile [--steps 3] [--torch] [--json OUT]

Every kernel event of the trace is matched to its instruction in the compiled HLO, which gives each dot fusion
its FLOPs and each kernel its phase (forward, backward, optimizer, by its `op_name`). The step's wall time is
split into: a projection product running (2-D dots: q/k/v/o, MLP, LM head, and their gradients); otherwise an
attention product running (batched dots); otherwise only elementwise / layout / reduction kernels; otherwise
nothing. `--torch` also profiles HF Llama under torch.compile (benchmarks/train_step.py's contender) and sums
its time by aten op, for the side-by-side reading in docs/benchmarks.md.

A plain (unfused) dot, which XLA:CPU hands to Eigen (e.g. one contracting the leading dims of both operands), runs
asynchronously on Eigen's thread pool: its trace event covers only the launch. Its interval is extended to the next
kernel's start (a lower bound; the reference step has no such dot since models.linear's weight gradients).
"""

from __future__ import annotations

import bisect
import collections
import glob
import math
import re
import tempfile
import time

import jax

from benchmarks.rounds import out_path, write_json
from benchmarks.train_step import CFG, MATMUL_N, jax_matmul, schedulable_cores, setup
from data.cli import cli_parser, run_main
from experiments.config import at_least
from experiments.lm_step import make_train_step
from parallel.host import tune_cpu_allocator

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")


def hlo_kernels(hlo: str) -> dict[str, dict]:
    """{instruction name: {flops, batched, phase, op}} for the instructions of `hlo` (the compiled module's text)
    that run as kernels: those of the entry computation and of loop / conditional bodies. A fusion's FLOPs are
    those of the dots in the computation it calls (per execution: a loop body's kernels run once per iteration)."""
    comps, name, body = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, body = head.group(1), []
        elif line.startswith("}") and name:
            comps[name], name = body, None
        elif name:
            body.append(line)

    shapes = {m.group(1): [int(d) for d in m.group(3).split(",") if d]  # instruction names are module-unique
              for body in comps.values() for m in map(_INSTR.match, body) if m}

    def dots(lines):
        flops, batched = 0, False
        for ln in lines:
            m = _INSTR.match(ln)
            if " dot(" not in ln or not m:
                continue
            lhs = re.search(r"dot\((?:\w+\[[\d,]*\]\{[\d,]*\} )?%?([\w.\-]+)", ln).group(1)
            contract = [int(d) for d in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ln).group(1).split(",")]
            flops += 2 * math.prod(shapes[m.group(1)]) * math.prod(shapes[lhs][d] for d in contract)
            batched |= "lhs_batch_dims" in ln
        return flops, batched

    out = {}
    fused = {c for body in comps.values() for ln in body if " fusion(" in ln
             for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    for comp, body in comps.items():  # the entry computation and the bodies of loops and conditionals
        for ln in body if comp not in fused else ():
            m = _INSTR.match(ln) or re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", ln)
            if not m or re.search(r"\s(while|conditional|call)\(", ln):  # containers: their bodies are traced
                continue
            called = re.search(r"calls=%?([\w.\-]+)", ln)
            flops, batched = dots(comps.get(called.group(1), []) if called else [ln])
            op = re.search(r'op_name="([^"]*)"', ln)
            op = op.group(1) if op else ""
            phase = "backward" if "transpose(jvp" in op else "forward" if "jvp(" in op else "optimizer / other"
            out[m.group(1)] = {"flops": flops, "batched": batched, "phase": phase, "eigen": " dot(" in ln,
                               "op": re.sub(r"^jit\([^)]*\)/", "", op)}
    return out


def _union(intervals) -> list[list[int]]:
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def phase_time_alone(evs, kernels, dots) -> dict[str, int]:
    """{phase: ns during which one of its non-dot kernels runs and no dot does}: the union of the phase's kernel
    intervals, so two kernels running at once on two threads count once."""
    out = {}
    for phase in sorted({kernels[n]["phase"] for _, _, n in evs}):
        own = _union((s, e) for s, e, n in evs if not kernels[n]["flops"] and kernels[n]["phase"] == phase)
        out[phase] = sum(_minus(a, b, dots) for a, b in own)
    return out


def _minus(s, e, merged) -> int:
    """Length of [s, e) not covered by the merged intervals."""
    return (e - s) - sum(max(0, min(e, b) - max(s, a)) for a, b in merged if a < e and b > s)


def profile_ours(steps: int) -> dict:
    """The reference step of benchmarks/train_step.py (donated state, one fixed batch), through `breakdown`."""
    graphdef, params, opt, data = setup(CFG, 8, 256)
    opt_state = jax.jit(opt.init)(params)
    compiled = make_train_step(graphdef, opt).lower(params, opt_state, data).compile()
    state = [params, opt_state]

    def call():
        state[0], state[1], metrics = compiled(state[0], state[1], data)
        jax.block_until_ready(metrics)

    return breakdown(compiled, call, steps)


def _eigen_extended(evs, kernels):
    """An Eigen dot's event only covers its launch (module docstring): extend it to the next kernel's start, a lower
    bound of its run time (nothing else starts while the step waits on it)."""
    starts = sorted(s for s, _, _ in evs)
    out = []
    for s, e, n in evs:
        if kernels[n]["eigen"]:
            i = bisect.bisect_left(starts, e)
            e = max(e, starts[i]) if i < len(starts) else e
        out.append((s, e, n))
    return out


def breakdown(compiled, call, steps: int) -> dict:
    """Trace `steps` calls of `call` (which runs `compiled`, a `jax.stages.Compiled`, to completion), one per
    trace; the median traced step's split of wall time, in ms (see the module docstring)."""
    kernels = hlo_kernels(compiled.as_text())
    for _ in range(3):
        call()
    untraced = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        untraced.append((time.perf_counter() - t0) * 1e3)
    traces = []  # one step per trace: the profiler's own cost grows with a trace's length
    for _ in range(steps):
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                call()
                wall_ms = (time.perf_counter() - t0) * 1e3
            prof = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        traces.append((wall_ms, [(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for plane in prof.planes
                                 for line in plane.lines for ev in line.events if ev.name in kernels]))
    wall_ms, evs = sorted(traces, key=lambda t: t[0])[len(traces) // 2]  # the median step
    evs = _eigen_extended(evs, kernels)
    if not evs:
        raise SystemExit("no kernel of the compiled step appears in the trace (XLA's trace event names changed?)")
    span = max(e for _, e, _ in evs) - min(s for s, _, _ in evs)
    proj = _union((s, e) for s, e, n in evs if kernels[n]["flops"] and not kernels[n]["batched"])
    dots = _union((s, e) for s, e, n in evs if kernels[n]["flops"])
    busy = _union((s, e) for s, e, _ in evs)
    ms = lambda ns: ns / 1e6  # noqa: E731
    proj_ms, dots_ms, busy_ms = (ms(sum(b - a for a, b in u)) for u in (proj, dots, busy))
    flops = {k: sum(kernels[n]["flops"] for _, _, n in evs if kernels[n]["batched"] == k) for k in (False, True)}
    # non-dot kernels' time while no dot runs: by phase in wall time (the union of the phase's kernels: two
    # running at once on the two threads count once, so the phases add up to 'other kernels only' unless phases
    # overlap each other); by fusion kind and by op in kernel time, summed over concurrent kernels
    alone = collections.Counter({k: ms(v) for k, v in phase_time_alone(evs, kernels, dots).items()})
    for s, e, n in evs:
        if not kernels[n]["flops"]:
            t = ms(_minus(s, e, dots))
            kind = re.sub(r"[._]\d+$", "", n)
            alone["kind: " + ("ynn_fusion without a dot (reductions)" if kind == "ynn_fusion" else kind)] += t
            alone["op: " + kernels[n]["op"]] += t
    return {"wall_ms": wall_ms, "untraced_ms": sorted(untraced)[len(untraced) // 2], "kernel_span_ms": ms(span),
            "projection_dots_ms": proj_ms,
            "projection_gflop": flops[False] / 1e9, "projection_gflops_while_running": flops[False] / 1e6 / proj_ms,
            "attention_dots_only_ms": dots_ms - proj_ms, "attention_gflop": flops[True] / 1e9,
            "other_kernels_only_ms": busy_ms - dots_ms, "no_kernel_ms": ms(span) - busy_ms,
            "other_alone_ms": dict(alone.most_common())}


def profile_torch_compile(steps: int, mm_gflop: float) -> dict:
    """torch.profiler over `steps` steps of HF Llama under torch.compile: self CPU ms per step by op; `mm_gflop`,
    the FLOPs of its matmuls (ours: the projections'), gives aten::mm's rate."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.train_step import hf_step

    torch.set_num_threads(schedulable_cores())
    call = hf_step(CFG, 8, 256, "sdpa", compile_=True)
    for _ in range(3):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            call()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    by_op = collections.Counter()
    for e in prof.key_averages():
        key = "compiled graphs (fused elementwise)" if e.key.startswith("## Call CompiledFxGraph") else e.key
        by_op[key] += e.self_cpu_time_total / 1e3 / steps
    mm = by_op.get("aten::mm", 0.0)
    return {"wall_ms_under_profiler": wall_ms, "aten_mm_ms": mm,
            "aten_mm_gflops": mm_gflop / (mm / 1e3) if mm else None,
            "by_op_ms": {k: round(v, 2) for k, v in by_op.most_common(12)}}


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    ap.add_argument("--steps", type=at_least(1), default=3, help="traced steps, one trace each (the median is shown)")
    ap.add_argument("--torch", action="store_true", help="also profile HF Llama under torch.compile")
    ap.add_argument("--json", type=out_path, metavar="OUT", help="write the breakdown here")
    args = ap.parse_args(argv)
    mm = jax_matmul()
    for _ in range(3):
        mm()
    t0 = time.perf_counter()
    for _ in range(5):
        mm()
    peak = 5 * 2 * MATMUL_N**3 / (time.perf_counter() - t0) / 1e9
    r = profile_ours(args.steps)
    print(f"XLA f32 matmul {MATMUL_N}^3: {peak:.0f} GFLOP/s (mean of 5 calls)")
    print(f"ours: {r['untraced_ms']:.1f} ms per step untraced; the median traced step {r['wall_ms']:.1f} ms "
          f"(kernels span {r['kernel_span_ms']:.1f} ms; the tracer's own cost is in it)")
    print(f"  projection products running     {r['projection_dots_ms']:7.1f} ms ({r['projection_gflop']:.1f} GFLOP, "
          f"{r['projection_gflops_while_running']:.0f} GFLOP/s while they run)")
    print(f"  else attention products running {r['attention_dots_only_ms']:7.1f} ms ({r['attention_gflop']:.2f} GFLOP)")
    print(f"  else other kernels only         {r['other_kernels_only_ms']:7.1f} ms")
    print(f"  no kernel                       {r['no_kernel_ms']:7.1f} ms")
    print("  non-dot kernels while no product runs (ms; by phase: wall time; by kind / op: kernel time, summed over "
          "kernels running at once):")
    for prefix, n in (("", 3), ("kind: ", 10), ("op: ", 25)):
        for k, v in [(k, v) for k, v in r["other_alone_ms"].items() if (":" not in k) == (not prefix)
                     and k.startswith(prefix)][:n]:
            print(f"    {v:6.1f}  {k}")
    if args.torch:
        t = profile_torch_compile(args.steps, r["projection_gflop"])
        r["torch_compile"] = t
        print(f"HF Llama, torch.compile, under torch.profiler: {t['wall_ms_under_profiler']:.1f} ms per step; "
              f"aten::mm {t['aten_mm_ms']:.1f} ms ({t['aten_mm_gflops']:.0f} GFLOP/s); self CPU ms by op:")
        for k, v in t["by_op_ms"].items():
            print(f"    {v:7.2f}  {k}")
    if args.json:
        write_json(args.json, {"xla_matmul_gflops": peak} | r, indent=2)
    return r


if __name__ == "__main__":
    tune_cpu_allocator()  # before the first JAX computation (parallel/host.py)
    run_main(main)
