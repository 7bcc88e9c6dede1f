"""μP: one Adam step moves the logits by the same amount at every width (the coordinate check of Yang et al.
2022), while the standard parametrisation's step grows with the width; μP's pieces are where they belong."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.lm_step import decay_mask, lm_loss, make_optimizer, mup_hidden_mask
from models import Transformer, TransformerConfig

TOK = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 33)), jnp.int32)
BATCH = {"inputs": TOK[:, :-1], "targets": TOK[:, 1:]}


def cfg(width, mup):
    return TransformerConfig(vocab_size=64, d_model=width, n_layers=2, n_heads=width // 16, head_dim=16,
                             mlp_dim=4 * width, max_seq_len=32, mup_base_width=32 if mup else None)


def logit_change(width, mup, lr=2e-3):
    """RMS change of the logits after two AdamW steps (the first has lr 0: warmup starts at 0)."""
    c = cfg(width, mup)
    graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))
    opt = make_optimizer(lr, total_steps=100, warmup_steps=1, weight_decay=0.0, width_mult=c.width_mult)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda p: lm_loss(graphdef, p, BATCH))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (new, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=2)
        before, after = (nnx.merge(graphdef, p)(BATCH["inputs"]) for p in (params, new))
        return jnp.sqrt(jnp.mean((after - before) ** 2))

    return float(run(params))


@pytest.fixture(scope="module")
def changes():
    return {(w, mup): logit_change(w, mup) for w in (32, 128) for mup in (False, True)}


def test_mup_update_size_is_width_independent(changes):
    sp, mup = changes[128, False] / changes[32, False], changes[128, True] / changes[32, True]
    assert sp > 2.5, f"standard parametrisation should grow with width (×4): ratio {sp:.2f}"
    assert 0.4 < mup < 1.6, f"μP should keep the update size: ratio {mup:.2f}"  # measured 0.66 (SP: 6.8)


def test_mup_pieces():
    c = cfg(128, True)
    assert c.width_mult == 4.0 and cfg(128, False).width_mult == 1.0
    state = nnx.state(Transformer(c, rngs=nnx.Rngs(0)))
    assert not np.any(np.asarray(state["lm_head"][...]))  # zero readout
    std = float(np.std(np.asarray(state["blocks"]["wq"][...])))
    assert std == pytest.approx(0.02 / 2, rel=0.05)  # init_std / sqrt(width_mult)
    np.testing.assert_allclose(np.std(np.asarray(state["embed"][...])), 0.02, rtol=0.05)  # input weights unscaled
    mask = mup_hidden_mask(state)
    flat = {"/".join(str(k.key) for k in path if hasattr(k, "key")): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in flat.items() if v} == {f"blocks/{n}" for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                                       "w_down")}
    with pytest.raises(ValueError, match="mup_base_width.*tie_embeddings=False"):
        TransformerConfig(mup_base_width=64, tie_embeddings=True)
    with pytest.raises(ValueError, match="embed_scale.*set embed_scale=False"):  # √d input grows with width
        TransformerConfig(mup_base_width=64, tie_embeddings=False, embed_scale=True)
    # MoE: the router (d x E, E fixed) takes lr / m as well; its selection bias (no gradient) does not
    from models.moe import MoEConfig

    moe = TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, mlp_dim=128, mup_base_width=32,
                            moe=MoEConfig(4, 2, 64), moe_every=2)
    state = nnx.state(Transformer(moe, rngs=nnx.Rngs(0)))
    flat = {"/".join(str(k.key) for k in path if hasattr(k, "key")): v for path, v in
            jax.tree_util.tree_leaves_with_path(mup_hidden_mask(state))}
    assert flat["moe_blocks/moe/router"] and flat["moe_blocks/moe/w_down"] and not flat["moe_blocks/moe/router_bias"]
    # ... and, output-like (fan-out E fixed), μP's init for output weights (Tensor Programs V, Table 3: variance
    # 1 / fan_in², std init_std / m): it drew std init_std / sqrt(m) as the hidden matrices do, so its logits at
    # init did not shrink with the width and its backward into the residual stream outgrew μP's O(1/width).
    # The same draws as the standard parametrisation's (std init_std), scaled
    sp = nnx.state(Transformer(dataclasses.replace(moe, mup_base_width=None), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(state["moe_blocks"]["moe"]["router"][...],
                               sp["moe_blocks"]["moe"]["router"][...] / moe.width_mult, rtol=1e-6)
    np.testing.assert_allclose(state["moe_blocks"]["moe"]["w_up"][...],
                               sp["moe_blocks"]["moe"]["w_up"][...] / moe.width_mult ** 0.5, rtol=1e-6)


def test_make_optimizer_gives_hidden_matrices_lr_over_width_mult():
    """Adam's first update is ±lr per element whatever the gradient's scale: so μP's hidden matrices (and the
    router) move by lr / width_mult, everything else by lr. The coordinate check above cannot see this (its hidden
    weights get no gradient until the zero readout has moved)."""
    c = cfg(128, True)
    params = nnx.state(Transformer(c, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(params)
    lr = 1e-2
    opt = make_optimizer(lr, total_steps=10, warmup_steps=0, weight_decay=0.0, width_mult=c.width_mult)

    @jax.jit  # one program (eagerly, each op of the random gradients and the update compiled: 3x the time)
    def first_update(params):
        grads = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape)
                                             for i, x in enumerate(jax.tree.leaves(params))])
        return opt.update(grads, opt.init(params), params)[0]

    updates = first_update(params)
    hidden = jax.tree.leaves(mup_hidden_mask(params))
    assert sum(hidden) == 7 and len(hidden) == len(leaves)
    for (path, u), h in zip(jax.tree_util.tree_leaves_with_path(updates), hidden, strict=True):
        want = lr / c.width_mult if h else lr
        # the median: after clipping a few tiny gradient entries feel Adam's eps
        assert np.median(np.abs(np.asarray(u))) == pytest.approx(want, rel=1e-3), jax.tree_util.keystr(path)


def test_mup_at_its_base_width_is_the_standard_parametrisation_but_for_the_zero_readout():
    """At m = 1 μP changes nothing but the readout's zero init (docs/scaling.md): every other parameter draws the
    same, and with the standard head the losses and the weights after AdamW updates (decay on) are identical."""
    runs = []
    for mup in (False, True):
        c = cfg(32, mup)
        graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))
        runs.append((c, graphdef, params, nnx.to_pure_dict(params)))
    (_, _, sp, sp_init), (_, _, mp, mp_init) = runs
    assert not np.any(mp_init["lm_head"])
    mp_init.pop("lm_head")
    jax.tree.map(np.testing.assert_array_equal, mp_init, {k: v for k, v in sp_init.items() if k != "lm_head"})
    mp["lm_head"][...] = sp["lm_head"][...]
    out = []
    for c, graphdef, params, _ in runs:
        assert c.width_mult == 1.0
        opt = make_optimizer(1e-2, total_steps=10, warmup_steps=0, width_mult=c.width_mult)

        @jax.jit
        def run(params, graphdef=graphdef, opt=opt):
            def step(carry, _):
                p, s = carry
                loss, g = jax.value_and_grad(lambda p: lm_loss(graphdef, p, BATCH))(p)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=2)
            return losses, params

        out.append(run(params))
    jax.tree.map(np.testing.assert_array_equal, out[0], out[1])  # the losses, then the weights


def test_make_optimizer_is_mu_adamw_with_weight_decay():
    """Two updates equal torch's AdamW with the `mup` package's MuAdamW groups: hidden matrices (and the router)
    at lr / m with weight_decay · m, so decoupled decay shrinks every decayed weight by lr·wd per update at any
    width. The 1/m scaled the decay too: at m = 4 the hidden matrices decayed 0.25·lr·wd per update, the
    embedding lr·wd, and a weight_decay tuned at the base width did not transfer."""
    import torch  # the test extra (requirements.lock): a broken install fails here rather than skipping the parity
    c = cfg(128, True)
    params = nnx.state(Transformer(c, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(10)
    grads = [[rng.standard_normal(x.shape, np.float32) for x in leaves] for _ in range(2)]
    lr, wd, m = 1e-2, 0.1, c.width_mult
    opt = make_optimizer(lr, total_steps=100, warmup_steps=0, weight_decay=wd, clip_norm=float("inf"),
                         schedule="wsd", width_mult=m)  # wsd: lr constant over these updates

    @jax.jit  # one program for both updates (eagerly, each op of the update compiled: 3.5 s of the test's 9.8)
    def update(g, state, p):
        u, state = opt.update(jax.tree.unflatten(treedef, g), state, p)
        return optax.apply_updates(p, u), state

    state, p = opt.init(params), params
    for g in grads:
        p, state = update(g, state, p)

    ts = [torch.tensor(np.asarray(x), requires_grad=True) for x in leaves]
    hidden, decayed = jax.tree.leaves(mup_hidden_mask(params)), jax.tree.leaves(decay_mask(params))
    groups = [{"params": [t], "lr": lr / m if h else lr, "weight_decay": (wd * m if h else wd) if d else 0.0}
              for t, h, d in zip(ts, hidden, decayed, strict=True)]
    ref = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        for t, gi in zip(ts, g, strict=True):
            t.grad = torch.tensor(gi)
        ref.step()
    for (path, got), t in zip(jax.tree_util.tree_leaves_with_path(p), ts, strict=True):
        np.testing.assert_allclose(np.asarray(got), t.detach().numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_the_sweep_at_a_rate_is_adamw_at_that_rate():
    """The sweep runs its optimizer at lr 1 and scales each update by lr, which the module says is the same AdamW
    (schedule, weight decay and μP's 1/m are linear in lr): its loss at 2^-6 equals a plain make_optimizer(2^-6)
    run's (an unscaled update, every rate trained at lr 1, passed)."""
    from experiments.mup_transfer import sweep

    c, steps, e = cfg(64, True), 12, -6  # > 10 steps: the reported loss is the last 10's mean, after a 1-step warmup
    rng = np.random.default_rng(1)
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]}
               for t in (jnp.asarray(rng.integers(0, 64, (4, 33)), jnp.int32) for _ in range(steps))]
    res = sweep(c, batches, steps, (-3, e))  # e second: each rate starts from the initial model and optimizer
    got = res[e]
    assert abs(res[-3] - got) > 1e-3  # the rate matters over these steps
    graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))
    opt = make_optimizer(2.0 ** e, total_steps=steps, warmup_steps=steps // 10, width_mult=c.width_mult)

    @jax.jit
    def step(params, state, batch):
        loss, g = jax.value_and_grad(lambda p: lm_loss(graphdef, p, batch))(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    state, losses = opt.init(params), []
    for b in batches:
        params, state, loss = step(params, state, b)
        losses.append(float(loss))
    assert got == pytest.approx(np.mean(losses[-10:]), rel=1e-5)


def test_the_transfer_cli_sweeps_the_documented_rates_per_parametrisation_and_reports_the_lowest_loss(
        tmp_path, monkeypatch, capsys):
    """main's own wiring, with `sweep` stubbed: each parametrisation gets its models (μP or standard; swapped passed),
    --steps batches, the rates 2^-12 ... 2^-4 of the docstring; the best rate printed and drawn is the lowest loss's
    (max for min passed); a sweep that differs in any setting writes ./mup_transfer.png, not docs/'s figure."""
    from matplotlib.axes import Axes

    from experiments import mup_transfer

    seen, labels, plot = [], [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, label=None, **k: (labels.append(label),
                                                                           plot(self, *a, label=label, **k))[1])

    def sweep(cfg, batches, steps, lrs):
        seen.append((cfg.mup_base_width, cfg.d_model, len(batches[:steps]), tuple(lrs)))
        return {e: (e + 7) ** 2 + 2.0 for e in lrs}  # lowest at 2^-7

    paths, draw = [], mup_transfer.plot  # drawn into tmp_path whatever the path: a failing run must not write docs/
    monkeypatch.setattr(mup_transfer, "sweep", sweep)
    monkeypatch.setattr(mup_transfer, "plot", lambda res, widths, path: (paths.append(path),
                                                                         draw(res, widths, tmp_path / "p.png")))
    mup_transfer.main(["--steps", "3", "--widths", "32", "--seq", "8"])  # --batch as documented, the rest not
    rates = tuple(range(-12, -3))
    assert seen == [(None, 32, 3, rates), (64, 32, 3, rates)]
    assert capsys.readouterr().out.count("best log2 lr   -7, loss 2.000") == 2
    assert labels.count("width 32 (best 2^-7)") == 2 and paths == ["mup_transfer.png"]


@pytest.mark.parametrize("checkout", [True, False])
def test_the_documented_sweep_writes_docs_figure_only_in_a_source_checkout(checkout, tmp_path, monkeypatch):
    """Every default: docs/mup_transfer.png where docs/ exists (the repository); an installed wheel has no docs/, and
    the default was a path inside site-packages, refused before the sweep ("the directory of ... does not exist")."""
    from experiments import mup_transfer

    docs = tmp_path / ("docs" if checkout else "absent")
    if checkout:
        docs.mkdir()
    paths = []
    monkeypatch.setattr(mup_transfer, "DOCS", docs)
    monkeypatch.setattr(mup_transfer, "sweep", lambda cfg, batches, steps, lrs: {e: 1.0 for e in lrs})
    monkeypatch.setattr(mup_transfer, "plot", lambda res, widths, path: paths.append(path))
    mup_transfer.main([])
    assert paths == [str(docs / "mup_transfer.png") if checkout else "mup_transfer.png"]


def test_the_transfer_sweep_models_are_mup_at_base_width_64():
    """The sweep's μP models scale by width / 64 and its SP ones not at all (a base width equal to each model's own
    width, a multiplier of 1 everywhere, passed every other test: they build their own configs)."""
    from experiments.mup_transfer import config

    assert config(256, True, 64).width_mult == 4.0 and config(64, True, 64).width_mult == 1.0
    assert config(256, False, 64).mup_base_width is None
    # the docstring's model: heads of 32, SwiGLU 4·d, 2 layers, untied
    c = config(128, True, 64)
    assert (c.d_model, c.n_heads, c.head_dim, c.mlp_dim, c.n_layers, c.tie_embeddings) == (128, 4, 32, 512, 2, False)


@pytest.mark.parametrize("width", ["48", "16", "0", "64.5", "abc"])
def test_the_transfer_sweep_refuses_widths_its_32_wide_heads_do_not_divide(width, capsys):
    """--widths 48 trained attention 32 wide in a 48-wide model; 16 failed on n_heads, a field never given; a word
    was "invalid multiple_of_32 value: 'abc'", naming a function and no fix."""
    from experiments import mup_transfer

    with pytest.raises(SystemExit):
        mup_transfer.main(["--widths", "64", width])
    err = capsys.readouterr().err
    assert "--widths" in err and "32 or 32" not in err  # 16 offered 'use e.g. 32 or 32'
    if width in ("48", "16"):  # (0 is refused as below 1)
        assert "use e.g. " + {"48": "32 or 64", "16": "32"}[width] in err
    if width in ("64.5", "abc"):
        assert f"argument --widths: must be a whole multiple of 32, e.g. 64, got {width}" in err
    with pytest.raises(SystemExit):  # a plot path in no directory failed after the whole sweep, losing it
        mup_transfer.main(["--steps", "1", "--widths", "32", "--json", "/nonexistent/r.json"])
    assert "argument --json: the directory of /nonexistent/r.json does not exist" in capsys.readouterr().err


def test_the_transfer_sweep_refuses_a_width_given_twice(monkeypatch, capsys):
    """--widths 64 64 trained the same width twice and drew it twice; refused before the sweep, naming it."""
    from experiments import mup_transfer

    def ran(*a, **k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(mup_transfer, "sweep", ran)
    with pytest.raises(SystemExit):
        mup_transfer.main(["--steps", "1", "--widths", "64", "32", "64"])
    assert "argument --widths: 64 given more than once" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_the_transfer_sweep_refuses_an_unwritable_directory_before_the_sweep(flag, tmp_path, monkeypatch, capsys):
    """A plot or results path in a directory this user may not write in failed in savefig / open() after the whole
    sweep (minutes), losing it. (Not writable for a non-root user; as root os.access says so only on a read-only
    file system, so it is told here that tmp_path is not writable.)"""
    import os

    from experiments import mup_transfer

    def ran(*a, **k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(mup_transfer, "sweep", ran)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not (mode & os.W_OK and str(p) == str(tmp_path.resolve()))
                        and access(p, mode, **k))
    name = tmp_path / ("p.png" if flag == "--out" else "r.json")
    with pytest.raises(SystemExit):
        mup_transfer.main(["--steps", "1", "--widths", "32", flag, str(name)])
    assert f"argument {flag}: the directory of {name} is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "mup", "mup.txt"])
def test_the_transfer_sweep_refuses_a_plot_path_matplotlib_would_not_write_as_named(name, tmp_path, monkeypatch,
                                                                                   capsys):
    """--out DIR (or runs/mup) printed 'plot: DIR' while matplotlib wrote DIR.png beside it; --out mup.txt failed in
    savefig after the whole sweep, and --json DIR in open(). All are refused before it, naming a file that works."""
    from experiments import mup_transfer

    def ran(*a, **k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(mup_transfer, "sweep", ran)
    with pytest.raises(SystemExit):
        mup_transfer.main(["--steps", "1", "--widths", "32", "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert "argument --out:" in err and ".png" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # open() of a directory failed after the sweep, before the plot was drawn
        mup_transfer.main(["--steps", "1", "--widths", "32", "--out", str(tmp_path / "p.png"), "--json", str(tmp_path)])
    assert f"argument --json: {tmp_path} is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("width_mult", [0, -2.0, float("nan"), True])
def test_make_optimizer_refuses_a_width_mult_that_is_not_positive(width_mult):
    """0 failed as a bare 'float division by zero'; -2 and NaN were taken, stepping the hidden matrices up the
    gradient (or to NaN) while the embeddings and the readout trained normally."""
    with pytest.raises(ValueError, match="width_mult=.* must be a positive number"):
        make_optimizer(1e-3, total_steps=10, warmup_steps=1, width_mult=width_mult)
    make_optimizer(1e-3, total_steps=10, warmup_steps=1, width_mult=np.float32(2.0))  # a numpy scalar is fine


def test_the_transfer_plot_survives_a_width_that_diverged_at_every_rate(tmp_path):
    """A width whose every rate diverged (loss inf) raised 'All-NaN slice encountered' in the plot, after the
    whole sweep; it is now drawn as such in the legend."""
    from experiments.mup_transfer import plot

    inf = float("inf")
    res = {"sp": {"64": {"-5": 2.0, "-4": inf}, "128": {"-5": inf, "-4": inf}},
           "mup": {"64": {"-5": 2.0, "-4": 2.1}, "128": {"-5": 2.0, "-4": 2.2}}}
    plot(res, [64, 128], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    all_inf = {name: {w: dict.fromkeys(c, inf) for w, c in r.items()} for name, r in res.items()}
    plot(all_inf, [64, 128], tmp_path / "q.png")  # nothing finite at all: still a figure
    assert (tmp_path / "q.png").stat().st_size > 0


def test_the_transfer_plot_names_the_rates_a_width_diverged_at(tmp_path, monkeypatch):
    """A diverged rate (loss inf) is a gap in its width's curve: at the end of the sweep the curve just stopped, as if
    the rate was never tried. The legend names each diverged rate, and each drawn point is the sweep's loss."""
    import matplotlib.figure

    from experiments.mup_transfer import plot

    figs, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figs.append(fig),
                                                                                  real_savefig(fig, *a, **k))[1])
    inf = float("inf")
    curve = {str(e): (e + 8) ** 2 / 10 + 2.0 for e in range(-12, -3)}
    res = {name: {"64": dict(curve), "128": dict(curve, **{"-5": inf, "-4": inf})} for name in ("sp", "mup")}
    plot(res, [64, 128], tmp_path / "p.png")
    for ax in figs[-1].axes:
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["width 64 (best 2^-8)", "width 128 (best 2^-8; diverged at 2^-5, 2^-4)"]
        for line, w in zip(ax.lines, ("64", "128")):
            drawn = {int(x): y for x, y in zip(line.get_xdata(), line.get_ydata()) if np.isfinite(y)}
            assert drawn == {int(k): v for k, v in res["sp"][w].items() if np.isfinite(v)}


def test_the_transfer_json_writes_a_diverged_rate_as_null(tmp_path, monkeypatch):
    """--json wrote a diverged rate's loss (inf) as bare Infinity, which strict readers (JavaScript, jq) refuse; it
    is null now, as metrics.jsonl writes a non-finite loss."""
    import json

    from experiments import mup_transfer

    monkeypatch.setattr(mup_transfer, "sweep", lambda cfg, batches, steps, lrs: {-6: 2.5, -5: float("inf")})
    res = mup_transfer.main(["--steps", "1", "--widths", "32", "--out", str(tmp_path / "p.png"),
                             "--json", str(tmp_path / "r.json")])

    def refuse(name):
        raise AssertionError(f"bare {name} is not JSON")

    saved = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert saved == {name: {"32": {"-6": 2.5, "-5": None}} for name in ("sp", "mup")}
    assert res["sp"]["32"]["-5"] == float("inf")  # the returned results keep inf (the plot reads it as diverged)


def test_the_transfer_cli_names_no_best_rate_for_a_width_that_diverged_at_every_rate(tmp_path, monkeypatch, capsys):
    """min() over all-inf losses printed 'best log2 lr  -12, loss inf', a best rate the figure's legend ('diverged at
    every rate') and the JSON (all null) do not have."""
    from experiments import mup_transfer

    monkeypatch.setattr(mup_transfer, "sweep", lambda cfg, batches, steps, lrs: (
        dict.fromkeys(lrs, float("inf")) if cfg.mup_base_width else {e: 3.0 + (e + 6) ** 2 for e in lrs}))
    mup_transfer.main(["--steps", "1", "--widths", "32", "--out", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "sp   width   32: best log2 lr   -6, loss 3.000" in out
    assert "mup  width   32: diverged at every rate" in out and out.count("best log2 lr") == 1


def test_a_diverged_rate_is_reported_as_inf():
    """sweep's docstring: inf when the run diverged (a NaN loss was kept as NaN, which min() and the printed best
    rate read as a value)."""
    from experiments.mup_transfer import sweep

    rng = np.random.default_rng(1)
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]}
               for t in (jnp.asarray(rng.integers(0, 64, (4, 33)), jnp.int32) for _ in range(3))]
    res = sweep(cfg(32, False), batches, 3, (-6, 40))  # 2^40: the first update overflows the weights
    assert np.isfinite(res[-6]) and res[40] == float("inf")


def test_the_zero_readout_starves_the_body_of_gradient_not_of_adam_steps():
    """docs/scaling.md said the zero readout 'passes no gradient to the body until the readout has grown'. Its body
    gradient is exactly zero for two updates (the first at warmup's lr 0 leaves the readout at zero), then far smaller
    than under a random readout; Adam normalises it, so the body's third step is about as large."""
    c = cfg(64, True)
    graphdef, zero = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))
    rand = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))[1]  # the same body, the standard parametrisation's readout
    rand["lm_head"].set_value(nnx.split(Transformer(cfg(64, False), rngs=nnx.Rngs(0)))[1]["lm_head"].get_value())
    opt = make_optimizer(2e-3, total_steps=100, warmup_steps=1, weight_decay=0.0, width_mult=c.width_mult)
    mask = jax.tree.leaves(mup_hidden_mask(zero))

    def body_rms(tree):
        xs = [x for x, m in zip(jax.tree.leaves(tree), mask) if m]
        return float(jnp.sqrt(sum(jnp.sum(x**2) for x in xs) / sum(x.size for x in xs)))

    # jitted (eagerly each op compiled on its own); both readouts share the two programs
    grad, update = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, BATCH))), jax.jit(opt.update)

    def steps(params, n=3):
        state, out = opt.init(params), []
        for _ in range(n):
            g = grad(params)
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            out.append((body_rms(g), body_rms(u)))
        return out

    (z1, _), (z2, zu2), (z3, zu3) = steps(zero)
    _, (r2, ru2), (r3, ru3) = steps(rand)
    assert z1 == z2 == zu2 == 0.0 and r2 > 0 and ru2 > 0
    assert 0 < z3 < r3 / 5  # a far smaller gradient (7x here) ...
    assert 0.5 < zu3 / ru3 < 1.5  # ... but a step about as large (0.69x)


