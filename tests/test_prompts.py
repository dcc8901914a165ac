"""Dolly prompt formats, LLM-CXR examples and their loss masks, with the real GPT-NeoX tokenizer."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from llmcxr_jax.data.labeler import label_report
from llmcxr_jax.text import prompts as P
from llmcxr_jax.text import vocab as V
from llmcxr_jax.text.bpe import train_bpe

REPORT = ("The heart size is normal. There is a small left pleural effusion. No pneumothorax.")
CODES = np.random.default_rng(1).integers(0, 1024, size=256)


@pytest.fixture(scope="module")
def vocab(neox_tokenizer_dir):
    return V.load_vocab(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_ref(neox_tokenizer_dir):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens({"additional_special_tokens": list(V.DOLLY_SPECIALS)})
    return tok


def test_dolly_formats_are_dolly_v2s():
    blurb = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.")
    assert P.format_prompt("Do X.", "ctx", "resp") == (
        f"{blurb}\n\n### Instruction:\nDo X.\n\nInput:\nctx\n\n### Response:\nresp\n\n### End")
    assert P.format_prompt("Do X.", None, "resp") == (
        f"{blurb}\n\n### Instruction:\nDo X.\n\n### Response:\nresp\n\n### End")
    assert P.format_prompt("Do X.", "ctx") == (
        f"{blurb}\n\n### Instruction:\nDo X.\n\nInput:\nctx\n\n### Response:\n")
    assert P.format_prompt("Do X.", "") == f"{blurb}\n\n### Instruction:\nDo X.\n\n### Response:\n"


def test_ten_distinct_phrasings_each_way():
    for table in (P.REPORT_TO_IMAGE_INSTRUCTIONS, P.IMAGE_TO_REPORT_INSTRUCTIONS):
        assert len(table) == len(set(table)) == 10
    assert all("image" in s and "report" in s for s in P.REPORT_TO_IMAGE_INSTRUCTIONS)
    rng = np.random.default_rng(0)
    drawn = {P.pick_instruction(P.IMAGE_TO_REPORT_INSTRUCTIONS, rng) for _ in range(200)}
    assert drawn == set(P.IMAGE_TO_REPORT_INSTRUCTIONS)
    with pytest.raises(ValueError, match="phrasing index 10"):
        P.pick_instruction(P.IMAGE_TO_REPORT_INSTRUCTIONS, 10)


def _check_mask(vocab, ex):
    ids, mask = ex.ids, ex.loss_mask
    assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
    r = int(np.flatnonzero(ids == vocab.response_id)[0])
    ones = np.flatnonzero(mask)
    assert ones[0] == r + 1  # first weighted token: right after `### Response:\n`
    assert ids[ones[-1]] == vocab.end_id and ones[-1] == len(ids) - 1  # last: `### End`
    assert mask[:r + 1].sum() == 0 and mask[r + 1:].all()
    return r


def test_report_to_image_example(vocab, hf_ref):
    ex = P.report_to_image_example(vocab, REPORT, CODES, phrasing=3, n_codes=256)
    assert ex.task == "report2image"
    r = _check_mask(vocab, ex)
    np.testing.assert_array_equal(ex.ids[r + 1:r + 257], CODES + 50280)  # response = the image
    assert vocab.decode(ex.ids[r + 257:]) == "\n\n### End"
    np.testing.assert_array_equal(vocab.codes_from_ids(ex.ids, 256, after_response=True), CODES)
    # The text part is transformers' tokenisation of the dolly-v2 training text.
    text = P.PROMPT_WITH_INPUT_FORMAT.format(instruction=P.REPORT_TO_IMAGE_INSTRUCTIONS[3],
                                             input=REPORT, response="<image>")
    ref = hf_ref.encode(text, add_special_tokens=False)
    assert ex.ids[:r + 1].tolist() == ref[:r + 1]
    # The inference prompt is exactly the example's prefix through `### Response:\n`.
    assert P.report_to_image_prompt_ids(vocab, REPORT, phrasing=3) == ex.ids[:r + 1].tolist()


def test_image_to_report_example(vocab):
    ex = P.image_to_report_example(vocab, CODES, REPORT, phrasing=np.random.default_rng(5))
    r = _check_mask(vocab, ex)
    assert vocab.decode(ex.ids[r + 1:]) == REPORT + "\n\n### End"
    np.testing.assert_array_equal(vocab.codes_from_ids(ex.ids[:r]), CODES)
    assert vocab.codes_from_ids(ex.ids, after_response=True).size == 0
    instruction = vocab.decode(ex.ids[:r]).split("### Instruction:\n")[1].split("\n\n")[0]
    assert instruction in P.IMAGE_TO_REPORT_INSTRUCTIONS
    idx = P.IMAGE_TO_REPORT_INSTRUCTIONS.index(instruction)
    assert P.image_to_report_prompt_ids(vocab, CODES, idx) == ex.ids[:r + 1].tolist()


def test_vqa_and_instruction_examples(vocab, hf_ref):
    ex = P.vqa_example(vocab, CODES, "Is there a pleural effusion?", "Yes, a small left one.")
    r = _check_mask(vocab, ex)
    assert ex.task == "vqa" and vocab.decode(ex.ids[r + 1:]) == "Yes, a small left one.\n\n### End"
    assert P.vqa_prompt_ids(vocab, CODES, "Is there a pleural effusion?") == ex.ids[:r + 1].tolist()

    for context in ("Some context.", "", None):
        ex = P.instruction_example(vocab, "Add 2 and 3.", context, "5")
        r = _check_mask(vocab, ex)
        text = P.format_prompt("Add 2 and 3.", context, "5")
        assert ex.ids.tolist() == hf_ref.encode(text, add_special_tokens=False)
        assert ("Input:" in vocab.decode(ex.ids)) == bool(context)
        assert P.instruction_prompt_ids(vocab, "Add 2 and 3.", context) == ex.ids[:r + 1].tolist()
        assert P.prompt_ids(vocab, "Add 2 and 3.", context) == ex.ids[:r + 1].tolist()


def test_build_example_dispatch_and_errors(vocab):
    rec = {"report": REPORT, "codes": CODES, "question": "Q?", "answer": "A.",
           "instruction": "Say hi.", "context": "", "response": "hi"}
    for task in P.TASKS:
        assert P.build_example(vocab, task, rec, phrasing=0).task == task
    with pytest.raises(P.PromptError, match="'question'"):
        P.build_example(vocab, "vqa", {"codes": CODES, "answer": "A."})
    with pytest.raises(ValueError, match="unknown task"):
        P.build_example(vocab, "caption", rec)
    with pytest.raises(P.PromptError, match="'### End'"):
        P.image_to_report_example(vocab, CODES, "Normal.\n### End")
    with pytest.raises(P.PromptError, match="<image>"):
        P.report_to_image_example(vocab, "see <image>", CODES)
    with pytest.raises(P.PromptError, match="non-empty"):
        P.instruction_example(vocab, "Say hi.", None, "")
    with pytest.raises(ValueError, match="expected 256 image codes, got 10"):
        P.report_to_image_example(vocab, REPORT, CODES[:10], n_codes=256)


def test_direction_for_pair():
    # LLM-CXR: io_type "input" (image is the input -> report) for even indices, else "output".
    assert [P.direction_for_pair(i) for i in range(4)] == [
        ("image2report",), ("report2image",), ("image2report",), ("report2image",)]
    assert P.direction_for_pair(7, "both") == ("report2image", "image2report")
    with pytest.raises(ValueError, match="direction mode 'random'"):
        P.direction_for_pair(0, "random")


def test_length_filter_never_truncates(vocab):
    ex = P.report_to_image_example(vocab, REPORT, CODES)
    assert P.fits(ex, len(ex)) and P.keep_if_fits(ex, len(ex)) is ex
    assert not P.fits(ex, len(ex) - 1) and P.keep_if_fits(ex, len(ex) - 1) is None


def test_examples_with_a_trained_bpe():
    """The builders do not depend on GPT-NeoX: a small trained tokenizer works the same way."""
    small = train_bpe([REPORT] * 20 + ["Is there a pleural effusion? Yes."] * 5)
    ex = P.report_to_image_example(small, REPORT, CODES, phrasing=0, n_codes=256)
    r = _check_mask(small, ex)
    np.testing.assert_array_equal(ex.ids[r + 1:r + 257], CODES + 2048)
    ex = P.image_to_report_example(small, CODES, REPORT, phrasing=0)
    r = _check_mask(small, ex)
    assert small.decode(ex.ids[r + 1:]) == REPORT + "\n\n### End"
    assert small.decode(ex.ids[:r], skip_image=False).endswith("Input:\n<image>\n\n")


def test_null_report_is_a_well_formed_unconditional_input(vocab):
    """The guidance null text: a valid report field that round-trips through GPT-NeoX's and a
    small trained BPE's tokenisation and names no finding to the labeler."""
    small = train_bpe([REPORT] * 20)
    for v in (vocab, small):
        assert v.decode(v.encode(P.NULL_REPORT)) == P.NULL_REPORT
        ex = P.report_to_image_example(v, P.NULL_REPORT, CODES, phrasing=2, n_codes=256)
        r = _check_mask(v, ex)
        assert v.decode(ex.ids[:r]).endswith(f"Input:\n{P.NULL_REPORT}\n\n")
    labels = label_report(P.NULL_REPORT)
    assert all(v is None for k, v in labels.items() if k != "No Finding"), labels
