"""The run's "clinical" step (vqgan/clinical.py, train/run.py): with `clinical.net=train` a
findings classifier is trained on the world's train split alone, before the VQ-GAN, whose loss
then has a clinical term; reruns reuse it or refuse a changed one in one line; without the
setting nothing changes, also for workdirs recorded before it existed."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import pathlib
import runpy
import shutil

import jax
import numpy as np
import pytest

from llmcxr_jax import cli, configs
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.eval import train_classifier as train_clf
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.train import step_record
from llmcxr_jax.train.metrics import METRICS_FILE, read_jsonl
from llmcxr_jax.train.preemption import PreemptionWatcher
from llmcxr_jax.vqgan import clinical as clinical_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = ["world.n_studies=30", "world.size=64", "world.n_instructions=10",
         "vqgan.vqgan=test-tiny", "vqgan.steps=2", "vqgan.log_every=1"]
CLINICAL = ["clinical.net=train", "clinical.steps=2", "clinical.widths=8,8",
            "clinical.batch_size=4"]


def _csv_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clinical_run(tmp_path_factory):
    """World, clinical classifier and VQ-GAN of a tiny run, every image the classifier read."""
    cfg = rc.apply_overrides(rc.run_preset("tiny"), SMALL + CLINICAL)
    cfg, paths, _, plan = run_lib.preflight(cfg, tmp_path_factory.mktemp("clinical") / "w")
    lines: list[str] = []
    world = run_lib.world_dir(cfg, paths, lines.append, plan, progress=False)
    read: list[pathlib.Path] = []

    def spy(path, size):
        read.append(pathlib.Path(path))
        return load_image(path, size)

    load_image = train_clf.load_image
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_clf, "load_image", spy)
        run_lib.vqgan_dir(cfg, paths, world, lines.append, plan, progress=False)
    return cfg, paths, world, read, lines


def test_the_classifier_reads_every_frontal_train_image_and_nothing_else(clinical_run):
    _, paths, world, read, lines = clinical_run
    split = {r["dicom_id"]: r["split"] for r in _csv_rows(world / "mimic-cxr-2.0.0-split.csv.gz")}
    view = {r["dicom_id"]: r["ViewPosition"]
            for r in _csv_rows(world / "mimic-cxr-2.0.0-metadata.csv.gz")}
    assert {split[d] for d in split} == {"train", "validate", "test"}  # all three exist
    frontal_train = {d for d in split if split[d] == "train" and view[d] in ("PA", "AP")}
    assert sorted(p.stem for p in read) == sorted(frontal_train)
    assert paths.clinical.is_dir() and any("clinical: training" in s for s in lines)
    saved = clf.load_config(paths.clinical)
    assert saved.widths == (8, 8)
    assert saved.image_size == configs.vqgan_preset("test-tiny").resolution  # the VQ-GAN's


def test_the_vqgan_trains_with_the_clinical_loss_of_that_classifier(clinical_run):
    cfg, paths, _, _, _ = clinical_run
    metrics = [r for r in read_jsonl(paths.vqgan_run / "metrics.jsonl") if "rec_loss" in r]
    assert len(metrics) == cfg.vqgan.steps
    assert all(math.isfinite(r["clinical_loss"]) and r["clinical_loss"] > 0 for r in metrics)
    vq_config = json.loads((paths.vqgan_run / "config.json").read_text())
    assert vq_config["clinical"] == f"classifier:{paths.clinical}"
    record = step_record.read(paths.clinical)
    assert record["status"] == "done" and record["settings"]["clinical.seed"] == 1
    # The VQ-GAN's record holds the classifier's settings and the loss weight.
    vq_settings = step_record.read(paths.vqgan_run)["settings"]
    assert vq_settings["clinical.widths"] == [8, 8] and vq_settings["vqgan.clinical_weight"] == 1


def test_reruns_reuse_it_and_refuse_a_changed_classifier(clinical_run, tmp_path):
    cfg, paths, _, _, _ = clinical_run
    plan = run_lib.plan_steps(cfg, paths, (1, 2))
    assert plan.decisions["clinical"].action == "reuse"
    assert plan.decisions["vqgan"].action == "reuse"
    again = rc.apply_overrides(cfg, ["clinical.seed=2"])
    with pytest.raises(run_lib.SetupError, match=r"^clinical in .*clinical was made with "
                                                 r"clinical.seed=1 \(this run: 2\)"):
        run_lib.plan_steps(again, paths, (1, 2))
    # Without the classifier's folder the VQ-GAN made from it is what refuses: its record names
    # the classifier's settings, so a new classifier means a new VQ-GAN.
    copy = RunLayout(tmp_path / "w")
    shutil.copytree(paths.vqgan_run, copy.vqgan_run)
    with pytest.raises(run_lib.SetupError, match=r"^vqgan in .* clinical.seed=1 \(this run: 2\)"):
        run_lib.plan_steps(again, copy, (1, 2))
    with pytest.raises(run_lib.SetupError, match=r'vqgan in .* clinical.net="train" \(this run: '
                                                 r'""\)'):
        run_lib.plan_steps(rc.apply_overrides(cfg, ["clinical.net="]), copy, (1, 2))
    # More classifier steps make another network: refused too (not continued).
    with pytest.raises(run_lib.SetupError, match=r"clinical.steps=2 \(this run: 4\)"):
        run_lib.plan_steps(rc.apply_overrides(cfg, ["clinical.steps=4"]), paths, (1, 2))


def test_a_killed_classifier_is_trained_again_then_reused(clinical_run, tmp_path):
    cfg, paths, world, _, _ = clinical_run
    killed = RunLayout(tmp_path / "w")
    shutil.copytree(paths.clinical, killed.clinical)
    # What a kill before the end leaves: STEP.json "started", no config.json (written last).
    (killed.clinical / clf.CONFIG_FILE).unlink()
    record = step_record.read(killed.clinical)
    step_record.write(killed.clinical, "clinical", record["settings"], "started")
    plan = run_lib.plan_steps(cfg, killed, (1, 2))
    assert plan.decisions["clinical"].action == "resume"
    lines: list[str] = []
    net = run_lib.clinical_net(cfg, killed, world, lines.append, plan, progress=False)
    assert net is not None and any("clinical: training again" in s for s in lines)
    assert step_record.read(killed.clinical)["status"] == "done"
    assert run_lib.plan_steps(cfg, killed, (1, 2)).decisions["clinical"].action == "reuse"


def test_a_stop_while_the_classifier_trains_ends_it_unsaved_and_a_rerun_trains_it_again(
        clinical_run, tmp_path):
    """SIGTERM's flag (set here as its handler sets it) ends the classifier after the step it
    is in: nothing saved, the run step raises Preempted, and the next run's plan trains it
    again (the classifier keeps no checkpoints)."""
    cfg, _, world, _, _ = clinical_run
    long = rc.apply_overrides(cfg, ["clinical.steps=5000"])
    paths = RunLayout(tmp_path / "w")
    plan = run_lib.plan_steps(long, paths, (1, 2))
    watcher = PreemptionWatcher()
    watcher.request_stop()
    lines: list[str] = []
    with pytest.raises(run_lib.Preempted):
        run_lib.clinical_net(long, paths, world, lines.append, plan, progress=False,
                             watcher=watcher)
    assert [r["step"] for r in read_jsonl(paths.clinical / METRICS_FILE)] == [1]
    assert not clinical_lib.is_complete(paths.clinical)
    assert any("so a rerun trains it again" in s for s in lines), lines
    assert step_record.read(paths.clinical)["status"] == "started"
    assert run_lib.plan_steps(long, paths, (1, 2)).decisions["clinical"].action == "resume"


def test_the_network_the_vqgan_was_trained_against_never_scores_it(clinical_run, tmp_path):
    """The evaluation refuses the VQ-GAN's clinical classifier, by folder, as a copy (the same
    architecture and seed in its train_config.json) and as named by the VQ-GAN's training
    config alone; another seed is another network. The run refuses the reverse, a copy too."""
    from llmcxr_jax.eval import protocol

    _, paths, world, _, _ = clinical_run
    inputs = protocol.RunInputs(run=paths, world=world, codes=paths.codes, instructions=None,
                                world_seed=0, init_from="", report_stage=2)
    size = configs.vqgan_preset("test-tiny").resolution

    def evaluate_with(classifier, run=paths, vqgan_dir=None):
        return protocol.classifier_for(dataclasses.replace(inputs, run=run),
                                       protocol.EvalOptions(classifier=str(classifier)), size,
                                       lambda _: None, vqgan_dir)

    copy = tmp_path / "copy"
    shutil.copytree(paths.clinical, copy)
    elsewhere = RunLayout(tmp_path / "elsewhere")  # a workdir without clinical/
    refused = r"^--classifier .* is the network the VQ-GAN's clinical loss was trained against"
    for classifier, run, vqgan_dir in ((paths.clinical, paths, None), (copy, paths, None),
                                       (copy, elsewhere, paths.vqgan)):
        with pytest.raises(protocol.EvalInputError, match=refused):
            evaluate_with(classifier, run, vqgan_dir)
    record = json.loads((copy / train_clf.TRAIN_CONFIG_FILE).read_text())
    (copy / train_clf.TRAIN_CONFIG_FILE).write_text(json.dumps(
        {**record, "train": {**record["train"], "seed": 7}}))
    assert evaluate_with(copy, elsewhere, paths.vqgan)[3] == copy

    evaluation = RunLayout(tmp_path / "c")  # its evaluation classifier: a copy of `clinical`
    shutil.copytree(paths.clinical, evaluation.classifier)
    given = rc.apply_overrides(rc.run_preset("tiny"), SMALL + [f"clinical.net={paths.clinical}"])
    with pytest.raises(run_lib.SetupError, match="is the evaluation's classifier"):
        run_lib.preflight(given, evaluation.root)


def test_train_vqgan_takes_a_classifier_folder_as_its_clinical_net(clinical_run, tmp_path):
    _, paths, _, _, _ = clinical_run
    clinical_net = runpy.run_path(str(REPO / "launch" / "train_vqgan.py"))["clinical_net"]
    net = clinical_net(str(paths.clinical))
    assert net.name == f"classifier:{paths.clinical}"
    jax.tree.map(np.testing.assert_array_equal, net.params,
                 clinical_lib.feature_net(paths.clinical).params)
    with pytest.raises(cli.UsageError, match="expected a classifier folder or "
                                             "package.module:function"):
        clinical_net(str(tmp_path / "missing"))


def test_without_clinical_net_nothing_changes(tmp_path):
    cfg = rc.resolve(rc.apply_overrides(rc.run_preset("tiny"), SMALL))
    paths = RunLayout(tmp_path)
    plan = run_lib.plan_steps(cfg, paths, (1, 2))
    assert "clinical" not in plan.decisions
    assert run_lib.clinical_net(cfg, paths, paths.world, print, plan) is None
    assert not paths.clinical.exists()
    assert "vqgan.clinical_weight" not in plan.settings["vqgan"]
    # A VQ-GAN recorded before the setting existed (the config's clinical_weight then 100, no
    # clinical.net) was made without the loss: the default reuses it, the loss refuses it.
    (paths.vqgan_run / "vqgan").mkdir(parents=True)
    (paths.vqgan_run / "vqgan" / "config.json").write_text("{}")
    old = {k: v for k, v in plan.settings["vqgan"].items() if not k.startswith("clinical.")}
    step_record.write(paths.vqgan_run, "vqgan", {**old, "vqgan.clinical_weight": 100.0}, "done")
    assert run_lib.plan_steps(cfg, paths, (1, 2)).decisions["vqgan"].action == "reuse"
    with pytest.raises(run_lib.SetupError, match=r"vqgan.clinical_weight=100.0 \(this run: 1.0\)"):
        run_lib.plan_steps(rc.apply_overrides(cfg, CLINICAL), paths, (1, 2))


def test_an_imported_vqgan_takes_no_clinical_step():
    """The real-data preset gives its VQ-GAN (vqgan_dir): its steps' records are as before."""
    cfg = rc.run_preset("dolly-v2-3b")
    vq = configs.vqgan_preset("phantom-f8")
    paths = RunLayout(pathlib.Path("/nonexistent"))
    for setting in ([], ["clinical.net=train"]):
        specs = run_lib.step_specs(rc.resolve(rc.apply_overrides(cfg, setting), vq), paths)
        clinical = next(s for s in specs if s.name == "clinical")
        vqgan = next(s for s in specs if s.name == "vqgan")
        assert clinical.directory is None and vqgan.inputs == ("world",)
        assert vqgan.own == {"vqgan_dir": cfg.vqgan_dir}


