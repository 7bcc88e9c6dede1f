"""The gated MLP's elementwise core act(g) ⊙ u, whose backward keeps only (g, u) and recomputes act(g).

Autodiff of `silu(g) * u` saves σ(g), silu(g) and their products for the backward: six [tokens, F] arrays per
layer in a scanned layer stack (the scan stacks every residual across layers), where (g, u) suffice: the
backward recomputes σ(g) in the pass that writes (dg, du). Three fewer MLP-width activations per layer in memory
(with remat 'none'), and on XLA:CPU the scanned reference train step 0.95x the time (in-step A/B, 10 rounds;
docs/benchmarks.md, fifteenth session).
Outside a layer loop (an unrolled stack) XLA would merge the backward's recomputed act(g) with the forward's and
keep σ(g), silu(g) alive from the forward to the backward: the backward reads (g, u) through an optimization
barrier (`_fresh`), so its recomputation stays its own. Unrolled reference train step: temp memory 475 -> 443 MiB,
0.99x the time (docs/benchmarks.md, twentieth session).
`glu_linear` goes one product further: act(g)·u @ w_down in one VJP whose backward also recomputes the product
h = act(g)·u (the down projection's input) instead of keeping it: two MLP-wide arrays per layer in a scan, not
three (reference scanned step temp 346 -> 314 MiB at 0.995x the time, unrolled 1.006x; DiT default preset temp
172.9 -> 163.9 MiB, 0.994x).
"""

from __future__ import annotations

import functools
import math

import jax

from models.linear import product, product_grads, resolve_impl
from parallel.autodiff import custom_vjp

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@functools.partial(custom_vjp, nondiff_argnums=(2,))
def glu(g_MF, u_MF, act="silu"):
    """act(g) * u for g, u [..., F] of one dtype; act: 'silu' (SwiGLU), 'gelu_tanh' (GeGLU) or an elementwise
    function."""
    return _fn(act)(g_MF) * u_MF


def _fn(act):
    if isinstance(act, str) and act not in ACTIVATIONS:  # a bare KeyError: 'gelu' from inside the custom VJP
        raise ValueError(f"glu: act={act!r}: use {', '.join(map(repr, ACTIVATIONS))} or an elementwise function "
                         "(e.g. jax.nn.gelu)")
    return ACTIVATIONS[act] if isinstance(act, str) else act


def _glu_fwd(g_MF, u_MF, act):
    return glu(g_MF, u_MF, act), (g_MF, u_MF)


def _fresh(res):
    """The residuals as values XLA cannot identify with the forward's (module docstring)."""
    return jax.lax.optimization_barrier(res)


def _glu_bwd(act, res, dh_MF):
    g_MF, u_MF = _fresh(res)
    a_MF, act_vjp = jax.vjp(_fn(act), g_MF)
    (dg_MF,) = act_vjp(dh_MF * u_MF)
    return dg_MF, dh_MF * a_MF


glu.defvjp(_glu_fwd, _glu_bwd)


def glu_linear(g_MF, u_MF, w_FD, act="silu", impl: str = "auto", flatten: bool = True):
    """act(g)·u @ w: g, u [..., F], w [F, D] → [..., D], the gated MLP's activation and down projection in one VJP.

    The backward recomputes the product h = act(g)·u from g and u (in the pass that recomputes act(g) anyway)
    instead of keeping it: a scanned layer stack saves two MLP-wide arrays per layer instead of three.
    impl / flatten: as `models.linear.linear` (the down projection's weight gradient from the narrower transposed
    operand on CPU; flatten=False keeps the rows' shape and plain products)."""
    tg = resolve_impl(impl) == "transposed_grad" and flatten
    if tg and g_MF.ndim != 2:
        lead = g_MF.shape[:-1]
        flat = lambda a: a.reshape(math.prod(lead), a.shape[-1])  # noqa: E731  (not -1: F may be 0)
        return _glu_linear(flat(g_MF), flat(u_MF), w_FD, act, tg).reshape(*lead, w_FD.shape[1])
    return _glu_linear(g_MF, u_MF, w_FD, act, tg)


@functools.partial(custom_vjp, nondiff_argnums=(3, 4))
def _glu_linear(g_MF, u_MF, w_FD, act, tg: bool):
    return product(_fn(act)(g_MF) * u_MF, w_FD)


def _glu_linear_fwd(g_MF, u_MF, w_FD, act, tg):
    return product(_fn(act)(g_MF) * u_MF, w_FD), (g_MF, u_MF, w_FD)  # a plain dot: remat policies see it


def _glu_linear_bwd(act, tg, res, dy_MD):
    g_MF, u_MF, w_FD = _fresh(res)
    a_MF, act_vjp = jax.vjp(_fn(act), g_MF)
    dh_MF, dw_FD = product_grads(a_MF * u_MF, w_FD, dy_MD, tg)
    (dg_MF,) = act_vjp(dh_MF * u_MF)
    return dg_MF, dh_MF * a_MF, dw_FD


_glu_linear.defvjp(_glu_linear_fwd, _glu_linear_bwd)
