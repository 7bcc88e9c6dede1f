"""Peak throughput, memory and power per accelerator kind, from public datasheets; a measured CPU peak.

All FLOP/s are *dense* (no 2:4 structured sparsity): NVIDIA datasheets print the sparse figure with
an asterisk, which is 2x the dense one. `power_w` is the board/chip TDP where the vendor publishes one
(Google does not publish per-chip power for Cloud TPUs: pass it explicitly, e.g. `plan --chip-power-w`).
Bandwidths in bytes/s, memory in bytes (GB = 1e9, GiB = 2^30 as the datasheet states).
"""

from __future__ import annotations

import dataclasses
import numbers
import time

import numpy as np

GB, GIB, T = 1e9, 2**30, 1e12


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. `peak_flops` maps a dtype name ('bf16', 'fp8', 'int8', 'fp32') to dense FLOP/s."""

    name: str
    peak_flops: dict[str, float]
    hbm_bytes: float
    hbm_bw: float
    power_w: float | None
    source: str


CHIPS: dict[str, Chip] = {
    # https://cloud.google.com/tpu/docs/v4 (System architecture): 275 TFLOPs bf16/int8, 32 GiB HBM2, 1200 GBps
    "tpu-v4": Chip("TPU v4", {"bf16": 275 * T, "int8": 275 * T}, 32 * GIB, 1200 * GB, None,
                   "https://cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 393 TOPs int8 (not 2 x 197), 16 GB HBM2, 819 GBps
    "tpu-v5e": Chip("TPU v5e", {"bf16": 197 * T, "int8": 393 * T}, 16 * GB, 819 * GB, None,
                    "https://cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 918 TOPs int8, 95 GB HBM2e, 2765 GBps
    "tpu-v5p": Chip("TPU v5p", {"bf16": 459 * T, "int8": 918 * T}, 95 * GB, 2765 * GB, None,
                    "https://cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 1836 TOPs int8, 32 GB HBM, 1638 GBps
    "tpu-v6e": Chip("TPU v6e (Trillium)", {"bf16": 918 * T, "int8": 1836 * T}, 32 * GB, 1638 * GB, None,
                    "https://cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS (624 sparse), TF32 156, FP32 19.5,
    # INT8 624 TOPS; 80 GB HBM2e, 2039 GB/s; max TDP 400 W. No FP8.
    "a100": Chip("NVIDIA A100 SXM4 80GB", {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T,
                                           "int8": 624 * T}, 80 * GB, 2039 * GB, 400.0,
                 "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                 "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS* and FP8 3,958 TFLOPS* (*with sparsity;
    # dense = half), TF32 989*, FP32 67; 80 GB HBM3, 3.35 TB/s; up to 700 W.
    "h100": Chip("NVIDIA H100 SXM", {"bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "tf32": 494.7 * T,
                                     "fp32": 67 * T, "int8": 1978.9 * T}, 80 * GB, 3.35e12, 700.0,
                 "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same Hopper compute as H100 SXM (BF16 1,979* / FP8 3,958*
    # TFLOPS with sparsity), 141 GB HBM3e, 4.8 TB/s; up to 700 W.
    "h200": Chip("NVIDIA H200 SXM", {"bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "tf32": 494.7 * T,
                                     "fp32": 67 * T, "int8": 1978.9 * T}, 141 * GB, 4.8e12, 700.0,
                 "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet)"),
}

ALIASES = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e", "trillium": "tpu-v6e",
           "a100-80gb": "a100", "h100-sxm": "h100", "h200-sxm": "h200"}


def chip(kind: str) -> Chip:
    """Look up a chip by kind ('h100', 'tpu-v5p', 'v5e', ...); the error lists the known kinds."""
    if not isinstance(kind, str):
        raise ValueError(f"hardware kind must be a name such as 'h100', got {kind!r}; known: "
                         f"{', '.join(sorted(CHIPS))}")
    key = ALIASES.get(kind.lower(), kind.lower())
    if key not in CHIPS:
        raise ValueError(f"unknown hardware kind {kind!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[key]


# the peak tables' short names; numpy / jax spellings are taken too
PEAK_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float8": "fp8",
                      "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


def peak_dtype(dtype) -> str:
    """'bfloat16' → 'bf16' (the peak tables' names); a name already short, or unknown, comes back as it is. A dtype
    object (jnp.bfloat16, np.dtype('float16')) is read by its name: jnp.bfloat16 had failed the lookup (peak_flops)
    or fallen through to the TF32 peak (device_peak: half the bf16 one, MFU doubled)."""
    if dtype is None:  # (np.dtype(None) would be float64)
        return dtype
    if not isinstance(dtype, str):
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            return dtype  # not a dtype either: the caller's error names it
    dtype = dtype.lower()
    # every float8 variant (e4m3, e4m3fnuz, e5m2fnuz, ...): the datasheets give one fp8 peak
    return "fp8" if dtype.startswith("float8") else PEAK_DTYPE_ALIASES.get(dtype, dtype)


def peak_flops(kind: str, dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of one chip for `dtype` ('bf16', 'fp8', ...; 'bfloat16' etc. also taken)."""
    c = chip(kind)
    dtype = peak_dtype(dtype)
    if dtype not in c.peak_flops:
        raise ValueError(f"{c.name} has no published {dtype!r} peak; available: {sorted(c.peak_flops)}")
    return c.peak_flops[dtype]


# jax's `device_kind` strings -> CHIPS keys, most specific first. Variants with other clocks or power (H100 PCIe /
# NVL, H200 NVL, TPU v4 lite) are left out on purpose: no peak is better than a wrong one.
_DEVICE_KINDS = (("h200 nvl", None), ("h200", "h200"), ("h100 pcie", None), ("h100 nvl", None), ("h100", "h100"),
                 ("a100", "a100"),
                 ("tpu v4 lite", None), ("tpu v4", "tpu-v4"), ("tpu v5 lite", "tpu-v5e"), ("tpu v5e", "tpu-v5e"),
                 ("tpu v5p", "tpu-v5p"), ("tpu v5", "tpu-v5p"), ("tpu v6 lite", "tpu-v6e"), ("tpu v6e", "tpu-v6e"))


# jax's dot-algorithm presets (`jax.lax.DotAlgorithmPreset` names, which jax_default_matmul_precision also takes): the
# inputs are cast to the preset's storage type whatever the model's dtype, so its peak is the one they run at (they fell
# through to the TF32 peak: F32_F32_F32 read 7.4x MFU's denominator, BF16_BF16_F32 on a float32 model MFU 2x). None: a
# multi-pass (X3 / X6 / X9) or float64 algorithm, which no datasheet has a peak for
_PRESET_PEAKS = {"F32_F32_F32": "fp32", "TF32_TF32_F32": "tf32", "BF16_BF16_F32": "bf16", "BF16_BF16_BF16": "bf16",
                 "F16_F16_F32": "fp16", "F16_F16_F16": "fp16", "BF16_BF16_F32_X3": None, "BF16_BF16_F32_X6": None,
                 "BF16_BF16_F32_X9": None, "TF32_TF32_F32_X3": None, "F64_F64_F64": None}


def device_peak(device_kind: str, compute_dtype, matmul_precision: str | None = None) -> tuple[float | None, str]:
    """(dense peak FLOP/s, chip key) of one accelerator as jax names it (`jax.devices()[0].device_kind`), for
    the matmul precision a model computing in `compute_dtype` ('bfloat16', 'bf16' or a dtype such as jnp.bfloat16)
    gets; (None, device_kind) when unknown.

    TPUs: the bf16 peak (their MXUs multiply float32 in bf16 passes). NVIDIA: bf16 / fp16 as named; float32 runs
    on TF32 tensor cores unless `matmul_precision` (jax's `jax_default_matmul_precision`) asks for full float32
    ('highest' / 'float32'), which gets the plain FP32 peak. A dot-algorithm preset ('BF16_BF16_F32', 'F32_F32_F32',
    ...) casts every matmul's inputs, so on NVIDIA it sets the peak whatever `compute_dtype` is; (None, device_kind)
    for a multi-pass one ('BF16_BF16_F32_X3'). fp8 (any float8_* dtype) and int8 get the chip's
    own fp8 / int8 peak (TPUs too, where published); (None, device_kind) for an NVIDIA chip that has none (an
    A100's fp8, a float64 model): no peak is better than the TF32 one, which is a quarter of an H100's fp8 peak. A
    TPU without one (v5e's fp8, any float64 model) gets its bf16 peak.
    """
    kind = device_kind.lower()
    key = next((name for pattern, name in _DEVICE_KINDS if pattern in kind), None)
    if key is None:
        return None, device_kind
    preset = str(matmul_precision).upper()
    if not key.startswith("tpu") and preset in _PRESET_PEAKS:
        dt = _PRESET_PEAKS[preset]
        if dt is None or dt not in CHIPS[key].peak_flops:
            return None, device_kind
        return peak_flops(key, dt), f"{key} {dt}"
    compute = peak_dtype(compute_dtype)  # 'bfloat16', 'bf16' and jnp.bfloat16 alike (the last two got the TF32 peak)
    if compute in ("fp8", "int8") and compute in CHIPS[key].peak_flops:  # they fell through to TF32 (4x MFU)
        dt = compute
    elif compute in ("fp8", "int8", "float64") and not key.startswith("tpu"):  # a peak the registry does not have
        return None, device_kind
    elif key.startswith("tpu") or compute == "bf16" or str(matmul_precision).lower() == "bfloat16":
        dt = "bf16"
    elif compute == "fp16":
        dt = "fp16"
    else:
        dt = "fp32" if str(matmul_precision).lower() in ("highest", "float32", "precision.highest") else "tf32"
    return peak_flops(key, dt), f"{key} {dt}"


def measure_cpu_peak(n: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """Measured matmul FLOP/s of this host's JAX CPU backend (all cores of one device; best of `repeats`).

    A practical peak for MFU on CPU: the best a large square matmul achieves, not a vendor number.
    """
    for name, v in (("n", n), ("repeats", repeats)):  # 0 timed nothing and returned a peak of 0.0 FLOP/s
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"measure_cpu_peak: {name} must be an int >= 1, got {v!r}")
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), dtype), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_table(dtypes=("bf16", "fp8")) -> str:
    """Markdown table of the registry (dense peaks in TFLOP/s); `dtypes` as peak_flops takes them ('bfloat16' or
    jnp.bfloat16 printed '—' for every chip)."""
    dtypes = [peak_dtype(d) for d in dtypes]
    rows = ["| kind | chip | " + " | ".join(f"{d} TFLOP/s" for d in dtypes) + " | HBM | HBM BW | power | source |",
            "|---" * (len(dtypes) + 6) + "|"]
    for k, c in CHIPS.items():
        peaks = " | ".join(f"{c.peak_flops[d] / T:g}" if d in c.peak_flops else "—" for d in dtypes)
        power = f"{c.power_w:g} W" if c.power_w else "not published"
        rows.append(f"| {k} | {c.name} | {peaks} | {c.hbm_bytes / GB:.3g} GB | {c.hbm_bw / GB:g} GB/s | {power} | "
                    f"{c.source} |")
    return "\n".join(rows)
