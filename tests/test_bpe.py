"""Training the small byte-level BPE of the tiny presets: layout, determinism, save/load."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from llmcxr_jax import configs
from llmcxr_jax.text import bpe
from llmcxr_jax.text import vocab as V

REPO = pathlib.Path(__file__).resolve().parents[1]

HELD_OUT = ["Mild cardiomegaly with small bilateral pleural effusions; no pneumothorax.",
            "Unicode survives: café, 5×5 mm, ≥ 2 cm, naïve — “quoted”.",
            "Tabs\tand  double  spaces\n\nand newlines", ""]


def _rich_corpus(n_texts: int = 600, seed: int = 0) -> list[str]:
    """Pseudo-words from a syllable inventory: enough distinct pairs for > 2,000 merges."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(3000)]
    return [" ".join(rng.choice(lexicon, size=40)) + "." for _ in range(n_texts)]


@pytest.fixture(scope="module")
def rich():
    return _rich_corpus()


@pytest.fixture(scope="module")
def trained(rich):
    return bpe.train_bpe(rich)


def test_layout_is_gpt_neox_like_with_exactly_2048_text_ids(trained):
    tok = trained.tokenizer
    assert trained.n_text == 2048 == tok.get_vocab_size()
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|padding|>")) == (0, 1)
    assert (trained.end_id, trained.instruction_id, trained.response_id) == (2045, 2046, 2047)
    assert not any(t.startswith("<|reserved_") for t in tok.get_vocab())  # all ids learned
    assert trained.embed_rows == configs.model_preset("tiny").vocab_size == 3072
    assert trained.image_ids([0, 1023]).tolist() == [2048, 3071]


def test_small_corpus_is_topped_up_with_reserved_ids():
    small = bpe.train_bpe(["no pleural effusion"] * 3, include_prompt_text=False)
    vocab = small.tokenizer.get_vocab()
    assert small.n_text == 2048 and small.response_id == 2047
    reserved = sorted(i for t, i in vocab.items() if t.startswith("<|reserved_"))
    assert reserved == list(range(reserved[0], 2045))  # contiguous, right before the specials
    assert small.decode(small.encode("no pleural effusion")) == "no pleural effusion"


def test_round_trip_text_and_prompt_text_is_compact(trained):
    for text in HELD_OUT:
        assert trained.decode(trained.encode(text)) == text
    # The prompt text is in the corpus by default, so its words are single tokens.
    assert len(trained.encode(" radiology")) == 1 and len(trained.encode(" chest")) == 1


def test_deterministic(rich, trained, tmp_path):
    again = bpe.train_bpe(list(reversed(rich)))  # same corpus, other order
    assert again.tokenizer.to_str() == trained.tokenizer.to_str()
    # Another process (another hash seed) learns the same tokenizer.
    (tmp_path / "corpus.json").write_text(json.dumps(rich))
    code = ("import json, sys; from llmcxr_jax.text import bpe; "
            "print(bpe.train_bpe(json.load(open(sys.argv[1]))).tokenizer.to_str())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus.json")],
                         capture_output=True, text=True, check=True, cwd=str(REPO))
    assert out.stdout.strip() == trained.tokenizer.to_str()


def test_save_load_identical(trained, tmp_path):
    trained.save(tmp_path)
    loaded = V.Vocab.load(tmp_path)
    assert (loaded.n_text, loaded.n_image, loaded.embed_rows) == (2048, 1024, 3072)
    assert loaded.tokenizer.to_str() == trained.tokenizer.to_str()
    texts = HELD_OUT + ["### Instruction:\nx\n\n### Response:\ny\n\n### End"]
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    # Reference: transformers reads the saved file and agrees on every id.
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == trained.encode(text)
    assert json.loads((tmp_path / V.VOCAB_META_FILE).read_text())["specials"] == {
        "### End": 2045, "### Instruction:": 2046, "### Response:\n": 2047}


def test_corpus_reader_and_launch_script(tmp_path, rich):
    reports = tmp_path / "corpus" / "reports" / "p10"
    reports.mkdir(parents=True)
    for i, text in enumerate(rich[:50]):
        (reports / f"s{i}.txt").write_text(text)
    (tmp_path / "corpus" / "dolly.jsonl").write_text(
        json.dumps({"instruction": "Sort 3 1 2.", "context": "", "response": "1 2 3"}) + "\n"
        + "this line is not json\n" + json.dumps([1, 2]) + "\n\n")
    stats = bpe.CorpusStats()
    texts = list(bpe.iter_corpus_texts([tmp_path / "corpus"], stats=stats))
    assert (stats.files, stats.texts, stats.bad_lines) == (51, 52, 2)
    assert "Sort 3 1 2." in texts and "1 2 3" in texts and "" not in texts
    with pytest.raises(FileNotFoundError, match="missing"):
        list(bpe.iter_corpus_texts([tmp_path / "missing"]))

    out = tmp_path / "tok"
    subprocess.run([sys.executable, "launch/train_tokenizer.py", "--corpus", str(tmp_path / "corpus"),
                    "--out", str(out), "--vocab-size", "1024"], check=True, cwd=str(REPO),
                   capture_output=True)
    loaded = V.Vocab.load(out)
    assert loaded.n_text == 1024 and loaded.response_id == 1023
    assert loaded.decode(loaded.encode(rich[0])) == rich[0]


def test_too_small_vocab_size_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        bpe.train_bpe(["x"], vocab_size=100)
