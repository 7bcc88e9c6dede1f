"""Objectives and samplers against closed forms: with the exact velocity / ε / v field of a known data
distribution (a 1D Gaussian mixture), Euler and DDIM must return samples from that distribution, and
classifier-free guidance must combine the conditional and unconditional fields as specified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.video.config import DiffusionConfig
from models.video.diffusion import (
    alpha_bar,
    ddim_sample,
    diffusion_loss,
    euler_sample,
    guided,
    noisy,
    sample,
    sample_time,
    shift_time,
)

W = jnp.asarray([0.3, 0.7])  # mixture weights
MU = jnp.asarray([-2.0, 1.5])
SD = jnp.asarray([0.3, 0.5])


def posterior(x, a, b, w=W):
    """E[x0 | x_t = x] and E[ε | x_t = x] for x_t = a·x0 + b·ε, x0 ~ Σ w_k N(μ_k, σ_k²), ε ~ N(0, 1). w: [K] weights,
    or [N, K] one set per sample. The components on the leading axis: the samplers' tests are run-time bound (XLA at
    -O0, see conftest), and sums over a trailing axis of 2 ran at half the speed."""
    x, a, b, mu, sd = x[None], a[None], b[None], MU[:, None], SD[:, None]
    w = jnp.asarray(w)[:, None] if jnp.ndim(w) == 1 else jnp.asarray(w).T
    var = a ** 2 * sd ** 2 + b ** 2
    logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (x - a * mu) ** 2 / var
    r = jax.nn.softmax(logp, axis=0)
    resid = (x - a * mu) / var
    e_x0 = (r * (mu + a * sd ** 2 * resid)).sum(0)
    e_eps = (r * b * resid).sum(0)
    return e_x0, e_eps


def flow_velocity(x, t, w=W):
    e_x0, e_eps = posterior(x, 1 - t, t, w)
    return e_eps - e_x0


def check_mixture(x, w=W, tol_w=0.02):
    x = np.asarray(x)
    left = x < -0.5  # the two modes are far apart; -0.5 separates them
    assert abs(left.mean() - float(w[0])) < tol_w
    for k, part in enumerate((x[left], x[~left])):
        if float(w[k]) > 0.05:
            assert abs(part.mean() - float(MU[k])) < 0.05, (k, part.mean())
            assert abs(part.std() / float(SD[k]) - 1) < 0.1, (k, part.std())


NOISE = jax.random.normal(jax.random.key(0), (20000,))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_recovers_the_mixture_from_the_exact_velocity(shift):
    check_mixture(euler_sample(flow_velocity, NOISE, steps=200, shift=shift))


def test_euler_with_few_steps_is_visibly_wrong():
    # the check above can fail: 2 Euler steps do not transport noise onto the mixture
    with pytest.raises(AssertionError):
        check_mixture(euler_sample(flow_velocity, NOISE, steps=2))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_recovers_the_mixture_from_the_exact_prediction(prediction):
    cfg = DiffusionConfig(kind="ddpm", prediction=prediction)

    def pred(x, t):
        ab = alpha_bar(t, cfg)
        a, b = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        e_x0, e_eps = posterior(x, a, b)
        return e_eps if prediction == "eps" else a * e_eps - b * e_x0

    check_mixture(ddim_sample(pred, NOISE, steps=200, cfg=cfg))


def test_classifier_free_guidance_combines_the_fields():
    cond_w = jnp.asarray([1e-6, 1.0 - 1e-6])  # condition: the right component only

    def model(x, t, c):  # c = 1: conditional field, c = 0: unconditional (the mixture); one field per row's weights
        return flow_velocity(x, t, jnp.where((c == 1)[:, None], cond_w, W))

    on, off = jnp.ones(NOISE.shape), jnp.zeros(NOISE.shape)
    check_mixture(euler_sample(guided(model, on, off, 1.0), NOISE, 200), w=cond_w)
    check_mixture(euler_sample(guided(model, on, off, 0.0), NOISE, 200))
    # a traced scale takes the batched two-halves path and gives the same answer as the Python number
    traced = jax.jit(lambda s: euler_sample(guided(model, on, off, s), NOISE, 50))(jnp.float32(1.0))
    np.testing.assert_allclose(traced, euler_sample(guided(model, on, off, 1.0), NOISE, 50), atol=1e-4)
    # guidance beyond 1 pushes further from the unconditional mode
    strong = np.asarray(euler_sample(guided(model, on, off, 3.0), NOISE, 200))
    assert (strong < -0.5).mean() < 1e-3 and strong.mean() > 1.5


def test_guidance_refuses_a_scale_per_example():
    """A [B] of scales broadcast against the prediction's last (channel) axis: with B = C the channels were scaled,
    not the examples, silently; traced scales too."""
    model = lambda x, t, c: x + c  # noqa: E731
    x, t, c = jnp.zeros((4, 3, 4)), jnp.zeros(4), jnp.ones((4, 1, 1))
    for run in (lambda s: guided(model, c, 0 * c, s)(x, t), jax.jit(lambda s: guided(model, c, 0 * c, s)(x, t))):
        with pytest.raises(ValueError, match=r"guided: scale must be one number \(0-d\), got shape \[4\]"):
            run(jnp.arange(4.0))
    np.testing.assert_array_equal(guided(model, c, 0 * c, jnp.float32(2.0))(x, t), 2.0)  # 0-d arrays still run


def test_noisy_targets_lead_back_to_the_data():
    x0 = jax.random.normal(jax.random.key(1), (64, 3, 4, 4, 2))
    eps = jax.random.normal(jax.random.key(2), x0.shape)
    t = jax.random.uniform(jax.random.key(3), (64,))
    flow = DiffusionConfig()
    x_t, v = noisy(x0, eps, t, flow)
    tb = t[:, None, None, None, None]
    np.testing.assert_allclose(x_t - tb * v, x0, atol=1e-5)  # one Euler step to t = 0 from the exact velocity
    ddpm = DiffusionConfig(kind="ddpm", prediction="v")
    x_t, v = noisy(x0, eps, t, ddpm)
    a, b = jnp.sqrt(alpha_bar(tb, ddpm)), jnp.sqrt(1 - alpha_bar(tb, ddpm))
    np.testing.assert_allclose(a * x_t - b * v, x0, atol=1e-5)
    # (the losses: test_diffusion_loss_against_oracle_and_zero_predictors, exactly per objective)


@pytest.mark.parametrize("cfg", [DiffusionConfig(), DiffusionConfig(kind="ddpm")], ids=["flow", "ddpm"])
def test_noisy_names_times_and_noise_of_another_shape(cfg):
    """A t_B of [B, 1] was reshaped to [B, 1, 1] and broadcast x_t to [B, B, C] (the target stayed [B, C]); an ε of
    [1, C] broadcast x_t to [B, C] and the eps target to [1, C]: shapes apart, silently. One 0-d time is all rows'."""
    x0, eps, t = jnp.ones((4, 3)), jnp.zeros((4, 3)), jnp.linspace(0.1, 0.9, 4)
    with pytest.raises(ValueError, match=r"noisy: .* t_B be \[B\] = \[4\].*got eps \[4, 3\] and t_B \[4, 1\]"):
        noisy(x0, eps, t[:, None], cfg)
    with pytest.raises(ValueError, match=r"noisy: eps must have x0's shape \[4, 3\].*got eps \[1, 3\]"):
        noisy(x0, eps[:1], t, cfg)
    for got, want in zip(noisy(x0, eps, t[2], cfg), noisy(x0, eps, jnp.full((4,), t[2]), cfg)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", [0.25, [0.25] * 4], ids=["float", "list"])
def test_noisy_takes_a_python_time_as_the_array_of_it(t):
    """One time as a Python float (0-d, as the docstring offers) or [B] times as a list passed the shape check and
    failed with a bare AttributeError ('float' object has no attribute 'reshape'). The flow's x_t = (1 - t)·x0 + t·ε
    and target ε - x0, here 0.75 and -1 everywhere."""
    x_t, target = noisy(jnp.ones((4, 3)), jnp.zeros((4, 3)), t, DiffusionConfig())
    np.testing.assert_allclose(x_t, np.full((4, 3), 0.75))
    np.testing.assert_allclose(target, np.full((4, 3), -1.0))


def test_alpha_bar_is_the_cosine_schedule():
    """ᾱ(t) = f(t) / f(0), f(t) = cos²((t + s)/(1 + s)·π/2) (Nichol & Dhariwal 2021), clipped below at alpha_bar_min,
    against float64: ᾱ(0) = 1 exactly, so x_0 is the data (f(t) alone, ᾱ(0) = 0.99984, passed the samplers'
    tests)."""
    cfg = DiffusionConfig(kind="ddpm", prediction="eps")
    t = np.linspace(0.0, 1.0, 101)
    f = lambda t: np.cos((t + cfg.cosine_s) / (1 + cfg.cosine_s) * np.pi / 2) ** 2  # noqa: E731
    want = np.clip(f(t) / f(0.0), cfg.alpha_bar_min, 1.0)
    np.testing.assert_allclose(alpha_bar(jnp.asarray(t, jnp.float32), cfg), want, rtol=1e-5, atol=1e-7)
    assert float(alpha_bar(jnp.float32(0.0), cfg)) == 1.0
    assert float(alpha_bar(jnp.float32(1.0), cfg)) == pytest.approx(cfg.alpha_bar_min)


def test_logit_normal_time_sampling_with_shift():
    cfg = DiffusionConfig(shift=3.0)
    t = np.asarray(sample_time(jax.random.key(0), 100_000, cfg))
    assert 0 < t.min() and t.max() < 1
    # the median of sigmoid(N(0, 1)) is 1/2, and the shift is monotone
    assert abs(np.median(t) - float(shift_time(0.5, 3.0))) < 0.01
    assert abs(np.median(t) - 0.75) < 0.01  # 3·0.5 / (1 + 2·0.5): towards noise, not shift_time's inverse (0.25)
    assert np.median(np.asarray(sample_time(jax.random.key(0), 100_000, DiffusionConfig()))) == pytest.approx(
        0.5, abs=0.01)


def test_logit_normal_time_sampling_takes_its_mean_and_std():
    """logit(t) ~ N(logit_mean, logit_std) before the shift: the median test above cannot see the std (a sampler
    that ignored logit_std passed), nor a mean of 0."""
    t = np.asarray(sample_time(jax.random.key(1), 200_000, DiffusionConfig(logit_mean=0.5, logit_std=0.5)),
                   np.float64)
    u = np.log(t / (1 - t))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 0.5) < 0.01


