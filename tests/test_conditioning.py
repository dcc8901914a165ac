"""The conditioning gap against a plain per-example forward; the derangement's guarantees."""

import jax
import numpy as np
import pytest

from llmcxr_jax.configs import ModelConfig, extended_vocab_rows
from llmcxr_jax.data.mimic import MimicRecord
from llmcxr_jax.eval import conditioning
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.text import prompts
from llmcxr_jax.text.bpe import train_bpe

MODEL = ModelConfig(vocab_size=extended_vocab_rows(2048, 64), hidden_size=64, num_layers=2,
                    num_heads=4, intermediate_size=128, max_position_embeddings=256)
WORDS = ["left", "right", "pleural", "effusion", "small", "large", "no", "cardiomegaly",
         "opacity", "lung", "clear", "stable"]


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        study = i // 2 if i < 4 else i - 2  # studies 0 and 1 have two images each
        report = " ".join(rng.choice(WORDS, 4 + i % 5)) + "."
        records.append(MimicRecord(dicom_id=f"d{i}", subject_id=f"p{study}", study_id=f"s{study}",
                                   split="train", report=report,
                                   codes=rng.integers(0, 64, 16).astype(np.uint16), pair_index=i))
    # Records of one study share their report (as in MIMIC), so they are one study's pairs.
    records = [MimicRecord(**{**r.__dict__, "report": records[i - 1].report}) if i in (1, 3) else r
               for i, r in enumerate(records)]
    vocab = train_bpe([r.report for r in records], n_image=64)
    params = GPTNeoX(MODEL).init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"]
    return records, vocab, jax.tree_util.tree_map(np.asarray, params)


def test_derangement_has_no_fixed_points_and_no_donor_of_the_same_study():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"]
    for seed in range(20):
        donor = conditioning.derangement(groups, seed)
        assert sorted(donor.tolist()) == list(range(len(groups)))
        assert all(groups[d] != groups[i] for i, d in enumerate(donor))
    np.testing.assert_array_equal(conditioning.derangement(groups, 3),
                                  conditioning.derangement(groups, 3))
    assert len({tuple(conditioning.derangement(list(range(6)), s)) for s in range(10)}) > 1
    with pytest.raises(ValueError):
        conditioning.derangement(["a", "a", "a", "b"], 0)  # one study holds over half
    with pytest.raises(ValueError):
        conditioning.derangement(["a"], 0)


_forward = jax.jit(lambda params, ids: GPTNeoX(MODEL).apply({"params": params}, ids))


def _plain_token_nll(params, ex):
    """-log p(token) of each response token, from one unbatched, unpadded forward."""
    logits = np.asarray(_forward(params, ex.ids[None, :-1]))[0]
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ex.ids) - 1), ex.ids[1:]]
    return nll[ex.loss_mask[1:] > 0]


@pytest.mark.parametrize("direction", conditioning.DIRECTIONS)
def test_gap_equals_per_example_forward(world, direction):
    records, vocab, params = world
    seed = 5
    donor = conditioning.derangement([f"{r.subject_id}/{r.study_id}" for r in records], seed)
    phrase = conditioning.phrasings(len(records), seed)
    true_sum = mismatched_sum = tokens = 0.0
    token_gaps = []
    for i, r in enumerate(records):
        d = records[donor[i]]
        assert d.study_id != r.study_id
        if direction == "report2image":
            true = prompts.report_to_image_example(vocab, r.report, r.codes, int(phrase[i]))
            mis = prompts.report_to_image_example(vocab, d.report, r.codes, int(phrase[i]))
        else:
            true = prompts.image_to_report_example(vocab, r.codes, r.report, int(phrase[i]))
            mis = prompts.image_to_report_example(vocab, d.codes, r.report, int(phrase[i]))
        t, t_mis = _plain_token_nll(params, true), _plain_token_nll(params, mis)
        assert len(t) == len(t_mis) > 0
        true_sum, mismatched_sum, tokens = true_sum + t.sum(), mismatched_sum + t_mis.sum(), \
            tokens + len(t)
        token_gaps.append(t_mis - t)

    result = conditioning.conditioning_gap(params, MODEL, vocab, records, direction,
                                           batch_size=4, seed=seed, bucket=32)
    assert result.n_pairs == len(records) and result.direction == direction
    np.testing.assert_allclose(result.nll_true, true_sum / tokens, rtol=1e-5)
    np.testing.assert_allclose(result.nll_mismatched, mismatched_sum / tokens, rtol=1e-5)
    np.testing.assert_allclose(result.gap, (mismatched_sum - true_sum) / tokens, atol=1e-5)
    assert abs(result.gap) > 1e-4  # a random model still reads its prompt a little
    assert result.pairs == tuple(range(len(records)))
    for got, want in zip(result.token_gaps, token_gaps):
        np.testing.assert_allclose(got, want, atol=1e-5)
    if direction == "report2image":  # the 16 codes of each image laid out on its 4x4 grid
        want = np.mean([g[:16] for g in token_gaps], axis=0).reshape(4, 4)
        np.testing.assert_allclose(conditioning.cell_gaps(result, 16), want, atol=1e-5)
        odd = np.arange(len(records)) % 2 == 1
        want_odd = np.mean([g[:16] for g, o in zip(token_gaps, odd) if o], axis=0).reshape(4, 4)
        np.testing.assert_allclose(conditioning.cell_gaps(result, 16, odd), want_odd, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="cell gaps are of report2image"):
            conditioning.cell_gaps(result, 16)

    # The same numbers on a mesh (batches sharded over 8 devices), and from pipeline pair dicts.
    dicts = [{"report": r.report, "codes": r.codes, "id": r.dicom_id,
              "study": f"{r.subject_id}/{r.study_id}"} for r in records]
    sharded = conditioning.conditioning_gap(params, MODEL, vocab, dicts, direction, batch_size=4,
                                            seed=seed, bucket=32, mesh=mesh_from_flag("2x4"))
    np.testing.assert_allclose(sharded.nll_true, result.nll_true, rtol=1e-5)
    np.testing.assert_allclose(sharded.gap, result.gap, atol=1e-5)


def test_cell_gap_block_groups_pairs_by_finding_and_draws_them(world, tmp_path):
    """eval.json's grids: all scored pairs, and each finding with enough pairs (by the pairs'
    own findings, through `GapResult.pairs`); the PNG has one panel per grid."""
    from PIL import Image

    from llmcxr_jax.eval import gap_cells

    records, vocab, params = world
    result = conditioning.conditioning_gap(params, MODEL, vocab, records, "report2image",
                                           batch_size=4, seed=5, bucket=32)
    positive = np.zeros((len(records), 3), int)
    positive[[0, 2, 5], 0] = 1  # three pairs with finding "a"
    positive[[1], 1] = 1  # one with "b": too few at min_pairs 2
    block = gap_cells.cell_gap_block(result, 16, positive, ["a", "b", "c"], min_pairs=2)
    assert block["side"] == 4 and block["all"]["n"] == len(records)
    np.testing.assert_allclose(block["all"]["gap"], conditioning.cell_gaps(result, 16))
    assert list(block["findings"]) == ["a"] and block["findings"]["a"]["n"] == 3
    np.testing.assert_allclose(block["findings"]["a"]["gap"],
                               conditioning.cell_gaps(result, 16, positive[:, 0] == 1))
    png = gap_cells.plot(block, tmp_path / "cells.png")
    width, height = Image.open(png).size
    assert width > height > 100  # two panels side by side
