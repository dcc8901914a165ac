"""A training stage end to end on a tiny model: resume after preemption is exact, DONE is reused."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from llmcxr_jax.configs import DataConfig, ModelConfig, TrainConfig, extended_vocab_rows
from llmcxr_jax.data.pipeline import Sources
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.text.bpe import train_bpe
from llmcxr_jax.train.loop import DONE_FILE, LoopConfig, run_stage
from llmcxr_jax.train.metrics import read_jsonl
from llmcxr_jax.train.preemption import PreemptionWatcher

MODEL = ModelConfig(vocab_size=extended_vocab_rows(2048), hidden_size=64, num_layers=2,
                    num_heads=4, intermediate_size=128, max_position_embeddings=128)
TRAIN = TrainConfig(learning_rate=3e-3, warmup_steps=1, global_batch=8, seq_len=64)
DATA = DataConfig(weights=(0.0, 0.0, 1.0, 0.0), seed=3)


def instruction_sources():
    """40 short instruction records of a 9-word language and a BPE trained on them."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "lung", "heart", "clear", "small", "left"]
    records = [{"instruction": " ".join(rng.choice(words, 4)), "context": "",
                "response": " ".join(rng.choice(words, 3))} for _ in range(40)]
    vocab = train_bpe([r["instruction"] + " " + r["response"] for r in records])
    return vocab, Sources({"instruct": records}, SkipCounter())


@pytest.fixture(scope="module")
def setup():
    return (*instruction_sources(), mesh_from_flag("2x4"))


def _run(setup, stage_dir, steps, watcher=None):
    vocab, sources, mesh = setup
    result = run_stage(1, model_cfg=MODEL, train_cfg=TRAIN, data_cfg=DATA,
                       loop_cfg=LoopConfig(steps=steps, log_every=1, checkpoint_every=2,
                                           eval_batches=1),
                       mesh=mesh, vocab=vocab, train_sources=sources, eval_sources=sources,
                       stage_dir=stage_dir, watcher=watcher, stream=None)
    losses = {}
    for record in read_jsonl(stage_dir / "metrics.jsonl"):
        losses.setdefault(record["step"], record.get("loss"))
    return result, losses


class StopAt(PreemptionWatcher):
    """Asks to stop at a given step, as a SIGTERM arriving then would."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def should_stop(self, step: int) -> bool:
        return step >= self.step


def test_preempted_then_resumed_stage_gives_the_uninterrupted_losses(setup, tmp_path):
    full, full_losses = _run(setup, tmp_path / "full", steps=4)
    assert full.status == "done" and full.step == 4
    assert full_losses[4] < full_losses[1]
    done = json.loads((tmp_path / "full" / DONE_FILE).read_text())
    assert done["step"] == 4 and "eval_loss" in done and done["tokens_per_s"] > 0
    assert (tmp_path / "full" / "tensorboard").is_dir()
    # The finished stage drew its curves (loss, learning rate, tokens/s: 2 x 2 panels).
    assert Image.open(tmp_path / "full" / "curves.png").size == (1200, 720)

    first, _ = _run(setup, tmp_path / "cut", steps=4, watcher=StopAt(3))
    assert first.status == "preempted" and first.step == 3
    assert not (tmp_path / "cut" / DONE_FILE).exists()
    assert not (tmp_path / "cut" / "curves.png").exists()
    resumed, resumed_losses = _run(setup, tmp_path / "cut", steps=4)
    assert resumed.status == "done"
    np.testing.assert_allclose(resumed_losses[4], full_losses[4], rtol=1e-6)

    again, _ = _run(setup, tmp_path / "full", steps=4)
    assert again.status == "reused"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           again.params, full.params)
