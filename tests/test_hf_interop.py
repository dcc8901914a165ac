"""HF interop against transformers' PyTorch GPT-NeoX: import, export, round trips, clear errors.

Tiny random models (hidden 32/64, 2-3 layers) keep a real GPT-NeoX-sized vocabulary (50,277-50,304
rows) so the real tokenizer, the Dolly specials and the vocabulary growth are all exercised.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import pathlib
import shutil
import warnings

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmcxr_jax.llm import checkpoint, hf_io, hf_mapping  # noqa: E402
from llmcxr_jax.llm.model import GPTNeoX  # noqa: E402
from llmcxr_jax.parallel import mesh as mesh_lib  # noqa: E402
from llmcxr_jax.text import vocab as vocab_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NEOX_IDS = 50_277  # the GPT-NeoX-20B tokenizer's own ids
DOLLY_TEXT = 50_280  # + ### End, ### Instruction:, ### Response:\n


def _load_launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny HF model, how it is saved, and how it is imported."""

    name: str
    rows: int  # the checkpoint's embedding rows
    hidden: int
    heads: int
    layers: int
    parallel: bool
    rotary: float
    fmt: str  # safetensors | sharded | bin
    tokenizer_has_specials: bool = False  # dolly-v2's tokenizer already carries them
    resize: str = "mean_cov"
    mesh: str = "-1"
    theta: float = 10_000.0
    max_positions: int = 64


CASES = [
    # Pythia-like: 50,304 rows for 50,277 ids; the specials take padding rows.
    Case("pythia", rows=50_304, hidden=32, heads=4, layers=2, parallel=True, rotary=0.25,
         fmt="safetensors"),
    # dolly-v2-like: 50,280 ids in 50,280 rows; sequential residual; full rotary; sharded files;
    # heads/mlp/vocab also split over a tensor axis.
    Case("dolly", rows=DOLLY_TEXT, hidden=32, heads=2, layers=2, parallel=False, rotary=1.0,
         fmt="sharded", tokenizer_has_specials=True, mesh="1x4x2", theta=5_000.0),
    # Exactly the tokenizer's rows: the specials we add must grow the matrix; .bin; mean init.
    Case("tight", rows=NEOX_IDS, hidden=64, heads=8, layers=3, parallel=True, rotary=0.25,
         fmt="bin", resize="mean"),
]


def _hf_config(case: Case) -> "transformers.GPTNeoXConfig":
    return transformers.GPTNeoXConfig(
        vocab_size=case.rows, hidden_size=case.hidden, num_hidden_layers=case.layers,
        num_attention_heads=case.heads, intermediate_size=2 * case.hidden,
        rope_parameters={"rope_type": "default", "rope_theta": case.theta,
                         "partial_rotary_factor": case.rotary},
        use_parallel_residual=case.parallel, max_position_embeddings=case.max_positions,
        architectures=["GPTNeoXForCausalLM"])


def _random_hf_model(case: Case, seed: int) -> "transformers.GPTNeoXForCausalLM":
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(_hf_config(case)).eval()
    with torch.no_grad():  # non-trivial values everywhere, LayerNorm scales and biases included
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight")
                        else 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def _write_hf_dir(case: Case, model, directory: pathlib.Path, tokenizer_src: pathlib.Path) -> None:
    if case.fmt == "safetensors":
        model.save_pretrained(directory)
    elif case.fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="600KB")
    else:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / hf_io.TORCH_FILE)
    if case.tokenizer_has_specials:
        tok = vocab_lib.add_dolly_specials(vocab_lib.Tokenizer.from_file(
            str(tokenizer_src / "tokenizer.json")))
        tok.save(str(directory / "tokenizer.json"))
    else:
        shutil.copy(tokenizer_src / "tokenizer.json", directory / "tokenizer.json")


