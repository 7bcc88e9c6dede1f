"""parallel.host.tune_cpu_allocator: XLA:CPU's per-execution buffers are reused instead of page-faulted anew."""

import os
import subprocess
import sys

import pytest

PROGRAM = r"""
import resource, sys
from parallel.host import tune_cpu_allocator
applied = tune_cpu_allocator()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cos(jnp.exp(x) @ jnp.sin(x).T).sum(0))  # 64 MB temporaries > glibc's mmap threshold
x = jnp.ones((4096, 256), jnp.float32) * 1e-3
for _ in range(2):
    f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 4)
"""


def faults_per_call(tuning: str):
    env = dict(os.environ, JAXSCALE_MALLOC_TUNING=tuning, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_stops_per_call_page_faults():
    applied_off, faults_off = faults_per_call("0")
    applied_on, faults_on = faults_per_call("1")
    assert not applied_off and applied_on
    # untuned: the 64 MB temporaries are mmapped per call, 4 KiB pages (or 2 MiB with THP) fault in again
    assert faults_off > 1000, faults_off
    assert faults_on < faults_off / 10, (faults_on, faults_off)