def test_ddpm_training_times_are_uniform_from_1e_3_to_1():
    """kind='ddpm' trains on t ~ U(1e-3, 1) (DiffusionConfig's docstring), not U(0, 1): near t = 0 the noise is
    invisible in x_t and an ε target is unlearnable. A sampler from U(0, 1) passed every test (the flow's were
    checked, the DDPM branch only through the oracle loss, which is exact at any t)."""
    t = np.asarray(sample_time(jax.random.key(0), 100_000, DiffusionConfig(kind="ddpm")), np.float64)
    assert 1e-3 <= t.min() < 1.1e-3 and t.max() < 1  # U(0, 1) puts ~100 of 100k draws below 1e-3
    assert t.mean() == pytest.approx((1 + 1e-3) / 2, abs=3e-3)


def test_the_objectives_sampler_steps_on_its_shifted_grid():
    """sample() for flow integrates on cfg.shift's grid (ignoring it passed: the Euler tests call euler_sample with
    their own shift). With v(x, t) = t², the result is noise + Σ (t_{i+1} - t_i)·t_i² over that grid (numpy). Not
    v = t: its Euler sum is the same on the grid mirrored about t = 1/2, and so on the inverse shift's grid
    (t / (s - (s - 1)·t) = 1 - shift(1 - t)), which passed with the median test below, itself shift_time-based."""
    noise = jnp.zeros((2, 3))
    pred = lambda x, t_B: jnp.broadcast_to(t_B[:, None] ** 2, x.shape)  # noqa: E731
    for shift in (1.0, 3.0):
        t = np.linspace(1.0, 0.0, 5)
        t = shift * t / (1 + (shift - 1) * t)
        want = np.sum((t[1:] - t[:-1]) * t[:-1] ** 2)
        np.testing.assert_allclose(sample(pred, noise, DiffusionConfig(shift=shift), steps=4), want, rtol=1e-6)


