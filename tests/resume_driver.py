"""A real training process for the resume tests: one tiny stage through `train.loop.run_stage`.

    python tests/resume_driver.py STAGE_DIR --steps 6 [--step-delay 0.3]

Everything is fixed by seeds (vocabulary, records, init, data order), so two runs in the same
STAGE_DIR continue each other exactly as `launch/train.py` would. After each step's checkpoint
save has been started, the process prints `step N` (flushed) and sleeps `--step-delay` seconds so
that a test can signal or kill it between steps; SIGTERM is handled by the project's
`PreemptionWatcher`. The last line is `result STATUS STEP`; the exit code is 0, also when
preempted (as `launch/train.py` does).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

# tensorboardX imports torch when it can (about 4 s here) only to accept torch tensors; this
# process never has any, and each resume test starts it four times.
sys.modules.setdefault("torch", None)  # type: ignore[arg-type]

import numpy as np  # noqa: E402

from llmcxr_jax.configs import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from llmcxr_jax.data.pipeline import Sources  # noqa: E402
from llmcxr_jax.data.skips import SkipCounter  # noqa: E402
from llmcxr_jax.parallel.mesh import mesh_from_flag  # noqa: E402
from llmcxr_jax.text.bpe import train_bpe  # noqa: E402
from llmcxr_jax.train.loop import LoopConfig, run_stage  # noqa: E402
from llmcxr_jax.train.preemption import PreemptionWatcher  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "lung", "heart", "clear", "small", "left", "right"]
SEQ_LEN = 64
BATCH = 4
CHECKPOINT_EVERY = 2


def tiny_setup():
    """Vocabulary (byte-level BPE, 1,024 text ids + 16 image ids), instruction records, configs."""
    rng = np.random.default_rng(0)
    records = [{"instruction": " ".join(rng.choice(WORDS, 3)), "context": "",
                "response": " ".join(rng.choice(WORDS, 2))} for _ in range(40)]
    vocab = train_bpe([r["instruction"] + " " + r["response"] for r in records],
                      vocab_size=1024, n_image=16)
    model = ModelConfig(vocab_size=vocab.embed_rows, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=SEQ_LEN)
    train = TrainConfig(learning_rate=3e-3, warmup_steps=1, global_batch=BATCH, seq_len=SEQ_LEN)
    data = DataConfig(weights=(0.0, 0.0, 1.0, 0.0), seed=3, tokens_per_image=16,
                      codebook_size=16)
    return vocab, Sources({"instruct": records}, SkipCounter()), model, train, data


class SlowWatcher(PreemptionWatcher):
    """The project's SIGTERM/SIGINT watcher, announcing each step and pausing after it."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def should_stop(self, step: int) -> bool:
        print(f"step {step}", flush=True)
        time.sleep(self.delay)
        return super().should_stop(step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage_dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    vocab, sources, model, train, data = tiny_setup()
    with SlowWatcher(args.step_delay) as watcher:
        result = run_stage(1, model_cfg=model, train_cfg=train, data_cfg=data,
                           loop_cfg=LoopConfig(steps=args.steps, log_every=1,
                                               checkpoint_every=CHECKPOINT_EVERY,
                                               keep_checkpoints=10, eval_batches=0),
                           mesh=mesh_from_flag("-1"), vocab=vocab, train_sources=sources,
                           eval_sources=None, stage_dir=pathlib.Path(args.stage_dir),
                           watcher=watcher, stream=None)
    print(f"result {result.status} {result.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
