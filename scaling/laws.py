"""Scaling laws: fit L(N, D) = E + A/N^alpha + B/D^beta, the IsoFLOP envelope, compute-optimal allocation.

N = parameters, D = training tokens, C = 6·N·D training FLOPs (Hoffmann et al. 2022, "Training
Compute-Optimal Large Language Models", arXiv:2203.15556; "the paper" below).

- `fit_law` is the paper's Approach 3 (Section 3.3 / App. D.2): minimise the Huber loss (delta = 1e-3)
  of log L_pred - log L over the runs, with L_pred written as LSE(a - alpha·log N, b - beta·log D, e)
  (A = e^a, B = e^b, E = e^e), by L-BFGS from a grid of initialisations. The paper starts L-BFGS from
  every grid point; we evaluate the objective on the whole grid and start L-BFGS-B from the best
  `n_starts` points, and from the best `n_starts` whose N and D terms are both alive (each >= 1e-3 of the loss
  at some run: a dead term stays dead under L-BFGS-B), 100x cheaper, which makes bootstrapping cheap.
- `bootstrap` resamples runs with replacement and refits: confidence intervals of parameters and
  of any prediction (e.g. the loss of a bigger model).
- `isoflop_envelope` is Approach 2 (Section 3.2): for each FLOP budget fit a parabola of loss vs
  log N, take its minimum N_opt(C), then fit N_opt ∝ C^a.
- Allocation: a fitted law gives N_opt(C) = G·(C/6)^a, D_opt = (C/6)^b / G with
  G = (alpha·A / (beta·B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta) (paper eq. 4).

What the paper's published numbers reproduce (verified in tests/test_scaling_laws.py):
- Table 3 (tokens for 400M ... 10T parameters) comes from Approach 1, whose paper gives only the
  exponents a = b = 0.50 (Table 2), not the coefficient. `CHINCHILLA_APPROACH1` uses those exponents
  anchored at the paper's headline Approach-1 result (Gopher's budget, 5.76e23 FLOPs -> 67B
  parameters); it reproduces every Table 3 token count within 7% (within 1.5% from 175B up).
  The residual is the rounding of the exponents: Table 3's tokens/parameter rises from 20.0 to
  21.6 across the table, i.e. its unrounded exponents are about a = 0.498, b = 0.502.
- The published Approach-3 fit (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28;
  `CHINCHILLA_APPROACH3`) does *not* reproduce Table 3 (it gives a = 0.45: fewer parameters and
  more tokens, 14.5B tokens for 400M), and with these rounded constants it puts Gopher's budget at
  32B parameters, not the 40B the paper quotes for Approach 3 (Besiroglu et al. 2024 report the
  same inconsistency of the rounded constants).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import warnings

import numpy as np
from scipy import optimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

# Paper Table 3: (parameters, FLOPs, tokens) — Approach 1 projections.
CHINCHILLA_TABLE3 = (
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)
GOPHER_FLOPS = 5.76e23


def _positive(x, name: str) -> np.ndarray:
    """`x` (a number or an array) as float64, refused naming `name` unless every entry is finite and > 0: a NaN, inf,
    zero or negative budget or size came back as a NaN / inf / 0 allocation, with at most a RuntimeWarning."""
    a = np.asarray(x, float)
    ok = np.isfinite(a) & (a > 0)
    if not ok.all():
        got = f"{a[~ok][:5].tolist()} (entries {np.flatnonzero(~ok.ravel())[:5].tolist()} of {a.size})" if a.ndim \
            else f"{float(a)}"
        raise ValueError(f"{name} must be finite and > 0, got {got}")
    return a


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (loss in nats per token)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params, n_tokens):
        """L at parameters N and tokens D (numbers or arrays that broadcast); each finite and > 0 (0 gave inf, a
        negative one NaN, with at most a RuntimeWarning)."""
        n, d = _positive(n_params, "n_params"), _positive(n_tokens, "n_tokens")
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ∝ C^a, D_opt ∝ C^b."""
        if not (self.alpha > 0 and self.beta > 0):  # a term that does not fall: no finite optimum (0/0 or N_opt 0)
            raise ValueError(f"ScalingLaw alpha={self.alpha:g}, beta={self.beta:g}: the compute-optimal allocation "
                             "needs both > 0 (a loss term that does not fall with N or D has no optimum); refit on "
                             "runs that span a wider range of N and D")
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    @property
    def G(self) -> float:
        self.exponents  # noqa: B018 - the same check
        for name, v in (("A", self.A), ("B", self.B)):  # (a negative one made N_opt complex, 0 made it 0 or inf)
            if not (v > 0 and math.isfinite(v)):  # (inf made N_opt or D_opt inf)
                raise ValueError(f"ScalingLaw {name}={v:g}: the compute-optimal allocation needs A and B finite and > 0"
                                 " (a loss term that does not fall with N or D has no optimum)")
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_params(self, flops):
        """N_opt(C) that minimises L on the budget 6·N·D = C (paper eq. 4)."""
        a, _ = self.exponents
        return self.G * (_positive(flops, "flops") / 6.0) ** a

    def optimal_tokens(self, flops):
        _, b = self.exponents
        return (_positive(flops, "flops") / 6.0) ** b / self.G

    def optimal_flops_for_params(self, n_params):
        """The budget C for which `n_params` is compute-optimal (inverse of `optimal_params`)."""
        a, _ = self.exponents
        return 6.0 * (_positive(n_params, "n_params") / self.G) ** (1.0 / a)

    def optimal_tokens_for_params(self, n_params):
        return self.optimal_flops_for_params(n_params) / (6.0 * np.asarray(n_params, float))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PowerLawAllocation:
    """N_opt = k·C^a and D_opt = C / (6·N_opt) (so D_opt ∝ C^(1-a)): the Approach 1/2 form."""

    a: float
    k: float

    def __post_init__(self):
        # N_opt and D_opt both grow with C only for 0 < a < 1: a = 0 raised a bare ZeroDivisionError
        # (optimal_flops_for_params), a < 0 or > 1 shrank N_opt or D_opt as the budget grew, k <= 0 or NaN gave
        # negative, zero or NaN sizes
        if isinstance(self.a, bool) or not isinstance(self.a, numbers.Real) or not 0 < self.a < 1:
            raise ValueError(f"PowerLawAllocation: a={self.a!r} must be in (0, 1) (N_opt ∝ C^a and D_opt ∝ C^(1-a) "
                             "both grow with the budget; Chinchilla's is 0.50)")
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Real) or not (
                self.k > 0 and math.isfinite(self.k)):
            raise ValueError(f"PowerLawAllocation: k={self.k!r} must be finite and > 0 (N_opt = k·C^a)")

    @classmethod
    def from_anchor(cls, a: float, flops: float, n_params: float) -> PowerLawAllocation:
        """The allocation with exponent `a` that makes `n_params` optimal at budget `flops`."""
        flops, n_params = float(_positive(flops, "flops")), float(_positive(n_params, "n_params"))
        return cls(a=a, k=n_params / flops ** a)

    def optimal_params(self, flops):
        return self.k * _positive(flops, "flops") ** self.a

    def optimal_tokens(self, flops):
        return np.asarray(flops, float) / (6.0 * self.optimal_params(flops))

    def optimal_flops_for_params(self, n_params):
        return (_positive(n_params, "n_params") / self.k) ** (1.0 / self.a)

    def optimal_tokens_for_params(self, n_params):
        return self.optimal_flops_for_params(n_params) / (6.0 * np.asarray(n_params, float))


