"""Two processes on localhost (2 fake devices each, one global mesh of 4) == one process."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
from flax import nnx

from experiments.lm_step import lm_loss
from models import Transformer
from tests.multihost_common import CFG, global_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(mode):
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i), mode], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def test_two_processes_match_single_process():
    procs = launch("ok")
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert result["devices"] == 4 and result["mesh"] == {"data": 2, "fsdp": 2}
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # only the primary writes

    tok = global_tokens()
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    single = float(jax.jit(lambda s: lm_loss(graphdef, s, {"inputs": tok[:, :-1], "targets": tok[:, 1:]}))(state))
    np.testing.assert_allclose(result["loss"], single, rtol=1e-5)


def test_dead_peer_ends_the_survivor_with_a_clear_error():
    procs = launch("die")
    t0 = time.time()
    _, err0 = procs[0].communicate(timeout=120)  # heartbeat timeout is 5 s: well inside this
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    assert "unhealthy" in err0 or "another task died" in err0, err0[-2000:]
    assert time.time() - t0 < 120
