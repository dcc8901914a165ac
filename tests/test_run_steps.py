"""What a rerun does with each finished step (train/step_record.py, train/run.py's plan), and how
the run fits each step's batch to the devices: reuse only what was asked for, continue a finished
stage to more steps from its checkpoint (the schedule held at its original end), refuse anything
else in one line naming the setting; the VQ-GAN's data axis divides its batch."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmcxr_jax.configs import TrainConfig
from llmcxr_jax.parallel.mesh import MeshError
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.train import step_record
from llmcxr_jax.train.loop import DONE_FILE, LoopConfig, run_stage
from llmcxr_jax.train.metrics import read_jsonl
from llmcxr_jax.train.optimizer import learning_rate_schedule
from llmcxr_jax.vqgan.train import data_axis_size
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- step_record.decide ------------------------------------------------------------------------


def _decide(directory, asked, **kw):
    kw.setdefault("finished", True)
    return step_record.decide("stage 1", directory, asked, length_key="stage1.steps", **kw)


def test_a_finished_step_is_reused_only_as_it_was_made(tmp_path):
    asked = {"stage1.steps": 12, "train.learning_rate": 1e-3, "data.weights": (0.4, 0.6)}
    assert _decide(tmp_path, asked, finished=False).action == "new"
    step_record.write(tmp_path, "stage1", asked, "done", schedule_steps=12)
    assert _decide(tmp_path, asked).action == "reuse"
    longer = _decide(tmp_path, {**asked, "stage1.steps": 24})
    assert longer.action == "continue" and longer.done_steps == 12
    assert longer.record["schedule_steps"] == 12
    with pytest.raises(step_record.StepConflict, match=r"already ran 12 steps .* cannot be cut"):
        _decide(tmp_path, {**asked, "stage1.steps": 6})
    with pytest.raises(step_record.StepConflict,
                       match=r"stage 1 in .* was made with train.learning_rate=0.001 \(this run: "
                             r"0.002\): rerun with the recorded values, or start afresh"):
        _decide(tmp_path, {**asked, "train.learning_rate": 2e-3})
    # A field added to a config after the record was written is not a difference.
    assert _decide(tmp_path, {**asked, "data.new_field": 1.0}).action == "reuse"
    # Unfinished (status "started"): same settings resume, another length is the new target.
    step_record.write(tmp_path, "stage1", asked, "started", schedule_steps=12)
    assert _decide(tmp_path, asked).action == "resume"
    assert _decide(tmp_path, {**asked, "stage1.steps": 30}).action == "resume"
    with pytest.raises(step_record.StepConflict, match="was started with train.learning_rate"):
        _decide(tmp_path, {**asked, "train.learning_rate": 2e-3})


def test_steps_without_a_record_are_reused_with_a_note_and_derived_steps_are_redone(tmp_path):
    legacy = _decide(tmp_path, {"stage1.steps": 12}, legacy_length=12)
    assert legacy.action == "legacy" and "finished before settings were recorded" in legacy.note
    assert _decide(tmp_path, {"stage1.steps": 20}, legacy_length=12).action == "continue"
    with pytest.raises(step_record.StepConflict, match="cannot be cut to 8"):
        _decide(tmp_path, {"stage1.steps": 8}, legacy_length=12)
    codes = tmp_path / "codes"
    step_record.write(codes, "codes", {"vqgan.steps": 1}, "done")
    redo = step_record.decide("codes", codes, {"vqgan.steps": 2}, finished=False, started=True,
                              derived=True)
    assert redo.action == "redo" and "vqgan.steps=1 (this run: 2)" in redo.note


# ---- the run's plan over a workdir -------------------------------------------------------------


def _fake_finished_stage(paths: RunLayout, k: int, steps: int) -> None:
    (paths.stage(k) / "checkpoints" / str(steps)).mkdir(parents=True)
    (paths.stage(k) / DONE_FILE).write_text(json.dumps({"step": steps}))


def _plan(cfg, paths, stages=(1, 2)):
    return run_lib.plan_steps(rc.resolve(cfg), paths, stages)


def test_plan_reuses_continues_or_refuses_each_step(tmp_path):
    cfg = rc.apply_overrides(rc.run_preset("tiny"), ["stage1.steps=12", "stage2.steps=12"])
    paths = RunLayout(tmp_path)
    plan = _plan(cfg, paths)
    assert {n: d.action for n, d in plan.decisions.items()} == {
        "world": "new", "vqgan": "new", "tokenizer": "new", "codes": "new", "stage1": "new",
        "stage2": "new"}
    # Stage 2's record holds what it was made from, transitively: stage 1, codes, VQ-GAN, world.
    assert plan.settings["stage2"]["stage1.steps"] == 12
    assert plan.settings["stage2"]["vqgan.steps"] == cfg.vqgan.steps
    assert plan.settings["stage2"]["world.n_studies"] == cfg.world.n_studies
    # Pretend every step finished as planned.
    (paths.world).mkdir()
    (paths.world / "phantom_world.json").write_text("{}")
    (paths.vqgan_run / "vqgan").mkdir(parents=True)
    (paths.vqgan_run / "vqgan" / "config.json").write_text("{}")
    paths.tokenizer.mkdir()
    (paths.tokenizer / "tokenizer.json").write_text("{}")
    paths.codes.mkdir()
    (paths.codes / "index.json").write_text("{}")
    _fake_finished_stage(paths, 1, 12)
    _fake_finished_stage(paths, 2, 12)
    for name in plan.decisions:
        plan.finish(name, schedule_steps=12)
    again = _plan(cfg, paths)
    assert {n: d.action for n, d in again.decisions.items()} == {
        "world": "reuse", "vqgan": "reuse", "tokenizer": "reuse", "codes": "resume",
        "stage1": "reuse", "stage2": "reuse"}

    # The case: a finished stage asked for more steps continues (stage 1 alone) ...
    more = _plan(dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, steps=24)),
                 paths, stages=(1,))
    assert more.decisions["stage1"].action == "continue"
    assert more.schedule_steps("stage1", 24) == 12  # the schedule keeps its original length
    # ... but not under a finished stage 2 that was trained from the 12-step stage 1.
    with pytest.raises(run_lib.SetupError, match=r"stage 2 in .* was made with stage1.steps=12 "
                                                 r"\(this run: 24\)"):
        _plan(dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, steps=24)), paths)
    # Any other changed setting of a finished step is refused, naming it; the first step whose
    # work differs is the one named (the world here, not the stages made from it).
    with pytest.raises(run_lib.SetupError, match=r"world in .* was made with world.n_studies=120 "
                                                 r"\(this run: 50\)"):
        _plan(rc.apply_overrides(cfg, ["world.n_studies=50"]), paths)
    with pytest.raises(run_lib.SetupError, match=r"was made with data.image_loss_weight=1.0 "
                                                 r"\(this run: 2.0\)"):
        _plan(rc.apply_overrides(cfg, ["data.image_loss_weight=2"]), paths)
    # Logging, checkpointing, the mesh and the bad-record limit are not results: changing them
    # reuses everything.
    relaxed = rc.apply_overrides(cfg, ["stage1.log_every=1", "vqgan.checkpoint_every=3",
                                       "mesh=1x2", "model.remat_policy=full",
                                       "data.max_skip_fraction=0.5"])
    assert _plan(relaxed, paths).decisions["stage2"].action == "reuse"
    # A longer VQ-GAN re-encodes the codes, so the stages made from the old ones are refused.
    with pytest.raises(run_lib.SetupError, match=r"stage 1 in .* vqgan.steps=20 \(this run: 40\)"):
        _plan(rc.apply_overrides(cfg, ["vqgan.steps=40"]), paths)
    # --stage 2 alone reads stage 1 as it is, but its weights fix the model of a new stage 2.
    assert _plan(cfg, paths, stages=(2,)).decisions["stage1"].action == "reuse"
    shutil.rmtree(paths.stage(2))
    assert _plan(rc.apply_overrides(cfg, ["stage1.steps=99"]), paths,
                 stages=(2,)).decisions["stage2"].action == "new"
    with pytest.raises(run_lib.SetupError, match=r"stage 2 starts from stage 1's weights .* "
                                                 r"model.hidden_size=128 \(this run: 64\)"):
        _plan(rc.apply_overrides(cfg, ["model.hidden_size=64"]), paths, stages=(2,))


def test_a_workdir_from_before_records_keeps_working(tmp_path):
    cfg = rc.apply_overrides(rc.run_preset("tiny"), ["stage1.steps=12"])
    paths = RunLayout(tmp_path)
    paths.world.mkdir()
    (paths.world / "phantom_world.json").write_text("{}")
    _fake_finished_stage(paths, 1, 12)
    plan = _plan(cfg, paths, stages=(1,))
    assert plan.decisions["world"].action == "legacy"
    assert plan.decisions["stage1"].action == "legacy"
    assert any("stage 1" in n and "before settings were recorded" in n for n in plan.notes())
    longer = _plan(rc.apply_overrides(cfg, ["stage1.steps=20"]), paths, stages=(1,))
    assert longer.decisions["stage1"].action == "continue"
    assert longer.schedule_steps("stage1", 20) == 12  # it was trained with a 12-step schedule


def test_the_schedule_holds_its_end_value_past_its_length():
    for schedule, warmup in (("cosine", 2), ("constant", 2), ("cosine", 20)):
        cfg = TrainConfig(learning_rate=1e-3, warmup_steps=warmup, schedule=schedule,
                          total_steps=10)
        lr = learning_rate_schedule(cfg)
        end = float(lr(10))
        assert [float(lr(s)) for s in (11, 20, 1000)] == [end] * 3
        if schedule == "cosine" and warmup < 10:
            assert end == pytest.approx(1e-4)  # min_lr_ratio x learning_rate


# ---- a continued stage is the uninterrupted run of its schedule --------------------------------


def test_a_finished_stage_continued_equals_the_uninterrupted_run(tmp_path):
    from llmcxr_jax.parallel.mesh import mesh_from_flag
    from test_loop import DATA as data, MODEL as model, instruction_sources

    # A 2-step cosine schedule (warmup 1): steps past 2 run at its floor.
    train = TrainConfig(learning_rate=3e-3, warmup_steps=1, global_batch=8, seq_len=64,
                        schedule="cosine", total_steps=2)
    vocab, sources = instruction_sources()
    mesh = mesh_from_flag("2x4")

    def stage(directory, steps, reuse_done=True):
        result = run_stage(1, model_cfg=model, train_cfg=train, data_cfg=data,
                           loop_cfg=LoopConfig(steps=steps, log_every=1, checkpoint_every=100,
                                               eval_batches=0, gap_pairs=0),
                           mesh=mesh, vocab=vocab, train_sources=sources, eval_sources=None,
                           stage_dir=directory, stream=None, reuse_done=reuse_done)
        metrics = {r["step"]: r for r in read_jsonl(directory / "metrics.jsonl") if "loss" in r}
        return result, metrics

    full, full_metrics = stage(tmp_path / "full", 4)
    first, _ = stage(tmp_path / "ext", 2)
    assert first.status == "done" and first.step == 2
    assert stage(tmp_path / "ext", 4)[0].status == "reused"  # DONE.json: as before
    more, more_metrics = stage(tmp_path / "ext", 4, reuse_done=False)
    assert more.status == "done" and more.step == 4
    assert json.loads((tmp_path / "ext" / DONE_FILE).read_text())["step"] == 4
    for step in (3, 4):
        np.testing.assert_allclose(more_metrics[step]["loss"], full_metrics[step]["loss"],
                                   rtol=1e-6)
        # The rate a step used is the schedule at the steps before it: held at its end value.
        assert more_metrics[step]["learning_rate"] == pytest.approx(3e-4)  # 0.1 x 3e-3
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
        more.params, full.params)


# ---- devices vs batches ------------------------------------------------------------------------


def test_vqgan_data_axis_divides_its_batch_or_names_values_that_work():
    assert data_axis_size(-1, 8, 16) == 8  # the default on a 4x4 host: 8 of the 16 devices
    assert data_axis_size(-1, 8, 2) == 2 and data_axis_size(-1, 8, 6) == 2
    assert data_axis_size(4, 8, 16) == 4
    with pytest.raises(MeshError, match=r"vqgan.batch_size=8 is not divisible by the 16 devices "
                                        r"of vqgan.mesh_data=16: --set vqgan.mesh_data=8 \(or -1\) "
                                        r"or --set vqgan.batch_size=16 works"):
        data_axis_size(16, 8, 16, prefix="vqgan.")
    with pytest.raises(MeshError, match="needs 32 devices but 16 are available"):
        data_axis_size(32, 8, 16, prefix="vqgan.")


@pytest.mark.parametrize("args,message", [
    # The default preset (global batch 8) on 16 devices: a value that works, nothing written.
    (["--mesh=4x4"], "global batch 8 is not divisible by the 16 data-parallel ways of the mesh "
                     "(data=4 x fsdp=4): --set train.global_batch=16 works on this mesh"),
    (["--mesh=4x4", "--config", "tiny", "--set", "vqgan.mesh_data=16"],
     "vqgan.batch_size=8 is not divisible by the 16 devices of vqgan.mesh_data=16"),
    (["--config", "dolly-v2-3b", "--mesh=4x4"], "this preset has no phantom world"),
])
def test_configurations_that_cannot_run_stop_in_one_line(args, message, tmp_path):
    env = {"XLA_FLAGS": xla_flags(16), "JAX_PLATFORMS": "cpu",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--workdir",
                           str(tmp_path / "w"), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    # Well-formed but cannot run on this mesh or without data: exit 1 (llmcxr_jax.cli).
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()  # checked before anything is written


def test_stage_2_alone_after_stage_1_with_a_base_model(tmp_path):
    """`--stage 2` after `--stage 1` of a preset with a base model (stage 0): stage 1 is read as it
    is, so neither stage 0 nor stage 1's starting point is rebuilt (this used to stop with a
    KeyError for stage 0, which the plan of `--stage 2` leaves out)."""
    env = {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    common = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "tiny",
              "--workdir", str(tmp_path / "w"), "--steps", "1", "--set", "world.n_studies=40",
              "--set", "world.n_instructions=40", "--set", "vqgan.steps=1", "--set",
              "base_steps=1", "--set", "samples=0"]
    for stage in ("1", "2"):
        proc = subprocess.run([*common, "--stage", stage], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stage 2: done at step 1" in proc.stdout
    assert "stage 0" not in proc.stdout  # the base model is neither rerun nor reloaded
    # Stage 1 gives its final params and nothing else: its data are not read.
    assert "stage 1: reused at step 1" in proc.stdout
    assert not [line for line in proc.stdout.splitlines()
                if line.startswith("stage 1:") and "training records" in line], proc.stdout


# ---- a run without stage 1 (the paper's two-stage ablation) ------------------------------------


def test_a_run_without_stage_1_plans_stage_2_from_the_base_model(tmp_path):
    """`stage1.steps=0`: no stage 1 in the plan; stage 2's record holds what stage 1's would (the
    base model, the codebook rows, stage1.steps=0), so a later run with stage 1 refuses it."""
    cfg = rc.apply_overrides(rc.run_preset("tiny"), ["stage1.steps=0", "stage2.steps=12",
                                                     "base_steps=4"])
    paths = RunLayout(tmp_path)
    for stages in ((1, 2), (2,)):
        plan = _plan(cfg, paths, stages)
        assert "stage1" not in plan.decisions, stages
        assert plan.decisions["stage0"].action == plan.decisions["stage2"].action == "new"
    made_from = plan.settings["stage2"]
    assert made_from["stage1.steps"] == 0 and made_from["base_steps"] == 4
    assert made_from["image_embeddings"] == "codebook" and made_from["init_from"] == ""
    assert made_from["vqgan.steps"] == cfg.vqgan.steps  # through the codes, as stage 1's would
    with pytest.raises(run_lib.SetupError, match="--stage 1 with stage1.steps=0: there is no "
                                                 "stage 1 to run"):
        _plan(cfg, paths, stages=(1,))
    _fake_finished_stage(paths, 2, 12)
    plan.finish("stage2", schedule_steps=12)
    assert _plan(cfg, paths).decisions["stage2"].action == "reuse"
    with pytest.raises(run_lib.SetupError, match=r"stage 2 in .* was made with stage1.steps=0 "
                                                 r"\(this run: 12\)"):
        _plan(rc.apply_overrides(cfg, ["stage1.steps=12"]), paths)


def test_a_run_without_stage_1_trains_stage_2_from_the_base_model(tmp_path):
    """`--set stage1.steps=0` end to end: stage 0, then stage 2 straight from the base model with
    the image rows from the VQ-GAN's codebook (learning rate 0, so the final model is exactly
    where stage 2 started); `--steps` leaves stage 1 off; no stage1/ is made, and the
    evaluation's inputs and learning curve read the workdir."""
    from flax import linen as nn

    from llmcxr_jax import configs
    from llmcxr_jax.eval import learning_curve, protocol
    from llmcxr_jax.llm.checkpoint import load_llm
    from llmcxr_jax.llm.image_embeddings import codebook_rows
    from llmcxr_jax.vqgan.checkpoint import save_vqgan
    from llmcxr_jax.vqgan.model import init_params as vqgan_init

    vq_cfg = configs.vqgan_preset("test-tiny")  # given, so the run trains no VQ-GAN
    vq_params = vqgan_init(vq_cfg, seed=1)
    save_vqgan(tmp_path / "vqgan", vq_cfg, vq_params)
    env = {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", "tiny", "--workdir",
         str(work), "--steps", "2", "--set", "stage1.steps=0", "--set", "world.n_studies=40",
         "--set", "world.n_instructions=40", "--set", f"vqgan_dir={tmp_path / 'vqgan'}",
         "--set", "base_steps=1", "--set", "samples=0", "--set", "train.learning_rate=0",
         "--set", "stage2.eval_batches=0", "--set", "stage2.gap_pairs=0", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stage 0: done at step 1" in proc.stdout and "stage 2: done at step 2" in proc.stdout
    assert not RunLayout(work).stage(1).exists()
    # The last line lists what the workdir holds: no stage1/, no vqgan_run/ (the VQ-GAN is given).
    listed = proc.stdout.strip().splitlines()[-1].split(": ", 1)[1].split(" (each stage")[0]
    assert listed == "config.json, world/, tokenizer/, codes/, stage0/, base/, stage2/, llm/"
    assert sorted(listed.split(", ")) == sorted(p.name + "/" * p.is_dir() for p in work.iterdir())
    cfg = rc.from_json((work / "config.json").read_text())
    assert cfg.stage1.steps == 0 and cfg.stage2.steps == 2
    _, base, vocab = load_llm(work / "base")
    model_cfg, final, _ = load_llm(work / "llm")
    codebook = np.asarray(nn.unbox(vq_params)["quantize"]["embedding"])
    rows = codebook_rows(codebook, model_cfg.hidden_size, model_cfg.initializer_range,
                         cfg.train.seed)
    image = slice(vocab.image_offset, vocab.image_offset + len(codebook))
    np.testing.assert_allclose(np.asarray(final["embed_in"]["embedding"])[image], rows, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(final["embed_out"]["kernel"])[:, image], rows.T,
                               rtol=1e-6)
    text = slice(0, vocab.image_offset)
    np.testing.assert_array_equal(np.asarray(final["embed_in"]["embedding"])[text],
                                  np.asarray(base["embed_in"]["embedding"])[text])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        {k: v for k, v in final.items() if not k.startswith("embed_")},
        {k: v for k, v in base.items() if not k.startswith("embed_")})
    # The evaluation reads it: the final model's report section, a curve of stage 2 alone.
    inputs = protocol.resolve_inputs(work, protocol.EvalOptions())
    assert inputs.report_stage == 2
    curves, boundaries = learning_curve.read_curves(work)
    assert curves and boundaries == []
    assert learning_curve.plot(work, tmp_path / "curve.png").is_file()