CHINCHILLA_APPROACH3 = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # paper eq. 10
CHINCHILLA_APPROACH1 = PowerLawAllocation.from_anchor(0.50, GOPHER_FLOPS, 67e9)  # Table 2 exponent, Gopher anchor
ALLOCATIONS = {"approach1": CHINCHILLA_APPROACH1, "approach3": CHINCHILLA_APPROACH3}


# ---- fitting ------------------------------------------------------------------------------------

# The paper's initialisation grid (App. D.2): alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1},
# a, b in {0, 5, ..., 25}.
PAPER_GRID = dict(e=np.arange(-1.0, 1.01, 0.5), a=np.arange(0.0, 25.1, 5.0), b=np.arange(0.0, 25.1, 5.0),
                  alpha=np.arange(0.0, 2.01, 0.5), beta=np.arange(0.0, 2.01, 0.5))
_ORDER = ("a", "b", "e", "alpha", "beta")
# L-BFGS-B keeps alpha and beta in the paper's grid range (published LM fits are 0.05-0.8): unbounded, an
# ill-posed fit runs off to alpha = 100 and A = 1e10 and reports it as a law
EXPONENT_BOUNDS = (0.0, 2.0)
BOUND_TOL = 1e-6  # an exponent this close to a bound sits on it (the warning below)
# above this |corr(log N, log D)| the runs cannot separate A/N^alpha from B/D^beta (a fixed D/N sweep has
# |corr| = 1; with D/N scattered by ±35% around 20 over 100x in N it is 0.99 and N_opt is off 3-4x)
MAX_LOG_CORR = 0.99
# a grid start whose N or D term is below this share of the predicted loss at every run has a dead term (see fit_law)
LIVE_TERM = 1e-3
# a fit whose median |log-residual| exceeds this share of the runs' median spread of log L explains little of the
# data (fit_law warns): uniform random losses leave 0.7-1.2, real ones shuffled across the runs (mislabelled) 0.5-1.2,
# a real law with 3% noise 0.04-0.12 (0.2 with a sixth of the runs 50% off: the median ignores such outliers)
MAX_RESIDUAL_SPREAD = 0.5
# fit_law shifts the grid's a, b, e by log(median loss) when the median loss lies outside this range (nats/token: ~1)
LOSS_RANGE = (0.05, 20.0)


