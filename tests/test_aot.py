"""AOT compile of the sharded train step: XLA's per-device memory agrees with scaling/'s estimate."""

import pytest

from experiments.aot import compile_report
from models import TransformerConfig
from scaling.memory import memory_per_device

CFG = TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, mlp_dim=256, max_seq_len=64)


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2},
                                  {"fsdp": -1}])  # -1: the CLI's default, filled in before the estimate
def test_aot_state_bytes_match_the_estimate(mesh):
    r = compile_report(CFG, mesh, batch=8, seq_len=64)
    batch_bytes = 2 * 8 * 64 * 4 // 8 if "data" not in mesh else 2 * 8 * 64 * 4 // 4
    # params + AdamW moments, per device: exact up to replicated norm scales and rounding (2%)
    assert abs((r.argument_bytes - batch_bytes) - r.estimate.state) <= 0.02 * r.estimate.state, r
    assert r.temp_bytes > 0 and r.peak_bytes < r.estimate.total * 1.5
    # the step donates its state: every output but the scalar metrics is written into an input, so the peak is
    # the inputs plus temporaries (a peak that counted the aliased outputs again passed the bound above)
    assert r.alias_bytes >= r.estimate.state and r.peak_bytes <= r.argument_bytes + r.temp_bytes + 1024, r


def test_aot_estimate_of_a_bf16_model_saving_dots_matches_the_cpu_compile():
    """A bf16 model under save_dots_no_batch compiled on the fake CPU devices keeps its projections' float32 dots
    (models.linear): the estimate next to XLA's bytes counts them so (counted in bf16, XLA's temp was 1.23x it)."""
    cfg = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=8, mlp_dim=512, max_seq_len=128,
                            dtype="bfloat16", remat="save_dots_no_batch")
    r = compile_report(cfg, {"data": 4, "tensor": 2}, batch=8, seq_len=128)
    assert 0.9 * r.estimate.temp <= r.temp_bytes <= 1.1 * r.estimate.temp, r.temp_bytes / r.estimate.temp
    accelerator = memory_per_device(cfg, {"data": 4, "tensor": 2}, 8, 128)  # bf16 dots: fewer activation bytes
    assert accelerator.activations < 0.6 * r.estimate.activations


def test_cli_compiles_for_the_fake_cpu_devices_on_an_accelerator_host(monkeypatch, capsys):
    import jax

    from experiments import aot

    cpu = jax.devices("cpu")
    # an accelerator host: the default backend has one device; the fake CPU devices are the ones to compile for
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpu if backend == "cpu" else cpu[:1])
    seen = []

    class Compiled(Exception):  # stop before compiling a 7B model
        pass

    def compile_report(cfg, mesh, batch, seq_len, devices=None):
        seen.append(devices)
        raise Compiled

    monkeypatch.setattr(aot, "compile_report", compile_report)
    with pytest.raises(Compiled):
        aot.main(["--devices", str(len(cpu)), "--mesh", f"fsdp={len(cpu)}"])
    assert seen == [cpu]
    # every --mesh is compiled, each its own (reporting the first mesh for all passed)
    meshes = []

    def report(cfg, mesh, batch, seq_len, devices=None):
        meshes.append(dict(mesh))
        return aot.AotReport(dict(mesh), 0, 0, 0, 0, type("E", (), {"state": 0, "total": 0})())

    monkeypatch.setattr(aot, "compile_report", report)
    aot.main(["--devices", "8", "--seq", "64", "--mesh", "fsdp=8", "--mesh", "fsdp=4,tensor=2"])
    assert meshes == [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}]
    # microbatches are refused only without a pipeline: a 2-stage one, the smallest, takes them
    meshes.clear()
    aot.main(["--devices", "8", "--seq", "64", "--dtype", "float32", "--microbatches", "2", "--mesh", "stage=2,fsdp=4"])
    assert meshes == [{"stage": 2, "fsdp": 4}]


