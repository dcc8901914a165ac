"""Data that is mostly bad stops the run before training (data.max_skip_fraction, default 5 %),
in one line naming the file, the fraction and the most common reason; a few bad records below
the limit are skipped, counted, and the rest trains."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llmcxr_jax import configs
from llmcxr_jax.configs import DataConfig
from llmcxr_jax.data import mimic
from llmcxr_jax.data import pipeline as P
from llmcxr_jax.data.skips import SkipCounter, TooManySkipped
from llmcxr_jax.text.bpe import train_bpe
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.vqgan import encode as encode_lib
from llmcxr_jax.vqgan.checkpoint import save_vqgan
from llmcxr_jax.vqgan.model import init_params as init_vqgan_params
from tiny_mimic_world import REPORT_FULL, Image, random_codes, write_world

REPO = pathlib.Path(__file__).resolve().parents[1]
N_IMAGES = 40
N_GOOD_ROWS = 4  # of the split CSV's 40 rows, the rest written with ';' between the fields


def _world(root: pathlib.Path, wrong_delimiter: bool) -> tuple[pathlib.Path, list[str]]:
    """A MIMIC-layout world of 40 train images, one report each; optionally its split CSV's rows
    (not its header) separated by ';' after the first 4, as a spreadsheet export might."""
    images = [Image(f"d{i:03d}", f"1{i:07d}", f"5{i:07d}") for i in range(N_IMAGES)]
    write_world(root, images, {(im.subject_id, im.study_id): REPORT_FULL for im in images},
                gz=False, write_images=False)
    if wrong_delimiter:
        path = root / mimic.SPLIT_CSV
        lines = path.read_text().splitlines()
        lines[1 + N_GOOD_ROWS:] = [line.replace(",", ";") for line in lines[1 + N_GOOD_ROWS:]]
        path.write_text("\n".join(lines) + "\n")
    return root, [im.dicom_id for im in images]


def _instructions(path: pathlib.Path, n: int, n_bad: int) -> pathlib.Path:
    lines = [json.dumps({"instruction": f"Say {i}.", "context": "", "response": str(i)})
             for i in range(n - n_bad)] + ["{not json"] * n_bad
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_wrong_delimiter_stops_the_run_in_one_line(tmp_path):
    """launch/train.py on a world whose split CSV skips 90 % of its rows: exit 1 before any
    training, one line naming the CSV, the fraction and the reason."""
    workdir = tmp_path / "run"
    world, ids = _world(workdir / "world", wrong_delimiter=True)
    (world / "phantom_world.json").write_text("{}")  # a finished world: the run reuses it
    _instructions(world / "instructions.jsonl", 20, 0)
    vq = configs.vqgan_preset("phantom-f8-64")
    save_vqgan(tmp_path / "vqgan", vq, init_vqgan_params(vq, 0))
    writer = encode_lib.CodesWriter(tmp_path / "codes", {
        "vqgan": configs.to_dict(vq), "params_sha256": "random", "latent_shape": [8, 8]})
    for dicom_id, codes in random_codes(ids, n=64).items():
        writer.add(dicom_id, codes.reshape(8, 8), dicom_id)
    writer.flush()
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "tiny", "--workdir", str(workdir),
         "--stage", "1", "--steps", "1", "--set", f"vqgan_dir={tmp_path / 'vqgan'}",
         "--set", f"data.codes={tmp_path / 'codes'}", "--set", "vocab_text_ids=512"],
        cwd=REPO, env=dict(os.environ, LLMCXR_CPU_DEVICES="1"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    bad = N_IMAGES - N_GOOD_ROWS
    line = (f"error: {world / mimic.SPLIT_CSV}: {bad / N_IMAGES:.1%} of its {N_IMAGES} records "
            f"are bad ({bad} skipped, most often malformed_csv_row: {bad}, e.g. "
            f"{mimic.SPLIT_CSV}:{N_GOOD_ROWS + 2}), more than data.max_skip_fraction=0.05")
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "stage1" / "checkpoints").exists()  # stopped before training


def test_the_limit_is_per_source_and_a_config_field(tmp_path):
    world, ids = _world(tmp_path / "w", wrong_delimiter=True)
    codes = {k: v for k, v in random_codes(ids, n=16).items()}
    cfg = DataConfig(world=str(world), weights=(0.5, 0.5, 0, 0), tokens_per_image=16)
    with pytest.raises(TooManySkipped, match=r"split.csv: 90.0% of its 40 records are bad "
                                             r"\(36 skipped, most often malformed_csv_row"):
        P.load_sources(cfg, codes=codes)
    # Raised to 0.95 the same files load: the 4 good rows, 36 counted skips.
    sources = P.load_sources(DataConfig(**{**configs.to_dict(cfg), "max_skip_fraction": 0.95,
                                           "splits": ("train",)}), codes=codes)
    assert sum(sources.sizes().values()) == N_GOOD_ROWS
    assert sources.skips["malformed_csv_row"] == N_IMAGES - N_GOOD_ROWS
    # Missing codes are bad records of the codes, not of the CSV; a filter is not bad data.
    half = dict(list(codes.items())[:N_GOOD_ROWS // 2])
    clean, _ = _world(tmp_path / "clean", wrong_delimiter=False)
    with pytest.raises(TooManySkipped, match=r"^image codes \(data.codes\): 95.0% of its 40 "
                                             r"records are bad \(38 skipped, most often "
                                             r"codes_missing"):
        P.load_sources(DataConfig(**{**configs.to_dict(cfg), "world": str(clean)}), codes=half)
    skips = SkipCounter()
    skips.saw("f", 10)
    skips.add("not_in_stage2_subset")
    for _ in range(9):
        skips.add("filtered")
    skips.check_fraction(0.05)
    with pytest.raises(ValueError, match="max_skip_fraction must be in"):
        DataConfig(max_skip_fraction=1.5)


def test_a_few_bad_records_below_the_limit_are_counted_and_the_rest_trains(tmp_path):
    """1 bad line in 40 (2.5 %) of an instruction file: read, counted, and batches come out of
    the run's own source loader."""
    path = _instructions(tmp_path / "dolly.jsonl", 40, 1)
    cfg = DataConfig(instructions=str(path), weights=(0, 0, 1, 0), tokens_per_image=16,
                     codebook_size=16)
    sources = run_lib.training_sources(cfg, None)
    assert sources.sizes() == {"instruct": 39} and sources.skips["not_json"] == 1
    assert sources.skips.seen[str(path)] == 40
    vocab = train_bpe([f"Say {i}. {i}" for i in range(40)], vocab_size=512, n_image=16)
    batch = next(iter(P.build_pipeline(sources, vocab, cfg, seq_len=64, global_batch=4,
                                       shard_index=0, shard_count=1)))
    assert batch["inputs"].shape == (4, 64) and np.any(batch["loss_mask"] > 0)
    # 3 bad lines in 40 (7.5 %): the run's loader stops with one line (SetupError).
    with pytest.raises(run_lib.SetupError, match=r"worse.jsonl: 7.5% of its 40 records are bad "
                                                 r"\(3 skipped, most often not_json: 3"):
        run_lib.training_sources(DataConfig(**{**configs.to_dict(cfg), "instructions": str(
            _instructions(tmp_path / "worse.jsonl", 40, 3))}), None)
