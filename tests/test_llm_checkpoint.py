"""The LLM workdir format (llmcxr_jax.llm.checkpoint) and parameter shardings."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm import checkpoint
from llmcxr_jax.parallel import mesh as mesh_lib
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.text.vocab import load_vocab


@pytest.fixture(scope="module")
def model(neox_tokenizer_dir):
    vocab = load_vocab(neox_tokenizer_dir, n_image=64)
    config = ModelConfig(vocab_size=vocab.embed_rows, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=32)
    mesh = mesh_lib.mesh_from_flag("-1")
    shardings = shardings_lib.param_shardings(config, mesh)
    rng = np.random.default_rng(0)  # random host values placed into the shardings: no compile
    params = jax.tree.map(
        lambda a, s: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), s),
        shardings_lib.abstract_params(config), shardings)
    return config, params, vocab


def _equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_param_shardings_follow_the_rules(model):
    config, params, _ = model
    mesh = mesh_lib.mesh_from_flag("2x2x2")
    shardings = shardings_lib.param_shardings(config, mesh)
    spec = shardings["layers"]["attention"]["query_key_value"]["kernel"].spec
    assert tuple(spec) == (None, "fsdp", "tensor", None, None)  # layers, embed, heads, qkv, kv
    assert tuple(shardings["embed_in"]["embedding"].spec) == ("tensor", "fsdp")
    assert jax.tree.structure(shardings) == jax.tree.structure(params)


def test_save_then_load_onto_another_mesh(model, tmp_path):
    config, params, vocab = model
    workdir = checkpoint.save_llm(tmp_path / "work", config, params, vocab)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "tokenizer"]
    assert not (tmp_path / "work.tmp").exists()
    mesh = mesh_lib.mesh_from_flag("1x4x2")
    config2, params2, vocab2 = checkpoint.load_llm(workdir, mesh=mesh)
    assert config2 == config and vocab2.n_text == vocab.n_text and vocab2.n_image == 64
    _equal(params2, params)
    mlp = params2["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
    assert mlp.sharding.mesh.shape == mesh.shape and tuple(mlp.sharding.spec) == (
        None, "fsdp", "tensor")


def test_save_refuses_to_overwrite_and_replaces_when_asked(model, tmp_path):
    config, params, vocab = model
    workdir = checkpoint.save_llm(tmp_path / "work", config, params, vocab)
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save_llm(workdir, config, params, vocab)
    doubled = jax.tree.map(lambda x: x * 2, params)
    checkpoint.save_llm(workdir, config, doubled, vocab, overwrite=True)
    _equal(checkpoint.load_llm(workdir)[1], doubled)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_load_reads_the_params_of_a_training_run_state(model, tmp_path):
    """A run saves {"params", "opt_state", "step", ...} under the "state" item; load_llm takes the
    params alone (this is how launch/export.py exports a trained workdir)."""
    config, params, vocab = model
    workdir = checkpoint.save_llm(tmp_path / "work", config, params, vocab)
    state = {"params": jax.tree.map(lambda x: x + 1, params), "step": np.int32(7),
             "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
    manager = checkpoint.checkpoint_manager(workdir)
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    _equal(checkpoint.load_llm(workdir)[1], state["params"])  # latest step
    _equal(checkpoint.load_llm(workdir, step=0)[1], params)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 not found.*\[0, 5\]"):
        checkpoint.load_llm(workdir, step=3)


def test_trainer_can_start_from_an_imported_workdir(model, tmp_path):
    from llmcxr_jax.train import checkpoint as train_ckpt

    config, params, vocab = model
    workdir = checkpoint.save_llm(tmp_path / "work", config, params, vocab)
    mesh = mesh_lib.mesh_from_flag("-1")
    restored = train_ckpt.restore_params(
        workdir / checkpoint.CHECKPOINT_DIR, None, shardings_lib.param_shardings(config, mesh),
        shardings_lib.abstract_params(config))
    _equal(restored, params)


def test_load_errors_name_the_problem(model, tmp_path):
    config, params, vocab = model
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.json not found"):
        checkpoint.load_llm(tmp_path)
    workdir = checkpoint.save_llm(tmp_path / "work", config, params, vocab)
    (workdir / "config.json").write_text('{"model": {"vocab_size": 1, "hidden": 2}}')
    with pytest.raises(checkpoint.CheckpointError, match=r"no valid 'model' config.*hidden"):
        checkpoint.load_llm(workdir)
    with pytest.raises(ValueError, match="embedding rows"):
        checkpoint.save_llm(pathlib.Path(tmp_path / "x"), config.__class__(
            **{**config.__dict__, "vocab_size": 128}), params, vocab)