def test_a_small_shift_keeps_the_grid_from_1_to_0():
    """shift_time must fix t = 1 for every shift DiffusionConfig takes. Written s·t / (1 + (s - 1)·t), the
    denominator at t = 1 is 1 + float32(s - 1), which cancels to ~s with float32's rounding of s - 1: the grid
    started at 1.0000129 (s = 1e-3), 0.50 (s = 3e-8), and at inf for s below ~3e-8, all-NaN samples. One Euler step
    of v = 1 from 0 to t = 0 must land on -1."""
    for shift in (0.1, 1e-3, 3e-8, 1e-12):
        np.testing.assert_array_equal(shift_time(jnp.asarray([0.0, 1.0], jnp.float32), shift), [0.0, 1.0])
        out = sample(lambda x, t: jnp.ones_like(x), jnp.zeros((2, 3)), DiffusionConfig(shift=shift), steps=1)
        np.testing.assert_allclose(out, -1.0, rtol=1e-6)


@pytest.mark.parametrize("cfg", [DiffusionConfig(), DiffusionConfig(kind="ddpm", prediction="eps"),
                                 DiffusionConfig(kind="ddpm", prediction="v")], ids=["flow", "eps", "v"])
def test_diffusion_loss_against_oracle_and_zero_predictors(cfg):
    """diffusion_loss draws t from the first half of split(key) and ε from the second. An oracle that rebuilds ε
    the same way and returns the objective's target (written out here: flow ε - x0, eps ε, v a·ε - b·x0 with
    a = √ᾱ(t), b = √(1-ᾱ(t))) has loss ~0; a zero predictor's loss is the mean of target² over the elements."""
    x0 = 2.0 * jax.random.normal(jax.random.key(1), (64, 3, 4, 4, 2))  # std 2: ε alone is a visibly wrong target
    key = jax.random.key(4)
    eps = jax.random.normal(jax.random.split(key)[1], x0.shape, jnp.float32)
    seen = {}

    def coeffs(t_B):  # target = c·ε + d, and x_t = a·x0 + b·ε, per objective
        t = t_B[:, None, None, None, None]
        if cfg.kind == "flow":
            return 1.0 - t, t, jnp.ones_like(t), -x0
        a, b = jnp.sqrt(alpha_bar(t, cfg)), jnp.sqrt(1 - alpha_bar(t, cfg))
        return (a, b, jnp.ones_like(t), jnp.zeros_like(x0)) if cfg.prediction == "eps" else (a, b, a, -b * x0)

    def oracle(x_t, t_B):
        a, b, c, d = coeffs(t_B)
        seen["x_t"], seen["want_x_t"] = x_t, a * x0 + b * eps
        return c * eps + d

    loss, per_ex, t_B = diffusion_loss(oracle, x0, key, cfg)
    np.testing.assert_allclose(seen["x_t"], seen["want_x_t"], atol=1e-5)
    assert per_ex.shape == (64,) and float(loss) < 1e-8
    # zero predictor: loss = mean(target²). Given x0 and t, target = c·ε + d elementwise with ε ~ N(0, 1), so
    # E[target²] = c² + d² and Var[target²] = 2c⁴ + 4c²d²; the mean over N elements is within 4σ of its expectation
    loss0, _, t0 = diffusion_loss(lambda x, t: jnp.zeros_like(x), x0, key, cfg)
    np.testing.assert_array_equal(t0, t_B)
    _, _, c, d = coeffs(t0)
    c, d = np.broadcast_to(c, x0.shape).astype(np.float64), np.asarray(d, np.float64)
    n = x0.size
    mean, sigma = np.mean(c ** 2 + d ** 2), np.sqrt(np.sum(2 * c ** 4 + 4 * c ** 2 * d ** 2)) / n
    assert abs(float(loss0) - mean) < 4 * sigma, (float(loss0), mean, sigma)
    # the check can fail: the expectation with target ε instead (1) is many σ away, for every objective here
    if cfg.prediction != "eps":
        assert abs(1.0 - mean) > 10 * sigma


