"""jaxscale scaling: FLOPs / memory / MFU accounting, scaling laws and planning.

- `scaling.flops`: parameter counts (dense, sliding-window, MoE total vs active), training /
  prefill / decode FLOPs per token, `mfu`.
- `scaling.memory`: parameter, gradient, optimizer-state and activation bytes per device for a mesh,
  micro-batch and remat policy (placement from parallel.rules).
- `scaling.dit`: the video DiT's parameters, FLOPs and memory per device (`dit_memory_per_device`).
- `scaling.hardware`: peak FLOP/s, HBM and power per chip kind (datasheets), measured CPU peak.
- `scaling.laws`: Chinchilla fits (Approach 3 with bootstrap, IsoFLOP envelope), compute-optimal allocation.
- `scaling.plan`: `python -m scaling.plan --params 7e9 --hardware h100 --chips 256`.
"""

from scaling.flops import (
    LMShape,
    MoESpec,
    attended_keys,
    decode_flops_per_token,
    executed_keys,
    forward_flops_per_token,
    lm_shape,
    mfu,
    param_counts,
    prefill_flops_per_token,
    train_flops_per_token,
)
from scaling.hardware import CHIPS, chip, measure_cpu_peak, peak_flops
from scaling.memory import MemoryBreakdown, kv_cache_bytes, memory_per_device, saved_bytes_per_token

__all__ = ["CHIPS", "LMShape", "MemoryBreakdown", "MoESpec", "attended_keys", "chip", "decode_flops_per_token",
           "executed_keys", "forward_flops_per_token", "kv_cache_bytes", "lm_shape", "measure_cpu_peak",
           "memory_per_device", "mfu", "param_counts", "peak_flops", "prefill_flops_per_token",
           "saved_bytes_per_token", "train_flops_per_token"]
