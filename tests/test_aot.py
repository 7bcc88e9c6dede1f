"""AOT compile of the sharded train step: XLA's per-device memory agrees with scaling/'s estimate."""

import pytest

from models import TransformerConfig
from parallel.aot import compile_report

CFG = TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, mlp_dim=256, max_seq_len=64)


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_aot_state_bytes_match_the_estimate(mesh):
    r = compile_report(CFG, mesh, batch=8, seq_len=64)
    batch_bytes = 2 * 8 * 64 * 4 // 8 if "data" not in mesh else 2 * 8 * 64 * 4 // 4
    # params + AdamW moments, per device: exact up to replicated norm scales and rounding (2%)
    assert abs((r.argument_bytes - batch_bytes) - r.estimate.state) <= 0.02 * r.estimate.state, r
    assert r.temp_bytes > 0 and r.peak_bytes < r.estimate.total * 1.5