@dataclasses.dataclass
class Imported:
    case: Case
    hf_dir: pathlib.Path
    workdir: pathlib.Path
    hf_model: object
    config: object
    params: dict
    vocab: vocab_lib.Vocab


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def imported(request, tmp_path_factory, neox_tokenizer_dir) -> Imported:
    case = request.param
    root = tmp_path_factory.mktemp(case.name)
    hf_dir = root / "hf"
    model = _random_hf_model(case, seed=len(case.name))
    _write_hf_dir(case, model, hf_dir, neox_tokenizer_dir)
    if case.fmt == "sharded":
        assert (hf_dir / hf_io.SAFETENSORS_INDEX).exists()
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    workdir = root / "work"
    argv = ["--hf-dir", str(hf_dir), "--out", str(workdir), "--resize", case.resize,
            "--mesh", case.mesh]
    assert _load_launch("import_hf").main(argv) == 0
    mesh = mesh_lib.mesh_from_flag(case.mesh)
    config, params, vocab = checkpoint.load_llm(workdir, mesh=mesh)
    return Imported(case, hf_dir, workdir, model, config, params, vocab)


def _ids(rng: np.random.Generator, high: int, shape=(2, 12)) -> np.ndarray:
    return rng.integers(0, high, shape).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _jitted(config):
    return jax.jit(lambda params, ids: GPTNeoX(config).apply({"params": params}, ids))


def _ours(config, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted(config)(params, ids))


