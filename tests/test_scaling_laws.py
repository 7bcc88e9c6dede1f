"""scaling.laws: the fit recovers a known law from noisy synthetic runs; IsoFLOP envelope; allocation;
the Chinchilla paper's Table 3."""

import dataclasses
import math
import re
import warnings

import numpy as np
import pytest
from scipy import optimize

from scaling.laws import (
    CHINCHILLA_APPROACH1,
    CHINCHILLA_APPROACH3,
    CHINCHILLA_TABLE3,
    EXPONENT_BOUNDS,
    GOPHER_FLOPS,
    Bootstrap,
    FitResult,
    PowerLawAllocation,
    ScalingLaw,
    _huber,
    _objective,
    bootstrap,
    fit_law,
    isoflop_envelope,
)

TRUE = ScalingLaw(E=1.8, A=300.0, B=500.0, alpha=0.32, beta=0.29)


def synthetic(noise, seed=0):
    """A 6 x 6 grid of runs (N 1e7..3e9, D 1e9..3e11) from TRUE with multiplicative log-normal noise."""
    n = np.repeat(np.geomspace(1e7, 3e9, 6), 6)
    d = np.tile(np.geomspace(1e9, 3e11, 6), 6)
    return n, d, TRUE.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))


def test_fit_recovers_known_law():
    n, d, loss = synthetic(noise=0.002)
    law = fit_law(n, d, loss).law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.E == pytest.approx(TRUE.E, abs=0.05)
    # extrapolation 10x beyond the largest run in both N and D
    assert law.loss(3e10, 3e12) == pytest.approx(TRUE.loss(3e10, 3e12), rel=0.01)
    for bad, name in (((0, 1e9), "n_params"), ((1e9, -1.0), "n_tokens"), ((np.array([1e9, np.nan]), 1e9), "n_params")):
        with pytest.raises(ValueError, match=f"{name} must be finite and > 0"):
            TRUE.loss(*bad)  # was inf / NaN with at most a RuntimeWarning
    # noise-free data is fitted exactly
    exact = fit_law(n, d, TRUE.loss(n, d)).law
    for k in ("E", "alpha", "beta"):
        assert getattr(exact, k) == pytest.approx(getattr(TRUE, k), rel=1e-3)


def test_collinear_runs_are_refused_and_exponents_bounded():
    n = np.geomspace(2e7, 2e9, 12)
    d = 20 * n  # a fixed tokens-per-parameter sweep: unbounded, this fit returned alpha = 26, N_opt(1e24) = 4
    loss = CHINCHILLA_APPROACH3.loss(n, d) * np.exp(np.random.default_rng(1).normal(0, 0.005, n.shape))
    with pytest.raises(ValueError, match=r"collinear.*Vary D/N across runs.*isoflop_envelope"):
        fit_law(n, d, loss)
    c = 1e20  # one IsoFLOP budget is a line in (log N, log D) too: its advice was to vary D/N, as it did
    with pytest.raises(ValueError, match=r"every run has the same FLOP budget .* collinear.* runs at >= 2 budgets"):
        fit_law(n, c / (6 * n), CHINCHILLA_APPROACH3.loss(n, c / (6 * n)))
    # a law steeper than any LM fit is clamped to the bound, and says so
    steep = ScalingLaw(E=1.8, A=3e17, B=500.0, alpha=2.5, beta=0.29)
    n, d, _ = synthetic(0.0)
    with pytest.warns(UserWarning, match="alpha=2 sits on its bound"):
        law = fit_law(n, d, steep.loss(n, d)).law
    assert law.alpha == EXPONENT_BOUNDS[1]


# a law whose N and D terms are each 1-7% of the loss over `synthetic`'s runs (E is most of it)
FLAT = ScalingLaw(E=1.83, A=4.39, B=4.59, alpha=0.217, beta=0.212)


def _huber_loss(law, n, d, loss):
    """The fit's objective, computed independently: Huber_1e-3 of log(E + A/N^alpha + B/D^beta) - log L, summed."""
    r = np.abs(np.log(law.E + law.A / n**law.alpha + law.B / d**law.beta) - np.log(loss))
    return np.where(r <= 1e-3, 0.5 * r**2, 1e-3 * (r - 0.5e-3)).sum()


def test_a_law_with_small_terms_is_fitted_with_both_terms_alive():
    """The 4 best-scored grid points of FLAT's runs all had a dead D term (b = 10, beta = 2: B/D^beta ~1e-9 of the
    loss), which L-BFGS-B cannot revive (its gradient is as small): the fit returned beta = 2 with E absorbing the
    term, N_opt(1e22) 6e6x the true one from noise-free runs, and with 0.1% noise 11-21x the true law's Huber loss.
    The best points with both terms alive start too."""
    n, d, _ = synthetic(0.0)
    law = fit_law(n, d, FLAT.loss(n, d)).law
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(FLAT, k), rel=1e-5), k
    loss = FLAT.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 1e-3, n.shape))
    law = fit_law(n, d, loss).law
    assert _huber_loss(law, n, d, loss) <= _huber_loss(FLAT, n, d, loss)  # at least as good as the truth
    assert law.optimal_params(1e22) == pytest.approx(FLAT.optimal_params(1e22), rel=0.2)


def test_an_exponent_a_hair_inside_its_bound_is_warned_about():
    """L-BFGS-B leaves an exponent pinned at its bound a rounding inside it (beta = 1.9999999989 here, started from
    a dead D term); the exact test `beta in EXPONENT_BOUNDS` let it pass without the warning."""
    n, d, _ = synthetic(0.0)
    loss = FLAT.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 1e-3, n.shape))
    dead = ScalingLaw(E=1.9, A=10.0, B=float(np.exp(10)), alpha=0.3, beta=2.0)
    with pytest.warns(UserWarning, match="beta=2 sits on its bound"):
        law = fit_law(n, d, loss, n_starts=0, init=dead).law
    assert 0 < EXPONENT_BOUNDS[1] - law.beta < 1e-6


