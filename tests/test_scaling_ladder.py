"""The scaling ladder's schedule and branched cooldowns (experiments/scaling_ladder.py): a cooldown branch is the run
a fresh model trained on that budget's schedule would have been, and branching leaves the main run untouched."""

import re

import numpy as np
import pytest

from data.corpus import ByteWindows
from experiments.scaling_ladder import Rung, make_wsd_optimizer, rung_lr, train_rung, with_lr, wsd_lr


def test_peak_lr_is_the_base_up_to_width_64_then_falls_as_one_over_width():
    """The module's rule (3e-3 up to d_model 64, 3e-3·64/d above); max for min passed, training every ladder rung
    (all d <= 64) at up to 4x the rate."""
    assert [rung_lr(3e-3, Rung(d, 2, 2)) for d in (16, 48, 64, 128, 256)] == pytest.approx(
        [3e-3, 3e-3, 3e-3, 1.5e-3, 7.5e-4])


def test_wsd_schedule():
    peak = 1e-3
    assert [wsd_lr(s, peak, 4) for s in range(4)] == pytest.approx([peak * (s + 1) / 4 for s in range(4)])
    assert [wsd_lr(s, peak, 4) for s in (4, 10)] == [peak, peak]  # stable from the warmup's end without a decay
    # (step <= warmup ran step 4 at 1.25x the peak)
    assert [wsd_lr(s, peak, 2, 8, 12) for s in (7, 8, 10, 11, 12)] == pytest.approx(
        [peak, peak, peak / 2, peak / 4, 0.0])


def test_the_ladder_optimizer_decays_weights_but_not_norm_scales_as_lm_step_does():
    """inject_hyperparams took the callable `mask=decay_mask` for a schedule and called it with the step count, whose
    mask (a bare True) decayed every parameter: RMSNorm scales shrank by lr·wd per step, unlike lm_step's AdamW."""
    import jax
    import jax.numpy as jnp

    params = {"blocks": {"attn_norm": jnp.ones((2, 4)), "wq": jnp.ones((2, 4, 4))}, "final_norm": jnp.ones(4)}
    opt = make_wsd_optimizer(1e-2, weight_decay=0.1)
    state = with_lr(opt.init(params), 1e-2)
    zero = jax.tree.map(jnp.zeros_like, params)  # no gradient: AdamW's update is the decay alone
    updates, _ = opt.update(zero, state, params)
    assert np.all(np.asarray(updates["blocks"]["attn_norm"]) == 0)
    assert np.all(np.asarray(updates["final_norm"]) == 0)
    np.testing.assert_allclose(np.asarray(updates["blocks"]["wq"]), -1e-2 * 0.1, rtol=1e-6)  # lr · wd · w


def test_a_cooldown_branch_equals_a_fresh_run_of_its_budget_and_leaves_the_main_run_alone():
    tokens = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.int32)
    train = ByteWindows(tokens, 128, 16, seed=0)
    evals = [ByteWindows(tokens, 128, 4, seed=1).batch(0)]
    rung = Rung(16, 1, 2)
    kw = dict(peak_lr=3e-3, warmup=2)
    # 80% of 11 steps is 8.8: both cool down over steps 9-10 (budgets 10 and 20, whose 80% are whole, passed a branch
    # at int(8.8) = 8)
    both = {r["steps"]: r["eval_loss"] for r in train_rung(rung, (11, 22), train, evals, **kw)["runs"]}
    alone11 = train_rung(rung, (11,), train, evals, **kw)["runs"][0]["eval_loss"]
    alone22 = train_rung(rung, (22,), train, evals, **kw)["runs"][0]["eval_loss"]
    assert both == {11: alone11, 22: alone22}  # bit-identical: same programs on the same data
    assert alone11 != alone22


def test_budgets_whose_cooldowns_start_at_one_step_each_get_their_run():
    """round(0.8·7) = round(0.8·8) = 6: one branch point kept one budget, so train_rung returned the 8-step run alone
    (of 12, 13, 20 the 13 and 20), dropping a point of the law's fit in silence. Each budget's branch is a fresh
    run of its own schedule."""
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.int32)
    train = ByteWindows(tokens, 16, 2, seed=0)
    evals = [ByteWindows(tokens, 16, 2, seed=1).batch(0)]
    rung, kw = Rung(16, 1, 2), dict(peak_lr=3e-3, warmup=2)
    both = {r["steps"]: r["eval_loss"] for r in train_rung(rung, (7, 8), train, evals, **kw)["runs"]}
    assert both == {7: train_rung(rung, (7,), train, evals, **kw)["runs"][0]["eval_loss"], 8: both[8]}
    assert both[7] != both[8]


