"""One process of the two-process test (run by tests/test_multihost.py, not collected by pytest)."""

import json
import os
import sys

import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_default_matmul_precision", "highest")

from parallel.distributed import (  # noqa: E402
    any_process,
    global_batch_from_local,
    initialize,
    is_primary,
    process_rows,
)


class FakeLoader:
    """Stands for data.loader.LMLoader: each process reads other documents, so its iterator state is its own."""

    def __init__(self, position):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


class StreamLoader(FakeLoader):
    """A FakeLoader whose state names its data stream: another stream's state is refused as LMLoader's is."""

    def __init__(self, position, stream):
        super().__init__(position)
        self.stream = stream

    def get_state(self):
        return {"position": self.position, "stream": self.stream}

    def set_state(self, state):
        from data.loader import StreamMismatch

        if state["stream"] != self.stream:
            raise StreamMismatch(f"saved over stream {state['stream']!r}, this loader reads {self.stream!r}")
        super().set_state(state)


def checkpoint_round_trip(directory, state, pid):
    """Save at step 1 with a per-process loader state, restore into a fresh loader: each gets its own back."""
    from experiments.checkpoint import Checkpoints

    ckpt = Checkpoints(directory, async_save=True, log=lambda *a: None)
    ckpt.save(1, state, {"config": "{}"}, loader=FakeLoader(100 + pid))
    ckpt.close()
    ckpt = Checkpoints(directory, log=lambda *a: None)
    fresh = FakeLoader(0)
    _, meta = ckpt.restore(state, loader=fresh)
    ckpt.close()
    return meta["step"], fresh.position