def _huber(r, delta):
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _objective(theta, logn, logd, logl, delta):
    """Sum of Huber(LSE(a - alpha·logN, b - beta·logD, e) - logL) and its gradient in theta.

    Written with plain numpy ufuncs: L-BFGS calls it ~100 times per start on a few dozen runs, where
    scipy's logsumexp wrapper would cost 10x the arithmetic."""
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * logn, b - beta * logd
    m = np.maximum(np.maximum(t0, t1), e)
    e0, e1, e2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = e0 + e1 + e2
    r = m + np.log(s) - logl
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    dh = np.clip(r, -delta, delta) / s  # Huber derivative x softmax normaliser
    g0, g1 = dh * e0, dh * e1
    grad = np.array([g0.sum(), g1.sum(), (dh * e2).sum(), -(g0 * logn).sum(), -(g1 * logd).sum()])
    return float(f), grad


@dataclasses.dataclass(frozen=True)
class FitResult:
    """`fit_law`'s result: the fitted law, the final Huber objective, the runs fitted and the L-BFGS-B starts."""

    law: ScalingLaw
    objective: float
    n_points: int
    starts: int


def _check_runs(n, d, loss):
    n, d, loss = (np.asarray(x, float).ravel() for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"N, D and loss must have the same length, got {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(n)}")
    for name, x in (("N", n), ("D", d), ("loss", loss)):
        bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
        if bad.size:  # as isoflop_envelope: say which runs (a diverged run's NaN loss), and what to do
            raise ValueError(f"{name} must be finite and positive for every run; runs {bad[:5].tolist()} are not "
                             "(drop diverged runs, or rerun them)")
    return n, d, loss


def _log_corr(n, d) -> float:
    """|corr(log N, log D)|; 1 when either does not vary (nothing separates the two terms then either)."""
    if np.ptp(np.log(n)) < 1e-9 or np.ptp(np.log(d)) < 1e-9:  # a rounding-level spread is no spread (the mean of
        return 1.0                                             # equal logs can be off by an ulp: corr ~ 1e-16)
    x, y = np.log(n) - np.log(n).mean(), np.log(d) - np.log(d).mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return abs(float(x @ y)) / den if den > 0 else 1.0


def _levels(x) -> int:
    """Distinct values of a run axis (equal up to rounding)."""
    return len(np.unique(np.round(np.log(x), 9)))


def _distinct_runs(n, d) -> int:
    """Distinct (N, D) configurations (equal up to rounding): repeats of one (seeds) add no equation to the fit."""
    return len(np.unique(np.round(np.stack([np.log(n), np.log(d)], 1), 9), axis=0))