def test_a_rungs_rows_count_its_tokens_non_embedding_params_and_each_loss_in_its_column():
    """Each row of train_rung is what the law is fitted on (the main tests stub train_rung): D = steps·SEQ·BATCH,
    N the non-embedding count (the module's docstring; the total passed), and eval_loss the held-out batches' loss:
    other eval batches change eval_loss only (train and eval columns swapped passed)."""
    from experiments.scaling_ladder import BATCH, SEQ
    from scaling.flops import param_counts, train_flops_per_token

    tokens = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.int32)
    train = ByteWindows(tokens, SEQ, BATCH, seed=0)
    rung, kw = Rung(16, 1, 2), dict(peak_lr=3e-3, warmup=1)
    runs = {name: train_rung(rung, (4, 6), train, [ByteWindows(data, SEQ, 4, seed=1).batch(0)], **kw)["runs"]
            for name, data in (("random", tokens), ("zeros", np.zeros(1000, np.int32)))}
    cfg, pc = rung.config(), param_counts(rung.config())
    assert pc.non_embedding != pc.total
    for a, b in zip(runs["random"], runs["zeros"]):
        assert a["tokens"] == a["steps"] * 128 * 16 and a["steps"] in (4, 6)
        assert (a["n_params"], a["n_params_total"]) == (pc.non_embedding, pc.total)
        assert a["flops"] == pytest.approx(train_flops_per_token(cfg, 128) * a["tokens"])
        assert a["train_loss"] == b["train_loss"] and a["eval_loss"] != b["eval_loss"]


def test_byte_windows_and_split_edges():
    """A corpus of exactly one window serves it (was refused as 'shorter than' its own length); a shorter one and
    an eval fraction outside (0, 1) (1.5 split 50/50, silently) are refused by name."""
    from data.corpus import train_eval_split

    one = ByteWindows(np.arange(9, dtype=np.int32), 8, 2)
    b = one.batch(0)
    np.testing.assert_array_equal(b["inputs"], np.tile(np.arange(8), (2, 1)))
    np.testing.assert_array_equal(b["targets"], np.tile(np.arange(1, 9), (2, 1)))
    with pytest.raises(ValueError, match="shorter than one window of seq_len \\+ 1 = 9"):
        ByteWindows(np.arange(8, dtype=np.int32), 8, 2)
    for bad in (1.5, -0.1, 0.0):
        with pytest.raises(ValueError, match="eval_fraction"):
            train_eval_split(np.arange(100), bad)
    # starts are drawn from [0, len - seq_len - 1), as the class documents: of 11 tokens and seq_len 8 only 0 and 1
    eleven = ByteWindows(np.arange(11, dtype=np.int32), 8, 8)
    with pytest.raises(ValueError, match="ByteWindows.batch: step=-1 must be an int >= 0"):
        eleven.batch(-1)
    assert {int(row[0]) for step in range(20) for row in eleven.batch(step)["inputs"]} == {0, 1}
    # (seed, step) name independent streams: seed 0's step 1 was seed 1's step 0 under a seed + step (the ladder draws
    # its training windows under seed 0, its held-out ones under seed 1)
    tokens = np.arange(10_000, dtype=np.int32)
    assert not np.array_equal(ByteWindows(tokens, 8, 4, seed=0).batch(1)["inputs"],
                              ByteWindows(tokens, 8, 4, seed=1).batch(0)["inputs"])
    train, held = train_eval_split(np.arange(100), 0.05)  # the last 5% held out in one piece (a cut at 5% passed)
    np.testing.assert_array_equal(train, np.arange(95))
    np.testing.assert_array_equal(held, np.arange(95, 100))


def test_the_embedded_text_is_max_bytes_characters_of_files_in_a_seeded_order():
    """`stdlib_text(max_bytes, seed)`: exactly max_bytes characters (the last file was not cut), and the seed orders
    the files (one ignored gave every seed the same text)."""
    from data.corpus import stdlib_text

    texts = [stdlib_text(3000, seed=s) for s in range(4)]
    assert [len(t) for t in texts] == [3000] * 4 and len(set(texts)) == 4
    assert stdlib_text(3000, seed=2) == texts[2]
    # _sysconfigdata_*.py is this build's settings (install paths, compiler flags), so seed 59's text, which began with
    # it, differed between machines of one Python version
    assert "build_time_vars" not in stdlib_text(3000, seed=59)