def _theirs(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_import_matches_transformers(imported: Imported):
    case, cfg, vocab = imported.case, imported.config, imported.vocab
    assert vocab.n_text == DOLLY_TEXT
    assert cfg.vocab_size == vocab.embed_rows == 51_328
    assert (cfg.num_heads, cfg.hidden_size, cfg.num_layers) == (
        case.heads, case.hidden, case.layers)
    assert (cfg.rotary_pct, cfg.use_parallel_residual, cfg.rotary_emb_base) == (
        case.rotary, case.parallel, case.theta)
    # Params really are sharded over the mesh, not parked on one device.
    qkv = imported.params["layers"]["attention"]["query_key_value"]["kernel"]
    assert len(qkv.sharding.device_set) == len(jax.devices())
    assert not qkv.sharding.is_fully_replicated

    keep = min(case.rows, vocab.n_text)  # rows that carry the checkpoint's values
    ids = _ids(np.random.default_rng(0), keep)
    ids[0, -3:] = [vocab.end_id, vocab.instruction_id, vocab.response_id] if keep > NEOX_IDS else 7
    ours = _ours(cfg, imported.params, ids)
    ref = _theirs(imported.hf_model, ids)
    assert ours.shape == ids.shape + (51_328,)
    np.testing.assert_allclose(ours[..., :keep], ref[..., :keep], atol=1e-4, rtol=0)


def test_grown_rows_follow_the_init_rule(imported: Imported):
    case, vocab = imported.case, imported.vocab
    keep = min(case.rows, vocab.n_text)
    state = imported.hf_model.state_dict()
    for hf_key, ours in (("gpt_neox.embed_in.weight",
                          imported.params["embed_in"]["embedding"]),
                         ("embed_out.weight", imported.params["embed_out"]["kernel"].T)):
        old = state[hf_key if hf_key in state else "lm_head.weight"].numpy()
        ours = np.asarray(ours)
        np.testing.assert_array_equal(ours[:keep], old[:keep])  # kept rows are untouched
        mean = old[:keep].mean(axis=0)
        new = ours[keep:]
        assert new.shape[0] == 51_328 - keep
        if case.resize == "mean":
            np.testing.assert_allclose(new, np.broadcast_to(mean, new.shape), atol=1e-6)
        else:
            # N(mean, 1e-9 cov): centred on the mean, with the old rows' spread times sqrt(1e-9).
            np.testing.assert_allclose(new.mean(axis=0), mean, atol=2e-6)
            spread = (new - mean).std(axis=0) / np.sqrt(hf_io.COVARIANCE_SCALE)
            np.testing.assert_allclose(spread, old[:keep].std(axis=0), rtol=0.15)
            assert np.abs(new - mean).max() < 1e-3


@pytest.mark.parametrize("imported", [CASES[0]], ids=[CASES[0].name], indirect=True)
def test_import_streams_each_tensor_once_into_shards(imported: Imported, monkeypatch):
    reads: dict[str, int] = {}
    original_get = hf_io.TensorReader.get

    def counting_get(self, key):
        reads[key] = reads.get(key, 0) + 1
        return original_get(self, key)

    monkeypatch.setattr(hf_io.TensorReader, "get", counting_get)
    mesh = mesh_lib.mesh_from_flag("1x4x2")
    _, params, _ = hf_io.import_hf(imported.hf_dir, mesh, progress=False)
    n_tensors = len(hf_mapping.flax_to_hf_keys(imported.config))
    assert len(reads) == n_tensors and set(reads.values()) == {1}
    # Every device holds a part of each matrix, none the whole (the layers' matrices are 3-D,
    # stacked by the scan); LayerNorms are replicated (the rules table's "vector" rule).
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        shards = leaf.addressable_shards
        assert len(shards) == 8
        name = jax.tree_util.keystr(path)
        if "layernorm" in name.lower() or "layer_norm" in name.lower():
            assert all(s.data.size == leaf.size for s in shards), name
        elif leaf.ndim >= (3 if name.startswith("['layers']") else 2):
            assert all(s.data.size < leaf.size for s in shards), name


def _export(imported: Imported, out: pathlib.Path, *extra: str) -> pathlib.Path:
    argv = ["--workdir", str(imported.workdir), "--format", "hf", "--out", str(out),
            "--max-shard-size", "300KB", "--mesh", imported.case.mesh, *extra]
    assert _load_launch("export").main(argv) == 0
    return out


@pytest.fixture(scope="module")
def exported(imported: Imported, tmp_path_factory) -> pathlib.Path:
    return _export(imported, tmp_path_factory.mktemp(imported.case.name + "_export") / "hf")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _from_pretrained_capturing(directory: pathlib.Path):
    """(model, loading info, transformers warning-level log messages, Python warnings)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.GPTNeoXForCausalLM.from_pretrained(
                directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages, [str(w.message) for w in caught]


def _weight_messages(messages: list[str]) -> list[str]:
    words = ("missing", "unexpected", "mismatch", "newly initialized", "load report")
    return [m for m in messages if any(w in m.lower() for w in words)]


def test_export_reloads_in_transformers_without_warnings(imported: Imported,
                                                          exported: pathlib.Path):
    files = sorted(p.name for p in exported.iterdir())
    assert hf_io.SAFETENSORS_INDEX in files and "config.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # 300KB shards
    assert not exported.with_name(exported.name + ".tmp").exists()

    model, info, logged, caught = _from_pretrained_capturing(exported)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert _weight_messages(logged) == [] and _weight_messages(caught) == []
    assert model.config.vocab_size == 51_328
    assert model.config.rope_parameters["partial_rotary_factor"] == imported.case.rotary

    ids = _ids(np.random.default_rng(1), imported.vocab.n_valid)  # text and image ids
    ours = _ours(imported.config, imported.params, ids)
    np.testing.assert_allclose(_theirs(model, ids), ours, atol=1e-4, rtol=0)


def test_weights_round_trip_exactly(imported: Imported, exported: pathlib.Path, tmp_path):
    index = json.loads((exported / hf_io.SAFETENSORS_INDEX).read_text())
    expected = hf_mapping.state_dict_from_params(
        jax.tree.map(np.asarray, imported.params), imported.config)
    expected["embed_out.weight"] = expected.pop("lm_head.weight")  # the name transformers writes
    assert set(index["weight_map"]) == set(expected)
    written = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(exported / shard), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
            written.update({k: f.get_tensor(k) for k in f.keys()})
    for key, value in expected.items():
        assert written[key].dtype == np.float32
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    # Against the original HF tensors: everything but the vocabulary matrices is bit-identical.
    original = {k: v.numpy() for k, v in imported.hf_model.state_dict().items()}
    original["embed_out.weight"] = original.pop("lm_head.weight")
    keep = min(imported.case.rows, imported.vocab.n_text)
    for key, value in original.items():
        if key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            np.testing.assert_array_equal(written[key][:keep], value[:keep], err_msg=key)
        else:
            np.testing.assert_array_equal(written[key], value, err_msg=key)

    # Export -> import keeps every row, image rows included (llmcxr_vocab.json travels along).
    mesh = mesh_lib.mesh_from_flag(imported.case.mesh)
    config, params, vocab = hf_io.import_hf(exported, mesh, progress=False)
    assert config == imported.config and vocab.n_image == imported.vocab.n_image
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, imported.params)


def test_exported_tokenizer_round_trip(imported: Imported, exported: pathlib.Path):
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert tok.convert_tokens_to_ids(list(vocab_lib.DOLLY_SPECIALS)) == [50277, 50278, 50279]
    text = ("### Instruction:\nDescribe the chest X-ray.\n\n### Response:\n"
            "No acute cardiopulmonary process.  Mild cardiomegaly.\n### End")
    ours = imported.vocab.encode(text)
    assert tok(text, add_special_tokens=False).input_ids == ours
    assert tok.decode(ours) == text
    assert tok.eos_token_id == 0 and tok.model_max_length == imported.config.max_position_embeddings


@pytest.mark.parametrize("imported", [CASES[0]], ids=[CASES[0].name], indirect=True)
def test_bf16_export_loads(imported: Imported, tmp_path):
    out = _export(imported, tmp_path / "bf16", "--param-dtype", "bfloat16")
    model, info, logged, _ = _from_pretrained_capturing(out)
    assert model.dtype == torch.bfloat16 and _weight_messages(logged) == []
    ids = _ids(np.random.default_rng(2), imported.vocab.n_valid)
    ours = _ours(imported.config, imported.params, ids)
    ref = _theirs(model.float(), ids)
    assert np.abs(ref - ours).max() < 0.05 * np.abs(ours).max()


# --------------------------------------------------------------------------------------------------
# Behaviour of the checks themselves, and clear errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("imported", [CASES[0]], ids=[CASES[0].name], indirect=True)
def test_warning_capture_detects_an_unexpected_weight(imported: Imported, exported: pathlib.Path,
                                                      tmp_path):
    """The no-warning assertion above can fail: an extra tensor is reported."""
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    save_file({"gpt_neox.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)},
              str(bad / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((bad / hf_io.SAFETENSORS_INDEX).read_text())
    index["weight_map"]["gpt_neox.layers.0.mlp.extra.weight"] = "extra.safetensors"
    (bad / hf_io.SAFETENSORS_INDEX).write_text(json.dumps(index))
    _, info, logged, caught = _from_pretrained_capturing(bad)
    assert info["unexpected_keys"]
    assert _weight_messages(logged) + _weight_messages(caught)


def _tiny_dir(tmp_path: pathlib.Path, neox_tokenizer_dir, rows: int = 50_304, **overrides):
    """A small GPT-NeoX directory written without torch: config.json, safetensors, tokenizer."""
    case = Case("x", rows=rows, hidden=8, heads=2, layers=1, parallel=True, rotary=0.25,
                fmt="safetensors")
    hf = _hf_config(case).to_dict()
    hf.update(overrides)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    from llmcxr_jax.configs import ModelConfig

    cfg = ModelConfig(vocab_size=rows, hidden_size=8, num_layers=1, num_heads=2,
                      intermediate_size=16)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          jax.eval_shape(lambda: _init(cfg)))
    save_file(hf_mapping.state_dict_from_params(params, cfg), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(neox_tokenizer_dir / "tokenizer.json", d / "tokenizer.json")
    return d


def _init(cfg):
    from llmcxr_jax.llm.model import init_params

    return init_params(cfg, jax.random.key(0))


def _mesh():
    return mesh_lib.mesh_from_flag("-1")


def test_error_other_architecture(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir, architectures=["LlamaForCausalLM"],
                  model_type="llama")
    with pytest.raises(hf_io.HFCheckpointError, match=r"LlamaForCausalLM.*not GPT-NeoX"):
        hf_io.import_hf(d, _mesh(), progress=False)


@pytest.mark.parametrize("field, value, match", [
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type"),
])
def test_error_unsupported_config(field, value, match):
    hf = _hf_config(CASES[0]).to_dict()
    hf[field] = value
    with pytest.raises(hf_io.HFCheckpointError, match=match):
        hf_io.model_config_from_hf(hf, "some/config.json")


def test_legacy_rotary_keys_are_read():
    hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 100,
          "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "rotary_pct": 0.5, "rotary_emb_base": 5000,
          "use_parallel_residual": False}
    cfg = hf_io.model_config_from_hf(hf)
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.use_parallel_residual) == (0.5, 5000.0, False)


@pytest.mark.parametrize("imported", [CASES[1]], ids=[CASES[1].name], indirect=True)
def test_error_missing_shard(imported: Imported, tmp_path):
    assert imported.case.fmt == "sharded"
    bad = tmp_path / "hf"
    shutil.copytree(imported.hf_dir, bad)
    index = json.loads((bad / hf_io.SAFETENSORS_INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (bad / victim).unlink()
    with pytest.raises(hf_io.HFCheckpointError, match=rf"names shard '{victim}'.*does not exist"):
        hf_io.import_hf(bad, _mesh(), progress=False)


def test_error_corrupt_safetensors_header(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\x00not json at all, truncated....."
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(hf_io.HFCheckpointError, match=r"model\.safetensors: not a readable"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_error_unreadable_torch_bin(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir)
    (d / "model.safetensors").unlink()
    (d / hf_io.TORCH_FILE).write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(hf_io.HFCheckpointError, match=r"pytorch_model\.bin: cannot be read with "
                                                      r"torch\.load\(weights_only=True\)"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_error_missing_tensor(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir)
    with safe_open(str(d / "model.safetensors"), "numpy") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "dense_4h_to_h.bias" not in k}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf_io.HFCheckpointError, match=r"missing.*dense_4h_to_h\.bias"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_error_shape_disagrees_with_config(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir)
    hf = json.loads((d / "config.json").read_text())
    hf["intermediate_size"] = 24
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(hf_io.HFCheckpointError,
                       match=r"mlp\.dense_(4h_to_h|h_to_4h)\.weight has shape \[\d+, \d+\] but "
                             r"config\.json implies \[(24, 8|8, 24)\]"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_error_tokenizer_larger_than_checkpoint(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir, rows=50_000)
    with pytest.raises(hf_io.HFCheckpointError,
                       match=r"50277 token ids.*only 50000 embedding rows"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_tokenizer_with_dolly_specials_past_the_rows_is_refused(tmp_path, neox_tokenizer_dir):
    """Only the specials we add ourselves may grow the matrix; a tokenizer that brings its own ids
    past the checkpoint's rows does not belong to it."""
    d = _tiny_dir(tmp_path, neox_tokenizer_dir, rows=NEOX_IDS)
    vocab_lib.add_dolly_specials(vocab_lib.Tokenizer.from_file(str(d / "tokenizer.json"))).save(
        str(d / "tokenizer.json"))
    with pytest.raises(hf_io.HFCheckpointError, match=r"50280 token ids.*only 50277"):
        hf_io.import_hf(d, _mesh(), progress=False)


def test_import_refuses_to_overwrite(tmp_path, neox_tokenizer_dir):
    d = _tiny_dir(tmp_path, neox_tokenizer_dir)
    out = tmp_path / "work"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        _load_launch("import_hf").main(["--hf-dir", str(d), "--out", str(out)])
    assert (out / "keep.txt").exists() and not out.with_name("work.tmp").exists()


def test_parse_size_and_plan_shards():
    assert hf_io.parse_size("2GB") == 2 * 10**9 and hf_io.parse_size("1GiB") == 2**30
    assert hf_io.parse_size("300KB") == 300_000 and hf_io.parse_size("123") == 123
    with pytest.raises(ValueError, match="not like"):
        hf_io.parse_size("2 gigs")
    assert hf_io.plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [
        ["a", "b"], ["c"], ["d"]]