def fit_law(n_params, n_tokens, loss, *, delta: float = 1e-3, grid: dict | None = None, n_starts: int = 4,
            init: ScalingLaw | None = None) -> FitResult:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (arrays of N, D, final loss), paper Approach 3.

    delta: Huber threshold on log-loss residuals (paper: 1e-3; inf: least squares). grid: initialisation
    grid, values per axis a, b, e (log A, log B, log E), alpha, beta; axes it leaves out keep `PAPER_GRID`'s
    (4500 points in all; a, b, e shifted by log(median loss) when that lies outside `LOSS_RANGE`: other units).
    n_starts: L-BFGS-B runs from the best grid points, from as many of the best whose N and D terms both reach
    `LIVE_TERM` of the loss at some run (when those are others), and from `init`, e.g. the full-data fit when
    bootstrapping. Returns the best optimum found; alpha and beta
    are bounded to `EXPONENT_BOUNDS` (a warning says when the optimum sits on a bound, and when its median residual
    exceeds `MAX_RESIDUAL_SPREAD` of the losses' median spread: a law fitted to losses that do not follow N and D).

    Raises ValueError when log N and log D are nearly collinear (|corr| > `MAX_LOG_CORR`), e.g. every
    run trained at D = 20N: the loss then depends on one variable and the split into an N term and a D
    term is arbitrary.
    """
    n, d, lv = _check_runs(n_params, n_tokens, loss)
    # delta <= 0 (or NaN) makes every Huber term 0 (or negative): the "fit" was the grid's first point, E = e^-1,
    # A = B = 1, alpha = beta = 0, with no error. inf is allowed: plain least squares on log L
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not delta > 0:
        raise ValueError(f"delta={delta!r}: the Huber threshold on log-loss residuals must be > 0 (the paper's "
                         "1e-3; float('inf') for least squares)")
    if isinstance(n_starts, bool) or not isinstance(n_starts, numbers.Integral) or n_starts < (
            0 if init is not None else 1):  # numpy ints too
        raise ValueError(f"n_starts must be an int >= 1 (>= 0 with init), got {n_starts!r}")
    if init is not None:  # the start is (log A, log B, log E): 0 or a negative one was a bare 'math domain error'
        for name in ("E", "A", "B"):
            if not (math.isfinite(v := getattr(init, name)) and v > 0):
                raise ValueError(f"init: {name}={v:g} must be finite and > 0 (L-BFGS-B starts from its log); pass a "
                                 "fitted law, or init=None to start from the grid alone")
    for name, x, what in (("N", n, "model sizes"), ("D", d, "token counts")):
        if (k := _levels(x)) < 3:  # E + A/N^alpha at k levels: k numbers for 3 unknowns, any alpha fits exactly
            raise ValueError(f"{name} takes {k} distinct value{'s' * (k != 1)} over the runs; fitting "
                             f"{'A/N^alpha' if name == 'N' else 'B/D^beta'} beside E needs >= 3 {what}")
    if (k := _distinct_runs(n, d)) < 5:  # 4 configurations + a repeated seed: 4 equations, 5 unknowns (E -> 1e-87)
        raise ValueError(f"{k} distinct (N, D) runs among the {len(n)} given (repeats of one configuration, e.g. "
                         "seeds, add no equation); fitting 5 parameters needs >= 5 distinct (N, D)")
    if (r := _log_corr(n, d)) > MAX_LOG_CORR and np.ptp(np.log(n * d)) < 0.05:  # one IsoFLOP profile
        raise ValueError(f"every run has the same FLOP budget (6·N·D within 5%, so log N and log D are collinear: "
                         f"|corr| = {r:.4f}); the fit needs runs at >= 2 budgets (several model sizes at each: one "
                         "IsoFLOP profile per budget), as isoflop_envelope does")
    if r > MAX_LOG_CORR:
        raise ValueError(f"N and D are nearly collinear over the runs (|corr(log N, log D)| = {r:.4f} > "
                         f"{MAX_LOG_CORR}; e.g. a fixed tokens-per-parameter sweep), so the fit cannot tell "
                         "A/N^alpha from B/D^beta. Vary D/N across runs (several token counts per model size, "
                         "or several model sizes per FLOP budget), or fit the allocation with isoflop_envelope")
    if k == 5:  # (the distinct runs above) 5 equations, 5 unknowns: the law can fit every run, noise and all
        warnings.warn("fit_law: 5 distinct (N, D) runs for the law's 5 parameters: it can fit every run, noise "
                      "included, and leaves no residual to judge it by (2% noise on 5 runs of a known law put "
                      "N_opt(1e23) at 0.008x-3.6x the true one over 4 draws), and bootstrap cannot resample it; "
                      "add runs (several token counts per model size)",
                      stacklevel=2)
    logn, logd, logl = np.log(n), np.log(d), np.log(lv)
    # a grid names the axes it changes; the others keep the paper's values (a partial grid raised KeyError: 'a')
    if unknown := set(grid or {}) - set(_ORDER):
        raise ValueError(f"grid has unknown keys {sorted(unknown)}; its axes are {list(_ORDER)} (log A, log B, log E, "
                         "alpha, beta)")
    # the paper's grid has E in [e^-1, e]: losses of the same law in other units (summed over a sequence, x200-x3000;
    # or x1e-3) left every start far off, and noiseless runs were fitted 6-10% off, N_opt 0.13x-17x, in silence. The
    # objective on log L only shifts a, b, e by log(unit): so do the starts of the axes a caller's grid leaves out
    shift = 0.0 if LOSS_RANGE[0] <= np.median(lv) <= LOSS_RANGE[1] else float(np.median(logl))
    g = {**{k: v + shift if k in "abe" else v for k, v in PAPER_GRID.items()}, **(grid or {})}
    for k in _ORDER:  # a NaN start made L-BFGS-B return alpha = nan as the law; [] was a bare IndexError
        a = np.asarray(g[k])
        if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iuf" or not np.isfinite(a).all():
            raise ValueError(f"grid[{k!r}] must be a non-empty list of finite numbers (start values of that axis), "
                             f"got {g[k]!r}")
    thetas = np.array(list(itertools.product(*(g[k] for k in _ORDER))))  # [G, 5]
    # vectorised screening of every grid point
    terms = np.stack([thetas[:, None, 0] - thetas[:, None, 3] * logn, thetas[:, None, 1] - thetas[:, None, 4] * logd,
                      np.broadcast_to(thetas[:, None, 2], (len(thetas), len(logn)))])
    lse = logsumexp(terms, axis=0)
    scores = _huber(lse - logl, delta).sum(-1)
    order = np.argsort(scores)
    # the best-scored points can all have a dead term (B/D^beta < 1e-8 of the loss at every run, e.g. b = 10 with
    # beta = 2): L-BFGS-B cannot revive it (its gradient is as small), and E absorbs it. On runs whose terms are each
    # 1-7% of the loss, 10 of 12 fits ended so, at 8-21x the Huber loss of the true law and N_opt off 1e6x: the
    # best-scored points whose two terms each reach LIVE_TERM of the loss at some run start too
    live = order[(np.exp(terms[:2] - lse).max(-1)[:, order] >= LIVE_TERM).all(0)]
    top = set(order[:n_starts].tolist())
    starts = list(thetas[[*order[:n_starts], *(i for i in live[:n_starts] if i not in top)]])
    if init is not None:
        starts.insert(0, np.array([math.log(init.A), math.log(init.B), math.log(init.E), init.alpha, init.beta]))
    best = None
    # L-BFGS-B's 5-dimensional BLAS calls pay a multi-threaded OpenBLAS sync each time: one thread is
    # ~50x faster (and not slower on an idle machine)
    with threadpool_limits(1, user_api="blas"):
        for x0 in starts:
            res = optimize.minimize(_objective, x0, args=(logn, logd, logl, delta), jac=True, method="L-BFGS-B",
                                    bounds=[(None, None)] * 3 + [EXPONENT_BOUNDS] * 2,
                                    options=dict(maxiter=1000, ftol=1e-14, gtol=1e-9))
            if best is None or res.fun < best.fun:
                best = res
    a, b, e, alpha, beta = best.x
    # within BOUND_TOL: L-BFGS-B leaves an exponent pinned at 2 as 1.9999997 (v in EXPONENT_BOUNDS missed it)
    at_bound = [f"{k}={v:g}" for k, v in (("alpha", alpha), ("beta", beta))
                if min(abs(v - lim) for lim in EXPONENT_BOUNDS) <= BOUND_TOL]
    if at_bound:
        warnings.warn(f"fit_law: {', '.join(at_bound)} sits on its bound {EXPONENT_BOUNDS}; the runs do not "
                      "pin this exponent down (too narrow a range of N or D, or too much noise)", stacklevel=2)
    law = ScalingLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))
    # the optimum of noise is a law too (uniform random losses: alpha = 1.47, beta = 0.007, N_opt ∝ C^0.005): say
    # when it leaves residuals as large as the losses' own spread (medians: the Huber fit lets outliers stand)
    resid = np.abs(logsumexp([a - alpha * logn, b - beta * logd, np.full_like(logn, e)], axis=0) - logl)
    spread = np.median(np.abs(logl - np.median(logl)))
    if spread > 0 and (ratio := np.median(resid) / spread) > MAX_RESIDUAL_SPREAD:
        warnings.warn(f"fit_law: the law explains little of how the loss varies over the runs: its median "
                      f"|log-residual| is {ratio:.2f} of the runs' median spread of log loss (a real law leaves "
                      f"< {MAX_RESIDUAL_SPREAD}; losses unrelated to N and D ~1). Check that each loss belongs to its "
                      "(N, D) run, and that the runs span enough N and D for the loss to change beyond its noise; do "
                      "not plan with this law", stacklevel=2)
    return FitResult(law=law, objective=float(best.fun), n_points=len(n), starts=len(starts))


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Refits on resampled runs. `laws[i]` is the fit to resample i; `residuals` are the full fit's
    log-loss residuals log L - log L_pred (the scatter of single runs around the law). `skipped` counts
    resamples that could not identify the 5 parameters (< 5 distinct (N, D) runs, < 3 values of N or D, or collinear N
    and D)."""

    fit: FitResult
    laws: tuple[ScalingLaw, ...]
    residuals: tuple[float, ...] = ()
    skipped: int = 0

    def interval(self, fn, level: float = 0.9) -> tuple[float, float, float]:
        """(point, low, high): `fn(law)` at the full-data fit and its central `level` percentile interval."""
        _check_level(level)
        point, vals = self._values(fn)
        return point, *_central(vals, level)

    def _values(self, fn) -> tuple[float, np.ndarray]:
        """fn at the full fit, and at every bootstrap law. A law the full fit's fn takes can fail in a resample (beta
        pinned at 0 in 5 of 40: `optimal_params` refuses it), which raised that law's own error, read as the full fit's
        ('refit on runs that span a wider range'): say that it is resamples, how many, and what to do."""
        point = float(fn(self.fit.law))
        vals, bad = [], []
        for i, law in enumerate(self.laws):
            try:
                vals.append(fn(law))
            except ValueError as e:
                bad.append(f"law {i}: {e}")
        if bad:
            raise ValueError(f"Bootstrap: fn raised on {len(bad)} of the {len(self.laws)} bootstrap laws (not on the "
                             f"full fit), e.g. {bad[0]}. Those resamples do not pin the law down, so the interval is "
                             "unbounded on their side: fit runs over a wider range of N and D, or make fn return the "
                             "limit for such a law (e.g. math.inf)")
        return point, np.array(vals, float)

    def prediction_interval(self, fn, level: float = 0.9, seed: int = 0) -> tuple[float, float, float]:
        """Like `interval`, for the loss of *one new run*: each bootstrap law's prediction times
        exp(a residual drawn from the full fit), so run-to-run scatter (seed, data order, LR fit) widens
        the interval beyond the parameter uncertainty of `interval`. The residuals' spread about their mean is
        widened by sqrt(n / (n - 5)) first: a fit of the law's 5 parameters to n runs leaves residuals smaller than
        the runs' scatter (40 simulated ladders of 16 runs at 2% noise: 86% of new runs inside a 90% interval
        unwidened, 88% widened)."""
        _check_level(level)
        rng = np.random.default_rng(seed)
        r = np.asarray(self.residuals, float) if self.residuals else np.zeros(1)
        if len(r) > 5:
            r = r.mean() + (r - r.mean()) * np.sqrt(len(r) / (len(r) - 5))
        point, vals = self._values(fn)
        vals = vals * np.exp(rng.choice(r, len(self.laws)))
        return point, *_central(vals, level)

    def param_intervals(self, level: float = 0.9) -> dict[str, tuple[float, float, float]]:
        return {k: self.interval(lambda law, k=k: getattr(law, k), level) for k in ("E", "A", "B", "alpha", "beta")}


def _central(vals, level: float) -> tuple[float, float]:
    """The central `level` percentile range of `vals` (numpy's linear interpolation). `_values` tells a caller to
    return math.inf for a resample with no finite answer: numpy interpolated inf - inf into NaN, so such an interval
    came back (point, low, nan); a quantile that reaches an infinite value is that infinity here."""
    qs = [50 * (1 - level), 50 * (1 + level)]
    if np.isfinite(vals).all():
        return tuple(float(x) for x in np.percentile(vals, qs))
    v, out = np.sort(vals), []
    for q in qs:
        j, t = divmod(q / 100 * (len(v) - 1), 1.0)
        lo, hi = v[int(j)], v[min(int(j) + 1, len(v) - 1)]
        out.append(float(lo if t == 0 or lo == hi or lo == -math.inf else hi if hi == math.inf
                         else lo + t * (hi - lo)))
    return out[0], out[1]


def _check_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ValueError(f"level={level!r} must be a fraction in (0, 1), e.g. 0.9 for a 90% interval")


def bootstrap(n_params, n_tokens, loss, *, n_boot: int = 200, seed: int = 0, n_starts: int = 1, progress: bool = False,
              **fit_kw) -> Bootstrap:
    """Case-resampling bootstrap of `fit_law`: resample runs with replacement `n_boot` times and refit
    (each refit starts from the full-data optimum and the best `n_starts` grid points). `fit_kw` go to `fit_law`;
    an `init` among them seeds the full-data fit only (the refits start from that fit)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:  # numpy ints too
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    n, d, lv = _check_runs(n_params, n_tokens, loss)
    full = fit_law(n, d, lv, **fit_kw)
    # the refits take init=full.law: a caller's init beside it was a bare TypeError ('multiple values') after this fit
    fit_kw.pop("init", None)
    rng = np.random.default_rng(seed)
    it = range(n_boot)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bootstrap", unit="fit", leave=False)
    laws, skipped = [], 0
    for _ in it:
        idx = rng.integers(0, len(n), len(n))
        if (_distinct_runs(n[idx], d[idx]) < 5 or min(_levels(n[idx]), _levels(d[idx])) < 3
                or _log_corr(n[idx], d[idx]) > MAX_LOG_CORR):
            skipped += 1
            continue
        with warnings.catch_warnings():  # the full fit said it once; not once per resample of the same runs
            warnings.filterwarnings("ignore", message="fit_law: the law explains little")
            warnings.filterwarnings("ignore", message="fit_law: 5 distinct")
            laws.append(fit_law(n[idx], d[idx], lv[idx], n_starts=n_starts, init=full.law, **fit_kw).law)
    if not laws:
        raise ValueError(f"bootstrap: all {n_boot} resamples were skipped (< 5 distinct (N, D) runs, or N and D "
                         "collinear); give more runs that vary N and D independently")
    resid = np.log(lv) - np.log(full.law.loss(n, d))
    return Bootstrap(fit=full, laws=tuple(laws), residuals=tuple(float(x) for x in resid), skipped=skipped)


# ---- IsoFLOP profiles (Approach 2) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """Per-budget optima and the power laws N_opt = k_n·C^a, D_opt = k_d·C^b fitted through them."""

    flops: tuple[float, ...]
    n_opt: tuple[float, ...]
    d_opt: tuple[float, ...]
    loss_opt: tuple[float, ...]
    a: float
    b: float
    k_n: float
    k_d: float
    skipped: tuple[tuple[float, str], ...] = ()  # (budget, why) of every budget left out of the fit

    def optimal_params(self, flops):
        return self.k_n * _positive(flops, "flops") ** self.a

    def optimal_tokens(self, flops):
        return self.k_d * _positive(flops, "flops") ** self.b


def isoflop_envelope(n_params, n_tokens, loss, flops=None, *, rtol: float = 0.05) -> IsoFlop:
    """Approach 2: group runs by budget (C = 6ND unless `flops` is given; budgets within `rtol` are one
    group), fit loss = p2·x² + p1·x + p0 with x = log N per group (>= 3 model sizes), take N_opt = exp(-p1 / 2p2),
    then least-squares lines log N_opt = a·log C + log k_n and log D_opt = b·log C + log k_d. D_opt is C / 6N_opt,
    or with `flops` given (a FLOP count other than 6ND) the tokens of the budget's runs interpolated to N_opt.

    A budget is left out (listed in `skipped` and in one warning) when it has < 3 distinct model sizes (repeats
    of a size, e.g. seeds, count once), when its parabola opens downwards, or when its minimum lies outside the
    model sizes it trained: a parabola extrapolated past its runs puts N_opt far off and drags the exponent with
    it (runs at 0.02-0.2x the optimum give half the true N_opt). Train sizes on both sides of each budget's
    optimum."""
    # < 0 or NaN put every run in a budget of its own ('need >= 2 FLOP budgets' naming nothing), inf all in one
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 <= rtol < math.inf:
        raise ValueError(f"isoflop_envelope: rtol={rtol!r} must be a finite number >= 0 (budgets within that relative "
                         "distance of a group's smallest are one group; default 0.05)")
    n, d, lv = (np.asarray(x, float).ravel() for x in (n_params, n_tokens, loss))
    c = 6 * n * d if flops is None else np.asarray(flops, float).ravel()
    if not (len(n) == len(d) == len(lv) == len(c)) or len(n) == 0:
        raise ValueError(f"isoflop_envelope: n_params, n_tokens, loss (and flops) need one entry per run, got "
                         f"{len(n)}, {len(d)}, {len(lv)}, {len(c)}; give runs at >= 2 budgets x >= 3 sizes")
    for name, x in (("n_params", n), ("n_tokens", d), ("loss", lv), ("flops", c)):
        bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
        if bad.size:  # a diverged run (NaN loss) would silently move or drop its whole budget
            raise ValueError(f"isoflop_envelope: {name} must be finite and positive for every run; runs "
                             f"{bad[:5].tolist()} are not (drop diverged runs, or rerun them)")
    order = np.argsort(c)
    groups, cur = [], [order[0]]
    for i in order[1:]:
        if c[i] <= c[cur[0]] * (1 + rtol):
            cur.append(i)
        else:
            groups.append(cur)
            cur = [i]
    groups.append(cur)
    cs, ns, ds, ls, skipped = [], [], [], [], []
    for g in groups:
        budget = float(np.exp(np.mean(np.log(c[g]))))
        if len(g) < 3:
            skipped.append((budget, f"{len(g)} run(s), need 3"))
            continue
        if (k := _levels(n[g])) < 3:  # repeats of a size (seeds) add no point: a parabola through 2 is any parabola
            skipped.append((budget, f"{k} distinct model size{'s' * (k != 1)} among its {len(g)} runs, need 3"))
            continue
        x = np.log(n[g])
        p2, p1, p0 = np.polyfit(x, lv[g], 2)
        if p2 <= 0:
            skipped.append((budget, "loss is not convex in log N: no minimum"))
            continue
        xo = -p1 / (2 * p2)
        if not x.min() <= xo <= x.max():
            skipped.append((budget, f"minimum at N={np.exp(xo):.3g} outside the runs' N in "
                                    f"[{n[g].min():.3g}, {n[g].max():.3g}]"))
            continue
        cs.append(budget)
        ns.append(float(np.exp(xo)))
        if flops is None:
            ds.append(budget / (6 * float(np.exp(xo))))
        else:  # C is not 6ND: the tokens the N_opt run trains, from the budget's runs (log D linear in log N)
            slope, icpt = np.polyfit(x, np.log(d[g]), 1)
            ds.append(float(np.exp(icpt + slope * xo)))
        ls.append(float(p0 + p1 * xo + p2 * xo * xo))
    why = "".join(f"; C={b:.3g}: {r}" for b, r in skipped)
    if len(cs) < 2:
        raise ValueError(f"need >= 2 FLOP budgets with >= 3 runs bracketing a minimum each; got {len(cs)} "
                         f"(train several model sizes on both sides of each budget's optimum){why}")
    if skipped:
        warnings.warn(f"isoflop_envelope: {len(skipped)} of {len(groups)} budgets left out{why}", stacklevel=2)
    a, logkn = np.polyfit(np.log(cs), np.log(ns), 1)
    b, logkd = np.polyfit(np.log(cs), np.log(ds), 1)
    return IsoFlop(tuple(cs), tuple(ns), tuple(ds), tuple(ls), float(a), float(b), float(np.exp(logkn)),
                   float(np.exp(logkd)), tuple(skipped))