def test_the_embedded_text_and_its_windows_refuse_lengths_and_steps_that_are_not_counts():
    """stdlib_text(-1) returned a whole file less its last character (a slice from the end), 1.5 failed in the slice
    naming nothing, True ran as 1; ByteWindows.batch(1.5) failed in numpy ('seed must be integer') and batch(True)
    served step 1. Numpy ints stay counts (a sweep's max_bytes, a loop's step)."""
    from data.corpus import stdlib_text

    for bad in (-1, 1.5, True, None, "100"):
        with pytest.raises(ValueError, match=r"stdlib_text: max_bytes=.* must be an int >= 0"):
            stdlib_text(bad)
    assert stdlib_text(np.int64(50)) == stdlib_text(50) and stdlib_text(0) == ""
    windows = ByteWindows(np.arange(40, dtype=np.int32), 8, 2)
    for bad in (1.5, True, np.float64(2.0), "1"):
        with pytest.raises(ValueError, match=r"ByteWindows.batch: step=.* must be an int >= 0"):
            windows.batch(bad)
    np.testing.assert_array_equal(windows.batch(np.int64(3))["inputs"], windows.batch(3)["inputs"])


def test_the_held_out_share_is_not_rounded_up_by_float_error():
    """int(n * (1 - f)) rounded float error down: 1,000 tokens at 7 % held out 71, 500 held out 36 (2,000 of the
    297,000 pairs n <= 3,000, f in 1 % steps, were a token over); the held-out part is ceil(n · f) of f as written."""
    from data.corpus import train_eval_split

    for n, f, want in ((100, 0.07, 7), (1000, 0.07, 70), (2150, 0.06, 129), (100, 0.05, 5), (10, 0.05, 1),
                       (7, 0.5, 4), (4_000_102, 0.05, 200_006)):
        train, held = train_eval_split(np.arange(n), f)
        assert (len(train), len(held)) == (n - want, want), (n, f)
        np.testing.assert_array_equal(np.concatenate([train, held]), np.arange(n))
    # a numpy float is the fraction its digits say too: np.float32(0.1) is 0.100000001 as a double, and held out 101
    for f, want in ((np.float32(0.1), 100), (np.float32(0.07), 70), (np.float64(0.07), 70), (np.float16(0.5), 500)):
        assert len(train_eval_split(np.arange(1000), f)[1]) == want, f


def test_the_ladder_cli_refuses_before_training(tmp_path, capsys):
    """--lr -1 trained the ladder by gradient ascent; a rerun into a finished ladder's directory rewrote ladder.json
    beside the old prediction and results (and --replot refitted those); --replot of no ladder was a traceback."""
    import pytest

    from experiments import scaling_ladder

    for lr in ("-1", "0", "nan", "abc"):  # a word was "invalid _positive value: 'abc'", naming no fix
        with pytest.raises(SystemExit):
            scaling_ladder.main(["--quick", "--lr", lr, "--out", str(tmp_path), "--no-docs"])
        assert f"argument --lr: must be a positive number, e.g. 3e-3, got {lr}" in capsys.readouterr().err
    for level in ("1", "nan", "90%"):
        with pytest.raises(SystemExit):
            scaling_ladder.main(["--quick", "--level", level, "--out", str(tmp_path), "--no-docs"])
        assert f"argument --level: must be in (0, 1), e.g. 0.9, got {level}" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        scaling_ladder.main(["--quick", "--out", str(tmp_path), "--no-docs"])
    assert "holds another (or a finished) ladder's results.json; pass --fresh" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"
    # below a file: mkdir's bare NotADirectoryError traceback
    with pytest.raises(SystemExit):
        scaling_ladder.main(["--quick", "--out", str(tmp_path / "results.json" / "ladder"), "--no-docs"])
    assert "argument --out: " in (err := capsys.readouterr().err) and "is a file; name a directory you can write" in err
    with pytest.raises(SystemExit, match=r"--replot: .*results.json does not exist"):
        scaling_ladder.main(["--replot", "--out", str(tmp_path / "none"), "--no-docs"])
    # --out naming the results file itself said '.../results.json/results.json does not exist'
    with pytest.raises(SystemExit, match=r"--replot: .*results.json is a file; pass the directory that holds it"):
        scaling_ladder.main(["--replot", "--out", str(tmp_path / "results.json"), "--no-docs"])
    # training settings beside --replot were ignored in silence (--fresh's files were kept, --lr changed nothing)
    for flag, value in (("--fresh", []), ("--lr", ["1e-3"]), ("--warmup", ["4"])):
        with pytest.raises(SystemExit):
            scaling_ladder.main(["--replot", flag, *value, "--out", str(tmp_path / "none"), "--no-docs"])
        assert f"argument {flag}: not allowed with --replot, which refits" in capsys.readouterr().err
    # a results.json that is no finished ladder's was a bare KeyError: 'prediction'
    for text in ("{}", '{"prediction": {}}', "[]", "not json"):
        (tmp_path / "results.json").write_text(text)
        with pytest.raises(SystemExit, match=rf"--replot: {re.escape(str(tmp_path / 'results.json'))} is not a "
                                             r"finished ladder's results .*; pass the --out of a finished ladder"):
            scaling_ladder.main(["--replot", "--out", str(tmp_path), "--no-docs"])