def test_a_fit_to_losses_that_do_not_follow_n_and_d_is_warned_about():
    """Losses drawn at random (or shuffled across runs: mislabelled results) were fitted without a word: uniform
    losses on a 5 x 5 grid gave alpha = 1.47, beta = 0.007 (N_opt ∝ C^0.005) and no warning, though the law left a
    median residual as large as the losses' own spread. Real fits leave a small fraction of it (3% noise: <= 0.12)."""
    n = np.repeat(np.geomspace(1e7, 1e10, 5), 5)
    d = np.tile(np.geomspace(1e9, 1e12, 5), 5)
    with pytest.warns(UserWarning, match=r"explains little of how the loss varies.*median \|log-residual\|"):
        fit_law(n, d, np.random.default_rng(0).uniform(2, 3, n.size))
    with pytest.warns(UserWarning, match="explains little"):  # the true losses, shuffled across the runs
        fit_law(n, d, np.random.default_rng(0).permutation(CHINCHILLA_APPROACH3.loss(n, d)))
    noisy = CHINCHILLA_APPROACH3.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.03, n.size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a noisy but real law: no warning
        fit_law(n, d, noisy)
    with warnings.catch_warnings(record=True) as seen:  # a bootstrap says it once (its full fit), not per resample
        warnings.simplefilter("always")
        bootstrap(n, d, np.random.default_rng(0).uniform(2, 3, n.size), n_boot=3)
    assert sum("explains little" in str(w.message) for w in seen) == 1


def test_runs_that_cannot_pin_a_term_are_refused():
    """One model size (the mean of equal logs is off by an ulp for some values, and the correlation came out 1e-16:
    N = 1e8 fitted alpha 0.51 for a true 0.34), or two (two levels, three unknowns: any alpha fits exactly; N_opt
    14x off): named, as collinear runs are."""
    law = CHINCHILLA_APPROACH3
    d = np.geomspace(2e9, 2e11, 6)
    for n_value in (1e8, 3e8, 1e9):
        n = np.full(6, n_value)
        with pytest.raises(ValueError, match="N takes 1 distinct value over the runs; .* needs >= 3 model sizes"):
            fit_law(n, d, law.loss(n, d))
    n, dd = np.repeat([1e8, 1e9], 6), np.tile(d, 2)
    with pytest.raises(ValueError, match="N takes 2 distinct values"):
        fit_law(n, dd, law.loss(n, dd))
    n, dd = np.repeat(np.geomspace(1e8, 1e9, 4), 2), np.tile([2e10, 3e11], 4)
    with pytest.raises(ValueError, match="D takes 2 distinct values .* >= 3 token counts"):
        fit_law(n, dd, law.loss(n, dd))
    n, dd, loss = synthetic(0.0)
    with pytest.raises(ValueError, match="n_starts must be an int >= 1"):  # an AttributeError on None before
        fit_law(n, dd, loss, n_starts=0)
    # a fit with an exponent at 0 has no compute-optimal allocation (ZeroDivisionError, or N_opt 0 and D_opt inf)
    for flat in (ScalingLaw(E=1.8, A=300.0, B=500.0, alpha=0.3, beta=0.0),
                 ScalingLaw(E=1.8, A=300.0, B=500.0, alpha=0.0, beta=0.3)):
        with pytest.raises(ValueError, match="compute-optimal allocation needs both > 0"):
            flat.optimal_params(1e21)


def test_allocation_of_a_nan_inf_or_negative_budget_is_refused_naming_the_argument():
    """optimal_params / optimal_tokens of a NaN or inf budget returned NaN / inf, and of a negative one NaN with only
    a RuntimeWarning (PowerLawAllocation's optimal_tokens(0) too: 0 / 0); make_plan checks its own flops, these did
    not. Arrays name the entries; good budgets are unchanged (paper eq. 4, by hand)."""
    budgets = np.geomspace(1e18, 1e21, 4)
    n = np.concatenate([TRUE.optimal_params(c) * np.geomspace(0.25, 4, 7) for c in budgets])
    d = np.repeat(budgets, 7) / (6 * n)
    iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    for alloc in (CHINCHILLA_APPROACH1, CHINCHILLA_APPROACH3, iso):
        for bad in (float("nan"), float("inf"), -1e20, 0.0):
            for fn in (alloc.optimal_params, alloc.optimal_tokens):
                with pytest.raises(ValueError, match=rf"^flops must be finite and > 0, got {re.escape(str(bad))}$"):
                    fn(bad)
        with pytest.raises(ValueError, match=r"flops must be finite and > 0, got \[nan\] \(entries \[1\] of 3\)"):
            alloc.optimal_params([1e20, np.nan, 1e21])
    for alloc in (CHINCHILLA_APPROACH1, CHINCHILLA_APPROACH3):
        with pytest.raises(ValueError, match=r"^n_params must be finite and > 0, got inf$"):
            alloc.optimal_tokens_for_params(np.inf)
    a, b = TRUE.exponents
    G = (TRUE.alpha * TRUE.A / (TRUE.beta * TRUE.B)) ** (1 / (TRUE.alpha + TRUE.beta))
    np.testing.assert_allclose(TRUE.optimal_params([6e20, 6e22]), G * np.array([1e20, 1e22]) ** a, rtol=1e-12)
    np.testing.assert_allclose(TRUE.optimal_tokens([6e20, 6e22]), np.array([1e20, 1e22]) ** b / G, rtol=1e-12)


@pytest.mark.parametrize("field", ["A", "B"])
def test_allocation_of_a_law_with_a_coefficient_that_is_not_positive_is_refused(field):
    """A hand-entered law with A or B <= 0 has no optimum: optimal_params returned a complex number for a negative
    one ((6.45e9-1.12e10j) at 1e21 FLOPs), 0 or inf parameters and tokens for zero, inf for an infinite one."""
    for bad in (-TRUE.A, 0.0, float("inf")):
        law = dataclasses.replace(TRUE, **{field: bad})
        for fn in (law.optimal_params, law.optimal_tokens, law.optimal_flops_for_params):
            with pytest.raises(ValueError, match=f"{field}={bad:g}"):
                fn(1e21)


@pytest.mark.parametrize("a, k", [(0.0, 1.0), (-0.5, 1.0), (1.2, 1.0), (float("nan"), 1.0), (0.5, -2.0), (0.5, 0.0),
                                  (0.5, float("inf")), (True, 1.0)])