def test_samplers_take_numpy_step_counts_and_refuse_zero():
    """np.int64 steps (from np.arange, a config array) were refused as 'steps must be an int >= 1', though
    DiffusionConfig takes numpy ints; euler_sample(..., steps=0), exported beside them, returned the noise unchanged."""
    noise, pred = jnp.ones((2, 3)), lambda x, t: -x  # dx/dt = -x from t = 1 to 0: x grows by (1 + 1/n)^n
    for cfg in (DiffusionConfig(), DiffusionConfig(kind="ddpm")):
        np.testing.assert_array_equal(sample(pred, noise, cfg, np.int64(4)), sample(pred, noise, cfg, 4))
    np.testing.assert_allclose(euler_sample(pred, noise, np.int64(4)), (1 + 1 / 4) ** 4 * noise, rtol=1e-6)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        euler_sample(pred, noise, 0)


def test_loss_and_samplers_name_a_prediction_of_another_shape_than_x():
    """A pred_fn returning [B, 1] (a reduced or per-example output) for x [B, 3] broadcast against the target and the
    sampler's x: a loss and samples of other numbers, silently. Checked on static shapes: at trace time."""
    x, key, bad = jnp.ones((2, 3)), jax.random.key(0), lambda x, t: x[:, :1]
    for cfg in (DiffusionConfig(), DiffusionConfig(kind="ddpm")):
        with pytest.raises(ValueError, match=r"diffusion_loss: pred_fn\(x, t\) must return x's shape \[2, 3\].*"
                                             r"got \[2, 1\]"):
            jax.eval_shape(lambda x: diffusion_loss(bad, x, key, cfg)[0], x)
        name = "euler_sample" if cfg.kind == "flow" else "ddim_sample"
        with pytest.raises(ValueError, match=rf"{name}: pred_fn\(x, t\) must return x's shape \[2, 3\]"):
            jax.eval_shape(lambda x: sample(bad, x, cfg, 2), x)
        assert jax.eval_shape(lambda x: diffusion_loss(lambda x, t: -x, x, key, cfg)[0], x).shape == ()