@pytest.mark.parametrize("argv, note", [(["--n-boot", "50", "--warmup", "2"], "bootstrap resamples 50 → 20"),
                                        (["--warmup", "6", "--n-boot", "3"], "warmup 6 → 4 steps"),
                                        (["--n-boot", "3"], "warmup 16 → 4 steps"),
                                        (["--warmup", "4", "--n-boot", "20"], None)])
def test_the_quick_clamp_note_names_only_what_it_changed(argv, note, tmp_path, capsys):
    """--quick --n-boot 50 --warmup 2 printed 'warmup 2 → 2 steps' beside the resamples it did clamp. (The run stops
    at once: --out is a file.)"""
    from experiments import scaling_ladder

    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        scaling_ladder.main(["--quick", "--no-docs", "--out", str(tmp_path / "f"), *argv])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ([] if note is None else [notes[0]]) and (note is None or note in notes[0])
    assert all(" → ".join([a] * 2) not in n for n in notes for a in argv)  # nothing left as it was
    if note is not None:
        assert ("warmup" in notes[0]) == ("warmup" in note) and ("resamples" in notes[0]) == ("resamples" in note)


def test_an_interrupted_ladder_resumes_after_its_finished_rungs(tmp_path, monkeypatch, capsys):
    """A killed ladder (10 min) started over; now each finished rung is kept and a rerun with the same settings
    trains only the rest, with the result of an uninterrupted run. Training is stubbed by a known law."""
    import json
    import shutil

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    calls = []

    def fake(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):  # L = 1 + 40/N^0.4 + 300/D^0.3 + noise
        calls.append(rung.name)
        n = param_counts(rung.config()).non_embedding
        rng = np.random.default_rng(list(rung.name.encode()))
        runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b,
                     eval_loss=1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3 + 1e-3 * rng.standard_normal(),
                     train_loss=0.0, flops=0.0) for b in budgets]
        return dict(runs=runs, seconds=0.0)

    monkeypatch.setattr(sl, "train_rung", fake)
    argv = ["--quick", "--no-docs", "--n-boot", "4"]
    whole = sl.main([*argv, "--out", str(tmp_path / "whole")])
    names = [r.name for r in sl.QUICK_LADDER]
    assert calls == names
    calls.clear()

    def dies_at_third(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake(*a, **k)

    monkeypatch.setattr(sl, "train_rung", dies_at_third)
    with pytest.raises(KeyboardInterrupt):  # other fit settings than the resumed run's: only the fit uses them
        sl.main([*argv, "--out", str(tmp_path / "cut"), "--n-boot", "5", "--level", "0.8"])
    assert sorted(json.loads((tmp_path / "cut" / "rungs.json").read_text())["done"]) == sorted(names[:2])
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")  # resumable as well: --fresh below retrains its rungs
    # other settings do not resume those rungs (they would mix two learning rates in one fit): refused, untrained
    monkeypatch.setattr(sl, "train_rung", fake)
    with pytest.raises(SystemExit):
        sl.main([*argv, "--out", str(tmp_path / "cut"), "--lr", "1e-3"])
    with pytest.raises(SystemExit):  # nor another warmup (a training setting, as the learning rate)
        sl.main([*argv, "--out", str(tmp_path / "cut"), "--warmup", "2"])
    assert calls == names[:2]
    monkeypatch.setattr(sl, "train_rung", fake)
    calls.clear()
    resumed = sl.main([*argv, "--out", str(tmp_path / "cut")])
    assert calls == names[2:]  # another --n-boot / --level demanded --fresh, which retrained every rung
    for key in ("runs", "comparison"):
        assert resumed[key] == whole[key]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # other settings do not mix with those rungs; a finished ladder is not resumed
        sl.main([*argv, "--out", str(tmp_path / "cut"), "--lr", "1e-3"])
    assert "redoes this finished ladder" not in capsys.readouterr().err  # training changes: no refit offered
    with pytest.raises(SystemExit):  # only the fit's settings changed: the refusal names the way without training
        sl.main([*argv, "--out", str(tmp_path / "cut"), "--n-boot", "5"])
    assert "--replot (with --n-boot / --level) redoes this finished ladder's fit" in capsys.readouterr().err
    assert calls == names[2:]
    sl.main(["--replot", "--out", str(tmp_path / "cut"), "--no-docs", "--n-boot", "5"])  # --n-boot was ignored
    assert "(5 resamples)" in capsys.readouterr().out
    # --replot of the finished ladder redraws its figure and says what it wrote (it printed nothing)
    (tmp_path / "whole" / "scaling_fit.png").unlink()
    capsys.readouterr()
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())  # a resample that failed to fit: the
    saved["prediction"]["n_boot_fitted"] = 3  # count drawn again is n_boot's, not the count that fitted
    (tmp_path / "whole" / "results.json").write_text(json.dumps(saved))
    again = sl.main(["--replot", "--out", str(tmp_path / "whole"), "--no-docs"])
    assert again["prediction"] == saved["prediction"]
    assert (tmp_path / "whole" / "scaling_fit.png").is_file()
    assert re.search(r"--replot: refitted \d+ runs \(4 resamples\); wrote .*whole/scaling_fit.png\n$",
                     capsys.readouterr().out)
    calls.clear()
    sl.main([*argv, "--out", str(tmp_path / "cut2"), "--fresh"])  # --fresh: no rung of the cut ladder resumed
    assert calls == names