def test_cli_output_and_errors(monkeypatch, capsys, closed_stdout):
    """One device reads "1 device" (it read "1 devices"); a bad config flag is named as the flag, not only as the
    config field; `| head -1` ends the run quietly (a BrokenPipeError traceback ended it)."""
    import jax

    from experiments import aot

    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the test's backend already runs, on 8 devices
    monkeypatch.setattr(aot, "compile_report", lambda cfg, mesh, batch, seq_len, devices=None: aot.AotReport(
        dict(mesh), 0, 0, 0, 0, type("E", (), {"state": 0, "total": 0})()))
    aot.main(["--devices", "1", "--seq", "64"])
    assert capsys.readouterr().out.splitlines()[0].endswith("compute bfloat16, 1 device")
    for argv, message in ((["--remat", "ful"], "argument --remat: TransformerConfig.remat: unknown 'ful'"),
                          (["--dtype", "foo"], "argument --dtype: TransformerConfig.dtype"),
                          (["--microbatches", "0"], "argument --microbatches: TransformerConfig.pipeline_"),
                          # stage=-1 fills to one stage here: no pipeline (the microbatches were ignored, silently)
                          (["--microbatches", "2", "--mesh", "fsdp=8,stage=-1"],
                           "argument --microbatches: 2 microbatches need a pipeline")):
        with pytest.raises(SystemExit):
            aot.main(["--devices", "8", *argv])
        err = capsys.readouterr().err
        # the usage line names what a user types (argparse's default, `aot.py`, does not run from the repo root)
        assert message in err and err.startswith("usage: python -m experiments.aot [-h]"), argv
    rc, err = closed_stdout("experiments.aot", "--devices", "1", "--seq", "64")
    assert rc == 1 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cli_header_states_the_batch_and_divisibility_errors_name_the_fix(monkeypatch, capsys):
    """The XLA bytes depend on the batch, which defaults to one sequence per device: the header states it (and the
    microbatches it splits into), where it said nothing of it. A --batch / --seq / tensor axis that does not divide
    says what would (it named only the divisor)."""
    import jax

    from experiments import aot

    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the test's backend already runs, on 8 devices
    monkeypatch.setattr(aot, "compile_report", lambda cfg, mesh, batch, seq_len, devices=None: aot.AotReport(
        dict(mesh), 0, 0, 0, 0, type("E", (), {"state": 0, "total": 0})()))
    aot.main(["--devices", "8", "--seq", "64"])
    assert "7b: 6.74 B params, batch 8, seq 64," in capsys.readouterr().out
    aot.main(["--devices", "8", "--seq", "64", "--dtype", "float32", "--batch", "16", "--microbatches", "2",
              "--mesh", "stage=2,data=4"])
    assert "batch 16 (2 microbatches of 8), seq 64," in capsys.readouterr().out
    for argv, message in ((["--batch", "12", "--mesh", "data=8"],
                           "--batch=12 is not divisible by the batch axes of {'data': 8} (= 8); use a multiple of 8"),
                          (["--seq", "100", "--mesh", "sequence=8"], "--seq=100 is not divisible by the sequence axis "
                           "of {'sequence': 8} (= 8); use a multiple of 8"),
                          (["--seq", "64", "--mesh", "tensor=-1", "--devices", "64"], "the model's heads=32 is not "
                           "divisible by the tensor axis of {'tensor': 64} (= 64); use a tensor axis that divides 32")):
        with pytest.raises(SystemExit):
            aot.main(argv if "--devices" in argv else ["--devices", "8", *argv])
        assert message in capsys.readouterr().err, argv


def test_cli_traces_and_estimates_for_the_cpu_it_compiles_on(monkeypatch):
    """On an accelerator host the step was traced for the default backend (models.linear's GPU products), compiled
    by XLA:CPU and set beside the accelerator's estimate: a step neither runs (bf16, V 32768, D 256, fsdp 8: XLA
    temp 90.2 MB, 1.33x the estimate shown, against 77.4 MB and 1.03x on a CPU host). The CLI makes the CPU the
    default backend before it starts, so the trace, the compile and the estimate are all XLA:CPU's."""
    import jax

    from experiments import aot

    updates = []
    monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))  # this test's backend already runs
    monkeypatch.setattr(aot, "compile_report", lambda cfg, mesh, batch, seq_len, devices=None: aot.AotReport(
        dict(mesh), 0, 0, 0, 0, type("E", (), {"state": 0, "total": 0})()))
    aot.main(["--devices", "8", "--seq", "64"])
    assert ("jax_platforms", "cpu") in updates, updates
