"""Checkpoints: sharded round trips onto other meshes, keep-K, the data iterator's position,
fallback from a damaged latest checkpoint, crash leftovers, params-only restore, SIGTERM."""

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import numpy as np
import pytest

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.train import checkpoint as ckpt
from llmcxr_jax.train import state as state_lib
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
TRAIN = TrainConfig(learning_rate=1e-3, warmup_steps=1, global_batch=8, seq_len=16)


def random_state(mesh, seed: int = 0) -> state_lib.TrainState:
    """A real TrainState (the model's and AdamW's exact tree) filled with random values and placed
    shard by shard into the mesh's shardings (no compilation)."""
    rng = np.random.default_rng(seed)

    def fill(a: jax.ShapeDtypeStruct) -> jax.Array:
        if np.issubdtype(a.dtype, np.floating):
            value = rng.standard_normal(a.shape).astype(a.dtype)
        else:
            value = rng.integers(0, 1000, a.shape).astype(a.dtype)
        return jax.device_put(value, a.sharding)

    return jax.tree.map(fill, ckpt.abstract_train_state(MODEL, TRAIN, mesh))


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: x * 10)
                .to_iter_dataset())


def test_round_trip_onto_same_and_other_meshes(tmp_path):
    state = random_state(mesh_from_flag("2x4"))
    expected = to_numpy(state)
    with ckpt.Checkpointer(tmp_path, save_every=10) as ck:
        assert ck.save(10, state, meta={"stage": 1, "epoch": 2})
        # The next train step donates the state: the asynchronous write must not need it.
        jax.tree.map(lambda x: x.delete(), state)
        ck.wait()
        assert ck.all_steps() == [10] and ck.latest_step() == 10
        for flag in ("2x4", "data:1,fsdp:8", "data:2,fsdp:2,tensor:2"):
            target = ckpt.abstract_train_state(MODEL, TRAIN, mesh_from_flag(flag))
            restored = ck.restore(10, target)
            assert restored.meta == {"stage": 1, "epoch": 2}
            jax.tree.map(np.testing.assert_array_equal, to_numpy(restored.state), expected)
            got = jax.tree.map(lambda x: x.sharding, restored.state)
            want = jax.tree.map(lambda x: x.sharding, target)
            assert jax.tree.leaves(got) == jax.tree.leaves(want), flag
    emb = restored.state.params["embed_in"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (128, 16)  # vocab/tensor 2, embed/fsdp 2


@flax.struct.dataclass
class StateWithRng:
    """The `TrainState` of checkpoints written before its never-read `rng` field was removed."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array


def test_checkpoint_with_the_old_rng_field_still_restores(tmp_path):
    mesh = mesh_from_flag("2x4")
    state = random_state(mesh)
    replicated = state.step.sharding
    old = StateWithRng(step=state.step, params=state.params, opt_state=state.opt_state,
                       rng=jax.device_put(np.array([7, 9], np.uint32), replicated),
                       skipped_steps=state.skipped_steps)
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(3, old, meta={"stage": 1})
    with ckpt.Checkpointer(tmp_path) as ck:
        restored = ck.restore_latest(ckpt.abstract_train_state(MODEL, TRAIN, mesh))
    assert isinstance(restored.state, state_lib.TrainState) and restored.step == 3
    jax.tree.map(np.testing.assert_array_equal, to_numpy(restored.state), to_numpy(state))


def test_keep_last_k_and_save_every(tmp_path):
    state = {"w": jax.device_put(np.arange(8, dtype=np.float32))}
    with ckpt.Checkpointer(tmp_path, save_every=2, keep=2) as ck:
        started = [s for s in range(1, 8) if ck.save(s, state)]
        assert ck.save(7, state, force=True)  # the final save of a run
        assert not ck.save(7, state, force=True)  # already there: nothing to do
        ck.wait()
        assert started == [2, 4, 6]
        assert ck.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_iterator_position_is_restored(tmp_path):
    it = data_iterator()
    for _ in range(5):
        next(it)
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(5, {"w": jax.device_put(np.zeros(2, np.float32))}, it)
        expected = [next(it) for _ in range(7)]  # while the save may still be writing
        ck.wait()
        fresh = data_iterator()
        ck.restore(5, {"w": jax.ShapeDtypeStruct((2,), np.float32)}, fresh)
    assert [next(fresh) for _ in range(7)] == expected
    assert expected != [next(data_iterator()) for _ in range(7)]


def _damage_array_file(step_dir: pathlib.Path) -> None:
    data = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")
    assert data, f"no array data files under {step_dir}"
    for path in data:
        path.write_bytes(b"\0" * 7)


def _delete_iterator_state(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "data").glob("process_*.json"):
        path.unlink()


def _corrupt_meta(step_dir: pathlib.Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"stage": ')


# A failed tensorstore read can complete its other reads after orbax closed that restore's event
# loop ("Event loop is closed", raised in a callback and ignored): noise from the failing restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog):
    """Steps 2, 3, 4 are each damaged a different way: the resume reports each one and lands on 1."""
    mesh = mesh_from_flag("2x4")
    states = {step: random_state(mesh, step) for step in (1, 2, 3, 4)}
    it = data_iterator()
    positions = {}
    with ckpt.Checkpointer(tmp_path, save_every=1, keep=5) as ck:
        for step in (1, 2, 3, 4):
            next(it)
            positions[step] = it.get_state()
            ck.save(step, states[step], it, meta={"step": step})
    expected = to_numpy(states[1])
    _damage_array_file(tmp_path / "4")
    _delete_iterator_state(tmp_path / "3")
    _corrupt_meta(tmp_path / "2")

    fresh = data_iterator()
    target = ckpt.abstract_train_state(MODEL, TRAIN, mesh)
    with caplog.at_level(logging.WARNING, logger="llmcxr_jax.train.checkpoint"):
        with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
            assert ck.latest_step() == 4
            restored = ck.restore_latest(target, fresh)
            assert restored.step == 1 and restored.meta == {"step": 1}
            jax.tree.map(np.testing.assert_array_equal, to_numpy(restored.state), expected)
            assert fresh.get_state() == positions[1]
            # The unreadable steps are set aside, so the resumed run can write them again.
            assert ck.all_steps() == [1]
            assert ck.save(2, restored.state, fresh, meta={"step": 2})
    lines = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert [line.split()[2] for line in lines] == ["4", "3", "2"], lines
    assert all("trying the previous one" in line for line in lines)
    assert "process_0-of-1.json" in lines[1]  # the error names what is missing
    aside = sorted(p.name.split(".")[0] for p in tmp_path.iterdir() if ".unreadable" in p.name)
    assert aside == ["2", "3", "4"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_all_checkpoints_damaged_is_an_error(tmp_path):
    state = random_state(mesh_from_flag("2x4"))
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, state)
    _damage_array_file(tmp_path / "1")
    with ckpt.Checkpointer(tmp_path) as ck, pytest.raises(ckpt.CheckpointError, match="step 1"):
        ck.restore_latest(ckpt.abstract_train_state(MODEL, TRAIN, mesh_from_flag("2x4")))


def test_half_written_save_is_never_a_checkpoint(tmp_path):
    state = {"w": jax.device_put(np.arange(4, dtype=np.float32))}
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, state)
        ck.save(2, state)
    # A crash in the middle of saving step 3 leaves orbax's temporary directory behind.
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "2", tmp)
    (tmp / "commit_success.txt").unlink()
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        assert ck.all_steps() == [1, 2] and ck.latest_step() == 2
        assert ck.restore_latest({"w": jax.ShapeDtypeStruct((4,), np.float32)}).step == 2
    assert not tmp.exists()  # cleaned up when the directory is opened


def test_restore_params_only_onto_another_mesh(tmp_path):
    state = random_state(mesh_from_flag("2x4"))
    expected = to_numpy(state.params)
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(4, state, force=True)
    mesh = mesh_from_flag("4x2")
    shardings = state_lib.param_shardings(MODEL, mesh)
    abstract = nn.unbox(state_lib.abstract_params(MODEL))
    for params in (ckpt.restore_params(tmp_path, None, shardings),  # shapes from the metadata
                   ckpt.restore_params(tmp_path, 4, shardings, abstract)):
        jax.tree.map(np.testing.assert_array_equal, to_numpy(params), expected)
        assert params["embed_in"]["embedding"].sharding == shardings["embed_in"]["embedding"]
    with pytest.raises(ckpt.CheckpointError, match="step 9"):
        ckpt.restore_params(tmp_path, 9, shardings, abstract)


LOOP = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from llmcxr_jax.train.checkpoint import Checkpointer
    from llmcxr_jax.train.preemption import PreemptionWatcher

    workdir = sys.argv[1]
    state = {"w": jax.device_put(np.zeros(4, np.float32)), "step": 0}
    with PreemptionWatcher() as watcher, Checkpointer(workdir, save_every=1000) as ck:
        step = 0
        while True:
            step += 1
            state = {"w": state["w"] + 1, "step": step}
            print(f"step {step}", flush=True)
            if watcher.should_stop(step):
                ck.save(step, state, force=True)
                print(f"saved {step} on signal {watcher.received}", flush=True)
                break
            time.sleep(0.05)
""")


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(1))
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path / "ckpt")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    saved = [line for line in out.splitlines() if line.startswith("saved")]
    assert saved and saved[0].endswith(f"on signal {int(signal.SIGTERM)}"), out
    step = int(saved[0].split()[1])
    assert step >= 3
    with ckpt.Checkpointer(tmp_path / "ckpt") as ck:
        assert ck.all_steps() == [step]
        restored = ck.restore(step, {"w": jax.ShapeDtypeStruct((4,), np.float32), "step": 0})
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full(4, step, np.float32))
