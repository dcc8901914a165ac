"""The evaluation protocol (eval/protocol.py, launch/evaluate.py) on a tiny run workdir: every
required key with its item count, metrics equal to a direct recomputation from the saved
predictions (and the predictions equal to the classifier run on the decoded saved codes), the
labeler-based block on references, chance levels against exact counts, the report's PNGs, and
clear errors for broken workdirs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_workdir
from llmcxr_jax import cli
from llmcxr_jax.data import labeler, mimic, procedural_instructions
from llmcxr_jax.eval import alignment, bootstrap, conditioning
from llmcxr_jax.eval import classification_metrics as metrics
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import language, protocol
from llmcxr_jax.eval.perplexity import perplexity
from llmcxr_jax.llm import inference, serving
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.text import prompts
from llmcxr_jax.vqgan.checkpoint import load_vqgan
from llmcxr_jax.vqgan.encode import Codec, load_codes

# Report -> image at guidance 2 (the headline) and 1.
OPTIONS = dict(batch_size=4, n_language=4, report_tokens=12, n_show=2, mesh="1", guidance=(2.0,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = eval_workdir.build(tmp_path_factory.mktemp("evalrun") / "work")
    lines: list[str] = []
    options = protocol.EvalOptions(classifier=str(root / "test_classifier"), **OPTIONS)
    result = protocol.evaluate(root, options, say=lines.append)
    return root, result, lines


def _get(d, dotted):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_eval_json_has_every_required_key_with_counts(run):
    root, result, lines = run
    saved = json.loads((root / "eval" / "eval.json").read_text())
    assert saved["n_test"] == result["n_test"]
    n = saved["n_test"]
    # The test items: frontal test-split images with a stage-2 (IMPRESSION) report.
    meta = mimic.read_metadata(root / "world", mimic.SkipCounter("t"))
    split = mimic.read_split(root / "world", mimic.SkipCounter("t"))
    frontal_test = {d for d, r in split.items() if r.split == "test"
                    and meta[d].view in mimic.FRONTAL_VIEWS}
    lines_out = (root / "eval" / "reports.jsonl").read_text().splitlines()
    ids = [json.loads(line)["dicom_id"] for line in lines_out]
    assert len(ids) == n and set(ids) <= frontal_test and n == len(frontal_test) and n >= 8
    for block in ("report2image", "image2report"):
        for metric in ("auroc", "f1"):
            for avg in ("micro", "macro", "weighted"):
                assert isinstance(_get(saved, f"{block}.{metric}.{avg}"), float)
        assert saved[block]["n"] == n
        assert saved[block]["chance"]["auroc"] == 0.5
        assert set(saved[block]["chance"]["f1"]) >= {"micro", "macro", "weighted"}
    for key in ("report2image.fid", "report2image.fid_reconstruction", "image2report.bleu4",
                "image2report.bleu1", "image2report.rouge_l", "image2report.jaccard.micro"):
        assert isinstance(_get(saved, key), float), key
    assert saved["report2image"]["reconstruction"]["n"] == n
    assert saved["report2image"]["fid_n"] == {"generated": n, "real": n}
    assert saved["report2image"]["inception_fid"].startswith("not computed")
    for model in ("base", "finetuned"):
        block = saved["language"][model]
        assert block["n"] == 4 and 0.0 <= block["accuracy"] <= 1.0 and block["perplexity"] > 1.0
    assert saved["language"]["base"]["source"] == protocol.RANDOM_INIT
    # Progress lines while generating.
    assert any(re.match(r"report->image: \d+/\d+ \(", l) for l in lines)
    assert any(re.match(r"image->report: \d+/\d+ \(", l) for l in lines)


def test_report2image_metrics_recompute_from_the_classifier(run):
    root, result, _ = run
    pred = np.load(root / "eval" / "predictions.npz")
    names = [str(s) for s in pred["label_names"]]
    cls_cfg, cls_params = clf.load_classifier(root / "test_classifier")
    assert names == list(cls_cfg.labels)
    # The saved probabilities are the classifier's on the VQ-GAN decode of the saved codes.
    vq_cfg, vq_params = load_vqgan(root / "vqgan_run" / "vqgan")
    codes = pred["generated_codes"]
    assert codes.shape == (result["n_test"], vq_cfg.tokens_per_image)
    assert codes.min() >= 0 and codes.max() < vq_cfg.n_embed
    decoder = Codec(vq_cfg, vq_params, 4).decode
    probs = clf.predict_proba(cls_cfg, cls_params, decoder(codes))
    np.testing.assert_allclose(probs, pred["probs_generated"], atol=1e-5)
    # ... and of the real images' reconstructions for the upper bound.
    world_codes = {k: np.asarray(v).reshape(-1) for k, v in load_codes(root / "codes").items()}
    rec = clf.predict_proba(cls_cfg, cls_params,
                            decoder(np.stack([world_codes[str(d)] for d in pred["dicom_ids"]])))
    np.testing.assert_allclose(rec, pred["probs_reconstructed"], atol=1e-5)
    # Metrics: classification_metrics on the findings with both classes in the truth.
    y = metrics.binarize_chexpert(pred["label_values"], "ones", "zeros")[0]
    keep = [j for j in range(len(names)) if 0 < y[:, j].sum() < len(y)]
    block = result["report2image"]
    assert block["findings"] == [names[j] for j in keep]
    assert block["excluded"] == [n for j, n in enumerate(names) if j not in keep]
    direct = metrics.evaluate(y[:, keep], pred["probs_generated"][:, keep],
                              names=block["findings"], threshold=0.5)
    for metric in ("auroc", "f1"):
        for avg in ("micro", "macro", "weighted"):
            assert block[metric][avg] == pytest.approx(direct[metric][avg])
    rec_direct = metrics.auroc(y[:, keep], pred["probs_reconstructed"][:, keep])
    assert block["reconstruction"]["auroc"]["macro"] == pytest.approx(rec_direct.macro)
    # The study labels are the world's CheXpert CSV rows.
    truth = {r["study_id"]: r["labels"] for r in map(
        json.loads, (root / "world" / "phantom_labels.jsonl").read_text().splitlines())}
    items = [json.loads(l) for l in (root / "eval" / "reports.jsonl").read_text().splitlines()]
    for it, row in zip(items, pred["label_values"]):
        want = [np.nan if truth[int(it["study_id"])][n] is None else truth[int(it["study_id"])][n]
                for n in names]
        np.testing.assert_array_equal(row, np.asarray(want, float))


def test_report2image_at_each_guidance_scale_recomputes_from_the_predictions(run):
    """The headline block is at S = 2; `by_guidance` holds S = 1 and 2, each recomputed from
    its saved probabilities, the codes at S = 1 differ from those at S = 2."""
    root, result, lines = run
    block = result["report2image"]
    trained_rate = json.loads((root / "config.json").read_text())["data"]["null_report_rate"]
    assert block["guidance"] == 2.0 and block["null_report_rate"] == trained_rate
    assert list(block["by_guidance"]) == ["1", "2"]
    pred = np.load(root / "eval" / "predictions.npz")
    np.testing.assert_array_equal(pred["guidance_scales"], [1.0, 2.0])
    np.testing.assert_array_equal(pred["generated_codes_by_guidance"][1], pred["generated_codes"])
    np.testing.assert_array_equal(pred["probs_generated_by_guidance"][1], pred["probs_generated"])
    assert (pred["generated_codes_by_guidance"][0] != pred["generated_codes"]).any()
    y = metrics.binarize_chexpert(pred["label_values"], "ones", "zeros")[0]
    names = [str(s) for s in pred["label_names"]]
    keep = [names.index(n) for n in block["findings"]]
    for i, key in enumerate(("1", "2")):
        direct = metrics.evaluate(y[:, keep], pred["probs_generated_by_guidance"][i][:, keep],
                                  names=block["findings"], threshold=0.5)
        for metric in ("auroc", "f1"):
            assert block["by_guidance"][key][metric]["macro"] == pytest.approx(
                direct[metric]["macro"])
    assert block["by_guidance"]["2"]["fid"] == block["fid"]
    assert block["by_guidance"]["1"]["fid"] != block["fid"]
    assert any(re.match(r"report->image \(guidance 2\): \d+/\d+ \(", l) for l in lines)


def test_report2image_draws_codes_at_the_runs_temperature(run):
    """The headline codes are the run's `image_temperature` draws: the first batch, drawn again
    with the same key at that temperature, is the same; at temperature 1 it differs."""
    root, result, _ = run
    block = result["report2image"]
    assert block["temperature"] == json.loads((root / "config.json").read_text())[
        "image_temperature"] == 0.5
    pred = np.load(root / "eval" / "predictions.npz")
    refs = [json.loads(l)["reference"]
            for l in (root / "eval" / "reports.jsonl").read_text().splitlines()]
    bundle = serving.load_bundle(root, protocol._mesh(OPTIONS["mesh"]), load_vqgan=False)
    bucket = protocol.prompt_bucket(
        [len(prompts.report_to_image_prompt_ids(bundle.vocab, r, 0)) for r in refs])
    key = jax.random.fold_in(jax.random.split(jax.random.key(0), 3)[0], 0)
    first = refs[:OPTIONS["batch_size"]]

    def draw(temperature):
        gen = dataclasses.replace(inference.IMAGE_SAMPLING, temperature=temperature,
                                  length_multiple=bucket)
        return inference.images_from_reports(bundle.params, bundle.model_config, bundle.vocab,
                                             first, key, pred["generated_codes"].shape[1], gen,
                                             guidance=block["guidance"])

    np.testing.assert_array_equal(draw(0.5), pred["generated_codes"][:len(first)])
    assert (draw(1.0) != pred["generated_codes"][:len(first)]).any()


def test_image2report_metrics_recompute_from_the_labeler(run):
    root, result, _ = run
    items = [json.loads(l) for l in (root / "eval" / "reports.jsonl").read_text().splitlines()]
    gen = [it["generated"] for it in items]
    ref = [it["reference"] for it in items]
    section = "findings+impression"
    g = alignment.label_matrix(labeler.label_reports(gen, section), labeler.LABELS)
    r = alignment.label_matrix(labeler.label_reports(ref, section), labeler.LABELS)
    y = metrics.binarize_chexpert(r, "ones", "zeros")[0]
    p = metrics.binarize_chexpert(g, "ones", "zeros")[0]
    keep = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    block = result["image2report"]
    assert block["findings"] == [labeler.LABELS[j] for j in keep]
    assert block["f1"]["micro"] == pytest.approx(metrics.f1(y[:, keep], p[:, keep]).micro)
    assert block["jaccard"]["macro"] == pytest.approx(metrics.jaccard(y[:, keep], p[:, keep]).macro)
    # The references themselves as "generated" reports agree perfectly.
    perfect = alignment.report_agreement(ref, ref, section)
    for metric in ("f1", "jaccard", "auroc"):
        assert perfect[metric]["micro"] == perfect[metric]["macro"] == 1.0
    assert perfect["chance"]["f1"]["micro"] < 1.0


def test_chance_levels_equal_the_expected_counts():
    # 100 items; prevalences 0.1 / 0.2 / 0.3 / 0.5 make the expected counts of a random predictor
    # at prevalence integers (TP = N p^2, FP = FN = N p (1 - p)): build that prediction exactly.
    n, prevalences = 100, (0.1, 0.2, 0.3, 0.5)
    y = np.zeros((n, len(prevalences)))
    pred = np.zeros_like(y)
    for j, p in enumerate(prevalences):
        pos = int(n * p)
        tp, fp = int(round(n * p * p)), int(round(n * p * (1 - p)))
        y[:pos, j] = 1
        pred[:tp, j] = 1  # true positives
        pred[pos:pos + fp, j] = 1  # false positives
    names = [f"f{j}" for j in range(len(prevalences))]
    chance = alignment.chance_levels(y, names)
    want = metrics.f1(y, pred)
    for avg in ("micro", "macro", "weighted"):
        assert chance["f1"][avg] == pytest.approx(getattr(want, avg))
    assert list(chance["f1"]["per_label"].values()) == pytest.approx(list(want.per_label))
    everything = metrics.f1(y, np.ones_like(y))
    for avg in ("micro", "macro", "weighted"):
        assert chance["f1_all_positive"][avg] == pytest.approx(getattr(everything, avg))


def test_language_heldout_set_and_perplexity(run):
    root, result, _ = run
    train = language.training_pairs(root / "world" / "instructions.jsonl")
    assert len(train) > 0
    seed = result["language"]["heldout_seed"]
    held = language.heldout_instructions(4, seed, train)
    assert not {(r["instruction"], r["context"]) for r in held} & train
    # The finetuned perplexity is eval.perplexity's on the same held-out examples.
    bundle = serving.load_bundle(root, protocol._mesh("1"), load_vqgan=False)
    examples = [prompts.instruction_example(bundle.vocab, r["instruction"], r["context"] or None,
                                            r["response"]) for r in held]
    direct = perplexity(bundle.model_config, bundle.params, examples, batch_size=4,
                        bucket=language.example_bucket(examples))
    assert result["language"]["finetuned"]["perplexity"] == pytest.approx(direct["perplexity"],
                                                                          rel=1e-5)
    for s in result["language"]["finetuned"]["samples"]:
        assert s["correct"] == procedural_instructions.check(
            {"response": s["reference"]}, s["generated"])
    # Excluding a drawn record makes the draw skip it.
    again = language.heldout_instructions(4, seed, train | {(held[0]["instruction"],
                                                             held[0]["context"])})
    assert (held[0]["instruction"], held[0]["context"]) not in {
        (r["instruction"], r["context"]) for r in again}


def test_conditioning_gap_and_bootstrap_intervals(run):
    root, result, _ = run
    saved = json.loads((root / "eval" / "eval.json").read_text())
    n = saved["n_test"]
    assert saved["bootstrap"]["resamples"] == bootstrap.RESAMPLES
    for direction in conditioning.DIRECTIONS:
        blocks = saved[direction]["conditioning_gap"]
        assert blocks["test"]["n_pairs"] == n and 2 <= blocks["train"]["n_pairs"] <= n
        for g in blocks.values():
            assert g["gap"] == pytest.approx(g["nll_mismatched"] - g["nll_true"])
            assert g["ci95"][0] <= g["ci95"][1]
    # The test-pair gap is the library's on the test items (reports.jsonl) with the eval's seed.
    items = [json.loads(l) for l in (root / "eval" / "reports.jsonl").read_text().splitlines()]
    codes = {k: np.asarray(v).reshape(-1) for k, v in load_codes(root / "codes").items()}
    pairs = [{"report": it["reference"], "codes": codes[it["dicom_id"]], "study": it["study_id"]}
             for it in items]
    bundle = serving.load_bundle(root, mesh_from_flag("1", jax.devices()[:1]), load_vqgan=False)
    direct = conditioning.conditioning_gap(bundle.params, bundle.model_config, bundle.vocab, pairs,
                                           "image2report", batch_size=4, seed=0)
    assert saved["image2report"]["conditioning_gap"]["test"]["gap"] == pytest.approx(
        direct.gap, abs=1e-6)
    # The report -> image gap over the VQ-GAN grid: the library's cells of the same pairs.
    drawn = conditioning.conditioning_gap(bundle.params, bundle.model_config, bundle.vocab,
                                          pairs, "report2image", batch_size=4, seed=0)
    by_cell = saved["report2image"]["conditioning_gap"]["test"]["by_cell"]
    assert by_cell["all"]["n"] == n and by_cell["side"] == 8
    np.testing.assert_allclose(by_cell["all"]["gap"], conditioning.cell_gaps(drawn, 64),
                               atol=1e-6)
    assert np.mean(by_cell["all"]["gap"]) == pytest.approx(
        np.mean([g[:64].mean() for g in drawn.token_gaps]))
    assert saved["gap_cells"] == "images/gap_cells.png"
    assert (root / "eval" / saved["gap_cells"]).is_file()
    assert "![gap by cell](images/gap_cells.png)" in (root / "eval" / "report.md").read_text()
    # Headline intervals: the bootstrap of the saved predictions on the scored findings.
    pred = np.load(root / "eval" / "predictions.npz")
    y = metrics.binarize_chexpert(pred["label_values"], "ones", "zeros")[0]
    keep = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    want = bootstrap.multilabel_intervals(y[:, keep], pred["probs_generated"][:, keep], 0.5)
    assert set(saved["report2image"]["ci95"]) == set(want)
    for key, interval in want.items():
        assert saved["report2image"]["ci95"][key] == pytest.approx(interval), key
    assert set(saved["image2report"]["ci95"]) == {"auroc_macro", "auroc_micro", "f1_macro",
                                                 "f1_micro", "bleu4", "rouge_l"}
    assert saved["learning_curve"] is None  # this workdir has no stage metrics


def test_single_finding_probes_are_in_eval_json_and_the_report(run):
    """report2image / image2report.{single_finding,no_finding,any_finding}: the items counted
    from the saved labels, report -> image's metrics recomputed from the saved probabilities
    (tests/test_probes.py checks the metrics against scikit-learn)."""
    root, result, _ = run
    saved = json.loads((root / "eval" / "eval.json").read_text())
    pred = np.load(root / "eval" / "predictions.npz")
    names = [str(s) for s in pred["label_names"]]
    positives = np.isin(pred["label_values"][:, [j for j, n in enumerate(names)
                                                 if n != "No Finding"]], (1.0, -1.0)).sum(1)
    counts = {"single_finding": positives == 1, "no_finding": positives == 0,
              "any_finding": positives >= 1}
    assert saved["finding_groups"]["labels"] == names
    for direction in ("report2image", "image2report"):
        for group, rows in counts.items():
            block = saved[direction][group]
            assert block["n"] == rows.sum() and 0.0 <= block["finding_called"] <= 1.0
            assert "auroc" in block or block["not_measured"]
    single = saved["report2image"]["single_finding"]
    rows = counts["single_finding"]
    if "auroc" in single:
        y = metrics.binarize_chexpert(pred["label_values"][rows], "ones", "zeros")[0]
        keep = [names.index(n) for n in single["findings"]]
        direct = metrics.auroc(y[:, keep], pred["probs_generated"][rows][:, keep])
        assert single["auroc"]["macro"] == pytest.approx(direct.macro)
    text = (root / "eval" / "report.md").read_text()
    assert "## Single-finding probes" in text and "| image2report | exactly one finding |" in text


def test_report_md_references_pngs_that_exist(run):
    root, _, _ = run
    out = root / "eval"
    text = (out / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(pngs) >= 2 * 2 + 2 + 1  # real + generated per shown item, image->report rows, grid
    for p in pngs:
        assert (out / p).is_file(), p
    assert "## Report -> image" in text and "## Image -> report" in text
    assert "## Language retention" in text and "random-init" in text
    assert "## Conditioning gap" in text and "95 % bootstrap intervals" in text


def test_bad_workdirs_give_clear_errors(run, tmp_path, capsys):
    root, _, _ = run
    with pytest.raises(protocol.EvalInputError, match="does not exist"):
        protocol.evaluate(tmp_path / "nowhere", protocol.EvalOptions(**OPTIONS))
    no_llm = tmp_path / "no_llm"
    no_llm.mkdir()
    for name in ("config.json", "world", "codes", "vqgan_run"):
        (no_llm / name).symlink_to(root / name)
    with pytest.raises(protocol.EvalInputError, match="holds no LLM"):
        protocol.evaluate(no_llm, protocol.EvalOptions(**OPTIONS))
    no_world = tmp_path / "no_world"
    no_world.mkdir()
    for name in ("llm", "codes", "vqgan_run"):
        (no_world / name).symlink_to(root / name)
    (no_world / "config.json").write_text(json.dumps({"data": {"world": str(tmp_path / "gone")}}))
    with pytest.raises(protocol.EvalInputError, match="no world to evaluate on"):
        protocol.evaluate(no_world, protocol.EvalOptions(**OPTIONS))
    with pytest.raises(protocol.EvalInputError, match="--subset"):
        protocol.EvalOptions(subset="lateral")
    with pytest.raises(protocol.EvalInputError, match="--image-temperature must be a finite "
                                                      "number > 0, got 0"):
        protocol.EvalOptions(image_temperature=0.0)
    spec = importlib.util.spec_from_file_location(
        "launch_evaluate", pathlib.Path(__file__).resolve().parents[1] / "launch" / "evaluate.py")
    launch_evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_evaluate)
    assert cli.call(launch_evaluate.main, ["--workdir", str(no_llm), "--mesh", "1"]) == 1
    assert "holds no LLM" in capsys.readouterr().err


def test_reproducible_from_the_seed(run, tmp_path):
    root, result, _ = run
    same = protocol.evaluate(root, protocol.EvalOptions(
        classifier=str(root / "test_classifier"), out=str(tmp_path / "same"), **OPTIONS),
        say=lambda s: None)
    for key in ("report2image", "image2report"):
        for metric in ("auroc", "f1"):
            assert same[key][metric] == result[key][metric]
    assert same["report2image"]["fid"] == result["report2image"]["fid"]
    assert same["language"]["finetuned"]["perplexity"] == result["language"]["finetuned"][
        "perplexity"]
    first = np.load(root / "eval" / "predictions.npz")["generated_codes"]
    np.testing.assert_array_equal(np.load(tmp_path / "same" / "predictions.npz")["generated_codes"],
                                  first)
    assert (tmp_path / "same" / "reports.jsonl").read_text() == (
        root / "eval" / "reports.jsonl").read_text()
    other = protocol.evaluate(root, protocol.EvalOptions(
        classifier=str(root / "test_classifier"), out=str(tmp_path / "other"),
        **{**OPTIONS, "seed": 1}), say=lambda s: None)
    assert other["seed"] == 1
    assert not np.array_equal(np.load(tmp_path / "other" / "predictions.npz")["generated_codes"],
                              first)


def test_image2report_greedy_block_is_the_argmax_decode_and_recomputes(run):
    """`image2report.greedy`: each saved greedy report is the argmax continuation of its prompt
    under the model's full (uncached) forward, and its F1 is the labeler's on those reports; the
    headline block keeps the original's top-p sampling."""
    root, result, lines = run
    block = result["image2report"]
    assert block["decoding"] == {"do_sample": True, "top_p": 0.92, "temperature": 1.0}
    items = [json.loads(l) for l in (root / "eval" / "reports.jsonl").read_text().splitlines()]
    bundle = serving.load_bundle(root, mesh_from_flag("1", jax.devices()[:1]), load_vqgan=False)
    codes = {k: np.asarray(v).reshape(-1) for k, v in load_codes(root / "codes").items()}
    # One compiled full forward over a fixed length: causal, so padding after a prefix leaves the
    # logits at its last position unchanged.
    forward = jax.jit(lambda x: GPTNeoX(bundle.model_config).apply({"params": bundle.params}, x))
    for it in items[:2]:
        ids = list(prompts.image_to_report_prompt_ids(bundle.vocab, codes[it["dicom_id"]], 0))
        new: list[int] = []
        for _ in range(OPTIONS["report_tokens"]):
            prefix = ids + new
            padded = prefix + [0] * (len(ids) + OPTIONS["report_tokens"] - len(prefix))
            logits = forward(jnp.asarray([padded]))[0, len(prefix) - 1]
            new.append(int(jnp.argmax(logits)))
            if new[-1] == bundle.vocab.end_id:
                new = new[:-1]
                break
        assert it["generated_greedy"] == bundle.vocab.decode(new).strip()
    gen = [it["generated_greedy"] for it in items]
    ref = [it["reference"] for it in items]
    y, p = (metrics.binarize_chexpert(alignment.label_matrix(
        labeler.label_reports(r, "findings+impression"), labeler.LABELS), "ones", "zeros")[0]
        for r in (ref, gen))
    keep = [labeler.LABELS.index(n) for n in block["findings"]]
    assert block["greedy"]["f1"]["micro"] == pytest.approx(metrics.f1(y[:, keep], p[:, keep]).micro)
    assert block["greedy"]["n"] == len(items)
    assert block["greedy"]["ci95"]["f1_micro"][0] <= block["greedy"]["f1"]["micro"] <= \
        block["greedy"]["ci95"]["f1_micro"][1]
    assert any("greedy decoding" in l for l in lines)