def test_samplers_take_bf16_noise_integrate_in_float32_and_return_its_dtype():
    """bf16 noise (a bf16 model's latents) failed in both samplers with a bare scan TypeError ('carry input and carry
    output must have equal types'): the float32 time grid promoted the bf16 carry. They integrate in float32 and
    return the noise's dtype."""
    noise, pred = NOISE[:8].astype(jnp.bfloat16), lambda x, t: -x
    for cfg in (DiffusionConfig(), DiffusionConfig(kind="ddpm"), DiffusionConfig(kind="ddpm", prediction="v")):
        got = sample(pred, noise, cfg, 4)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, sample(pred, noise.astype(jnp.float32), cfg, 4).astype(jnp.bfloat16))


def test_samplers_return_float_samples_from_integer_or_bool_noise():
    """Integer noise (np.zeros((B, D), int), a probe of the map from noise to sample) was integrated in float32 and cast
    back to the noise's dtype: the samples were truncated to integers (Euler 0.57 -> 0), silently. They are float32."""
    pred = lambda x, t: x - 0.37  # noqa: E731
    for cfg in (DiffusionConfig(), DiffusionConfig(kind="ddpm"), DiffusionConfig(kind="ddpm", prediction="v")):
        for noise in (np.array([[1, 2], [3, 4]]), jnp.array([[1, 2], [3, 4]], jnp.int32), np.array([[True, False]])):
            got = sample(pred, noise, cfg, 4)
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(got, sample(pred, jnp.asarray(noise, jnp.float32), cfg, 4))


