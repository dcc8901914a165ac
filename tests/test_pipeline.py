"""The grain pipeline: packing invariants, task mix, drop counting, resume, host shards, and
global arrays on a mesh of 8 simulated devices."""

import json
import math

import grain
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from llmcxr_jax import configs
from llmcxr_jax.configs import DataConfig
from llmcxr_jax.data import pipeline as P
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import load_vocab
from tiny_mimic_world import REPORT_FULL, REPORT_IMPRESSION_ONLY, Image, random_codes, write_world

N_CODES = 16  # tokens per image in these tests (keeps examples short)
WORDS = ("heart size is normal no pleural effusion pneumothorax or focal consolidation mild "
         "cardiomegaly small left basilar atelectasis right picc line tip in the svc stable").split()


@pytest.fixture(scope="module")
def vocab(neox_tokenizer_dir):
    return load_vocab(neox_tokenizer_dir)


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))).capitalize() + "."


def _sources(n=40, seed=0, vqa=True, long_instructions=0):
    rng = np.random.default_rng(seed)

    def codes():
        return rng.integers(0, 1024, N_CODES).astype(np.uint16)

    recs = {
        "report2image": [{"report": _text(rng, 5, 40), "codes": codes(), "id": f"r{i}"}
                         for i in range(n)],
        "image2report": [{"report": _text(rng, 5, 40), "codes": codes(), "id": f"i{i}"}
                         for i in range(n)],
        "instruct": [{"instruction": _text(rng, 3, 12), "response": _text(rng, 1, 30),
                      "context": _text(rng, 5, 20) if i % 3 == 0 else ""} for i in range(n)],
    }
    recs["instruct"] += [{"instruction": "Repeat this.", "context": _text(rng, 400, 401),
                          "response": "No."} for _ in range(long_instructions)]
    if vqa:
        recs["vqa"] = [{"question": "Is there a pleural effusion?", "answer": _text(rng, 1, 8),
                        "codes": codes(), "id": f"q{i}"} for i in range(n)]
    return P.Sources(recs, SkipCounter())