def finite_epoch_loader(directory, mesh, pid):
    """num_epochs=1 where process 0's documents fill many more rows than process 1's: both must stop together."""
    import warnings

    from data.loader import LMLoader, LoaderConfig, Source, lm_dataset
    from data.shards import DocWriter, shard_name
    from data.tokenizer import ByteTokenizer

    tier = os.path.join(directory, f"tier_{pid}")  # each process its own copy of the same documents
    writer = DocWriter(os.path.join(tier, f"{shard_name(0)}.array_record"))
    for i in range(10):  # documents are split [p::2]: the even (long) ones go to process 0
        writer.write({"id": str(i), "text": ("long document " * 14) if i % 2 == 0 else "short one"})
    writer.commit()
    tok, cfg = ByteTokenizer(add_eos=True), LoaderConfig(seq_len=32, global_batch_size=4, num_epochs=1)
    total = sum(int(b["weights"].sum()) for b in lm_dataset([Source(tier)], tok, cfg))
    loader = LMLoader([Source(tier)], tok, cfg, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = [int(np.asarray(b["weights"].addressable_shards[0].data).size) for b in loader]
    return {"batches": len(read), "unread": loader.unread, "total_tokens": total,
            "warned": any("ran out first" in str(w.message) for w in caught)}


def main():
    port, pid, mode, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    assert initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_s=5, init_timeout_s=60)
    if mode == "settings":  # process 1 has one field more (another version of the code on its host)
        from parallel.distributed import check_same_settings

        check_same_settings({})  # nothing to compare: passes on both
        errors = []
        # process 1 with one field more (another version of the code on its host), then with as many fields but
        # one of another name (a renamed field)
        for settings in ({"a": "1", "b": "2", **({"c": "3"} if pid == 1 else {})},
                         {"a": "1", ("c" if pid == 1 else "b"): "2"}):
            try:
                check_same_settings(settings)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        # initialize again in the running job (train_lm.main twice in one script): nothing started, still two
        again = initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_s=5, init_timeout_s=60)
        print(json.dumps({"pid": pid, "errors": errors, "again": again}), flush=True)
        return
    if mode == "local_leaf":  # a scalar made with jnp.int32 (on this process's first device) beside a global array
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from experiments.checkpoint import Checkpoints
        from parallel import make_mesh

        mesh = make_mesh({"fsdp": 2}, dcn={"data": 2})
        state = {"w": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(("data", "fsdp")))), "n": jnp.int32(7)}
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), async_save=False, log=lambda *a: None)
        try:
            ckpt.save(1, state, {})
            error = None
        except Exception as e:  # noqa: BLE001 - the test reads which one
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"pid": pid, "error": error, "steps": ckpt.steps()}), flush=True)
        return
    if mode == "loader_mismatch":  # process 1's loader now reads another stream (its host's own data changed)
        import time

        import jax.numpy as jnp
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P

        from experiments.checkpoint import Checkpoints
        from parallel import make_mesh

        mesh = make_mesh({"fsdp": 2}, dcn={"data": 2})
        state = {"w": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(("data", "fsdp"))))}
        logs = []
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), async_save=False, log=logs.append)
        ckpt.save(1, state, {}, loader=StreamLoader(100 + pid, "a"))
        ckpt.close()
        multihost_utils.sync_global_devices("saved")
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), log=logs.append)
        fresh, t0 = StreamLoader(7, "b" if pid == 1 else "a"), time.time()
        try:
            ckpt.restore(jax.tree.map(jnp.zeros_like, state), loader=fresh)
            error = None
        except Exception as e:  # noqa: BLE001 - the test reads which one
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"pid": pid, "error": error, "seconds": time.time() - t0, "steps": ckpt.steps(),
                          "logs": logs, "loader_position": fresh.position}), flush=True)
        return
    if mode == "legacy_loader":  # a checkpoint of before per-process loader states: one state, in the meta
        import jax.numpy as jnp
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P

        from experiments.checkpoint import Checkpoints
        from parallel import make_mesh

        mesh = make_mesh({"fsdp": 2}, dcn={"data": 2})
        state = {"w": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(("data", "fsdp"))))}
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), async_save=False, log=lambda *a: None)
        ckpt.save(1, state, {"loader": FakeLoader(100 + pid).get_state()})  # (the meta is the primary's)
        ckpt.close()
        multihost_utils.sync_global_devices("saved")
        ckpt, fresh = Checkpoints(os.path.join(workdir, "ckpt"), log=lambda *a: None), FakeLoader(7)
        try:
            ckpt.restore(jax.tree.map(jnp.zeros_like, state), loader=fresh)
            error = None
        except Exception as e:  # noqa: BLE001 - the test reads which one
            error = f"{type(e).__name__}: {e}"
        ckpt.close()
        print(json.dumps({"pid": pid, "error": error, "steps": ckpt.steps(), "loader_position": fresh.position}),
              flush=True)
        return
    if mode == "damaged_shard":  # one process's own shard file damaged: every process must fall back together
        import glob

        import jax.numpy as jnp
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P

        from experiments.checkpoint import Checkpoints
        from parallel import make_mesh

        mesh = make_mesh({"fsdp": 2}, dcn={"data": 2})  # rows [0, 2048) on process 0's devices, the rest on 1's
        state = {"w": jax.device_put(jnp.arange(4096 * 6, dtype=jnp.float32).reshape(4096, 6),
                                     NamedSharding(mesh, P(("data", "fsdp"))))}
        logs = []
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), async_save=False, log=logs.append)
        ckpt.save(1, state, {})
        ckpt.close()
        if pid == 0:  # process 1's data file (its rows, only it reads them) cut short
            data = max(glob.glob(os.path.join(workdir, "ckpt", "1", "state", "ocdbt.process_1", "d", "*")),
                       key=os.path.getsize)
            os.truncate(data, os.path.getsize(data) // 2)
        multihost_utils.sync_global_devices("damaged")
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), log=logs.append)
        restored = [ckpt.restore(jax.tree.map(jnp.zeros_like, state)) is not None]
        ckpt.save(2, state, {}, loader=FakeLoader(100 + pid))  # then process 1's own loader file emptied
        ckpt.close()
        if pid == 0:
            open(os.path.join(workdir, "ckpt", "2", "loader", "process_1-of-2.json"), "w", encoding="utf-8").close()
        multihost_utils.sync_global_devices("damaged-loader")
        fresh = FakeLoader(7)
        ckpt = Checkpoints(os.path.join(workdir, "ckpt"), log=logs.append)
        restored.append(ckpt.restore(jax.tree.map(jnp.zeros_like, state), loader=fresh) is not None)
        print(json.dumps({"pid": pid, "restored": restored, "steps": ckpt.steps(), "logs": logs,
                          "loader_position": fresh.position}), flush=True)
        ckpt.close()
        return
    from flax import nnx

    from experiments.lm_step import lm_loss
    from models import Transformer
    from parallel import create_sharded, make_mesh
    from tests.multihost_common import CFG, global_tokens

    mesh = make_mesh({"fsdp": 2}, dcn={"data": 2})  # data crosses processes, fsdp stays inside one
    graphdef, state = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    tok = global_tokens()[process_rows(4)]
    batch = global_batch_from_local({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
    with jax.set_mesh(mesh):
        loss = jax.jit(lambda s, b: lm_loss(graphdef, s, b))(state, batch)
    loss = float(loss)
    if mode == "die" and pid == 1:
        os._exit(3)  # a crashed peer: the survivor must not hang in its next collective
    if mode == "die":
        with jax.set_mesh(mesh):
            jax.block_until_ready(jax.jit(lambda s, b: lm_loss(graphdef, s, b))(state, batch))
    # 'tensor' across the processes: the batch would be replicated over them, so each process's own rows are refused
    try:
        global_batch_from_local({"inputs": tok[:, :-1]}, make_mesh({"fsdp": 2}, dcn={"tensor": 2}))
        bad_mesh_refused = False
    except ValueError as e:
        bad_mesh_refused = "put the processes on the outermost batch axis" in str(e)
    # SIGTERM seen by process 1 only: both must agree to stop at this step
    stops = [any_process(pid == 1), any_process(False)]
    step, position = checkpoint_round_trip(os.path.join(workdir, "ckpt"), state, pid)
    finite = finite_epoch_loader(workdir, mesh, pid)
    # parameters sharded across the processes (fsdp over them): every process calls save_pretrained, one writes
    from models.hf import save_pretrained

    across = make_mesh({"data": 2}, dcn={"fsdp": 2})
    graphdef_x, state_x = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), across)
    assert not state_x["embed"][...].is_fully_addressable
    save_pretrained(nnx.merge(graphdef_x, state_x), os.path.join(workdir, "hf"), max_shard_size="20KB")
    print(json.dumps({"pid": pid, "stops": stops, "restored_step": step, "loader_position": position,
                      "bad_mesh_refused": bad_mesh_refused, "finite": finite}), flush=True)
    if is_primary():
        print(json.dumps({"loss": loss, "devices": jax.device_count(), "mesh": dict(mesh.shape)}), flush=True)


if __name__ == "__main__":
    main()
