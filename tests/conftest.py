"""Every test sees 8 fake CPU devices; compiled models are shared through session fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound (hundreds of small programs, each run a few times): LLVM at -O0 halves the wall
# time (test_moe_transformer: 76 -> 33 s) and changes no semantics (XLA's HLO passes, fusion, buffer
# assignment and cost/memory analyses are the same). Subprocesses started by tests inherit it. Benchmarks and
# experiments keep the default level; set the flag yourself in XLA_FLAGS to override.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