def test_rungs_trained_before_the_norm_decay_fix_are_not_resumed(tmp_path, monkeypatch, capsys):
    """The ladder's optimizer decayed the RMSNorm scales until 2026-12-07; an interrupted ladder's rungs.json from
    before then matched every TRAINING setting, so a rerun resumed those rungs beside rungs trained without the decay
    (one fit over two optimizers). Such a rungs.json is another ladder's: refused, its rungs not reused."""
    import json

    from experiments import scaling_ladder as sl

    calls = []

    def fake(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rung.name)
        runs = [dict(rung=rung.name, n_params=1000 * len(calls), tokens=b * sl.TOKENS_PER_STEP, steps=b,
                     eval_loss=2.0 + 1 / b, train_loss=0.0, flops=0.0) for b in budgets]
        return dict(runs=runs, seconds=0.0)

    monkeypatch.setattr(sl, "train_rung", fake)
    argv = ["--quick", "--no-docs", "--n-boot", "4", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        sl.main(argv)
    saved = json.loads((tmp_path / "rungs.json").read_text())
    saved["settings"].pop("decay", None)  # as the ladder wrote it before the fix
    (tmp_path / "rungs.json").write_text(json.dumps(saved))
    calls.clear()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sl.main(argv)
    assert "holds another (or a finished) ladder's" in capsys.readouterr().err
    assert calls == []


def test_the_largest_rung_is_predicted_from_the_smaller_ones_before_it_trains(tmp_path, monkeypatch):
    """The experiment's claim: the law is fitted on the smaller rungs and the largest rung's prediction is on disk
    before that rung trains. Training is stubbed by a known law; the target rung's losses are shifted by a rung-wide
    offset that the prediction must not see (a fit over every run, or a prediction written after the target, would)."""
    import json

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    target = sl.QUICK_LADDER[-1].name

    def fake_train(offset):
        def train(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):  # L = 1 + 40/N^0.4 + 300/D^0.3 + noise
            out = tmp_path / f"off{offset}"
            assert (out / "prediction.json").exists() == (rung.name == target), rung.name
            n = param_counts(rung.config()).non_embedding
            rng = np.random.default_rng(list(rung.name.encode()))
            shift = offset if rung.name == target else 0.0
            runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0, flops=0.0,
                         eval_loss=1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3 + shift
                         + 1e-3 * rng.standard_normal()) for b in budgets]
            return dict(runs=runs, seconds=0.0)
        return train

    res = {}
    for offset in (0.0, 0.5):
        monkeypatch.setattr(sl, "train_rung", fake_train(offset))
        res[offset] = sl.main(["--quick", "--no-docs", "--n-boot", "4", "--out", str(tmp_path / f"off{offset}")])
    smaller = len(sl.QUICK_LADDER) - 1
    for r in res.values():
        assert r["prediction"]["fit_runs"] == smaller * len(sl.QUICK_STEPS)
        assert [c["tokens"] for c in r["comparison"]] == [b * sl.TOKENS_PER_STEP for b in sl.QUICK_STEPS]  # all budgets
        on_disk = json.loads((tmp_path / "off0.0" / "prediction.json").read_text())["predictions"]
        assert [c["predicted"] for c in r["comparison"]] == [p["predicted"] for p in on_disk]
    # the known law predicts the unshifted target; the shifted one lands 0.5 above, outside the interval
    for c in res[0.0]["comparison"]:
        assert abs(c["error"]) < 0.01, c
    for a, b in zip(res[0.0]["comparison"], res[0.5]["comparison"]):
        assert b["actual"] - a["actual"] == pytest.approx(0.5) and not b["inside"]
        assert b["error"] == pytest.approx(0.5, abs=0.02)  # actual - predicted: the target ran 0.5 worse


