"""Compute planner: what will a training run cost, will it fit, and what does it emit.

    python -m scaling.plan --params 7e9 --hardware h100 --chips 256
    python -m scaling.plan --flops 1e23 --hardware tpu-v5p --chips 1024 --chip-power-w 450 --mfu 0.5

Given a model size (or a FLOP budget) it prints: the compute-optimal tokens (or N and D; a budget with
`--tokens` gives N = C / 6D, so the plan stays on the budget), a
Llama-style shape for that size, the training FLOPs (6ND and the model FLOPs with causal attention),
the wall-clock at a stated MFU, memory per chip for a suggested mesh (the least-sharded
fsdp x tensor layout that fits), and energy = chip-hours x chip power x PUE and CO2e = energy x grid
intensity. Every assumption is printed with the numbers.

Worked example (tests/test_scaling_plan.py checks it by hand): 7e9 parameters, 256 H100 at 40% MFU,
seq 4096, PUE 1.1, 400 gCO2e/kWh -> 1.497e11 tokens, 6.42e21 model FLOPs, ~17.6 h, ~3.5 MWh, ~1.4 t CO2e.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re

from data.cli import at_least, cli_parser, run_main
from scaling.flops import LMShape, _finite_number, param_counts, train_flops_per_token
from scaling.hardware import chip as get_chip, peak_dtype
from scaling.laws import ALLOCATIONS
from scaling.memory import REMAT_POLICIES, MemoryBreakdown, memory_per_device


def suggest_shape(n_params: float, *, vocab_size: int = 32_000, aspect: int = 128, head_dim: int = 128,
                  mlp_multiple: int = 256) -> LMShape:
    """A Llama-style dense shape with about `n_params` parameters: d_model = aspect·L (rounded to a
    multiple of head_dim), MHA with `head_dim`-wide heads, SwiGLU width 8/3·d rounded up to
    `mlp_multiple`; L is the integer whose total is closest to n_params. 7e9 -> L=32, d=4096, F=11008.
    Eight or more heads come in a multiple of 8, so that any tensor axis up to 8 divides them: where the closest
    depth has another count (75 at L=75), a nearby depth (±8) or d_model (within 1.5x of aspect·L, upwards to the
    next multiple of head_dim: L=1 may take d=256) within 10% of n_params is taken instead. Where none exists (at
    head_dim 128: ~2.4e8-6.3e8 parameters, 9-14 heads, and ~1.5e9-1.8e9, 19-20 heads) the closest shape keeps its
    count, and only tensor axes that divide it fit; a smaller head_dim gives more heads."""
    if not _finite_number(n_params, above=True):  # ('1e9' raised a bare TypeError, True planned 1 parameter)
        raise ValueError(f"n_params must be a finite number > 0, got {n_params!r}")
    n_params = float(n_params)  # a jax scalar made the size arithmetic below jax's (an int32 overflow)
    # (head_dim 0 raised a bare ZeroDivisionError, aspect 0 gave a 3780-layer shape 128 wide)
    _check_ints(head_dim=head_dim, aspect=aspect, mlp_multiple=mlp_multiple)

    def shape(L: int, d: int | None = None) -> LMShape:
        d = d or max(head_dim, int(round(aspect * L / head_dim)) * head_dim)
        f = int(math.ceil(8 * d / 3 / mlp_multiple) * mlp_multiple)
        return LMShape(vocab_size=vocab_size, d_model=d, n_layers=L, n_heads=d // head_dim, kv_heads=d // head_dim,
                       head_dim=head_dim, mlp_dim=f, windows=(None,) * L)

    total = functools.cache(lambda L, d=None: param_counts(shape(L, d)).total)  # grows with L
    lo, hi = 1, 4096
    while lo < hi:  # the smallest L whose total reaches n_params
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if total(mid) < n_params else (lo, mid)
    err = lambda c: abs(total(*c) - n_params)  # noqa: E731

    def off_family(depths):  # d_model up to 1.5x off aspect·L either way, in steps of head_dim
        return [(L, d) for L in depths if L >= 1
                for d in range(head_dim, int(1.5 * aspect * L) + head_dim, head_dim) if d >= aspect * L / 1.5]

    best = min(((L, None) for L in (lo - 1, lo) if L >= 1), key=err)
    if err(best) > 0.1 * n_params:
        # the d = aspect·L family's neighbours are 20-30% apart at ~1e8 parameters: let d_model leave it
        best = min(off_family(range(lo - 2, lo + 2)) or [best], key=err)
    heads = lambda c: (c[1] or shape(c[0]).d_model) // head_dim  # noqa: E731
    if heads(best) >= 8 and heads(best) % 8:  # a tensor axis of 2, 4 or 8 must divide them: a nearby shape that
        ready = [c for c in [(L, None) for L in range(lo - 8, lo + 9) if L >= 1] + off_family(range(lo - 8, lo + 9))
                 if heads(c) % 8 == 0 and err(c) <= 0.1 * n_params]  # has 8k heads, within 10% of the size
        best = min(ready, key=err, default=best)
    got = total(*best)
    if abs(got - n_params) > 0.1 * n_params:  # every FLOP, hour and joule of the plan would be off by as much
        d = shape(*best).d_model
        embed = vocab_size * d
        # the closest shape without its (untied) embedding: a vocabulary of v adds 2·v·d to it. Only a closest
        # shape above the size is advised a vocabulary (a smaller one); the one-layer d=128 shape's vocabulary
        # had told 1.32e7 (closest 1.72e7 at d=256) to 'lower' 32000 to 50,537
        vocab_fits = int((n_params - (got - 2 * vocab_size * d)) / (2 * d))
        raise NoShapeError(f"no Llama-style shape (head_dim {head_dim}, d_model ≈ {aspect}·L, vocab {vocab_size}) "
                           f"has about {n_params:.3g} parameters: the closest, L={best[0]}, d={d}, has {got:.3g}"
                           + (f"; its embedding alone is most of that: lower the vocabulary (--vocab) to about "
                              f"{vocab_fits:,}" if got > n_params and embed > n_params / 2 and vocab_fits >= 1
                              else ""), got)
    return shape(*best)


def _check_ints(**values):
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class NoShapeError(ValueError):
    """`suggest_shape` found no shape within 10% of the size asked for; `closest` is the nearest one's size."""

    def __init__(self, msg: str, closest: float):
        super().__init__(msg)
        self.closest = closest


