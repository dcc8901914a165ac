"""Behaviour: a tiny model trained on a tiny world learns to use its input in both directions.

The world: studies with four binary findings; the report states each finding, the image's codes
are a deterministic function of the findings (a block of codes per finding) plus noise, so a
model that reads its input can predict the response far better than one that does not. A stage
of the real training loop (`run_stage`, both directions, text-only tasks off) then has to show a
clearly positive conditioning gap on its train pairs in both directions, measured by the loop's
own evaluation (`gap/<direction>/train` in metrics.jsonl).
"""

import jax
import numpy as np

from llmcxr_jax.configs import DataConfig, ModelConfig, TrainConfig, extended_vocab_rows
from llmcxr_jax.data.pipeline import Sources, pair_records
from llmcxr_jax.data.mimic import MimicRecord
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.text.bpe import train_bpe
from llmcxr_jax.train.loop import LoopConfig, run_stage
from llmcxr_jax.train.metrics import read_jsonl

N_CODES = 64  # codebook size
TOKENS_PER_IMAGE = 16
FINDINGS = (("left pleural effusion", "no left effusion"), ("cardiomegaly", "normal heart size"),
            ("right lower lobe opacity", "clear right lung"), ("pneumothorax", "no pneumothorax"))
MODEL = ModelConfig(vocab_size=extended_vocab_rows(2048, N_CODES), hidden_size=64, num_layers=2,
                    num_heads=4, intermediate_size=256, max_position_embeddings=256)
SEQ_LEN = 256
STEPS = 120
GAP_THRESHOLD = 0.1  # nats per response token, in each direction


def tiny_world(n_studies: int, seed: int = 0) -> list[MimicRecord]:
    """One image per study; findings drawn at random, codes = a function of them + 10 % noise."""
    rng = np.random.default_rng(seed)
    block = TOKENS_PER_IMAGE // len(FINDINGS)
    records = []
    for i in range(n_studies):
        present = rng.random(len(FINDINGS)) < 0.5
        report = " ".join(f"{pair[0] if p else pair[1]}." for pair, p in zip(FINDINGS, present))
        codes = np.concatenate([(np.arange(block) * 7 + 2 * k + int(p) + 1) % N_CODES
                                for k, p in enumerate(present)])
        noise = rng.random(TOKENS_PER_IMAGE) < 0.1
        codes = np.where(noise, rng.integers(0, N_CODES, TOKENS_PER_IMAGE), codes)
        records.append(MimicRecord(dicom_id=f"d{i}", subject_id=f"p{i}", study_id=f"s{i}",
                                   split="train", report=report.capitalize(),
                                   codes=codes.astype(np.uint16), pair_index=i))
    return records


def test_tiny_model_learns_to_read_its_input_in_both_directions(tmp_path):
    records = tiny_world(32)
    vocab = train_bpe([r.report for r in records], n_image=N_CODES)
    sources = Sources(pair_records(records, "both"), SkipCounter())
    data = DataConfig(weights=(0.5, 0.5, 0.0, 0.0), direction="both",
                      tokens_per_image=TOKENS_PER_IMAGE, codebook_size=N_CODES)
    train = TrainConfig(learning_rate=3e-3, warmup_steps=10, schedule="constant",
                        total_steps=STEPS, global_batch=8, seq_len=SEQ_LEN, weight_decay=0.0)
    result = run_stage(1, model_cfg=MODEL, train_cfg=train, data_cfg=data,
                       loop_cfg=LoopConfig(steps=STEPS, log_every=STEPS, eval_every=0,
                                           eval_batches=0, gap_pairs=32,
                                           checkpoint_every=10 * STEPS),
                       mesh=mesh_from_flag("1", jax.devices()[:1]), vocab=vocab,
                       train_sources=sources, eval_sources=None, stage_dir=tmp_path, stream=None)
    assert result.status == "done"
    final = {}
    for record in read_jsonl(tmp_path / "metrics.jsonl"):  # the last step's train and gap records
        if record["step"] == STEPS:
            final.update(record)
    gaps = {d: final[f"gap/{d}/train"] for d in ("report2image", "image2report")}
    print(f"train-pair gaps after {STEPS} steps: {gaps} (loss {final['loss']:.3f}, "
          f"gap evaluation {final['gap_time_s']:.2f} s)")
    assert min(gaps.values()) > GAP_THRESHOLD, gaps
