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
"""

from __future__ import annotations

import functools

import jax

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def glu(g_MF, u_MF, act="silu"):
    """act(g) * u for g, u [..., F] of one dtype; act: 'silu' (SwiGLU), 'gelu_tanh' (GeGLU) or an elementwise
    function."""
    return _fn(act)(g_MF) * u_MF


def _fn(act):
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