HEADROOM = 0.9  # the share of a chip's HBM a plan fills (the rest: XLA's buffers, fragmentation)


@dataclasses.dataclass(frozen=True)
class MeshChoice:
    """The mesh a plan picks and the per-device memory it leaves (`scaling.memory.memory_per_device`)."""

    mesh: dict[str, int]
    micro_batch: int  # global sequences per step
    memory: MemoryBreakdown


def suggest_mesh(shape: LMShape, chips: int, hbm_bytes: float, *, seq_len: int, seqs_per_chip: int = 1,
                 remat: str = "save_dots_no_batch", param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                 kernel: str = "flash", headroom: float = HEADROOM,
                 skipped: list[str] | None = None, tried: list[MeshChoice] | None = None) -> MeshChoice | None:
    """The least-sharded layout that fits: tensor in (1, 2, 4, 8) then fsdp over each divisor of the rest,
    smallest first (24 chips: 1, 2, 3, 4, 6, 8, 12, 24; powers of two only missed fsdp 24 and reported a model that
    fits there as not fitting), data the rest; `seqs_per_chip` sequences of `seq_len` per data/fsdp rank. None if
    nothing fits. skipped: a list that receives why layouts could not be used at all (a dimension they do not
    divide); tried: a list that receives every layout evaluated, with its memory (the closest, when none fits).
    Bad inputs raise, naming the field (caught per layout below, a remat typo or seq_len 0 came back as None)."""
    _check_ints(chips=chips, seqs_per_chip=seqs_per_chip)
    for name, v, top in (("hbm_bytes", hbm_bytes, math.inf), ("headroom", headroom, 1.0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= top:
            raise ValueError(f"{name} must be a number in (0, {top:g}], got {v!r}")
    # on one device nothing has to divide, so a ValueError here is the inputs' own (remat, kernel, dtypes, seq_len)
    memory_per_device(shape, {"data": 1}, seqs_per_chip, seq_len, remat=remat, param_dtype=param_dtype,
                      compute_dtype=compute_dtype, kernel=kernel)
    for t in (1, 2, 4, 8):
        if chips % t:
            continue
        rest = chips // t
        for f in _divisors(rest):
            mesh = {"data": rest // f, "fsdp": f, "tensor": t}
            mb = seqs_per_chip * mesh["data"] * f
            try:
                mem = memory_per_device(shape, mesh, mb, seq_len, remat=remat, param_dtype=param_dtype,
                                        compute_dtype=compute_dtype, kernel=kernel)
            except ValueError as e:  # a dimension does not divide this mesh
                mem = None
                if skipped is not None and str(e) not in skipped:
                    skipped.append(str(e))
            if mem is not None and tried is not None:
                tried.append(MeshChoice(mesh, mb, mem))
            if mem is not None and mem.total <= headroom * hbm_bytes:
                return MeshChoice(mesh, mb, mem)
    return None


def _divisors(n: int) -> list[int]:
    """The divisors of `n`, ascending, in O(sqrt(n)) steps (a scan of 1..n took 6 s at 5e7 chips, minutes at 2**31)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _overflow(name: str, value, what: str):
    fix = "raise" if name == "mfu" else "lower"
    raise ValueError(f"{name}={value:g} takes the plan's {what} past the largest float (inf); {fix} {name}")


def _num(x: float, places: int = 0) -> str:
    """`places` decimals with thousands separators while that keeps two significant figures (from 10 up for whole
    numbers); three significant figures below (a small run's 2.45 chip-hours printed as '2', 0.000177 as '0.00')."""
    return f"{x:,.{places}f}" if abs(x) >= 10 ** (1 - places) else f"{x:.3g}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A planned training run: model size and tokens, FLOPs, time, chip-hours, energy and CO2, the LM shape, a mesh
    that fits (None if none does) and `text`, the printable summary."""

    n_params: float
    tokens: float
    flops_6nd: float
    flops_model: float
    flops_per_token: float
    seconds: float
    chip_hours: float
    energy_kwh: float
    co2_kg: float
    shape: LMShape
    mesh: MeshChoice | None
    text: str


def make_plan(*, params: float | None = None, flops: float | None = None, tokens: float | None = None,
              hardware: str = "h100", chips: int = 256, dtype: str = "bf16", mfu: float = 0.4, seq_len: int = 4096,
              vocab_size: int = 32_000, law: str = "approach1", pue: float = 1.1, grid_g_per_kwh: float = 400.0,
              chip_power_w: float | None = None, remat: str = "save_dots_no_batch", seqs_per_chip: int = 1,
              sliding_window: int | None = None, global_every: int | None = None) -> Plan:
    """Plan a run from `params` (tokens from the compute-optimal allocation unless `tokens` is given)
    or from a FLOP budget `flops` (compute-optimal N and D; with `tokens`, N = flops / (6·tokens) so the
    plan stays on the budget). See the module docstring. `sliding_window` W: the suggested shape's layers attend
    to their last W keys (Mistral), every `global_every`-th layer globally (2: Gemma 2's alternation, 6: Gemma 3's
    5:1); the windows change the attention FLOPs and memory, not N or D (scaling.flops' sliding_window /
    global_every)."""
    if (params is None) == (flops is None):
        raise ValueError("give exactly one of params= (a model size) or flops= (a training budget)")
    # named before math.isfinite: a string ('7e9' from a command line or YAML) raised "must be real number, not
    # str", naming no argument, and True counted as 1 (tokens=True planned a run of one token)
    for name, v in (("params", params), ("flops", flops), ("tokens", tokens), ("pue", pue),
                    ("grid_g_per_kwh", grid_g_per_kwh), ("chip_power_w", chip_power_w)):
        optional = name in ("params", "flops", "tokens", "chip_power_w")
        if not (v is None and optional) and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"{name} must be a number, got {v!r}" + (f" (a {type(v).__name__}; e.g. float({v!r}))"
                                                                      if isinstance(v, str) else ""))
    for name, v in (("params", params), ("flops", flops), ("tokens", tokens)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")
    for name, v, low in (("chips", chips, 1), ("seq_len", seq_len, 1), ("seqs_per_chip", seqs_per_chip, 1),
                         ("vocab_size", vocab_size, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if sliding_window is not None:
        _check_ints(sliding_window=sliding_window)
    if global_every is not None and sliding_window is None:  # (it would have been ignored, the plan all global)
        raise ValueError(f"global_every={global_every} needs sliding_window (the local layers' window)")
    if global_every is not None and (isinstance(global_every, bool) or not isinstance(global_every, numbers.Integral)
                                     or global_every < 2):  # 1: every layer global, the window applied nowhere
        raise ValueError(f"global_every must be an int >= 2 (2: local and global layers alternate; leave it out for "
                         f"every layer local), got {global_every!r}")
    if not (math.isfinite(pue) and pue >= 1):
        raise ValueError(f"pue must be a finite number >= 1 (facility energy / IT energy), got {pue}")
    if not (math.isfinite(grid_g_per_kwh) and grid_g_per_kwh >= 0):
        raise ValueError(f"grid_g_per_kwh must be a finite number >= 0, got {grid_g_per_kwh}")
    if chip_power_w is not None and not (math.isfinite(chip_power_w) and chip_power_w > 0):
        raise ValueError(f"chip_power_w must be a finite number > 0, got {chip_power_w}")
    if isinstance(mfu, bool) or not isinstance(mfu, numbers.Real) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be a number in (0, 1], got {mfu!r}")
    if remat not in REMAT_POLICIES:  # (a typo was reported as 'does not fit')
        raise ValueError(f"remat={remat!r}: use one of {REMAT_POLICIES}")
    if law not in ALLOCATIONS:
        raise ValueError(f"law={law!r}: use one of {sorted(ALLOCATIONS)}")
    alloc = ALLOCATIONS[law]
    try:
        c = get_chip(hardware)
    except ValueError as e:
        raise ValueError(f"hardware={hardware!r}: {e}") from None
    dtype = peak_dtype(dtype)
    peak = c.peak_flops.get(dtype)
    if peak is None:
        raise ValueError(f"dtype={dtype!r}: {c.name} has no published {dtype} peak; use one of "
                         f"{sorted(c.peak_flops)}")
    # the matmuls run at the peak of the dtype they compute in: a float32 (tf32 / fp32) peak is a float32 model, whose
    # activations take twice a bf16 one's bytes (sized as bf16, 7B on 256 A100 at tf32 'fit' at 63.7 GiB of 67.1,
    # where its float32 activations need 75.5); fp8 / int8 matmuls keep bf16 activations
    compute_dtype = {"fp32": "float32", "tf32": "float32", "fp16": "float16"}.get(dtype, "bfloat16")
    power = chip_power_w if chip_power_w is not None else c.power_w
    if power is None:
        raise ValueError(f"{c.name}: the vendor publishes no per-chip power; pass chip_power_w (--chip-power-w W)")

    if params is not None:
        n = float(params)
        d = float(tokens) if tokens is not None else float(alloc.optimal_tokens_for_params(n))
        how = "given" if tokens is not None else "compute-optimal for N"
    elif tokens is not None:  # the budget and the data fix the model: 6·N·D = C
        d = float(tokens)
        n = float(flops) / (6.0 * d)
        if not (math.isfinite(n) and n > 0):  # (inf or 0 was refused as 'n_params', which the CLI read as --params)
            raise ValueError(f"tokens={d:g} with flops={flops:g} leaves N = C / 6D = {n:g}, which no float model size "
                             f"holds: {'raise' if n else 'lower'} tokens (--tokens) or "
                             f"{'lower' if n else 'raise'} flops (--flops)")
        how = "given; N = C / 6D"
    else:
        n = float(alloc.optimal_params(flops))
        d = float(alloc.optimal_tokens(flops))
        how = "compute-optimal for the budget"
    try:
        shape = suggest_shape(n, vocab_size=vocab_size)
    except NoShapeError as e:  # name the inputs that reach the closest size (the vocabulary alone rarely can)
        # a closest shape below N (N in a gap of the family, 1.1e7, or past its deepest shape, 1e17) is reached by
        # lowering the input: that case had re-raised the bare error, naming no input (and no flag on the CLI)
        up = e.closest > n
        more, less = ("raise", "lower") if up else ("lower", "raise")
        if params is not None:
            fix = f"{more} params (--params) to about {e.closest:.3g}"
        elif tokens is not None:  # N = C / 6D: a larger budget or fewer tokens, or the reverse
            fix = (f"the budget leaves N = C / 6D = {n:.3g}: {more} flops (--flops) to about "
                   f"{6 * d * e.closest:.3g} or {less} tokens (--tokens) to about {flops / (6 * e.closest):.3g}")
        else:
            fix = f"{more} flops (--flops) to about {float(alloc.optimal_flops_for_params(e.closest)):.3g}"
        raise ValueError(f"{e}; {'or ' if 'vocabulary' in str(e) else ''}{fix}") from None
    if sliding_window is not None:
        shape = dataclasses.replace(shape, windows=tuple(  # (scaling.flops' layout: layer i global at (i+1) % K == 0)
            None if global_every and (i + 1) % global_every == 0 else sliding_window for i in range(shape.n_layers)))
    n_local = sum(w is not None for w in shape.windows)
    try:
        fpt = train_flops_per_token(shape, seq_len)
    except OverflowError:  # (a bare 'integer division result too large for a float' traceback)
        raise ValueError(f"seq_len ({len(str(seq_len))} digits) is too long: its attention FLOPs overflow a float; "
                         "lower seq_len") from None
    c6 = 6.0 * n * d
    cm = fpt * d
    seconds = cm / (chips * peak * mfu)
    chip_hours = chips * seconds / 3600
    kwh = chip_hours * power / 1000 * pue
    co2 = kwh * grid_g_per_kwh / 1000
    # a product past the float range printed a plan of 'inf s', 'inf kWh' (tokens 1e300, mfu 1e-300, pue 1e308):
    # refused naming the input that took it there (each factor before it is finite)
    if not (math.isfinite(c6) and math.isfinite(cm)):
        attention = fpt - 6.0 * param_counts(shape).matmul_active
        # without --tokens, N and D stay below ~1e17 (the deepest shape): only the sequence's attention can get there
        name, v = (("seq_len", seq_len) if tokens is None or math.isfinite(c6) and attention > fpt / 2 else
                   ("tokens", tokens) if params is not None else ("flops", flops))
        _overflow(name, v, f"training FLOPs (6ND {c6:.4g}, model FLOPs {cm:.4g})")
    if not (math.isfinite(seconds) and math.isfinite(chip_hours)):
        _overflow("mfu", mfu, f"wall-clock ({cm:.4g} FLOPs at {mfu:g} of {chips} x {peak:.4g} FLOP/s)")
    if not math.isfinite(kwh):
        _overflow(*(("chip_power_w", chip_power_w) if chip_power_w is not None and chip_power_w / 1000 > pue
                    else ("pue", pue)), f"energy ({_num(chip_hours)} chip-h x {power:g} W x PUE {pue:g})")
    if not math.isfinite(co2):
        _overflow("grid_g_per_kwh", grid_g_per_kwh, f"CO2e ({_num(kwh)} kWh x {grid_g_per_kwh:g} g/kWh)")
    skipped: list[str] = []
    tried: list[MeshChoice] = []
    mesh = suggest_mesh(shape, chips, c.hbm_bytes, seq_len=seq_len, seqs_per_chip=seqs_per_chip, remat=remat,
                        compute_dtype=compute_dtype, skipped=skipped, tried=tried)

    law_txt = {"approach1": "Chinchilla Approach 1: N_opt ∝ C^0.50, anchored at 67B params for Gopher's 5.76e23 FLOPs "
                            f"({float(alloc.optimal_tokens_for_params(1e9)) / 1e9:.1f} tokens/param)",
               "approach3": "Chinchilla Approach 3 fit L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 "
                            "(N_opt ∝ C^0.45)"}[law]
    pc = param_counts(shape)
    lines = [
        "== jaxscale plan ==",
        "assumptions:",
        f"  allocation : {law_txt}",
        "  FLOPs      : budget C = 6·N·D; model FLOPs = D x (6 x matmul params + 12·L·d_attn·(T+1)/2 causal "
        f"attention) of the suggested shape at seq {seq_len}"
        + ("" if sliding_window is None else f"; its {n_local} of {shape.n_layers} local layers: min(W, position + 1) "
           f"keys, W={sliding_window}{'' if n_local == shape.n_layers else f', every {global_every}th layer global'}")
        + " (no remat recompute: MFU convention)",
        f"  hardware   : {chips} x {c.name}, {dtype} dense peak {peak / 1e12:g} TFLOP/s per chip "
        f"({c.source}), MFU {mfu:.0%}",
        f"  energy     : {power:g} W per chip{' (datasheet max TDP)' if chip_power_w is None else ' (given)'} "
        f"x PUE {pue:g}; grid {grid_g_per_kwh:g} gCO2e/kWh; chips only (hosts, network, idle not counted)",
        f"  memory     : f32 params + f32 grads + AdamW (2 x f32), {peak_dtype(compute_dtype)} compute, remat {remat}, "
        f"fused (flash) attention, {seqs_per_chip} sequence(s) of {seq_len} per data/fsdp rank, {HEADROOM:.0%} of HBM "
        "usable",
        "",
        f"model     : N = {n:.4g} params; suggested shape L={shape.n_layers}, d={shape.d_model}, "
        f"heads={shape.n_heads}x{shape.head_dim}, mlp={shape.mlp_dim}, vocab={shape.vocab_size} "
        f"({pc.total:.4g} params)",
        f"tokens    : D = {d:.4g} ({how}; {_num(d / n, 1)} tokens/param)",
        f"compute   : 6ND = {c6:.4g} FLOPs; model FLOPs = {fpt:.4g}/token x D = {cm:.4g} FLOPs",
        f"wall-clock: {cm:.4g} / ({chips} x {peak:.4g} x {mfu:g}) = {_num(seconds)} s = {_num(seconds / 3600, 1)} h "
        f"= {_num(seconds / 86400, 2)} days ({_num(chip_hours)} chip-hours)",
    ]
    if mesh is None:
        # what the most sharded layout (fsdp over as many chips as divide the shape, data over the rest) still
        # needs says which advice can help (with 7 chips fsdp 7 divides nothing: fsdp 1, the state unsharded)
        least, fsdp = None, chips
        for fsdp in reversed(_divisors(chips)):
            try:
                least = memory_per_device(shape, {"fsdp": fsdp, "data": chips // fsdp}, seqs_per_chip * chips,
                                          seq_len, remat=remat, param_dtype="float32", compute_dtype=compute_dtype,
                                          kernel="flash")
                break
            except ValueError:
                continue
        state = None if least is None else least.params + least.grads + least.opt_state
        # what no sequence length or remat lowers: the state and the optimizer update's buffers (7B on 3 H200s peaks
        # there, 125.5 GiB of 118.2, and was told to 'lower seq_len' at seq 128)
        fixed = None if least is None else least.state + least.update_peak
        if fixed is None or fixed < HEADROOM * c.hbm_bytes:  # the state fits: activations are what overflows,
            # and more chips bring more sequences (one per data / fsdp rank), not fewer per chip
            # (seqs_per_chip 64 multiplies them 64-fold: the advice named remat and seq_len, never the count asked for)
            fixes = ([] if seqs_per_chip == 1 else [f"lower seqs_per_chip (from {seqs_per_chip})"]) + (
                [] if remat == "full" else ["use remat='full'"]) + [
                "lower seq_len", "split each sequence over a 'sequence' mesh axis (this planner does not search it)"]
        else:
            fixes = ["add chips" if fsdp == chips else f"add chips (fsdp can split d_model={shape.d_model} over only "
                     f"{fsdp} of {chips})"]
        # the closest layout tried (tensor shards activations too): printed alone, the fsdp-only probe read as the
        # best it could do (400B on 256 H100s: 201.7 GiB per chip, where tensor 8 x fsdp 32 needs 73.5 GiB)
        closest = min(tried, key=lambda m: m.memory.total, default=None)
        if closest is not None and least is not None and closest.memory.total >= least.total:
            closest = None  # the probe's own layout: said once
        need = [] if closest is None else [f"closest tried: mesh {closest.mesh}, "
                                           f"{closest.memory.total / 2**30:.1f} GiB per chip"]
        if least is not None:
            need.append(f"fsdp over {fsdp} of {chips}: {least.total / 2**30:.1f} GiB per chip, of which parameters + "
                        f"gradients + optimizer state {state / 2**30:.1f} GiB, with the optimizer update "
                        f"{fixed / 2**30:.1f} GiB")
        need = f" ({'; '.join(need)})" if need else ""
        lines.append(f"memory    : does not fit {chips} x {c.hbm_bytes / 1e9:g} GB ({HEADROOM:.0%} usable) with "
                     f"tensor <= 8 at this micro-batch{need}; "
                     f"{', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}{fixes[-1]}"
                     + "".join(f"\n            layouts not tried: {why}" for why in skipped))
    else:
        lines += [f"memory    : mesh {mesh.mesh}, micro-batch {mesh.micro_batch} x {seq_len} "
                  f"token{'s' * (seq_len != 1)}, per chip "
                  f"{mesh.memory.total / 2**30:.1f} GiB of {c.hbm_bytes / 2**30:.1f} GiB "
                  f"({HEADROOM:.0%} usable: {HEADROOM * c.hbm_bytes / 2**30:.1f} GiB):", mesh.memory.table()]
    lines += [f"energy    : {_num(chip_hours)} chip-h x {power:g} W x PUE {pue:g} = {_num(kwh)} kWh",
              f"CO2e      : {_num(kwh)} kWh x {grid_g_per_kwh:g} g/kWh = {_num(co2)} kg ({_num(co2 / 1000, 2)} t)"]
    return Plan(n, d, c6, cm, fpt, seconds, chip_hours, kwh, co2, shape, mesh, "\n".join(lines))


# make_plan's keyword → the flag that sets it
FLAGS = {"params": "--params", "n_params": "--params", "flops": "--flops", "tokens": "--tokens", "chips": "--chips",
         "mfu": "--mfu", "seq_len": "--seq-len", "vocab_size": "--vocab", "pue": "--pue", "grid_g_per_kwh": "--grid",
         "chip_power_w": "--chip-power-w", "seqs_per_chip": "--seqs-per-chip", "law": "--law",
         "hardware": "--hardware", "dtype": "--dtype", "sliding_window": "--sliding-window",
         "global_every": "--global-every"}


def main(argv=None):
    ap = cli_parser(__doc__, __spec__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=float, help="model size N (parameters)")
    g.add_argument("--flops", type=float, help="training budget C (FLOPs)")
    ap.add_argument("--tokens", type=float, help="override the compute-optimal token count (with --flops: "
                    "the model size becomes C / 6D)")
    ap.add_argument("--hardware", default="h100", help="chip kind: h100, h200, a100, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e")
    ap.add_argument("--chips", type=at_least(1), default=256)
    ap.add_argument("--dtype", default="bf16", help="peak to use: bf16, fp8, ... (tf32 / fp32: memory sized for "
                    "float32 compute)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--seq-len", type=at_least(1), default=4096)
    ap.add_argument("--vocab", type=at_least(1), default=32_000)
    ap.add_argument("--law", default="approach1", choices=sorted(ALLOCATIONS))
    ap.add_argument("--pue", type=float, default=1.1)
    ap.add_argument("--grid", type=float, default=400.0, help="grid carbon intensity, gCO2e/kWh")
    ap.add_argument("--chip-power-w", type=float, help="per-chip power (W); required for TPUs")
    ap.add_argument("--remat", default="save_dots_no_batch", choices=("none", "full", "save_dots",
                                                                      "save_dots_no_batch"))
    ap.add_argument("--seqs-per-chip", type=at_least(1), default=1)
    ap.add_argument("--sliding-window", type=at_least(1), metavar="W",
                    help="local layers attend to their last W keys (default: every layer global)")
    ap.add_argument("--global-every", type=at_least(2), metavar="K",
                    help="with --sliding-window: every K-th layer global (2: Gemma 2, 6: Gemma 3's 5:1; default: "
                         "every layer local, Mistral)")
    a = ap.parse_args(argv)
    try:
        plan = make_plan(params=a.params, flops=a.flops, tokens=a.tokens, hardware=a.hardware, chips=a.chips,
                         dtype=a.dtype, mfu=a.mfu, seq_len=a.seq_len, vocab_size=a.vocab, law=a.law, pue=a.pue,
                         grid_g_per_kwh=a.grid, chip_power_w=a.chip_power_w, remat=a.remat,
                         seqs_per_chip=a.seqs_per_chip, sliding_window=a.sliding_window,
                         global_every=a.global_every)
    except ValueError as e:  # make_plan names its keyword; name the flag the user typed
        msg = str(e)
        word = re.match(r"[a-z_]+", msg)
        flag = FLAGS.get(word.group()) if word else None
        raise SystemExit(f"error: argument {flag}: {msg}" if flag else f"error: {msg}") from None
    print(plan.text)
    return plan


if __name__ == "__main__":
    run_main(main)