def test_ddim_sample_takes_none_steps_as_the_config_s():
    """steps=None passed ddim_sample's check, whose message offers 'None: cfg.sample_steps', then failed building the
    grid ('unsupported operand type(s) for +: NoneType and int'); it is cfg.sample_steps, as in `sample`."""
    cfg, noise, pred = DiffusionConfig(kind="ddpm", sample_steps=5), jnp.ones((2, 3)), lambda x, t: 0.1 * x
    np.testing.assert_array_equal(ddim_sample(pred, noise, None, cfg), ddim_sample(pred, noise, 5, cfg))


def test_ddim_sample_refuses_a_flow_config():
    """ddim_sample(pred, noise, steps, DiffusionConfig()) took the flow's velocity for v on the cosine schedule:
    with the exact velocity of the mixture it returned samples, silently off, instead of naming the sampler."""
    with pytest.raises(ValueError, match=r"ddim_sample needs a DiffusionConfig\(kind='ddpm'\), got kind='flow'"):
        ddim_sample(flow_velocity, NOISE, 10, DiffusionConfig())


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf"), None, "3"])
def test_euler_sample_refuses_a_shift_outside_the_configs_range(shift):
    """euler_sample's shift, unlike DiffusionConfig.shift, was not checked: 0, -1, NaN and inf made the grid's
    first time NaN and returned all-NaN samples; a string ('3' from a command line) passed float() and failed in
    the grid ("Only integer scalar arrays can be converted to a scalar index")."""
    with pytest.raises(ValueError, match=r"euler_sample: shift=.* must be a number in \(0, 1e6\]"):
        euler_sample(flow_velocity, NOISE, 4, shift)


def test_euler_sample_takes_array_and_traced_shifts():
    want = euler_sample(flow_velocity, NOISE[:8], 4, 3.0)
    np.testing.assert_array_equal(euler_sample(flow_velocity, NOISE[:8], 4, jnp.float32(3.0)), want)
    traced = jax.jit(lambda s: euler_sample(flow_velocity, NOISE[:8], 4, s))(jnp.float32(3.0))
    np.testing.assert_allclose(traced, want, rtol=1e-6, atol=1e-6)


