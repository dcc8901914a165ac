"""The joint text + image vocabulary against the real GPT-NeoX-20B tokenizer and transformers."""

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from llmcxr_jax import configs
from llmcxr_jax.text import vocab as V

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\nGenerate free-text radiology reports for the "
          "entered chest X-ray images.\n\nInput:\n<image>\n\n### Response:\nNo acute "
          "cardiopulmonary process. Café-au-lait 5×5 mm.\n\n### End")


@pytest.fixture(scope="module")
def vocab(neox_tokenizer_dir):
    return V.load_vocab(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_ref(neox_tokenizer_dir):
    """transformers' tokenizer with the specials added the way dolly-v2's trainer does."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": list(V.DOLLY_SPECIALS)})
    return tok


def test_dolly_special_ids(vocab, hf_ref):
    assert (vocab.end_id, vocab.instruction_id, vocab.response_id) == (50277, 50278, 50279)
    assert [hf_ref.convert_tokens_to_ids(t) for t in V.DOLLY_SPECIALS] == [50277, 50278, 50279]
    assert vocab.n_text == len(hf_ref) == 50280 == configs.DOLLY_TEXT_IDS
    assert (vocab.eos_id, vocab.pad_id) == (0, 1)
    assert vocab.encode(V.RESPONSE_KEY_NL) == [50279]
    assert vocab.encode(V.RESPONSE_KEY) != [50279]  # without its newline it is ordinary text


def test_encoding_matches_transformers(vocab, hf_ref):
    assert vocab.encode("Hello world") == [12092, 1533]  # well-known GPT-NeoX ids
    for text in (PROMPT, "Hello world", "  two spaces\tand a tab\n\n\nthree newlines"):
        assert vocab.encode(text) == hf_ref.encode(text, add_special_tokens=False)
    ids = vocab.encode(PROMPT)
    assert ids.count(50278) == ids.count(50279) == ids.count(50277) == 1
    assert vocab.decode(ids) == hf_ref.decode(ids) == PROMPT
    assert vocab.encode_batch([PROMPT, "Hello world"]) == [ids, [12092, 1533]]


def test_layout(vocab):
    assert vocab.image_offset == 50280
    assert vocab.embed_rows == 51328 == configs.extended_vocab_rows()
    mask = vocab.valid_token_mask()
    assert mask.shape == (51328,) and mask.dtype == bool
    assert mask[:51304].all() and not mask[51304:].any()
    assert vocab.image_token_mask().sum() == 1024 and vocab.image_token_mask()[50280]
    assert vocab.text_token_mask().sum() == 50280
    assert vocab.is_image_id(50280) and vocab.is_image_id(51303)
    assert not vocab.is_image_id(50279) and not vocab.is_image_id(51304)
    np.testing.assert_array_equal(vocab.is_image_id([0, 50280, 51304]), [False, True, False])


def test_load_is_idempotent_and_saved_vocab_round_trips(vocab, tmp_path):
    vocab.save(tmp_path)
    assert json.loads((tmp_path / V.VOCAB_META_FILE).read_text())["n_text"] == 50280
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        again = V.Vocab.load(path)
        assert again.n_text == 50280 and again.response_id == 50279
        assert again.encode(PROMPT) == vocab.encode(PROMPT)
    # Loading the saved tokenizer.json as a plain tokenizer must not add the specials twice.
    assert V.load_vocab(tmp_path / "tokenizer.json").n_text == 50280
    with pytest.raises(ValueError, match="n_image=1024"):
        V.Vocab.load(tmp_path, n_image=512)


def _tokenizer_with(neox_tokenizer_dir, tmp_path, tokens):
    tok = Tokenizer.from_file(str(neox_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_released_dolly_layout_gives_llmcxr_offset(neox_tokenizer_dir, tmp_path):
    """A tokenizer with dolly-v2's released keys (`### Response:` without newline) gets
    `### Response:\\n` appended: image ids then start at 50281, LLM-CXR's CXR_VQ_TOKENIZER_LEN."""
    d = _tokenizer_with(neox_tokenizer_dir, tmp_path, ["### End", "### Instruction:", "### Response:"])
    v = V.load_vocab(d)
    assert (v.end_id, v.instruction_id, v.response_id) == (50277, 50278, 50280)
    assert v.n_text == v.image_offset == 50281


def test_extra_added_tokens_stay_text(neox_tokenizer_dir, tmp_path):
    d = _tokenizer_with(neox_tokenizer_dir, tmp_path, list(V.DOLLY_SPECIALS) + ["<extra>"])
    v = V.load_vocab(d)
    assert (v.end_id, v.response_id, v.n_text) == (50277, 50279, 50281)
    assert v.image_ids([0])[0] == 50281


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        V.load_vocab(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        V.load_vocab(tmp_path)


def test_placeholder_injection_matches_llmcxr(vocab, hf_ref):
    codes = np.random.default_rng(0).integers(0, 1024, size=256)
    ids = vocab.ids_with_image(PROMPT, codes, expected=256)
    # Reference: LLM-CXR's inject_vq on transformers' tokenisation of the whole text.
    ref = hf_ref.encode(PROMPT, add_special_tokens=False)
    pattern = hf_ref.encode(V.IMAGE_PLACEHOLDER, add_special_tokens=False)
    assert pattern == [29, 5695, 31]  # "<", "image", ">"
    i = next(k for k in range(len(ref)) if ref[k:k + 3] == pattern)
    shifted = [int(c) + 50280 for c in codes]
    assert ids == ref[:i] + shifted + ref[i + 3:]
    bracketed = V.Vocab(vocab.tokenizer, vocab.n_text, image_brackets=True)
    assert bracketed.ids_with_image(PROMPT, codes) == ref[:i + 1] + shifted + ref[i + 2:]
    # Extraction round trip, and decoding drops the image ids.
    np.testing.assert_array_equal(vocab.codes_from_ids(ids, expected=256), codes)
    assert vocab.decode(ids) == PROMPT.replace(V.IMAGE_PLACEHOLDER, "")
    assert vocab.decode(ids, skip_image=False) == PROMPT
    assert vocab.decode(ids + [51304, 51327]) == vocab.decode(ids)  # padding rows dropped
    assert vocab.decode(np.asarray(ids)) == vocab.decode(ids)


def test_placeholder_merged_with_neighbours(vocab):
    ids = vocab.ids_with_image("see <image>.", [7, 8])
    assert ids == vocab.encode("see ") + [50287, 50288] + vocab.encode(".")


def test_after_response_extraction(vocab):
    prompt_codes, out_codes = [1, 2, 3], [1023, 0]
    seq = vocab.ids_with_image("Input:\n<image>\n\n### Response:\n", prompt_codes)
    seq += vocab.image_ids(out_codes).tolist() + vocab.encode("\n\n### End")
    np.testing.assert_array_equal(vocab.codes_from_ids(seq), prompt_codes + out_codes)
    np.testing.assert_array_equal(vocab.codes_from_ids(seq, after_response=True), out_codes)
    with pytest.raises(ValueError, match="Response"):
        vocab.codes_from_ids(vocab.encode("no key"), after_response=True)


@pytest.mark.parametrize("codes, message", [
    ([5, -1, 3], r"image code -1 at position 1 is outside \[0, 1024\)"),
    ([0, 1024], r"image code 1024 at position 1 is outside \[0, 1024\)"),
    ([0.5, 1.0], "integers"),
    ([[1, 2]], "1-D"),
])
def test_bad_codes(vocab, codes, message):
    with pytest.raises(ValueError, match=message):
        vocab.image_ids(codes)
    with pytest.raises(ValueError, match=message):
        vocab.ids_with_image("x <image> y", codes)


def test_wrong_counts(vocab):
    with pytest.raises(ValueError, match="expected 256 image codes, got 255"):
        vocab.ids_with_image(PROMPT, np.zeros(255, np.int64), expected=256)
    ids = vocab.ids_with_image(PROMPT, np.zeros(255, np.int64))
    with pytest.raises(ValueError, match="expected 256 image tokens, found 255"):
        vocab.codes_from_ids(ids, expected=256)
    for text, n in (("no placeholder", 0), ("<image> and <image>", 2)):
        with pytest.raises(ValueError, match=f"exactly one '<image>' placeholder.*found {n}"):
            vocab.ids_with_image(text, [0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.codes_from_ids([50280, 51310])
    with pytest.raises(ValueError, match="negative token id -3 at position 0"):
        vocab.decode([-3])


def test_to_transformers(vocab):
    tok = vocab.to_transformers()
    assert tok.encode(PROMPT, add_special_tokens=False) == vocab.encode(PROMPT)
    assert tok.convert_tokens_to_ids(list(V.DOLLY_SPECIALS)) == [50277, 50278, 50279]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1 and len(tok) == 50280