def test_a_diverged_run_is_left_out_of_the_fit_and_said_or_the_ladder_stops_by_name(tmp_path, monkeypatch, capsys):
    """One NaN eval loss among the smaller rungs made the fit raise 'runs [5] are not (drop diverged runs ...)' after
    all their training, the index into a list the ladder never showed, and a resumed ladder raised it again. Now
    such runs are left out, counted and named (printed, in prediction.json, in the figure's legend); with too few
    left the ladder stops naming them; a diverged target run is DIVERGED, not a missed prediction."""
    import json

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    names = [r.name for r in sl.QUICK_LADDER]

    def fake(diverged):
        def train(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):  # L = 1 + 40/N^0.4 + 300/D^0.3 + noise
            n = param_counts(rung.config()).non_embedding
            rng = np.random.default_rng(list(rung.name.encode()))
            runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0, flops=0.0,
                         eval_loss=float("nan") if (rung.name, b) in diverged or rung.name in diverged else
                         1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3 + 1e-3 * rng.standard_normal())
                    for b in budgets]
            return dict(runs=runs, seconds=0.0)
        return train

    argv = ["--quick", "--no-docs", "--n-boot", "4"]
    last = max(sl.QUICK_STEPS)
    monkeypatch.setattr(sl, "train_rung", fake({(names[1], last), (names[-1], last)}))
    res = sl.main([*argv, "--out", str(tmp_path / "one")])
    out = capsys.readouterr().out
    tokens = f"{last * sl.TOKENS_PER_STEP:,}"
    assert (f"note: 1 of {4 * len(sl.QUICK_STEPS)} runs diverged (eval loss not finite) and are left out of the fit: "
            f"{names[1]} D={tokens} (nan)") in out
    assert res["prediction"]["fit_runs"] == 4 * len(sl.QUICK_STEPS) - 1
    assert res["prediction"]["diverged"] == [dict(rung=names[1], tokens=last * sl.TOKENS_PER_STEP)]
    assert json.loads((tmp_path / "one" / "prediction.json").read_text())["diverged"] == res["prediction"]["diverged"]
    assert all(np.isfinite(v) for v in res["prediction"]["fit"].values())
    *fine, bad = res["comparison"]
    assert bad["diverged"] and not any(c["diverged"] for c in fine) and all(abs(c["error"]) < 0.01 for c in fine)
    assert re.search(rf"D=\s*{tokens}: predicted .* actual nan .*  DIVERGED\n", out)
    again = sl.main(["--replot", "--out", str(tmp_path / "one"), "--no-docs"])  # the same runs fitted again
    assert again["prediction"]["fit"] == res["prediction"]["fit"]
    assert re.search(rf"refitted {4 * len(sl.QUICK_STEPS) - 1} runs", capsys.readouterr().out)
    # two whole rungs diverged: two model sizes are left, too few for A/N^alpha
    monkeypatch.setattr(sl, "train_rung", fake({names[1], names[2]}))
    with pytest.raises(SystemExit, match=r"cannot fit the law on the 6 runs left: N takes 2 distinct values.* 6 of 12 "
                                         rf"runs diverged .*: {names[1]} D=.*; rerun with a lower --lr"):
        sl.main([*argv, "--out", str(tmp_path / "two")])


def _strict_json(path):
    """The JSON at `path` as a strict reader (JavaScript's JSON.parse, jq) sees it: bare NaN / Infinity refused."""
    import json

    def refuse(name):
        raise AssertionError(f"{path.name}: bare {name} is not JSON (strict readers refuse the file)")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_loss_is_written_as_null_and_read_back_as_nan(tmp_path, monkeypatch):
    """ladder.json, rungs.json, prediction.json and results.json held a diverged run's loss as bare NaN, which
    JavaScript and jq refuse; it is null now (metrics.jsonl's convention), and the ladder's own readers (resume,
    --replot) take null back as NaN: a resumed ladder and a replot fit the runs the first one did."""
    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    names, last = [r.name for r in sl.QUICK_LADDER], max(sl.QUICK_STEPS)
    bad = {(names[1], last), (names[-1], last)}  # one smaller run and one target run diverge

    def fake(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):  # L = 1 + 40/N^0.4 + 300/D^0.3 + noise
        if rung.name == names[3] and not (tmp_path / "done").exists():
            (tmp_path / "done").touch()
            raise KeyboardInterrupt  # the first attempt is killed after two rungs, the diverged one among them
        n = param_counts(rung.config()).non_embedding
        rng = np.random.default_rng(list(rung.name.encode()))
        runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=float("nan"),
                     flops=0.0, eval_loss=float("nan") if (rung.name, b) in bad else
                     1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3 + 1e-3 * rng.standard_normal())
                for b in budgets]
        return dict(runs=runs, seconds=0.0)

    monkeypatch.setattr(sl, "train_rung", fake)
    out, argv = tmp_path / "ladder", ["--quick", "--no-docs", "--n-boot", "4", "--out", str(tmp_path / "ladder")]
    with pytest.raises(KeyboardInterrupt):
        sl.main(argv)
    saved = _strict_json(out / "rungs.json")["done"][names[1]]["runs"]
    assert [r["eval_loss"] is None for r in saved] == [r["steps"] == last for r in saved]
    res = sl.main(argv)  # resumed from rungs.json: the diverged run is left out again, not a TypeError on None
    assert res["prediction"]["fit_runs"] == 4 * len(sl.QUICK_STEPS) - 1
    ladder = _strict_json(out / "ladder.json")
    assert sum(r["eval_loss"] is None for r in ladder) == 2 and all(r["train_loss"] is None for r in ladder)
    _strict_json(out / "prediction.json")
    results = _strict_json(out / "results.json")
    assert [c["actual"] is None and c["diverged"] for c in results["comparison"]] == [False] * (
        len(sl.QUICK_STEPS) - 1) + [True]
    again = sl.main(["--replot", "--out", str(out), "--no-docs"])
    assert again["prediction"]["fit"] == res["prediction"]["fit"]
    assert np.isnan(again["comparison"][-1]["actual"]) and np.isnan(again["runs"][0]["train_loss"])