def test_a_mup_run_saved_before_the_weight_decay_fix_still_loads_its_model(tmp_path, monkeypatch):
    """The fix moved Adam's 1/m inside AdamW, so a μP run's optimizer state has another layout: load_model, which
    reads the optimizer state only to verify it, refused every μP run saved before ("opt_state/1/2/count: saved (),
    now missing") though its params are intact. They load; resuming such a run is refused naming the fix."""
    from experiments import lm_step, train_lm

    def before_the_fix(lr, total_steps, warmup_steps, weight_decay, clip_norm, b1, b2, schedule, min_lr_ratio,
                       decay_frac, width_mult):  # make_optimizer as it was: the 1/m after adamw
        sched = lm_step.make_schedule(lr, total_steps, warmup_steps, schedule, min_lr_ratio, decay_frac)
        return lm_step.float32_state(optax.chain(
            optax.clip_by_global_norm(clip_norm),
            optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
            optax.masked(optax.scale(1.0 / width_mult), mup_hidden_mask)))

    args = ["--preset", "tiny", "--set", "train.sample_tokens=0", "--set", "model.mup_base_width=16", "--set",
            "train.steps=4", "--set", "train.eval_every=4", "--out", str(tmp_path / "run")]
    with monkeypatch.context() as mp:
        mp.setattr(lm_step, "make_optimizer", before_the_fix)
        train_lm.main(args)
    from experiments.checkpoint import Checkpoints

    read, restore = [], Checkpoints.restore

    def spy(self, template, *a, **k):  # per restored entry, the most bytes one device holds
        if (got := restore(self, template, *a, **k)) is not None:
            read.append({name: max(sum(s.data.nbytes for x in jax.tree.leaves(v) for s in x.addressable_shards
                                       if s.device == d) for d in jax.devices()[:8]) for name, v in got[0].items()})
        return got

    monkeypatch.setattr(Checkpoints, "restore", spy)
    model, cfg = train_lm.load_model(tmp_path / "run", mesh_shape={"fsdp": 8})
    assert cfg.model.width_mult == 2.0
    # the params alone, by their own checksum: the old optimizer state was read replicated, 2x the params on each device
    assert list(read.pop()) == ["params"]
    assert np.any(np.asarray(model.lm_head[...]))  # the trained readout (μP's starts at zero)
    with pytest.raises(SystemExit, match=r"train.out: .* μP .* weight decay fix.*new --out"):
        train_lm.main([*args[:-4], "--set", "train.steps=8", "--out", str(tmp_path / "run")])
    # one saved before part checksums (2026-12-03): its params could not be read alone ("rng: saved (2,), now
    # missing"); the whole state is read, its optimizer state in the saved layout, and verified
    for meta in (tmp_path / "run" / "ckpt").glob("*/meta/metadata"):
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "part_fingerprints"}))
    older, _ = train_lm.load_model(tmp_path / "run", mesh_shape={"fsdp": 8})
    np.testing.assert_array_equal(older.lm_head[...], model.lm_head[...])
    opt_bytes = 2 * sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # Adam's mu and nu
    assert read[-1]["opt_state"] < opt_bytes / 4  # split over the 8 devices, not whole on each


def test_the_transfer_sweep_refuses_a_seq_longer_than_its_corpus_naming_the_flag(monkeypatch, capsys, tmp_path):
    """--seq 2000000 (past the sweep's 1 MB corpus) ended in ByteWindows' ValueError traceback, naming no flag."""
    from experiments import mup_transfer

    monkeypatch.setattr(mup_transfer, "sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as e:
        mup_transfer.main(["--steps", "1", "--widths", "32", "--seq", "2000000", "--out", str(tmp_path / "p.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seq: " in err and "2000001" in err, err