def test_euler_sample_takes_a_float64_shift_under_jax_enable_x64():
    """Under jax_enable_x64 a float64 shift (np.float64 from a numpy sweep of shifts, a float64 array, traced or not)
    promoted the float32 time grid to float64, and with it the sampler's float32 carry: a bare scan carry-type
    TypeError. The samples are those of the same shift as a Python float, with x64 off."""
    want = euler_sample(flow_velocity, NOISE[:8], 4, 3.0)
    with jax.enable_x64(True):
        for shift in (np.float64(3.0), jnp.asarray(3.0, jnp.float64)):
            got = euler_sample(flow_velocity, NOISE[:8], 4, shift)
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        traced = jax.jit(lambda s: euler_sample(flow_velocity, NOISE[:8], 4, s))(jnp.asarray(3.0, jnp.float64))
        np.testing.assert_allclose(traced, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_steps_are_the_closed_form_update_on_the_uniform_grid(prediction):
    """Three DDIM steps against float64 numpy on the grid t_i = 1 - i/3: the model is asked at t_i, its prediction
    read as ε (or v) at ᾱ(t_i) to give (x0, ε), and x ← √ᾱ(t_{i+1})·x0 + √(1-ᾱ(t_{i+1}))·ε. The mixture test's 200
    steps could not see a grid starting below t = 1 (pure noise read as a less noisy x) nor the model asked at
    t_{i+1}: both passed it."""
    cfg = DiffusionConfig(kind="ddpm", prediction=prediction)
    pred = lambda x, t_B: jnp.sin(3 * t_B)[:, None] * x + t_B[:, None]  # noqa: E731 - depends on t, not linear in it
    noise = np.asarray(jax.random.normal(jax.random.key(5), (4, 3)), np.float64)
    f = lambda t: np.cos((t + cfg.cosine_s) / (1 + cfg.cosine_s) * np.pi / 2) ** 2  # noqa: E731
    ab = lambda t: np.clip(f(t) / f(0.0), cfg.alpha_bar_min, 1.0)  # noqa: E731
    x, ts = noise, np.linspace(1.0, 0.0, 4)
    for t, t_next in zip(ts[:-1], ts[1:]):
        a, b = np.sqrt(ab(t)), np.sqrt(1 - ab(t))
        p = np.sin(3 * t) * x + t
        x0, eps = ((x - b * p) / a, p) if prediction == "eps" else (a * x - b * p, b * x + a * p)
        x = np.sqrt(ab(t_next)) * x0 + np.sqrt(1 - ab(t_next)) * eps
    np.testing.assert_allclose(ddim_sample(pred, jnp.asarray(noise, jnp.float32), 3, cfg), x, rtol=1e-4, atol=1e-4)


def test_objectives_and_samplers_under_jax_enable_x64_are_the_float32_ones():
    """Scripts that turn on jax_enable_x64 (float64 references) then train or sample: the training times were drawn
    as float64 (jax.random's default dtype there: other random bits, so other times from the same key), which made
    the noisy latents, targets and loss float64; the samplers' float64 time grid promoted their float32 carry, a
    bare scan carry-type TypeError for Euler and DDIM alike. Under x64 every result is x64-off's, dtype and value."""
    x0 = jax.random.normal(jax.random.key(1), (3, 2, 4))
    key, pred = jax.random.key(2), lambda x, t: 0.5 * x - t[:, None, None]  # noqa: E731

    def run():
        out = {}
        for kind in ("flow", "ddpm"):
            cfg = DiffusionConfig(kind=kind, shift=3.0 if kind == "flow" else 1.0, sample_steps=3)
            out[kind] = (sample_time(key, 5, cfg), diffusion_loss(pred, x0, key, cfg), sample(pred, x0, cfg))
        return out

    run = jax.jit(run)  # traced under each setting (the x64 flag is part of jit's cache key); eagerly each op compiled
    want = run()
    with jax.enable_x64(True):
        got = run()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_diffusion_loss_per_example_is_each_clips_own_mean():
    """per_ex[i] is the mean squared error over clip i's elements alone (the loss their mean): an oracle off by
    i + 1 on every element of clip i gives per_ex = (i + 1)², by hand. A reshape grouping the flat errors by another
    axis ([P, B] means) keeps the scalar loss and mixes the clips' errors, silently (e.g. a loss-by-time plot). The
    oracle reads ε off its own input (x0 = 0: x_t = t·ε, the flow target ε), not off diffusion_loss's key splits."""
    x0 = jnp.zeros((4, 3, 2, 2, 2))
    off = jnp.arange(1.0, 5.0)[:, None, None, None, None]
    loss, per_ex, _ = diffusion_loss(lambda x, t: x / t[:, None, None, None, None] + off, x0, jax.random.key(4),
                                     DiffusionConfig())
    np.testing.assert_allclose(per_ex, [1.0, 4.0, 9.0, 16.0], rtol=1e-5)
    np.testing.assert_allclose(loss, 7.5, rtol=1e-5)
