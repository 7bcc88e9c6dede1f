"""The prepared GPU benchmark runs its code path at toy size on CPU, so it cannot rot before a GPU is lent."""

import math

import pytest

from benchmarks import train_step_gpu
from scaling.hardware import peak_flops


def test_gpu_train_step_tiny_runs_and_reports_mfu():
    out = train_step_gpu.main(["--tiny", "--steps", "2"])
    assert out["attn_impl"] == "xla" and out["seq"] == 128 and out["batch"] == 2
    assert math.isfinite(out["loss"]) and out["tokens_per_s"] > 0
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * out["flops_per_token"] / peak_flops("h200", "bf16"))


def test_gpu_train_step_refuses_the_1b_config_without_a_gpu():
    with pytest.raises(SystemExit, match="--tiny"):
        train_step_gpu.main(["--steps", "1"])