def test_the_figure_says_what_the_prediction_was_fitted_on(tmp_path, monkeypatch):
    """The prediction panel's title said "from the 4 smaller models" also when diverged runs were left out of the
    fit; it now counts the runs fitted and the diverged ones left out."""
    import matplotlib.pyplot as plt

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    names, last = [r.name for r in sl.QUICK_LADDER], max(sl.QUICK_STEPS)

    def fake(bad):
        def train(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):
            n = param_counts(rung.config()).non_embedding
            runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0,
                         flops=0.0, eval_loss=float("nan") if (rung.name, b) in bad or rung.name in bad else
                         1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3)
                    for b in budgets]
            return dict(runs=runs, seconds=0.0)
        return train

    titles, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (titles.append(fig.axes[1].get_title()), close(fig)))
    n_runs = len(sl.QUICK_STEPS)
    for i, bad in enumerate(({}, {(names[1], last)}, {names[0]})):
        monkeypatch.setattr(sl, "train_rung", fake(bad))
        sl.main(["--quick", "--no-docs", "--n-boot", "4", "--out", str(tmp_path / str(i))])
    assert titles == [f"{names[-1]}: prediction from the 4 smaller models",
                      f"{names[-1]}: prediction from {4 * n_runs - 1} runs of the 4 smaller models\n"
                      f"(1 diverged run left out)",
                      f"{names[-1]}: prediction from {3 * n_runs} runs of 3 smaller models\n"
                      f"({n_runs} diverged runs left out)"]


def test_the_prediction_panel_says_which_of_the_held_out_models_runs_diverged(tmp_path, monkeypatch):
    """A diverged run of the held-out model (eval loss NaN) drew no 'actual' star beside its prediction, and neither
    panel said so (the left one names the fitted rungs' diverged runs only): the missing star read as one hidden
    behind the predicted point. Its legend names each such run, at the tokens results.json marks diverged; the
    stars drawn are the finite actual losses."""
    import json

    import matplotlib.pyplot as plt

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    target, last = sl.QUICK_LADDER[-1].name, max(sl.QUICK_STEPS)

    def train(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):
        n = param_counts(rung.config()).non_embedding
        runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0, flops=0.0,
                     eval_loss=float("nan") if (rung.name, b) == (target, last) else
                     1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3) for b in budgets]
        return dict(runs=runs, seconds=0.0)

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    monkeypatch.setattr(sl, "train_rung", train)
    sl.main(["--quick", "--no-docs", "--n-boot", "4", "--out", str(tmp_path / "q")])
    rows = json.loads((tmp_path / "q" / "results.json").read_text())["comparison"]
    gone = [r["tokens"] for r in rows if r["diverged"]]
    assert gone == [last * sl.TOKENS_PER_STEP]
    ax2 = figs[-1].axes[1]
    assert f"{target} diverged (no actual): D={gone[0] / 1e3:.0f}k" in [t.get_text() for t in
                                                                       ax2.get_legend().get_texts()]
    (stars,) = [line for line in ax2.lines if line.get_label() == "actual"]
    assert [(x, y) for x, y in zip(stars.get_xdata(), stars.get_ydata()) if np.isfinite(y)] == [
        (r["tokens"], r["actual"]) for r in rows if not r["diverged"]]


