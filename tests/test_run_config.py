"""Run presets, --set overrides and launch/train.py's one-line errors for bad configuration."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from llmcxr_jax.train import run_config as rc
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_checked_by_name():
    cfg = rc.apply_overrides(rc.run_preset("phantom"), [
        "train.learning_rate=1e-4", "model.num_layers=3", "data.weights=0.3,0.3,0.2,0.2",
        "stage2.steps=7", "mesh=2x4", "world.n_studies=50", "vqgan.dead_code_restart=true",
        "world.split_fractions=(0.7, 0.1, 0.2)", "clinical.widths=[8,16]"])
    assert cfg.train.learning_rate == 1e-4 and cfg.model.num_layers == 3
    # A tuple as --help lists it (Python's repr), as a JSON list, or bare commas
    assert cfg.world.split_fractions == (0.7, 0.1, 0.2) and cfg.clinical.widths == (8, 16)
    assert cfg.data.weights == (0.3, 0.3, 0.2, 0.2) and cfg.stage2.steps == 7
    assert cfg.mesh == "2x4" and cfg.world.n_studies == 50 and cfg.vqgan.dead_code_restart is True


@pytest.mark.parametrize("item,message", [
    ("train.lr=1", "unknown --set key 'train.lr'; train keys: .*learning_rate"),
    ("optimizer.b1=0.9", "unknown --set section 'optimizer'"),
    ("train.warmup_steps=ten", "expected a value like 20"),
    ("data.weights=(0.5,0.5", "expected a value like \\(0.4, 0.4, 0.2, 0.0\\)"),
    ("colour=red", "unknown --set key 'colour'"),
    ("train.learning_rate", "expected key=value"),
    ("image_temperature=0", "image_temperature must be a finite number > 0, got 0"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        rc.apply_overrides(rc.run_preset("phantom"), [item])


@pytest.mark.parametrize("key,source", [
    ("data.seq_len", "train.seq_len"), ("data.global_batch", "train.global_batch"),
    ("data.tokens_per_image", "the VQ-GAN"), ("data.codebook_size", "the VQ-GAN"),
    ("data.stage", "the stage"), ("train.total_steps", "stage1.steps"),
    ("model.vocab_size", "vocab_text_ids"),
])
def test_derived_keys_are_refused_naming_their_source(key, source):
    with pytest.raises(ValueError, match=f"--set {key}: derived, not settable: it follows .*"
                                         f"{source}"):
        rc.apply_overrides(rc.run_preset("phantom"), [f"{key}=64"])
    listed = [line.split("=")[0] for line in rc.describe_keys().splitlines()]  # --help's list
    assert (key in listed) == (key == "model.vocab_size")  # settable only with a tokenizer


def test_a_set_value_is_what_runs():
    """What a user sets reaches the resolved config unchanged; derived values follow it."""
    cfg = rc.resolve(rc.apply_overrides(rc.run_preset("tiny"), [
        "train.seq_len=256", "train.global_batch=32", "stage1.steps=7", "vocab_text_ids=1000"]))
    vq = rc.configs.vqgan_preset(cfg.vqgan.vqgan)
    assert (cfg.train.seq_len, cfg.train.global_batch) == (256, 32)
    assert not {"seq_len", "global_batch"} & {f.name for f in dataclasses.fields(cfg.data)}
    assert (cfg.data.tokens_per_image, cfg.data.codebook_size) == (vq.tokens_per_image,
                                                                  vq.n_embed)
    assert cfg.train.total_steps == 7
    assert cfg.model.vocab_size == -(-(1000 + vq.n_embed) // 128) * 128
    # With a given tokenizer the embedding rows are the user's to set (and resolve keeps them).
    given = rc.apply_overrides(rc.run_preset("tiny"), ["tokenizer=t.json", "model.vocab_size=640"])
    assert rc.resolve(given).model.vocab_size == 640


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="known presets: .*phantom.*tiny"):
        rc.run_preset("gpt-5")


def test_resolved_config_round_trips_through_json():
    cfg = rc.resolve(rc.apply_overrides(rc.run_preset("tiny"), ["train.global_batch=32"]))
    assert cfg.train.global_batch == 32 and cfg.train.total_steps == cfg.stage1.steps
    again = rc.from_json(rc.to_json(cfg))
    assert again == cfg
    assert rc.check_against(cfg, json.loads(rc.to_json(cfg))) == []
    changed = rc.apply_overrides(cfg, ["stage1.steps=5"])
    assert rc.check_against(changed, json.loads(rc.to_json(cfg))) == ["stage1.steps"]


def test_a_config_json_that_held_the_step_shape_twice_still_loads():
    """A workdir's config.json from when `data` held copies of `train.seq_len` and
    `train.global_batch` reads as the same config."""
    cfg = rc.resolve(rc.run_preset("tiny"))
    old = json.loads(rc.to_json(cfg))
    old["data"].update(seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    assert rc.from_json(json.dumps(old)) == cfg
    assert rc.check_against(cfg, old) == []


def test_stage2_uses_impression_only_data_and_its_own_weights():
    cfg = rc.run_preset("phantom")
    assert rc.stage_data(cfg, 1).stage == 1
    two = rc.stage_data(cfg, 2)
    assert two.stage == 2 and two.weights == cfg.stage2_weights
    assert rc.stage_train(cfg, 2).total_steps == cfg.stage2.steps


def test_a_stage_scales_its_own_peak_learning_rate():
    cfg = rc.apply_overrides(rc.run_preset("phantom"), ["train.learning_rate=0.002",
                                                        "stage2.learning_rate_scale=0.25"])
    assert rc.stage_train(cfg, 2).learning_rate == pytest.approx(0.0005)
    assert rc.stage_train(cfg, 1).learning_rate == 0.002  # stage 1 (and the base) unscaled
    assert rc.stage_train(cfg, 0).learning_rate == 0.002
    with pytest.raises(ValueError, match="learning_rate_scale"):
        rc.apply_overrides(cfg, ["stage2.learning_rate_scale=0"])
    # Stage 1's scale is stage 1's alone: the base model (stage 0) keeps the unscaled rate, so a
    # rerun with another stage-1 rate reuses the base model instead of refusing it.
    one = rc.apply_overrides(cfg, ["stage1.learning_rate_scale=2"])
    assert rc.stage_train(one, 1).learning_rate == pytest.approx(0.004)
    assert rc.stage_train(one, 0).learning_rate == 0.002


def test_stage0_base_model_trains_on_text_only():
    cfg = rc.apply_overrides(rc.run_preset("phantom"), ["base_steps=12"])
    zero = rc.stage_data(cfg, 0)
    assert zero.task_weights() == {"instruct": 1.0}
    assert rc.stage_loop(cfg, 0).steps == 12 and rc.stage_train(cfg, 0).total_steps == 12
    assert rc.stage_loop(cfg, 1) == cfg.stage1  # stage 1's own settings are untouched
    assert rc.run_preset("dolly-v2-3b").base_steps == 0  # starts from dolly-v2 instead


@pytest.mark.parametrize("args,code,message", [  # exit 2: the command line is wrong; 1: cannot run
    (["--mesh=4x4"], 1, "--mesh=4x4 needs 16 devices but 2 are available"),
    (["--config", "nope"], 2, "argument --config: invalid choice: 'nope'"),
    (["--set", "train.nope=1"], 2, "unknown --set key 'train.nope'"),
    (["--set", "data.seq_len=64"], 2, "--set data.seq_len: derived, not settable: it follows "
                                      "train.seq_len"),
    (["--mesh=2", "--set", "train.global_batch=7"], 1,
     "global batch 7 is not divisible by the 2 data-parallel ways"),
])
def test_launch_train_stops_with_a_one_line_error(args, code, message, tmp_path):
    env = {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--workdir",
                           str(tmp_path / "w"), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written before the configuration is valid