def test_clinical_settings_that_cannot_work_stop_in_one_line(tmp_path):
    cfg = rc.apply_overrides(rc.run_preset("tiny"), SMALL)
    with pytest.raises(run_lib.SetupError, match="clinical.net=train needs "
                                                 "vqgan.clinical_weight > 0"):
        run_lib.preflight(rc.apply_overrides(cfg, CLINICAL + ["vqgan.clinical_weight=0"]),
                          tmp_path / "a")
    with pytest.raises(run_lib.SetupError, match=r"^clinical.net: classifier checkpoint: "
                                                 r".*nowhere"):
        run_lib.preflight(rc.apply_overrides(cfg, [f"clinical.net={tmp_path / 'nowhere'}"]),
                          tmp_path / "b")
    with pytest.raises(run_lib.SetupError, match="is the evaluation's classifier"):
        evaluation = RunLayout(tmp_path / "c").classifier
        run_lib.preflight(rc.apply_overrides(cfg, [f"clinical.net={evaluation}"]), tmp_path / "c")
    with pytest.raises(ValueError, match="are the evaluation classifier's"):
        rc.apply_overrides(cfg, ["clinical.seed=0", "clinical.widths=24,48,96,192"])
    assert not any((tmp_path / w).exists() for w in "abc")
    # The evaluation's network and this one differ by default.
    assert dataclasses.replace(rc.run_preset("phantom").clinical, net="train").classifier_config(
        64) != clf.ClassifierConfig(image_size=64)
