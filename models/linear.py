"""Activation × weight products [M, D] @ [D, F] that XLA:CPU runs on its fast matmul kernels.

Autodiff of y = x @ w makes the weight gradient dw = xᵀ @ g a dot that contracts the leading (token) dim of
both operands. XLA:CPU hands that form to Eigen rather than to YNNPACK, its faster kernels for products of
row-major operands (about half the rate on the Zen 5 machine), and runs it beside the YNNPACK dx = g @ wᵀ.
Materialising a transpose (through a reshape sandwich that XLA does not fold back into the dot) makes dw a plain
product: the reference train step runs 1.03-1.09x faster than with plain products on the AMD machines, within 2% on
the Intel one (docs/benchmarks.md, "Transformer train step").
Which operand is transposed: the narrower one, xᵀ [D, M] (dw = xᵀ @ g) or gᵀ [F, M] (dwᵀ = gᵀ @ x, then the small
[F, D] result transposed), x on a tie (q / k / v then share one xᵀ). In a layer scan this matters: x reaches the
backward as a dynamic slice of the stacked residuals, and XLA:CPU fuses that slice into its transpose (a loop
fusion ~5x slower than a plain transpose), whereas g is a plain array of the backward; the down projection
([M, 4D] @ [4D, D]) transposes its narrow g. Scanned reference step 0.94-0.96x the time of plain products in the
loop, bf16 scanned 0.94-0.96x, the DiT's scanned float32 step 0.87-0.98x (docs/benchmarks.md, twentieth session).
Low precision (bf16 / f16 operands) on the CPU backend: XLA:CPU runs a dot with bf16 *output* as a float32 dot on
operands converted up, and does the same to a dot whose operand is a transpose it can fold into the dot's
dimensions, even behind an optimization barrier. Products here therefore accumulate into float32 and round the
result (numerically what a GPU's bf16 GEMM does), and the transpose is materialised by the reshape sandwich: bf16
dots then stay bf16, on AMX / AVX512-BF16 kernels (a 2048³ bf16 product: 1266 GFLOP/s against 305 in float32 on the
Intel machine; the bf16-compute reference step 0.54x the time it took with converted dots).
Only on the CPU backend: elsewhere the copy would cost memory bandwidth for nothing, and GPU / TPU GEMMs
accumulate in float32 anyway.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from parallel.autodiff import custom_vjp

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _dot(a, b, dims, out=None):
    """lax.dot_general with result dtype `out` (None: the operands' result type). On the CPU backend bf16 / f16
    operands accumulate into float32, rounded to `out` afterwards (see the module docstring)."""
    rt = jnp.result_type(a, b)
    out = rt if out is None else jnp.dtype(out)
    if rt in _LOW_PRECISION and jax.default_backend() == "cpu":
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out)


def product(x, w, out=None):
    """x [..., K] @ w [K, N] → [..., N] through `_dot`."""
    return _dot(x, w, (((x.ndim - 1,), (0,)), ((), ())), out)


def flat_rows() -> bool:
    """Whether projections may run on flattened [B·T, D] rows: not when the current mesh shards the sequence
    (those rows are not a per-device block; XLA would gather the whole sequence onto every device)."""
    from parallel.rules import mesh_axis_for

    return mesh_axis_for("act_seq")[1] == 1


def linear(x_MD, w_DF, impl: str = "auto", out_dtype=None, flatten: bool = True, contract: int = 1):
    """x [..., D] @ w [D, F] → [..., F]; values and gradients are those of `x @ w` (`out_dtype` None).

    contract: for a weight kept in its own shape, e.g. q's [D, N, H] or o's [N, H, D]: x's last `contract` dims
    meet w's first ones (x [..., N, H] @ w [N, H, D] → [..., D]). The product then runs as the 2-D one, but the
    backward keeps w itself: a reshaped copy would be a new array, which a scanned layer stack saves per layer (a
    copy of those weights every step).

    impl: 'plain' is that product; 'transposed_grad' computes dw from a materialised transpose of x or g (see
    above); 'auto' picks 'transposed_grad' on the CPU backend and 'plain' elsewhere.
    flatten: run it on rows [M, D] (M = all leading dims; 3-D products make XLA:CPU's weight gradients 1.5x
    slower). flatten=False keeps x's shape (and 'plain'), for a leading dim other than the first sharded (sequence
    parallelism): [B, T] rows with T split over devices are not a per-device block, and XLA would gather the whole
    sequence onto each device.
    out_dtype: accumulation and output dtype, e.g. float32 logits from bf16 operands rather than bf16 ones cast
    up. The backward products still run in the operands' dtype (the cotangent rounded to it, as autodiff of a
    product cast up afterwards does), so a bf16 model's LM-head backward keeps its bf16 matmuls.
    """
    impl = resolve_impl(impl)
    if contract != 1 or w_DF.ndim != 2:
        if out_dtype is not None and jnp.dtype(out_dtype) != jnp.result_type(x_MD, w_DF):
            raise ValueError(f"linear(out_dtype={jnp.dtype(out_dtype).name}) takes a 2-D weight with contract=1 "
                             f"(got w {w_DF.shape}, contract={contract}): reshape w to 2-D, or cast the result")
        return _linear_nd(x_MD, w_DF, impl if flatten else "plain", contract)
    lead = x_MD.shape[:-1]
    if not flatten:
        impl = "plain"
    elif len(lead) != 1:
        # sizes spelled out, not -1: with a zero-size dim (D = 0) -1 is ambiguous, a bare ZeroDivisionError
        x_MD = x_MD.reshape(math.prod(lead), x_MD.shape[-1])
        return linear(x_MD, w_DF, impl, out_dtype).reshape(*lead, w_DF.shape[1])
    if out_dtype is not None and jnp.dtype(out_dtype) != jnp.result_type(x_MD, w_DF):
        return _linear_out(x_MD, w_DF, impl == "transposed_grad", jnp.dtype(out_dtype))
    return product(x_MD, w_DF) if impl == "plain" else _linear_tg(x_MD, w_DF, 1)


def add_bias(x, b):
    """x [..., F] + b [F] (any leading dims; b broadcast over them) in float32, returned in x's dtype.

    Under bf16 compute the bias's gradient is a sum of the cotangent over every token: written x + b.astype(bf16),
    autodiff sums it in bf16 and casts that up to the float32 parameter's gradient (0.6-1.7% of the largest entry over
    4K-256K tokens on CPU, where a float32 sum is exact to 1e-7); here the sum runs in float32. The forward rounds
    once (x + b) instead of twice (b, then x + b). A float32 x costs nothing: the casts are no-ops."""
    b = jnp.broadcast_to(b.astype(jnp.float32), x.shape)  # explicit: jax_numpy_rank_promotion='raise' refused it
    return (x.astype(jnp.float32) + b).astype(x.dtype)


def resolve_impl(impl: str) -> str:
    """'auto' → 'transposed_grad' on the CPU backend, 'plain' elsewhere; an unknown impl raises naming the field."""
    if impl == "auto":
        impl = "transposed_grad" if jax.default_backend() == "cpu" else "plain"
    if impl not in ("plain", "transposed_grad"):
        raise ValueError(f"matmul_impl={impl!r}: use 'auto', 'plain' or 'transposed_grad'")
    return impl


def transposed(x_MD):
    """x [M, D] → xᵀ [D, M], materialised: XLA:CPU folds a plain transpose into the dot that reads it (as a
    contraction of both operands' leading dims) or writes it, and in low precision converts the operands to
    float32; through this reshape sandwich it copies x once and runs a row-major product (`product_grads`)."""
    M, D = x_MD.shape
    return x_MD.reshape(M, D, 1).transpose(1, 2, 0).reshape(D, M)


def product_grads(x_MD, w_DF, g_MF, transposed_grad: bool):
    """(dx, dw) of x @ w for the cotangent g, in the operands' dtypes (x [..., D]; [M, D] if transposed_grad)."""
    g_MF = g_MF.astype(jnp.result_type(x_MD, w_DF))
    if transposed_grad and g_MF.shape[1] < x_MD.shape[1]:  # the narrower operand is transposed (module docstring)
        dw_DF = transposed(product(transposed(g_MF), x_MD, out=w_DF.dtype))
    elif transposed_grad:
        dw_DF = product(transposed(x_MD), g_MF, out=w_DF.dtype)  # f32 weights: the f32 accumulation, not a rounded copy
    else:
        lead = tuple(range(x_MD.ndim - 1))
        dw_DF = _dot(x_MD, g_MF, ((lead, lead), ((), ())), out=w_DF.dtype)
    return _dot(g_MF, w_DF, (((g_MF.ndim - 1,), (1,)), ((), ())), out=x_MD.dtype), dw_DF


def _as_2d(w, contract: int):
    """w [C..., F...] → [prod C, prod F] (not -1: a zero-size C made that a bare ZeroDivisionError where x @ w is 0)."""
    return w.reshape(math.prod(w.shape[:contract]), math.prod(w.shape[contract:]))


@functools.partial(custom_vjp, nondiff_argnums=(2,))
def _linear_tg(x_MK, w, contract: int):
    """x [M, K] @ w [C..., F...] (prod C = K) → [M, prod F]; the backward keeps w in its own shape."""
    return product(x_MK, _as_2d(w, contract))


def _linear_tg_bwd(contract, res, g_MF):
    x_MK, w = res
    dx_MK, dw = product_grads(x_MK, _as_2d(w, contract), g_MF, transposed_grad=True)
    return dx_MK, dw.reshape(w.shape)


# the forward rule's product is a plain dot, not a nested custom-VJP call: remat policies save dots by primitive
_linear_tg.defvjp(lambda x_MK, w, contract: (product(x_MK, _as_2d(w, contract)), (x_MK, w)), _linear_tg_bwd)


@functools.partial(custom_vjp, nondiff_argnums=(2, 3))
def _linear_out(x_MD, w_DF, transposed_grad: bool, out_dtype):
    return jnp.matmul(x_MD, w_DF, preferred_element_type=out_dtype)


_linear_out.defvjp(lambda x_MD, w_DF, tg, od: (jnp.matmul(x_MD, w_DF, preferred_element_type=od), (x_MD, w_DF)),
                   lambda tg, od, res, g_MF: product_grads(*res, g_MF, tg))


def _linear_nd(x, w, impl: str, contract: int):
    """x [..., C...] @ w [C..., F...] → [..., F...] (C: w's first `contract` dims, x's last)."""
    C, F = w.shape[:contract], w.shape[contract:]
    if x.shape[x.ndim - contract:] != C:
        raise ValueError(f"linear: x {x.shape} does not end in the weight's contracted dims {C} (w {w.shape})")
    lead = x.shape[:x.ndim - contract]
    if impl == "plain":
        dims = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
        return _dot(x, w, (dims, ((), ())))
    return _linear_tg(x.reshape(math.prod(lead), math.prod(C)), w, contract).reshape(*lead, *F)