def _cfg(**kw):
    base = dict(tokens_per_image=N_CODES, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _build(sources, vocab, cfg, *, seq_len=256, global_batch=8, **kw):
    """The pipeline in batches of 8 rows of 256 tokens unless told otherwise."""
    return P.build_pipeline(sources, vocab, cfg, seq_len=seq_len, global_batch=global_batch, **kw)


def _segments(row_seg):
    """[(segment id, start, stop)] of the contiguous runs of non-zero ids in a row."""
    out, t = [], 0
    while t < len(row_seg):
        s = row_seg[t]
        stop = t
        while stop < len(row_seg) and row_seg[stop] == s:
            stop += 1
        if s:
            out.append((int(s), t, stop))
        t = stop
    return out


def _expected_text(task, rec):
    if task == "instruct":
        return prompts.format_prompt(rec["instruction"], rec["context"] or None, rec["response"])
    return None


# --------------------------------------------------------------------------------------------------


def test_packed_batches_keep_examples_whole_and_targets_inside_segments(vocab):
    sources = _sources()
    pipe = _build(sources, vocab, _cfg(), shard_index=0, shard_count=1)
    texts = {prompts.format_prompt(r["instruction"], r["context"] or None, r["response"])
             for r in sources.records["instruct"]}
    codes_of = {t: {r["codes"].tobytes(): r for r in sources.records[t]}
                for t in ("report2image", "image2report", "vqa")}
    pad = vocab.pad_id
    n_segments = 0
    it = iter(pipe)
    for _ in range(6):
        b = next(it)
        assert set(b) == set(P.BATCH_KEYS)
        assert all(v.shape == (8, 256) for v in b.values())
        assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        for r in range(8):
            seg, pos, inp, tgt = (b[k][r] for k in ("segment_ids", "positions", "inputs",
                                                    "targets"))
            lm, task_ids = b["loss_mask"][r], b["task_ids"][r]
            runs = _segments(seg)
            # Ids 1..n in order, each one contiguous run, padding only after the last.
            assert [s for s, _, _ in runs] == list(range(1, len(runs) + 1))
            last = runs[-1][2]
            assert (seg[last:] == 0).all() and (inp[last:] == pad).all()
            assert (lm[last:] == 0).all() and (task_ids[last:] == -1).all()
            assert (tgt[last:] == pad).all() and (pos[last:] == 0).all()
            for s, a, z in runs:
                n_segments += 1
                ids = inp[a:z]
                np.testing.assert_array_equal(pos[a:z], np.arange(z - a))
                # Next token within the segment; nothing crosses into the next one.
                np.testing.assert_array_equal(tgt[a:z - 1], ids[1:])
                assert tgt[z - 1] == pad and lm[z - 1] == 0
                # Loss exactly on the response tokens: after `### Response:\n` through `### End`.
                resp = int(np.flatnonzero(ids == vocab.response_id)[0])
                assert ids[-1] == vocab.end_id
                expected = np.zeros(z - a, np.float32)
                expected[resp:z - a - 1] = 1.0  # predicting tokens resp+1 .. end (the last)
                np.testing.assert_array_equal(lm[a:z], expected)
                # One whole example of its task, identical to a source record's prompt.
                task = P.TASKS[int(task_ids[a])]
                assert (task_ids[a:z] == task_ids[a]).all()
                if task == "instruct":
                    assert vocab.decode(ids) in texts
                else:
                    codes = vocab.codes_from_ids(ids, expected=N_CODES).astype(np.uint16)
                    rec = codes_of[task][codes.tobytes()]
                    image_after_response = vocab.is_image_id(ids[resp + 1:]).any()
                    assert image_after_response == (task == "report2image")
                    text = vocab.decode(ids)
                    assert (rec.get("report") or rec["answer"]) in text
    assert n_segments > 6 * 8  # several examples per row


def test_padding_fraction_with_and_without_packing(vocab):
    sources = _sources(vqa=False)
    fractions = {}
    for packing in (True, False):
        it = iter(_build(sources, vocab, _cfg(packing=packing, weights=(.4, .4, .2, 0)),
                         shard_index=0, shard_count=1))
        batches = [next(it) for _ in range(4)]
        fractions[packing] = np.mean([P.padding_fraction(b) for b in batches])
        if not packing:
            assert all((b["segment_ids"].max(axis=1) == 1).all() for b in batches)
    assert fractions[True] < 0.5 * fractions[False]


@pytest.mark.parametrize("preset", ["stage1", "stage1-vqa"])
def test_task_fractions_match_weights(vocab, preset):
    weights = configs.data_preset(preset).task_weights()
    # Some instruction records are too long: they are dropped inside their source, before the mix.
    sources = _sources(long_instructions=10)
    cfg = _cfg(weights=configs.data_preset(preset).weights)
    pipe = _build(sources, vocab, cfg, shard_index=0, shard_count=1)
    counts = dict.fromkeys(P.TASKS, 0)
    it = iter(pipe)
    for _ in range(25):
        b = next(it)
        for r in range(b["segment_ids"].shape[0]):
            for s, a, _ in _segments(b["segment_ids"][r]):
                counts[P.TASKS[int(b["task_ids"][r, a])]] += 1
    n = sum(counts.values())
    assert n > 400
    for task in P.TASKS:
        w = weights.get(task, 0.0)
        frac = counts[task] / n
        bound = 4 * math.sqrt(w * (1 - w) / n) if w else 0.0
        assert abs(frac - w) <= bound, (task, frac, w, bound, counts)
    assert pipe.drops.as_dict().get("instruct:too_long", 0) > 0


def test_tokenise_counts_drops_exactly(vocab):
    drops = P.DropCounter({"instruct": 4})
    fn = P.tokenise_fn(vocab, "instruct", 64, N_CODES, drops)
    rng = np.random.default_rng(0)
    records = [
        {"instruction": "Add 2 and 3.", "context": "", "response": "5"},
        {"instruction": "Summarise.", "context": " ".join(["word"] * 100), "response": "Short."},
        {"instruction": "Say ### End now.", "context": "", "response": "no"},  # reserved key
        {"instruction": "Sort 3 1 2.", "context": "", "response": "1 2 3"},
    ]
    out = [fn(r, rng) for r in records]
    assert [o is None for o in out] == [False, True, True, False]
    assert drops.as_dict() == {"instruct:bad_prompt": 1, "instruct:too_long": 1}
    np.testing.assert_array_equal(
        out[0]["tokens"], vocab.encode(prompts.format_prompt("Add 2 and 3.", None, "5")))
    assert (out[0]["task"] == P.TASK_INDEX["instruct"]).all()


def test_null_report_rate_replaces_report2image_reports_only(vocab):
    """At rate r about r of the report -> image examples carry `prompts.NULL_REPORT` in place of
    their report (same phrasing draw, same image response); other tasks and rate 0 unchanged."""
    records = _sources(n=400, seed=1).records
    drops = P.DropCounter({t: 400 for t in records})
    plain = P.tokenise_fn(vocab, "report2image", 256, N_CODES, drops)
    nulled = P.tokenise_fn(vocab, "report2image", 256, N_CODES, drops, null_report_rate=0.3)
    n_null = 0
    for i, rec in enumerate(records["report2image"]):
        out = nulled(rec, np.random.default_rng(i))
        draws = np.random.default_rng(i)  # the same element rng: first the null draw, then
        is_null = draws.random() < 0.3  # the phrasing
        expected = prompts.build_example(vocab, "report2image", {
            **rec, "report": prompts.NULL_REPORT if is_null else rec["report"]},
            phrasing=draws, n_codes=N_CODES)
        np.testing.assert_array_equal(out["tokens"], expected.ids)
        assert (prompts.NULL_REPORT in vocab.decode(out["tokens"])) == is_null
        n_null += is_null
        # Rate 0 draws nothing extra: the phrasing comes straight from the element's rng.
        np.testing.assert_array_equal(plain(rec, np.random.default_rng(i))["tokens"],
                                      prompts.build_example(vocab, "report2image", rec,
                                                            np.random.default_rng(i),
                                                            N_CODES).ids)
    assert abs(n_null / 400 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400), n_null
    other = P.tokenise_fn(vocab, "image2report", 256, N_CODES, drops, null_report_rate=0.9)
    for i, rec in enumerate(records["image2report"][:20]):
        tokens = other(rec, np.random.default_rng(i))["tokens"]
        assert prompts.NULL_REPORT not in vocab.decode(tokens)
    # build_pipeline passes the config's rate on.
    pipe = _build(P.Sources({"report2image": records["report2image"]}, SkipCounter()),
                  vocab, _cfg(weights=(1, 0, 0, 0), null_report_rate=0.5),
                  shard_index=0, shard_count=1)
    texts = [vocab.decode(row) for row in next(iter(pipe))["inputs"]]
    assert sum(t.count(prompts.NULL_REPORT) for t in texts) > 0
    with pytest.raises(ValueError, match="null_report_rate"):
        DataConfig(null_report_rate=1.0)


def test_a_task_with_no_example_that_fits_stops_with_a_clear_error(vocab):
    sources = P.Sources({"instruct": _sources().records["instruct"][:5]}, SkipCounter())
    pipe = _build(sources, vocab, _cfg(weights=(0, 0, 1, 0)), seq_len=8, shard_index=0,
                  shard_count=1)
    with pytest.raises(ValueError, match="seq_len=8"):
        next(iter(pipe))


def test_resume_gives_identical_next_batches(vocab, tmp_path):
    import orbax.checkpoint as ocp

    sources = _sources()
    cfg = _cfg(weights=(0.3, 0.3, 0.2, 0.2))
    it = iter(_build(sources, vocab, cfg, shard_index=0, shard_count=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # orbax stores it as JSON
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    # A new pipeline (as after a restart), restored from the state dict ...
    fresh = iter(_build(sources, vocab, cfg, shard_index=0, shard_count=1))
    fresh.set_state(state)
    # ... and another restored through orbax.
    restored = iter(_build(sources, vocab, cfg, shard_index=0, shard_count=1))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want in expected:
        for got in (next(fresh), next(restored)):
            for k in P.BATCH_KEYS:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_hosts_read_disjoint_shards(vocab):
    sources = P.Sources({"instruct": _sources(n=30).records["instruct"]}, SkipCounter())
    cfg = _cfg(weights=(0, 0, 1, 0))
    seen = []
    for host in (0, 1):
        pipe = _build(sources, vocab, cfg, shard_index=host, shard_count=2)
        assert pipe.local_batch == 4
        b = next(iter(pipe))
        assert b["inputs"].shape == (4, 256)
        responses = set()
        for r in range(4):
            for s, a, z in _segments(b["segment_ids"][r]):
                responses.add(vocab.decode(b["inputs"][r, a:z]))
        seen.append(responses)
    shard_texts = [{prompts.format_prompt(x["instruction"], x["context"] or None, x["response"])
                    for x in sources.records["instruct"][h::2]} for h in (0, 1)]
    assert seen[0] <= shard_texts[0] and seen[1] <= shard_texts[1]
    assert not shard_texts[0] & shard_texts[1]
    with pytest.raises(ValueError, match="global batch 8 is not divisible by the number of "
                                         "processes 3"):
        _build(sources, vocab, cfg, shard_index=0, shard_count=3)


@pytest.mark.parametrize("shape,names,spec", [
    ((4, 2), ("data", "fsdp"), (("data", "fsdp"), None)),
    ((2, 2, 2), ("data", "fsdp", "tensor"), (("data", "fsdp"), None)),
])
def test_global_arrays_on_8_devices(vocab, shape, names, spec):
    assert jax.device_count() == 8
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    sources = _sources()
    pipe = _build(sources, vocab, _cfg(), shard_index=0, shard_count=1)
    local_it = iter(pipe)
    local = next(local_it)
    it = pipe.global_iterator(mesh)
    batch = next(it)
    assert set(batch) == set(P.BATCH_KEYS)
    rows_per_device = 8 // math.prod(mesh.shape[a] for a in spec[0])
    for k, arr in batch.items():
        assert isinstance(arr, jax.Array) and arr.shape == (8, 256)
        assert arr.sharding.spec == PartitionSpec(*spec)
        assert arr.sharding.mesh.shape == mesh.shape
        assert {s.data.shape for s in arr.addressable_shards} == {(rows_per_device, 256)}
        np.testing.assert_array_equal(np.asarray(arr), local[k])
    # The wrapper carries the pipeline's state: after one batch, the same as the local iterator's.
    assert it.get_state() == local_it.get_state() != iter(pipe).get_state()


def test_load_sources_from_a_world(tmp_path, vocab):
    images = [Image("d01", "10000001", "50000001"), Image("d02", "10000001", "50000001", view="LL"),
              Image("d03", "10000002", "50000002"), Image("d04", "10000002", "50000003",
                                                          date=21700101)]
    reports = {("10000001", "50000001"): REPORT_FULL, ("10000002", "50000002"): REPORT_FULL,
               ("10000002", "50000003"): REPORT_IMPRESSION_ONLY}
    root = write_world(tmp_path / "w", images, reports, write_images=False)
    (tmp_path / "dolly.jsonl").write_text(
        json.dumps({"instruction": "Add 1 and 2.", "context": "", "response": "3",
                    "category": "math"}) + "\nnot json\n")
    (tmp_path / "vqa.jsonl").write_text(
        json.dumps({"subject_id": "10000002", "study_id": "50000003",
                    "question": "Is there cardiomegaly?", "answer": "Yes."}) + "\n" +
        json.dumps({"subject_id": "10000002", "study_id": "50000002",
                    "question": "Is there cardiomegaly?", "answer": "No."}) + "\n")
    codes = random_codes(["d01", "d02", "d03", "d04"], n=N_CODES)
    cfg = _cfg(world=str(root), instructions=str(tmp_path / "dolly.jsonl"),
               vqa=str(tmp_path / "vqa.jsonl"), weights=(0.3, 0.3, 0.2, 0.2),
               max_skip_fraction=0.5)  # the 2-line dolly file is half bad on purpose
    sources = P.load_sources(cfg, codes=codes)
    # alternate: sorted pairs d01 (0: image2report), d02 (1: report2image), d03 (2), d04 (3).
    assert [r["id"] for r in sources.records["image2report"]] == ["d01", "d03"]
    assert [r["id"] for r in sources.records["report2image"]] == ["d02", "d04"]
    assert sources.records["instruct"] == [{"instruction": "Add 1 and 2.", "context": "",
                                            "response": "3"}]
    # VQA joins stage 2's images only: subject 2's earliest study is 50000003 (d04).
    assert [(r["id"], r["answer"]) for r in sources.records["vqa"]] == [("d04", "Yes.")]
    assert sources.skips["not_json"] == 1 and sources.skips["no_image"] == 1
    both = P.load_sources(DataConfig(**{**configs.to_dict(cfg), "direction": "both",
                                        "splits": ("train",), "weights": (.5, .5, 0, 0)}),
                          codes=codes)
    assert len(both.records["report2image"]) == len(both.records["image2report"]) == 4
    b = next(iter(_build(sources, vocab, cfg, shard_index=0, shard_count=1)))
    assert set(np.unique(b["task_ids"])) <= {-1, 0, 1, 2, 3}
    with pytest.raises(ValueError, match="instructions is empty"):
        P.load_sources(_cfg(world=str(root), weights=(0.4, 0.4, 0.2, 0)), codes=codes)


def test_data_config_checks_and_presets():
    assert configs.data_preset("stage2").stage == 2
    assert configs.data_preset("stage1").task_weights() == pytest.approx(
        {"report2image": 0.4, "image2report": 0.4, "instruct": 0.2})
    with pytest.raises(ValueError, match="weights"):
        DataConfig(weights=(0.5, 0.5))
    with pytest.raises(KeyError, match="unknown data preset"):
        configs.data_preset("stage3")


@pytest.mark.parametrize("stage", [1, 2])
def test_phantom_world_end_to_end(tmp_path, vocab, stage):
    from llmcxr_jax.data import mimic
    from llmcxr_jax.data.phantom_world import WorldConfig, write_world as write_phantoms

    root = tmp_path / "phantoms"
    write_phantoms(root, WorldConfig(n_studies=10, size=32, seed=2, n_instructions=20), workers=1,
                   progress=False)
    split = mimic.read_split(root, SkipCounter())
    codes = random_codes(sorted(split), n=N_CODES)
    cfg = _cfg(world=str(root), instructions=str(root / "instructions.jsonl"),
               vqa=str(root / "vqa.jsonl"), stage=stage, weights=(0.3, 0.3, 0.2, 0.2))
    sources = P.load_sources(cfg, codes=codes)
    n_train = sum(r.split == "train" for r in split.values())
    pairs = len(sources.records["report2image"]) + len(sources.records["image2report"])
    assert 0 < pairs <= n_train
    assert len(sources.records["instruct"]) == 20
    assert sources.records["vqa"]
    stage2 = mimic.select_stage2(mimic.read_metadata(root, SkipCounter()))
    assert {r["id"] for r in sources.records["vqa"]} <= stage2
    if stage == 2:
        assert {r["id"] for t in ("report2image", "image2report")
                for r in sources.records[t]} <= stage2
    pipe = _build(sources, vocab, cfg, shard_index=0, shard_count=1)
    b = next(iter(pipe))
    assert set(np.unique(b["task_ids"])) - {-1} <= {0, 1, 2, 3}
    assert b["loss_mask"].sum() > 0 and P.describe(pipe, sources).startswith("data: stage")


def test_epoch_shuffled_source_is_a_fresh_permutation_per_epoch():
    ds = P.EpochShuffled(list(range(10)), seed=7)
    epochs = [[ds[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = P.EpochShuffled(list(range(10)), seed=7)
    assert [again[i] for i in range(25, 30)] == epochs[2][5:10]
    assert [P.EpochShuffled(list(range(10)), seed=8)[i] for i in range(10)] != epochs[0]


def test_prefetch_threads_give_the_same_batches(vocab):
    sources = _sources()
    out = []
    for threads in (0, 4):
        it = iter(_build(sources, vocab, _cfg(read_threads=threads),
                         shard_index=0, shard_count=1))
        out.append([next(it) for _ in range(2)])
    for a, b in zip(*out):
        for k in P.BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_image_loss_weight_scales_image_targets_only(vocab):
    """The loss weight of an image-code target is `image_loss_weight`, of a text target 1, and
    prompt tokens stay 0: checked per token against the vocabulary's image id range."""
    sources = _sources(n=40, seed=4, vqa=False)
    plain = next(iter(_build(sources, vocab, _cfg(weights=(1, 1, 1, 0)),
                             shard_index=0, shard_count=1)))
    weighted = next(iter(_build(sources, vocab,
                                _cfg(weights=(1, 1, 1, 0), image_loss_weight=0.25),
                                shard_index=0, shard_count=1)))
    np.testing.assert_array_equal(plain["targets"], weighted["targets"])
    is_image = (weighted["targets"] >= vocab.image_offset) & (weighted["targets"] < vocab.n_valid)
    on = plain["loss_mask"] > 0
    assert (on & is_image).sum() > 0 and (on & ~is_image).sum() > 0
    np.testing.assert_array_equal(weighted["loss_mask"][on & is_image], 0.25)
    np.testing.assert_array_equal(weighted["loss_mask"][on & ~is_image], 1.0)
    np.testing.assert_array_equal(weighted["loss_mask"][~on], 0.0)
    with pytest.raises(ValueError, match="image_loss_weight"):
        DataConfig(image_loss_weight=0.0)


def test_loss_positions_cap_every_row_and_drop_what_cannot_fit(vocab):
    # 256-token rows with at most 48 loss tokens each: the packer must close a row before its
    # loss tokens exceed 48 (most examples fit alone; three 80-word responses added here do not).
    sources = _sources(vqa=False)
    sources.records["instruct"] += [{"instruction": "Repeat.", "context": "",
                                     "response": _text(np.random.default_rng(9), 80, 81)}] * 3
    k = 48
    capped = _build(sources, vocab, _cfg(weights=(.4, .4, .2, 0)), loss_positions=k,
                    shard_index=0, shard_count=1)
    free = _build(sources, vocab, _cfg(weights=(.4, .4, .2, 0)), shard_index=0, shard_count=1)
    counts = {"capped": [], "free": []}
    for name, pipe in (("capped", capped), ("free", free)):
        it = iter(pipe)
        for _ in range(12):
            counts[name].extend((next(it)["loss_mask"] > 0).sum(axis=1))
    assert max(counts["capped"]) <= k
    assert max(counts["free"]) > k  # without the cap the same data packs rows past it
    # The 80-word responses hold more than 48 loss tokens on their own: dropped, counted.
    assert capped.drops.as_dict().get("instruct:more_loss_tokens_than_loss_positions", 0) > 0
    assert "instruct:more_loss_tokens_than_loss_positions" not in free.drops.as_dict()