def test_a_power_law_allocation_that_does_not_grow_n_and_d_with_the_budget_is_refused(a, k):
    """N_opt = k·C^a, D_opt = C / 6N_opt: both grow with C only for 0 < a < 1 and k > 0. a = 0 raised a bare
    ZeroDivisionError (optimal_flops_for_params), a < 0 or > 1 shrank N_opt or D_opt as the budget grew, k <= 0 or NaN
    gave negative, zero or NaN sizes; from_anchor at a zero budget divided by zero. Published ones are kept."""
    with pytest.raises(ValueError, match="PowerLawAllocation"):
        PowerLawAllocation(a=a, k=k)
    for bad in ((0.5, 0.0, 1e9), (0.5, 1e20, -1e9), (0.5, 1e20, float("nan"))):
        with pytest.raises(ValueError, match="must be finite and > 0"):
            PowerLawAllocation.from_anchor(*bad)
    for good in (0.5, 0.73, 0.45):  # Chinchilla, Kaplan et al. 2020, Approach 3's
        alloc = PowerLawAllocation.from_anchor(good, GOPHER_FLOPS, 67e9)
        assert alloc.optimal_params(GOPHER_FLOPS) == pytest.approx(67e9, rel=1e-12)


def test_bootstrap_counts_resamples_it_cannot_fit():
    # 8 runs at D = 20N and 2 off that line: resamples without the 2 are collinear and skipped
    n = np.geomspace(1e7, 1e9, 10)
    d = 20 * n * np.array([1, 1, 1, 10, 1, 1, 0.1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 runs fit 5 parameters loosely: exponents may touch a bound
        bs = bootstrap(n, d, TRUE.loss(n, d), n_boot=20, seed=0)
    assert bs.skipped > 0 and len(bs.laws) + bs.skipped == 20


def test_bootstrap_interval_covers_truth_and_shrinks_with_noise():
    widths = []
    for noise in (0.01, 0.002):
        runs = synthetic(noise, seed=1)
        bs = bootstrap(*runs, n_boot=12, seed=0)
        n, d, loss = (np.asarray(x, float) for x in runs)  # residuals are log L - log L_pred (sign: observed over fit)
        np.testing.assert_allclose(bs.residuals, np.log(loss) - np.log(bs.fit.law.loss(n, d)), rtol=1e-12)
        point, lo, hi = bs.interval(lambda law: float(law.loss(1e10, 1e12)))
        assert lo <= point <= hi
        widths.append(hi - lo)
        assert lo - 0.01 <= TRUE.loss(1e10, 1e12) <= hi + 0.01
    assert widths[1] < widths[0]


def test_prediction_interval_covers_new_runs_at_its_level():
    """The ladder publishes `prediction_interval` for one new run: fresh noisy runs of the true law at a new size
    should fall inside the 90% interval about 90% of the time; the parameter-only `interval` covers far fewer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bs = bootstrap(*synthetic(0.01, seed=1), n_boot=40, seed=0)
    n_new, d_new = 3e8, 3e10  # inside the grid, not one of its points
    fresh = TRUE.loss(n_new, d_new) * np.exp(np.random.default_rng(7).normal(0, 0.01, 400))
    fn = lambda law: float(law.loss(n_new, d_new))  # noqa: E731
    _, lo, hi = bs.prediction_interval(fn, 0.9)
    _, plo, phi = bs.interval(fn, 0.9)
    covered, param_covered = np.mean((fresh >= lo) & (fresh <= hi)), np.mean((fresh >= plo) & (fresh <= phi))
    assert 0.75 <= covered <= 0.98, covered  # 0.83 here: 40 resamples and 36 residuals make a coarse 90%
    assert param_covered < 0.6 * covered, (param_covered, covered)


def test_prediction_interval_scales_predictions_by_the_residuals_of_the_fit():
    """Residuals are log L - log L_pred: runs that all land above the law move the interval up, by exp(residual)
    (symmetric noise could not tell a flipped sign: the coverage test above passed with one)."""
    law = TRUE
    fit = FitResult(law=law, objective=0.0, n_points=8, starts=1)
    r = np.linspace(0.0, 0.1, 8)  # every run above the law
    bs = Bootstrap(fit=fit, laws=(law,) * 50, residuals=tuple(r))
    fn = lambda law: float(law.loss(1e9, 2e10))  # noqa: E731
    point, lo, hi = bs.prediction_interval(fn, 0.9, seed=0)
    # spread about their mean widened by sqrt(n / (n - 5)): a 5-parameter fit to n runs leaves residuals smaller
    # than the runs' scatter (new runs fell inside a 90% interval 86% of the time from 16 ladder-like runs)
    wide = r.mean() + (r - r.mean()) * np.sqrt(8 / 3)
    assert point == fn(law) and lo >= point * np.exp(wide.min()) - 1e-12 and hi <= point * np.exp(wide.max()) + 1e-12
    assert hi > point * np.exp(0.12) and lo < point * np.exp(-0.02)  # beyond the raw residuals' [0, 0.1]


def test_interval_covers_its_level_of_the_bootstrap_laws():
    """`interval(fn, level)` is the central `level` range of fn over the resampled laws: 90% of them inside, 5% on
    each side (a [10, 90] percentile pair passed every other test: it only narrows an interval)."""
    fit = FitResult(law=TRUE, objective=0.0, n_points=8, starts=1)
    laws = tuple(ScalingLaw(E=1.0 + i / 1000, A=1.0, B=1.0, alpha=0.3, beta=0.3) for i in range(1000))
    bs = Bootstrap(fit=fit, laws=laws)
    vals = np.array([law.E for law in laws])
    for level in (0.5, 0.9):
        point, lo, hi = bs.interval(lambda law: law.E, level)
        assert point == TRUE.E
        assert np.mean((vals >= lo) & (vals <= hi)) == pytest.approx(level, abs=0.002)
        assert np.mean(vals < lo) == pytest.approx((1 - level) / 2, abs=0.002)
    for level in (90, 0, 1.0, True):  # a percent raised numpy's "Percentiles must be in the range [0, 100]"
        with pytest.raises(ValueError, match=rf"level={level!r} must be a fraction in \(0, 1\)"):
            bs.interval(lambda law: law.E, level)
        with pytest.raises(ValueError, match="level=.* must be a fraction"):
            bs.prediction_interval(lambda law: law.E, level)


def test_isoflop_envelope_recovers_optimal_exponent():
    budgets = np.geomspace(1e18, 1e21, 4)
    n = np.concatenate([TRUE.optimal_params(c) * np.geomspace(0.25, 4, 7) for c in budgets])
    c = np.repeat(budgets, 7)
    d = c / (6 * n)
    iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    a, b = TRUE.exponents
    assert iso.a == pytest.approx(a, abs=0.02) and iso.b == pytest.approx(b, abs=0.02)
    assert iso.optimal_params(1e20) == pytest.approx(TRUE.optimal_params(1e20), rel=0.1)
    # with C = 6ND, D_opt = C / 6N_opt (a D_opt of C / N_opt had passed: the exponent b does not see a constant)
    np.testing.assert_allclose(iso.d_opt, np.asarray(iso.flops) / (6 * np.asarray(iso.n_opt)), rtol=1e-12)
    assert iso.optimal_tokens(1e20) == pytest.approx(TRUE.optimal_tokens(1e20), rel=0.1)
    with pytest.raises(ValueError, match="FLOP budgets"):
        isoflop_envelope(n[:7], d[:7], TRUE.loss(n[:7], d[:7]))
    # budgets counted another way than 6ND (here 12ND, as attention and embeddings add): D_opt is the tokens the
    # N_opt run trains, not C / 6N_opt (2x too many)
    d12 = c / (12 * n)
    iso12 = isoflop_envelope(n, d12, TRUE.loss(n, d12), flops=c)
    np.testing.assert_allclose(iso12.d_opt, np.asarray(iso12.flops) / (12 * np.asarray(iso12.n_opt)), rtol=1e-6)
    assert iso12.b == pytest.approx(b, abs=0.02)


def test_isoflop_leaves_out_budgets_whose_runs_miss_the_minimum():
    rows = []
    for c, sizes in ((1e19, (0.5, 1, 2)), (1e20, (0.5, 1, 2)), (1e21, (0.02, 0.05, 0.1, 0.2))):
        rows += [(f * TRUE.optimal_params(c), c) for f in sizes]
    n, c = map(np.array, zip(*rows))
    d = c / (6 * n)
    with pytest.warns(UserWarning, match=r"1 of 3 budgets left out; C=1e\+21: minimum at N=.* outside"):
        iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    # the extrapolated budget put N_opt at 0.57x its true value and the exponent at 0.35 instead of 0.48
    assert [b for b, _ in iso.skipped] == pytest.approx([1e21])
    assert iso.flops == pytest.approx([1e19, 1e20])
    assert iso.a == pytest.approx(TRUE.exponents[0], abs=0.01)
    with pytest.raises(ValueError, match=r"FLOP budgets.*C=1e\+21: minimum"):
        isoflop_envelope(n[3:], d[3:], TRUE.loss(n[3:], d[3:]))


def test_isoflop_groups_budgets_within_rtol_of_the_groups_smallest():
    """A group holds the budgets within rtol of its *smallest* (the docstring), not a chain of neighbours each within
    rtol of the last: 1.00, 1.04, 1.08 x 1e20 at rtol 0.05 are two groups (1.08 is 8% past 1.00), so that budget's
    runs (one per size) are left out; chained, the three merged into one budget 8% wide."""
    rows = [(f * TRUE.optimal_params(c), c) for c in (1e19, 1e21) for f in (0.5, 1, 2)]
    rows += [(f * TRUE.optimal_params(1e20), c) for f, c in ((0.5, 1e20), (1, 1.04e20), (2, 1.08e20))]
    n, c = map(np.array, zip(*rows))
    d = c / (6 * n)
    with pytest.warns(UserWarning, match=r"2 of 4 budgets left out"):
        iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    assert iso.flops == pytest.approx([1e19, 1e21])


def test_isoflop_names_a_budget_with_fewer_than_three_distinct_sizes():
    """Three runs at two sizes (a size repeated with another seed) give polyfit a rank-deficient parabola: the budget
    was left out as 'loss is not convex in log N', with numpy's RankWarning, for runs whose loss is convex. Repeats
    count once, as in fit_law; the other budgets' fit is unchanged."""
    rows = [(f * TRUE.optimal_params(c), c) for c in (1e19, 1e20, 1e21) for f in (0.5, 1, 2)]
    rows += [(f * TRUE.optimal_params(1e22), 1e22) for f in (0.5, 0.5, 2)]
    n, c = map(np.array, zip(*rows))
    d = c / (6 * n)
    loss = TRUE.loss(n, d) * np.r_[np.ones(10), 1.002, 1.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iso = isoflop_envelope(n, d, loss)
    assert [str(w.message) for w in caught] == [
        "isoflop_envelope: 1 of 4 budgets left out; C=1e+22: 2 distinct model sizes among its 3 runs, need 3"]
    assert iso.flops == pytest.approx([1e19, 1e20, 1e21])
    assert iso.a == pytest.approx(isoflop_envelope(n[:9], d[:9], loss[:9]).a, rel=1e-12)


def test_isoflop_loss_opt_is_the_minimum_loss_of_each_budget():
    """`loss_opt` is the parabola's value at its minimum: the true law's loss at its compute-optimal N on that budget
    (the parabola in log N over 0.25-4x of N_opt fits the true curve to 0.1%); no other test read it."""
    budgets = np.geomspace(1e18, 1e21, 4)
    n = np.concatenate([TRUE.optimal_params(c) * np.geomspace(0.25, 4, 7) for c in budgets])
    d = np.repeat(budgets, 7) / (6 * n)
    iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    best = [TRUE.loss(TRUE.optimal_params(c), TRUE.optimal_tokens(c)) for c in budgets]
    np.testing.assert_allclose(iso.loss_opt, best, rtol=1e-3)


def test_isoflop_reports_a_budget_at_the_centre_of_its_runs():
    """Runs planned at one budget land a little off it (token counts rounded to whole batches): a group of runs at
    C/1.02, C and 1.02·C (one group at rtol 0.05) reports C, its geometric centre, and D_opt = C / 6N_opt of that C;
    not its smallest run's budget (2% low, and every D_opt with it)."""
    rows = []
    for c in (1e19, 1e20, 1e21):
        rows += [(f * TRUE.optimal_params(c), c * j) for f, j in ((0.5, 1 / 1.02), (1, 1.0), (2, 1.02))]
    n, c = map(np.array, zip(*rows))
    d = c / (6 * n)
    iso = isoflop_envelope(n, d, TRUE.loss(n, d))
    assert iso.flops == pytest.approx([1e19, 1e20, 1e21], rel=1e-12)
    np.testing.assert_allclose(iso.d_opt, np.asarray(iso.flops) / (6 * np.asarray(iso.n_opt)), rtol=1e-12)


def test_isoflop_leaves_out_a_budget_whose_loss_is_concave_in_log_n():
    """A budget whose losses bend down (a broken run in the middle of the sizes, here a middle loss 0.1 above its
    neighbours' line) has a maximum, not a minimum: taken, its vertex was reported as N_opt. It is left out, named."""
    rows = [(f * TRUE.optimal_params(c), c) for c in (1e19, 1e20, 1e21, 1e22) for f in (0.5, 1, 2)]
    n, c = map(np.array, zip(*rows))
    d = c / (6 * n)
    loss = TRUE.loss(n, d)
    loss[10] = (loss[9] + loss[11]) / 2 + 0.1  # the 1e22 budget's middle size: concave
    with pytest.warns(UserWarning, match=r"1 of 4 budgets left out; C=1e\+22: loss is not convex in log N"):
        iso = isoflop_envelope(n, d, loss)
    assert iso.flops == pytest.approx([1e19, 1e20, 1e21])


def test_bootstrap_resamples_from_every_run(monkeypatch):
    """Each resample draws its runs uniformly from all of them, the last one included (its share of the draws is
    1/n: 1/36 here, within 4 standard errors over 200 resamples). The refits are stubbed: what is drawn is checked."""
    import scaling.laws as laws

    n, d, loss = synthetic(0.0)
    drawn = []

    def fake_fit(n_params, n_tokens, loss, **kw):
        drawn.append(np.asarray(n_params) * 1e12 + np.asarray(n_tokens))  # one key per (N, D) run
        return FitResult(law=TRUE, objective=0.0, n_points=len(n_params), starts=1)

    monkeypatch.setattr(laws, "fit_law", fake_fit)
    bootstrap(n, d, loss, n_boot=200, seed=0)
    keys = np.concatenate(drawn[1:])  # drawn[0]: the full-data fit
    share = np.mean(keys == n[-1] * 1e12 + d[-1])
    assert abs(share - 1 / 36) < 4 * np.sqrt(1 / 36 * 35 / 36 / keys.size), share
    assert len(np.unique(keys)) == 36


def test_a_fit_started_at_the_optimum_stays_there():
    """`init` is the start L-BFGS-B takes first (bootstrap starts each refit from the full-data fit): started at the
    exact law of noise-free runs, with no grid starts, the fit returns that law to rounding (the objective's gradient
    is 0 there)."""
    n, d, _ = synthetic(0.0)
    fit = fit_law(n, d, TRUE.loss(n, d), n_starts=0, init=TRUE)
    assert fit.starts == 1 and fit.objective < 1e-25
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, k) == pytest.approx(getattr(TRUE, k), rel=1e-10), k


def test_bootstrap_takes_fit_laws_init_for_the_full_fit():
    """bootstrap passes fit_law's keywords on: `init` (a start, e.g. a published law) seeds the full-data fit, and each
    refit starts from that fit. It had been passed to the refits beside their own init=: a bare TypeError ('multiple
    values for keyword argument') after the full fit."""
    n, d, _ = synthetic(0.0)
    bs = bootstrap(n, d, TRUE.loss(n, d), n_boot=2, seed=0, n_starts=0, init=TRUE)
    assert len(bs.laws) == 2
    for law in (bs.fit.law, *bs.laws):
        assert law.alpha == pytest.approx(TRUE.alpha, rel=1e-6) and law.beta == pytest.approx(TRUE.beta, rel=1e-6)


def test_collinear_runs_at_several_budgets_are_told_to_vary_d_over_n():
    """A fixed D/N sweep over 1.2x in N spans budgets 1.44x apart: it is collinear but not one IsoFLOP profile (6·N·D
    within 5%), so the advice is to vary D/N, not to add budgets."""
    n = np.geomspace(1e8, 1.2e8, 6)
    d = 20 * n
    with pytest.raises(ValueError, match=r"nearly collinear .*Vary D/N across runs"):
        fit_law(n, d, TRUE.loss(n, d))


def test_the_fit_starts_from_the_best_scored_grid_points(monkeypatch):
    """fit_law starts L-BFGS-B from the `n_starts` grid points of lowest Huber loss (module docstring), scored here
    independently: E + A/N^alpha + B/D^beta in float64, no log-sum-exp. (The worst points as starts reached the same
    optimum on these runs: only the starts tell.)"""
    import itertools

    from scaling.laws import PAPER_GRID, optimize

    n, d, loss = synthetic(0.01, seed=2)
    starts, minimize = [], optimize.minimize
    monkeypatch.setattr(optimize, "minimize", lambda f, x0, **kw: starts.append(np.array(x0)) or minimize(f, x0, **kw))
    fit_law(n, d, loss, n_starts=3)
    grid = np.array(list(itertools.product(*(PAPER_GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))

    def score(theta):
        a, b, e, alpha, beta = theta
        r = np.abs(np.log(np.exp(e) + np.exp(a) / n**alpha + np.exp(b) / d**beta) - np.log(loss))
        return np.where(r <= 1e-3, 0.5 * r**2, 1e-3 * (r - 0.5e-3)).sum()

    best = np.sort([score(t) for t in grid])[:3]
    np.testing.assert_allclose(sorted(score(x) for x in starts), best, rtol=1e-9)


@pytest.mark.parametrize("flops", [1e19, 5.76e23, 1e26])
def test_allocation_minimises_loss_on_the_budget(flops):
    law = CHINCHILLA_APPROACH3
    res = optimize.minimize_scalar(lambda x: law.loss(np.exp(x), flops / (6 * np.exp(x))), bounds=(10, 40),
                                   method="bounded", options=dict(xatol=1e-10))
    assert law.optimal_params(flops) == pytest.approx(np.exp(res.x), rel=1e-3)
    assert 6 * law.optimal_params(flops) * law.optimal_tokens(flops) == pytest.approx(flops)
    n = law.optimal_params(flops)
    assert law.optimal_flops_for_params(n) == pytest.approx(flops)  # the inverse


def test_chinchilla_table3():
    """Table 3 is Approach 1 (a = b = 0.50, paper Table 2). With the exponent anchored at the paper's
    Approach-1 result for Gopher's budget (67B at 5.76e23 FLOPs) every row's tokens are within 7%,
    and within 1.5% from 175B up; the paper's FLOPs column is 6·N·D (1%) except the 67B row, which is
    Gopher's budget (4.7%). The published Approach-3 law does not reproduce the table."""
    for n, flops, tokens in CHINCHILLA_TABLE3:
        pred = CHINCHILLA_APPROACH1.optimal_tokens_for_params(n)
        assert pred == pytest.approx(tokens, rel=0.015 if n >= 175e9 else 0.07), n
        assert 6 * n * tokens == pytest.approx(flops, rel=0.05 if n == 67e9 else 0.01)
        # from the budget (make_plan --flops): the same allocation, on the budget (6·N·D = C)
        n_c, d_c = CHINCHILLA_APPROACH1.optimal_params(flops), CHINCHILLA_APPROACH1.optimal_tokens(flops)
        assert 6 * n_c * d_c == pytest.approx(flops, rel=1e-12)
        assert d_c == pytest.approx(CHINCHILLA_APPROACH1.optimal_tokens_for_params(n_c), rel=1e-12)
        # going from the budget instead of the size lands on the same row
        assert CHINCHILLA_APPROACH1.optimal_params(flops) == pytest.approx(n, rel=0.05 if n == 67e9 else 0.04)
    # Approach 3 with the published (rounded) constants: N_opt ∝ C^0.45, 14.5B tokens for 400M (Table 3: 8.0B),
    # and 32B parameters for Gopher's budget (the paper quotes 40B)
    assert CHINCHILLA_APPROACH3.exponents[0] == pytest.approx(0.4516, abs=1e-4)
    assert CHINCHILLA_APPROACH3.optimal_tokens_for_params(400e6) == pytest.approx(14.5e9, rel=0.01)
    assert CHINCHILLA_APPROACH3.optimal_params(GOPHER_FLOPS) == pytest.approx(32.2e9, rel=0.01)


def test_fit_input_errors():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_law([1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="loss must be finite and positive"):
        fit_law(*synthetic(0.0)[:2], np.zeros(36))


def test_isoflop_envelope_refuses_empty_or_ragged_input():
    with pytest.raises(ValueError, match="one entry per run"):
        isoflop_envelope([], [], [])
    with pytest.raises(ValueError, match="one entry per run"):
        isoflop_envelope([1e6, 2e6], [1e9], [3.0, 2.9])
    # one diverged run used to drop (or move) its whole budget with a misleading reason
    n = np.array([1e6, 2e6, 4e6, 1e6, 2e6, 4e6])
    d = np.array([4e9, 2e9, 1e9, 4e10, 2e10, 1e10])
    for bad, name in (({"loss": [3.0, np.nan, 3.1, 2.5, 2.4, 2.6]}, "loss"), ({"n": -n}, "n_params")):
        args = {"n": n, "d": d, "loss": [3.0, 2.9, 3.1, 2.5, 2.4, 2.6]} | bad
        with pytest.raises(ValueError, match=f"{name} must be finite and positive for every run; runs"):
            isoflop_envelope(args["n"], args["d"], args["loss"])


@pytest.mark.parametrize("rtol", [-0.05, float("nan"), float("inf"), "0.05"])
def test_isoflop_envelope_names_a_grouping_tolerance_that_groups_nothing(rtol):
    """rtol < 0 or NaN put every run in a budget of its own: 'need >= 2 FLOP budgets with >= 3 runs' for runs that
    have 3 at each of 2 budgets, naming no argument (inf merged every budget into one, a string raised a TypeError)."""
    n = np.array([1e6, 2e6, 4e6, 1e6, 2e6, 4e6])
    d = np.array([4e9, 2e9, 1e9, 4e10, 2e10, 1e10])
    loss = [3.0, 2.9, 3.1, 2.5, 2.4, 2.6]
    assert len(isoflop_envelope(n, d, loss).n_opt) == 2  # 3 runs at each of 2 budgets
    with pytest.raises(ValueError, match="rtol="):
        isoflop_envelope(n, d, loss, rtol=rtol)


def test_bootstrap_without_a_fit_is_an_error():
    n = np.geomspace(1e7, 1e9, 10)
    with pytest.raises(ValueError, match="n_boot must be an int >= 1"):
        bootstrap(n, 20 * n * np.linspace(1, 3, 10), TRUE.loss(n, 20 * n * np.linspace(1, 3, 10)), n_boot=0)


@pytest.mark.parametrize("delta", [0.0, -1e-3, float("nan")])
def test_fit_refuses_a_huber_threshold_that_is_not_positive(delta):
    # delta = 0 made every Huber term 0: fit_law returned the grid's first point (E = 0.37, A = B = 1,
    # alpha = beta = 0) as the law; a negative delta gave A = B = inf
    n, d, loss = synthetic(0.0)
    with pytest.raises(ValueError, match="delta=.*must be > 0"):
        fit_law(n, d, loss, delta=delta)


def test_fit_objective_is_the_papers_huber_loss_by_default():
    """The default threshold is the paper's delta = 1e-3: the objective fit_law reports is the Huber loss of its law's
    log-loss residuals, recomputed here by hand (noise 0.01 puts most residuals past 1e-3, where deltas differ)."""
    n, d, loss = synthetic(0.01, seed=2)
    fit = fit_law(n, d, loss)
    r = np.abs(np.log(fit.law.loss(n, d)) - np.log(loss))
    huber = np.where(r <= 1e-3, 0.5 * r**2, 1e-3 * (r - 0.5e-3)).sum()
    assert fit.objective == pytest.approx(huber, rel=1e-6)


def test_grid_screening_scores_with_the_objective_l_bfgs_minimises():
    """fit_law ranks its grid by `_huber` and refines with `_objective`: the two are one Huber loss (continuous at
    |r| = delta), so the best-screened starts are the best by the objective too."""
    n, d, loss = synthetic(0.01, seed=2)
    theta = np.array([np.log(300.0), np.log(500.0), np.log(1.8), 0.3, 0.3])
    r = np.logaddexp(np.logaddexp(theta[0] - theta[3] * np.log(n), theta[1] - theta[4] * np.log(d)), theta[2])
    r = r - np.log(loss)
    assert _huber(r, 1e-3).sum() == pytest.approx(_objective(theta, np.log(n), np.log(d), np.log(loss), 1e-3)[0])


def test_fit_with_infinite_delta_is_least_squares_and_names_bad_runs():
    n, d, loss = synthetic(0.0)
    law = fit_law(n, d, loss, delta=float("inf")).law
    assert law.alpha == pytest.approx(TRUE.alpha, rel=1e-3) and law.beta == pytest.approx(TRUE.beta, rel=1e-3)
    loss = loss.copy()
    loss[[3, 7]] = np.nan  # diverged runs
    with pytest.raises(ValueError, match=r"loss must be finite and positive for every run; runs \[3, 7\]"):
        fit_law(n, d, loss)


def test_fit_takes_a_partial_grid_and_names_unknown_axes():
    # a grid of only alpha and beta raised KeyError: 'a'; the other axes keep the paper's grid
    n, d, loss = synthetic(0.0)
    fine = dict(alpha=np.arange(0.0, 1.01, 0.1), beta=np.arange(0.0, 1.01, 0.1))
    law = fit_law(n, d, loss, grid=fine).law
    assert law.alpha == pytest.approx(TRUE.alpha, rel=1e-3) and law.beta == pytest.approx(TRUE.beta, rel=1e-3)
    with pytest.raises(ValueError, match=r"grid has unknown keys \['Alpha'\]"):
        fit_law(n, d, loss, grid=dict(Alpha=[0.3]))


def test_runs_just_past_the_collinearity_threshold_are_refused():
    """|corr(log N, log D)| = 0.995 (D/N = 20 x e^±0.15, alternating, over 100x in N) is above MAX_LOG_CORR = 0.99:
    refused with the measured correlation; at 0.98 (e^±0.3) the fit runs."""
    n = np.geomspace(1e7, 1e9, 8)
    sign = np.array([1, -1] * 4)
    d = 20 * n * np.exp(0.15 * sign)
    with pytest.raises(ValueError, match=r"nearly collinear .* = 0\.9951 > 0\.99"):
        fit_law(n, d, TRUE.loss(n, d))
    d = 20 * n * np.exp(0.3 * sign)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an exponent may sit on its bound with so few runs
        assert fit_law(n, d, TRUE.loss(n, d)).n_points == 8


def test_fit_counts_distinct_runs_not_repeats():
    """Five runs of which two repeat one (N, D) (a second seed) are four equations for five unknowns: the fit was
    accepted and returned E = 3.6e-87 with no error. Refused by name; the bootstrap skips such resamples too."""
    law = CHINCHILLA_APPROACH3
    n, d = np.array([1e7, 3e7, 1e8, 3e8]), np.array([1e10, 3e9, 3e10, 1e9])
    n5, d5 = np.r_[n, n[0]], np.r_[d, d[0]]
    with pytest.raises(ValueError, match=r"4 distinct \(N, D\) runs.*needs >= 5"):
        fit_law(n5, d5, law.loss(n5, d5) * np.r_[1, 1, 1, 1, 1.01])
    # repeats beside 5 distinct runs are fine, and a bootstrap over runs with repeats does not raise
    n, d, loss = synthetic(0.01)
    n2, d2, loss2 = np.r_[n, n[:6]], np.r_[d, d[:6]], np.r_[loss, loss[:6] * 1.01]
    assert fit_law(n2, d2, loss2).n_points == 42
    sub = np.r_[0, 8, 13, 21, 30, 0, 0, 8]  # 5 distinct runs, three of them repeated: resamples often have < 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bs = bootstrap(n2[sub], d2[sub], loss2[sub] * np.r_[1, 1, 1, 1, 1, 1.01, 0.99, 1.01], n_boot=20, seed=0)
    assert bs.skipped > 0 and len(bs.laws) + bs.skipped == 20


def test_fit_and_bootstrap_take_numpy_int_counts():
    """n_starts=np.int64(2) and n_boot=np.int64(3) (a count from a numpy array or sweep) were refused as 'must be an
    int' although they are ints; bools and floats still are."""
    n, d, loss = synthetic(0.0)
    assert fit_law(n, d, loss, n_starts=np.int64(2)).starts == 2
    assert len(bootstrap(n, d, loss, n_boot=np.int64(3), n_starts=np.int32(1)).laws) == 3
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="n_starts must be an int"):
            fit_law(n, d, loss, n_starts=bad)
        with pytest.raises(ValueError, match="n_boot must be an int"):
            bootstrap(n, d, loss, n_boot=bad)


@pytest.mark.parametrize("axis", [[np.nan], [], 0.5, [0.5, np.inf], ["0.5"]])
def test_fit_names_a_grid_axis_that_is_not_finite_numbers(axis):
    """grid={'alpha': [nan]} returned a law with alpha = nan and no error (L-BFGS-B started from the NaN point); an
    empty axis was a bare IndexError and a scalar one a bare TypeError."""
    n, d, loss = synthetic(0.0)
    with pytest.raises(ValueError, match=r"grid\['alpha'\] must be a non-empty list of finite numbers"):
        fit_law(n, d, loss, grid=dict(alpha=axis))


@pytest.mark.parametrize("field", ["E", "A", "B"])
def test_fit_names_an_init_law_it_cannot_start_from(field):
    """init=ScalingLaw(E=0, ...) (or A, B <= 0) failed as a bare 'math domain error' (the start is their logs)."""
    n, d, loss = synthetic(0.0)
    with pytest.raises(ValueError, match=rf"init: {field}=0 must be finite and > 0"):
        fit_law(n, d, loss, init=dataclasses.replace(TRUE, **{field: 0.0}))


def test_a_fit_to_exactly_five_distinct_runs_is_warned_about():
    """5 distinct runs are 5 equations for the law's 5 parameters: the fit reproduces every run, noise included,
    so neither its residuals nor a bootstrap can flag it. With 2% noise on 5 runs of CHINCHILLA_APPROACH3 it put
    N_opt(1e23) at 1.06e9, 1.46e8, 1.22e8 and 5.24e10 (true 1.46e10) over 4 draws, in silence."""
    law = CHINCHILLA_APPROACH3
    n, d = np.array([1e7, 3e7, 1e8, 3e7, 1e8, 1e7]), np.array([1e9, 3e9, 1e10, 1e10, 1e9, 1e10])
    loss = law.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.02, 6))
    with pytest.warns(UserWarning, match=r"5 distinct \(N, D\) runs for the law's 5 parameters.*add runs"):
        fit_law(n[:5], d[:5], loss[:5])
    with pytest.warns(UserWarning, match="5 distinct"):  # a repeated seed adds no equation: still 5
        fit_law(np.r_[n[:5], n[0]], np.r_[d[:5], d[0]], np.r_[loss[:5], loss[0] * 1.01])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit_law(n, d, loss)  # 6 distinct runs: one residual degree of freedom, no such warning
    assert not [w for w in seen if "5 distinct" in str(w.message)]


def test_an_interval_that_a_resampled_law_cannot_take_says_it_is_the_resamples():
    """A weak D term over a 3x range of D: the full fit has beta = 2 (on its bound), and 5 of 40 resamples pin beta
    at 0, where `optimal_params` refuses the law. `interval(optimal_params)` raised that one resample's error
    ('ScalingLaw alpha=0.38, beta=0 ... refit on runs that span a wider range'), read as the full fit's."""
    law = ScalingLaw(E=1.7, A=400.0, B=20.0, alpha=0.34, beta=0.28)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e9, 4), np.geomspace(1e9, 3e9, 3)))
    loss = law.loss(n, d) * np.exp(np.random.default_rng(4).normal(0, 0.02, n.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exponents on their bounds, said per resample
        bs = bootstrap(n, d, loss, n_boot=40, seed=4)
    assert sum(x.beta == 0 for x in bs.laws) == 5 and bs.fit.law.beta > 0
    for interval in (bs.interval, bs.prediction_interval):
        with pytest.raises(ValueError, match=r"Bootstrap: fn raised on 5 of the 40 bootstrap laws \(not on the full "
                                             r"fit\), e.g. law \d+: ScalingLaw .*beta=0.*math\.inf"):
            interval(lambda lw: float(lw.optimal_params(1e22)))
    # a fn every law takes is unchanged: the full fit's value and the resamples' percentiles
    point, lo, hi = bs.interval(lambda lw: lw.beta)
    assert point == bs.fit.law.beta and (lo, hi) == tuple(np.percentile([x.beta for x in bs.laws], [5, 95]))


def test_interval_reaches_infinity_when_resamples_return_it():
    """`_values` tells the caller whose fn fails on some resamples (beta pinned at 0: no optimum) to return the limit,
    e.g. math.inf. numpy's percentile interpolates inf - inf into NaN: such an interval came back (point, low, nan),
    with only a RuntimeWarning, instead of an upper bound of inf."""
    fit = FitResult(law=TRUE, objective=0.0, n_points=8, starts=1)
    laws = tuple(ScalingLaw(E=1.0 + i / 100, A=1.0, B=1.0, alpha=0.3, beta=0.3) for i in range(100))
    bs = Bootstrap(fit=fit, laws=laws, residuals=(0.0,) * 8)
    fn = lambda law: math.inf if law.E >= 1.9 else law.E  # noqa: E731 - the top 10% of resamples have no optimum
    for level in (0.9, 0.5):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (numpy's 'invalid value encountered in subtract')
            _, lo, hi = bs.interval(fn, level)
            _, plo, phi = bs.prediction_interval(fn, level)
        expect = np.percentile([law.E for law in laws], [50 * (1 - level)])[0]
        assert lo == pytest.approx(expect) and plo == pytest.approx(expect)
        if level == 0.9:  # the 95th percentile lies among the infinite resamples
            assert hi == phi == math.inf, (hi, phi)
        else:  # the 75th below them: numpy's number, as before
            assert hi == phi == pytest.approx(np.percentile([law.E for law in laws], 75)), (hi, phi)
    neg = lambda law: -fn(law)  # noqa: E731
    _, lo, hi = bs.interval(neg, 0.9)
    assert lo == -math.inf and hi == pytest.approx(-np.percentile([law.E for law in laws], 5))


def test_fit_recovers_a_law_whose_losses_are_far_from_one_nat():
    """The paper's grid starts at E in [e^-1, e] (nats per token). Losses of the same law in other units (summed over
    a sequence: x200-x3000; or x1e-3) left every start far off: on noiseless runs L-BFGS-B stopped at a law 6-10% off
    the runs, N_opt(1e23) 0.13x or 17x the truth, in silence. The Huber objective on log L does not see a unit."""
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e9, 1e12, 5)))
    law = CHINCHILLA_APPROACH3
    for unit in (1e-3, 200.0, 1000.0):
        fit = fit_law(n, d, unit * law.loss(n, d)).law
        assert fit.E == pytest.approx(unit * law.E, rel=1e-4) and fit.A == pytest.approx(unit * law.A, rel=1e-4)
        assert fit.B == pytest.approx(unit * law.B, rel=1e-4) and fit.alpha == pytest.approx(law.alpha, rel=1e-5)
        assert fit.optimal_params(1e23) == pytest.approx(law.optimal_params(1e23), rel=1e-4)