def test_the_ladder_trains_each_rung_at_its_peak_lr_after_a_warmup_of_at_most_half_the_shortest_budget(tmp_path,
                                                                                                     monkeypatch):
    """main's clamp: --warmup 16 under --quick (budgets 8, 12, 16 steps) is 8 // 2 = 4 steps (a clamp by the longest
    budget, 8, warmed up through every cooldown branch); each rung at rung_lr(--lr), trained on the corpus's training
    part and evaluated on its held-out part (the training part passed: the other tests stub train_rung)."""
    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    seen = []

    def fake(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):
        seen.append((rung.name, peak_lr, warmup, tuple(budgets)))
        n = param_counts(rung.config()).non_embedding
        runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0, flops=0.0,
                     eval_loss=1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3) for b in budgets]
        return dict(runs=runs, seconds=0.0)

    made, windows = [], sl.ByteWindows
    monkeypatch.setattr(sl, "ByteWindows", lambda tokens, *a, **k: made.append(tokens) or windows(tokens, *a, **k))
    monkeypatch.setattr(sl, "train_rung", fake)
    sl.main(["--quick", "--no-docs", "--n-boot", "4", "--lr", "2e-3", "--out", str(tmp_path / "q")])
    assert seen == [(r.name, sl.rung_lr(2e-3, r), 4, sl.QUICK_STEPS) for r in sl.QUICK_LADDER]
    parts = sl.train_eval_split(sl.encode_bytes(sl.stdlib_text(4_000_000)))
    assert len(made) == 2 and all(np.array_equal(m, t) for m, t in zip(made, parts))


def test_the_interval_is_named_at_its_level_and_a_replot_draws_one_level(tmp_path, monkeypatch, capsys):
    """--level 0.58 was printed and drawn as a '57%' interval (int(0.58 * 100) = 57). --replot drew the refitted band
    at its --level (0.9 unless given) beside the bars of results.json at the ladder's own level: a 0.58 ladder's
    figure showed a 90% band and 58% bars. A replot now draws the ladder's level unless told, bars and band alike."""
    import matplotlib.pyplot as plt

    from experiments import scaling_ladder as sl
    from scaling.flops import param_counts

    def fake(rung, budgets, train, evals, *, peak_lr, warmup, seed=0):  # L = 1 + 40/N^0.4 + 300/D^0.3 + noise
        n = param_counts(rung.config()).non_embedding
        rng = np.random.default_rng(list(rung.name.encode()))
        runs = [dict(rung=rung.name, n_params=n, tokens=b * sl.TOKENS_PER_STEP, steps=b, train_loss=0.0, flops=0.0,
                     eval_loss=1 + 40 / n**0.4 + 300 / (b * sl.TOKENS_PER_STEP)**0.3 + 1e-2 * rng.standard_normal())
                for b in budgets]
        return dict(runs=runs, seconds=0.0)

    legends, close, drawn, draw = [], plt.close, [], sl.plot
    monkeypatch.setattr(plt, "close", lambda fig: (legends.append([t.get_text() for t in fig.axes[0].get_legend()
                                                                    .get_texts()]), close(fig)))
    monkeypatch.setattr(sl, "plot", lambda *a: (drawn.append(a), draw(*a)))
    monkeypatch.setattr(sl, "train_rung", fake)
    out = tmp_path / "q"
    res = sl.main(["--quick", "--no-docs", "--n-boot", "8", "--level", "0.58", "--out", str(out)])
    assert "58% bootstrap prediction interval" in capsys.readouterr().out
    assert "58% prediction interval" in legends[-1]
    n = res["prediction"]["n_params"]
    for argv, level in (([], 0.58), (["--level", "0.9"], 0.9)):
        sl.main(["--replot", "--out", str(out), "--no-docs", *argv])
        _, _, bs, _, rows, drawn_level = drawn[-1]
        assert drawn_level == level and f"{round(100 * level)}% prediction interval" in legends[-1]
        for r in rows:  # the bars: one new run's interval at the level of the band
            assert (r["low"], r["high"]) == pytest.approx(
                bs.prediction_interval(lambda law, t=r["tokens"]: float(law.loss(n, t)), level)[1:])


def test_the_figure_goes_to_docs_only_in_a_source_checkout(tmp_path, monkeypatch):
    """docs/scaling_fit.png is the repository's figure: an installed wheel has no docs/, and the copy into
    site-packages raised FileNotFoundError at the end of a full ladder (its summary never printed)."""
    from experiments import scaling_ladder

    png = tmp_path / "scaling_fit.png"
    png.write_bytes(b"png")
    monkeypatch.setattr(scaling_ladder, "DOCS", tmp_path / "absent")
    assert scaling_ladder._to_docs(png) is None and not (tmp_path / "absent").exists()
    monkeypatch.setattr(scaling_ladder, "DOCS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    assert scaling_ladder._to_docs(png) == tmp_path / "docs" / "scaling_fit.png"
    assert (tmp_path / "docs" / "scaling_fit.png").read_bytes() == b"png"
