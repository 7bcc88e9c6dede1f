"""Activation × weight products [M, D] @ [D, F] whose weight gradient XLA:CPU runs on its fast matmul kernels.

Autodiff of y = x @ w makes the weight gradient dw = xᵀ @ g a dot that contracts the leading (token) dim of
both operands. XLA:CPU hands that form to Eigen rather than to YNNPACK, its faster kernels for products of
row-major operands, and runs it beside the YNNPACK dx = g @ wᵀ. Materialising xᵀ ([D, M], behind an
optimization barrier so that XLA does not fold the transpose back into the dot) makes dw a plain product:
the reference train step runs 1.03-1.09× faster than with plain products (docs/benchmarks.md,
"Transformer train step").
Only on the CPU backend: elsewhere the copy of x would cost memory bandwidth for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(x_MD, w_DF, impl: str = "auto"):
    """x [M, D] @ w [D, F] → [M, F] in their (common) dtype; values and gradients are those of `x @ w`.

    impl: 'plain' is `x @ w`; 'transposed_grad' computes dw from a materialised xᵀ (see above);
    'auto' picks 'transposed_grad' on the CPU backend and 'plain' elsewhere.
    """
    if impl == "auto":
        impl = "transposed_grad" if jax.default_backend() == "cpu" else "plain"
    if impl == "plain":
        return x_MD @ w_DF
    if impl != "transposed_grad":
        raise ValueError(f"matmul_impl={impl!r}: use 'auto', 'plain' or 'transposed_grad'")
    return _linear_tg(x_MD, w_DF)


@jax.custom_vjp
def _linear_tg(x_MD, w_DF):
    return x_MD @ w_DF


def _linear_tg_fwd(x_MD, w_DF):
    return x_MD @ w_DF, (x_MD, w_DF)


def _linear_tg_bwd(res, g_MF):
    x_MD, w_DF = res
    xt_DM = jax.lax.optimization_barrier(jnp.transpose(x_MD))
    return g_MF @ w_DF.T, (xt_DM @ g_MF).astype(w_DF.dtype)


_linear_tg.defvjp(_linear_tg_fwd, _linear_tg_bwd)
