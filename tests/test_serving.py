"""Serving export and `load_bundle` (llmcxr_jax.llm.serving, launch/export.py --format serving).

A tiny GPT-NeoX (real GPT-NeoX tokenizer + 128 image ids) is saved as a training run's final LLM
from a 2x4 mesh beside a test-tiny VQ-GAN; the serving export restores onto 1 device and a 2x2
mesh with the original logits, in bf16 within bf16 tolerance, and the HF export of the same run
workdir writes exactly its params (tests/test_hf_interop.py checks HF exports against
transformers' logits).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from llmcxr_jax import configs
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm import checkpoint as llm_checkpoint
from llmcxr_jax.llm import serving
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel import mesh as mesh_lib
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.text.vocab import load_vocab
from llmcxr_jax.vqgan.checkpoint import save_vqgan
from llmcxr_jax.vqgan.model import init_params as vqgan_init

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory, neox_tokenizer_dir):
    """(workdir laid out like a training run, config, host params, vocab); saved from 2x4."""
    vq_config = configs.vqgan_preset("test-tiny")
    vocab = load_vocab(neox_tokenizer_dir, n_image=vq_config.n_embed)
    config = ModelConfig(vocab_size=vocab.embed_rows, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=512)
    mesh = mesh_lib.mesh_from_flag("2x4")
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype),
                        shardings_lib.abstract_params(config))
    params = jax.device_put(host, shardings_lib.param_shardings(config, mesh))
    root = tmp_path_factory.mktemp("run")
    llm_checkpoint.save_llm(root / "llm", config, params, vocab, step=7)
    save_vqgan(root / "vqgan_run" / "vqgan", vq_config, vqgan_init(vq_config, seed=3))
    (root / "stage1").mkdir()
    (root / "config.json").write_text(json.dumps({"vqgan_dir": ""}))
    return root, config, host, vocab


@functools.lru_cache(maxsize=None)
def _forward(config):
    return jax.jit(lambda params, ids: GPTNeoX(config).apply({"params": params}, ids))


def _ids(vocab) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab.n_valid, (2, 10)).astype(np.int32)


def _export(*argv: str) -> None:
    assert _load_launch("export").main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def exported(run_workdir, tmp_path_factory):
    root = run_workdir[0]
    out = tmp_path_factory.mktemp("serve") / "f32"
    _export("--workdir", root, "--format", "serving", "--out", out, "--mesh", "2x4")
    return out


def _submesh(flag: str, n: int):
    return mesh_lib.mesh_from_flag(flag, jax.devices()[:n])


def test_run_workdir_bundle(run_workdir):
    root, config, host, vocab = run_workdir
    bundle = serving.load_bundle(root, _submesh("1", 1))
    assert bundle.kind == "run" and bundle.step == 7 and bundle.llm_dir == root / "llm"
    assert bundle.model_config == config and bundle.vocab.n_image == 128
    assert bundle.vqgan_config == configs.vqgan_preset("test-tiny")
    assert bundle.vqgan_dir == root / "vqgan_run" / "vqgan"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), bundle.params, host)


@pytest.mark.parametrize("flag,n", [("1", 1), ("2x2", 4)])
def test_serving_restores_onto_another_mesh_with_the_same_logits(run_workdir, exported, flag, n):
    root, config, host, vocab = run_workdir
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["checkpoints", "config.json", "tokenizer", "vqgan"]
    assert not exported.with_name(exported.name + ".tmp").exists()
    for name in ("config.json", "params.safetensors"):  # the VQ-GAN travels byte for byte
        assert (exported / "vqgan" / name).read_bytes() == (
            root / "vqgan_run" / "vqgan" / name).read_bytes()
    # Only the params are stored: a single "params" entry in the state item.
    meta = json.loads((exported / "config.json").read_text())
    assert meta["serving"]["format"] == serving.SERVING_FORMAT and meta["serving"]["step"] == 7

    mesh = _submesh(flag, n)
    bundle = serving.load_bundle(exported, mesh)
    assert bundle.kind == "serving" and bundle.vqgan_dir == exported / "vqgan"
    kernel = bundle.params["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and len(kernel.sharding.device_set) == n
    ids = _ids(vocab)
    want = np.asarray(_forward(config)(host, ids))
    got = np.asarray(_forward(bundle.model_config)(bundle.params, ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_serving_export(run_workdir, tmp_path):
    root, config, host, vocab = run_workdir
    out = tmp_path / "bf16"
    _export("--workdir", root, "--format", "serving", "--out", out, "--param-dtype", "bfloat16")
    bundle = serving.load_bundle(out, _submesh("2x2", 4))
    assert bundle.model_config.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(bundle.params)} == {"bfloat16"}
    for a, b in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(host)):  # round to nearest
        np.testing.assert_array_equal(np.asarray(a), b.astype(jax.numpy.bfloat16))
    ids = _ids(vocab)
    want = np.asarray(_forward(config)(host, ids))
    got = np.asarray(_forward(bundle.model_config)(bundle.params, ids))
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert not np.array_equal(got, want)  # really a different (rounded) model


def test_hf_export_of_a_run_workdir(run_workdir, tmp_path):
    """`--format hf` reads a run workdir's final LLM: the written tensors are its params. (That
    an HF export loads in transformers with the same logits is tests/test_hf_interop.py's job.)"""
    from safetensors.numpy import load_file

    from llmcxr_jax.llm import hf_io, hf_mapping

    root, config, host, vocab = run_workdir
    out = tmp_path / "hf"
    _export("--workdir", root, "--format", "hf", "--out", out, "--mesh", "2x2x2")
    index = json.loads((out / hf_io.SAFETENSORS_INDEX).read_text())
    written = {}
    for shard in sorted(set(index["weight_map"].values())):
        written.update(load_file(str(out / shard)))
    expected = hf_mapping.state_dict_from_params(host, config)
    expected["embed_out.weight"] = expected.pop("lm_head.weight")
    assert set(written) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_errors_name_the_path(run_workdir, exported, tmp_path):
    root = run_workdir[0]
    with pytest.raises(serving.BundleError, match=f"{tmp_path / 'nope'} does not exist"):
        serving.locate(tmp_path / "nope")
    empty_run = tmp_path / "unfinished"
    (empty_run / "stage1").mkdir(parents=True)
    (empty_run / "config.json").write_text("{}")
    with pytest.raises(serving.BundleError, match=r"without a final LLM.*llm/config\.json"):
        serving.load_bundle(empty_run)
    with pytest.raises(serving.BundleError, match="holds no LLM"):
        serving.load_bundle(tmp_path)
    with pytest.raises(serving.BundleError, match=r"--vqgan .*no VQ-GAN"):
        serving.load_bundle(root, vqgan=tmp_path)
    with pytest.raises(serving.BundleError, match=r"step 3 not found.*\[7\]"):
        serving.load_bundle(exported, step=3, load_vqgan=False)
    llm_only = tmp_path / "llm_only"
    llm_checkpoint.save_llm(llm_only, *llm_checkpoint.load_llm(root / "llm")[:2],
                            run_workdir[3])
    bundle = serving.load_bundle(llm_only)
    assert bundle.kind == "llm" and not bundle.has_vqgan
    with pytest.raises(serving.BundleError, match=f"{llm_only} holds no VQ-GAN.*--vqgan"):
        bundle.require_vqgan("report2image decodes codes")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _export("--workdir", root, "--format", "serving", "--out", exported)
    with pytest.raises(serving.BundleError, match="--workdir"):
        _export("--workdir", tmp_path / "nope", "--format", "serving", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()
