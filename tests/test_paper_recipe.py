"""The paper's recipe (the `dolly-v2-3b` run preset) end to end in miniature, as a user runs it.

A tiny random GPT-NeoX saved with transformers (the real GPT-NeoX-20B tokenizer plus dolly-v2's
three special tokens, added the way dolly-v2 added them) -> launch/import_hf.py; a taming-format
VQ-GAN checkpoint -> launch/import_taming.py; a phantom world in MIMIC-CXR-JPG layout ->
launch/encode_images.py -> launch/train.py --config dolly-v2-3b (its init_from and vqgan_dir, the
real-data flags, scaled down by --set) -> launch/export.py --format hf. Each launcher runs in a
subprocess from the directory holding `workdir/`, like the README's commands. The run must train
under the imported model's own ids (not a BPE of the same size trained on the data), start from
its weights, and export a model transformers loads; a given tokenizer that differs from the
imported one is a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("taming.modules.diffusionmodules.model")

import test_hf_interop as hf_cases  # noqa: E402
import test_taming_import as taming_cases  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from llmcxr_jax.data.phantom_world import WorldConfig, write_world  # noqa: E402
from llmcxr_jax.text import vocab as vocab_lib  # noqa: E402
from llmcxr_jax.train import run as run_lib  # noqa: E402
from llmcxr_jax.train import run_config as rc  # noqa: E402
from xla_flags import xla_flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SENTENCE = "Moderate left pleural effusion. No pneumothorax."
# A dolly-v2-shaped model (50,280 rows = 50,277 GPT-NeoX ids + 3 dolly specials, parallel
# residual, rotary on a quarter of each head), 2 layers of width 32.
MODEL = hf_cases.Case("dolly-tiny", rows=50_280, hidden=32, heads=4, layers=2, parallel=True,
                      rotary=0.25, fmt="safetensors", max_positions=512)
N_CODES = taming_cases.CONFIG.n_embed  # the test-tiny VQ-GAN: 128 codes, 8 x 8 per image
SCALE_DOWN = ("--mesh=-1", "--set", "model.hidden_size=32", "--set", "model.num_layers=2",
              "--set", "model.num_heads=4", "--set", "model.intermediate_size=64",
              "--set", "model.max_position_embeddings=512", "--set", "model.dtype=float32",
              "--set", "train.global_batch=2", "--set", "train.seq_len=512",
              "--set", "stage1.steps=3", "--set", "stage2.steps=2", "--set", "samples=0")


def _launch(script: str, *argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """launch/<script>.py in a subprocess, with the launchers' own device split (not conftest's
    8 simulated devices)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    return subprocess.run([sys.executable, str(REPO / "launch" / f"{script}.py"), *argv],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _hf_tokenizer(neox_tokenizer_dir: pathlib.Path):
    """The GPT-NeoX-20B tokenizer with dolly-v2's specials added by transformers, as dolly-v2's
    training code does (`add_special_tokens({"additional_special_tokens": [...]})`)."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(neox_tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|padding|>")
    tok.add_special_tokens({"additional_special_tokens": ["### End", "### Instruction:",
                                                         "### Response:\n"]})
    assert len(tok) == MODEL.rows
    return tok


@dataclasses.dataclass(frozen=True)
class Recipe:
    root: pathlib.Path  # the user's directory: workdir/, hf/, world/, codes/
    hf_dir: pathlib.Path
    hf_model: object
    world: pathlib.Path
    codes: pathlib.Path
    train_log: str

    @property
    def imported(self) -> pathlib.Path:
        return self.root / rc.run_preset("dolly-v2-3b").init_from

    @property
    def run(self) -> pathlib.Path:
        return self.root / "workdir" / "dolly-v2-3b"  # launch/train.py's default --workdir

    def data_flags(self) -> tuple[str, ...]:
        return ("--set", f"data.world={self.world}", "--set", f"data.codes={self.codes}",
                "--set", f"data.instructions={self.world / 'instructions.jsonl'}")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, neox_tokenizer_dir) -> Recipe:
    root = tmp_path_factory.mktemp("paper_recipe")
    preset = rc.run_preset("dolly-v2-3b")
    hf_dir = root / "hf"
    model = hf_cases._random_hf_model(MODEL, seed=0)
    model.save_pretrained(hf_dir)
    _hf_tokenizer(neox_tokenizer_dir).save_pretrained(hf_dir)
    _ok(_launch("import_hf", "--hf-dir", str(hf_dir), "--out", preset.init_from,
                "--n-image", str(N_CODES), cwd=root))

    (root / "taming").mkdir()
    _, ckpt, project_yaml = taming_cases.write_reference(root / "taming")
    vqgan = pathlib.Path(preset.vqgan_dir)
    _ok(_launch("import_taming", "--ckpt", str(ckpt), "--yaml", str(project_yaml),
                "--out", str(vqgan.parent), "--subdir", vqgan.name, cwd=root))

    world = root / "mimic-cxr-jpg"
    write_world(world, WorldConfig(n_studies=24, size=64, seed=0, n_instructions=40), workers=1,
                progress=False)
    codes = root / "codes"
    _ok(_launch("encode_images", "--vqgan", preset.vqgan_dir, "--images", str(world / "files"),
                "--out", str(codes), "--no-progress", cwd=root))

    recipe = Recipe(root, hf_dir, model, world, codes, train_log="")
    log = _ok(_launch("train", "--config", "dolly-v2-3b", *recipe.data_flags(), *SCALE_DOWN,
                      cwd=root))
    return dataclasses.replace(recipe, train_log=log)


def test_run_trains_under_the_imported_tokenizer(recipe: Recipe):
    reference = transformers.AutoTokenizer.from_pretrained(recipe.hf_dir)
    expected = reference(SENTENCE, add_special_tokens=False)["input_ids"]
    assert "tokenizer: the imported LLM's own" in recipe.train_log
    for directory in (recipe.run / "tokenizer", recipe.run / "llm" / "tokenizer"):
        vocab = vocab_lib.Vocab.load(directory)
        assert vocab.encode(SENTENCE) == expected
        assert (vocab.end_id, vocab.instruction_id, vocab.response_id) == tuple(
            reference.convert_tokens_to_ids(["### End", "### Instruction:", "### Response:\n"]))
        assert (vocab.n_text, vocab.n_image) == (MODEL.rows, N_CODES)
    for stage in ("stage1", "stage2"):
        assert json.loads((recipe.run / stage / "DONE.json").read_text())["step"] > 0


def test_export_loads_in_transformers_with_the_imported_weights_and_ids(recipe: Recipe):
    out = recipe.root / "export"
    _ok(_launch("export", "--workdir", str(recipe.run), "--format", "hf", "--out", str(out),
                cwd=recipe.root))
    model, info = transformers.GPTNeoXForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.vocab_size == vocab_lib.Vocab.load(recipe.run / "llm" / "tokenizer").embed_rows
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoTokenizer.from_pretrained(recipe.hf_dir)
    assert (exported_tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
            == reference(SENTENCE, add_special_tokens=False)["input_ids"])

    # Stage 1 started from the imported weights: after 5 steps at lr <= 5e-6 every tensor is
    # within 1e-3 of the HF model's (random init would be ~0.2 away), and training moved them.
    original = {k: v.numpy() for k, v in recipe.hf_model.state_dict().items()}
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    drift = np.abs(exported[name] - original[name]).max()
    assert 0 < drift < 1e-3, drift
    text_rows = np.abs(exported["gpt_neox.embed_in.weight"][:MODEL.rows]
                       - original["gpt_neox.embed_in.weight"]).max()
    assert text_rows < 1e-3, text_rows


def test_a_different_tokenizer_is_a_one_line_error(recipe: Recipe, neox_tokenizer_dir):
    # Same size, different content: two GPT-NeoX tokens swap ids.
    data = json.loads((neox_tokenizer_dir / "tokenizer.json").read_text())
    ids = data["model"]["vocab"]
    ids["Ġleft"], ids["Ġright"] = ids["Ġright"], ids["Ġleft"]
    swapped = recipe.root / "swapped"
    swapped.mkdir()
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    result = _launch("train", "--config", "dolly-v2-3b", "--workdir", "workdir/other",
                     *recipe.data_flags(), *SCALE_DOWN, "--set", f"tokenizer={swapped}",
                     cwd=recipe.root)
    assert result.returncode == 1, result.stderr[-3000:]  # well-formed, cannot run: exit 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert str(swapped) in lines[0] and rc.run_preset("dolly-v2-3b").init_from in lines[0]
    assert "'Ġleft'" in lines[0] or "'Ġright'" in lines[0]


def test_the_imported_tokenizer_itself_may_be_given(recipe: Recipe, neox_tokenizer_dir):
    """`--set tokenizer=` the GPT-NeoX-20B tokenizer the model was saved with is accepted
    (the Dolly specials are added to it the same way), and the imported vocabulary is used."""
    cfg = dataclasses.replace(rc.run_preset("dolly-v2-3b"), tokenizer=str(neox_tokenizer_dir),
                              init_from=str(recipe.imported))
    vocab = run_lib.imported_vocab(cfg, N_CODES)
    assert vocab.encode(SENTENCE) == vocab_lib.load_vocab(neox_tokenizer_dir).encode(SENTENCE)
    with pytest.raises(run_lib.SetupError, match="--n-image 1024"):
        run_lib.imported_vocab(cfg, 1024)
