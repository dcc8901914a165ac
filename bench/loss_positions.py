"""The train step with logits at the loss slots only (`train.loss_positions`) against the same
step with logits at every slot (what transformers' `GPTNeoXForCausalLM(labels=...)` and the
original compute), on the same packed batches and weights.

The phantom default's shape: the tiny model with its vocabulary (2,048 text ids + 1,024 codes),
B=8, T=512, fp32, on all the CPU devices the launch scripts split the host into (batch over
fsdp). Each row is packed like the pipeline's: examples of 60-160 tokens whose last
`--response-share` carry the loss (the default world's rows: 29-32 % on average), so no row
holds more than T/2 loss tokens, the default's `loss_positions`. Timed interleaved (median of
`--steps`); the first-step losses must agree.

    python bench/loss_positions.py            # B=8, T=512, loss_positions 256
    python bench/loss_positions.py --quick    # B=2, T=128, 2 steps

Prints a table, then one JSON object as the last line; `speedup` is the full step's time over
the sliced one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # as the launch scripts do: one XLA CPU device per core

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llmcxr_jax.configs import TrainConfig  # noqa: E402
from llmcxr_jax.parallel.mesh import make_mesh  # noqa: E402
from llmcxr_jax.train import run_config as rc  # noqa: E402
from llmcxr_jax.train.state import init_state  # noqa: E402
from llmcxr_jax.train.step import make_train_step  # noqa: E402


def packed_batch(batch: int, length: int, vocab: int, response_share: float,
                 seed: int) -> dict[str, np.ndarray]:
    """Rows of whole examples (60-160 tokens, or shorter at T < 256), the last `response_share`
    of each with loss, in the pipeline's batch convention."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, length), np.int32) for k in
           ("inputs", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((batch, length), np.float32)
    out["task_ids"] = np.full((batch, length), -1, np.int32)
    lo, hi = (60, 160) if length >= 256 else (length // 8, length // 3)
    for r in range(batch):
        start, segment = 0, 1
        while True:
            n = int(rng.integers(lo, hi))
            if start + n > length:
                break
            ids = rng.integers(0, vocab, n)
            sl = slice(start, start + n)
            out["inputs"][r, sl] = ids
            out["targets"][r, sl] = np.append(ids[1:], 0)
            out["segment_ids"][r, sl] = segment
            out["positions"][r, sl] = np.arange(n)
            out["task_ids"][r, sl] = segment % 3
            first = start + n - int(round(response_share * n))
            out["loss_mask"][r, first:start + n - 1] = 1.0
            start, segment = start + n, segment + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: B=2, T=128, 2 steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--loss-positions", type=int, default=0,
                        help="logit slots per row (default: half the row, as the default's)")
    parser.add_argument("--response-share", type=float, default=0.32,
                        help="share of each example's tokens with loss")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.steps = 2, 128, 2
    k = args.loss_positions or args.seq_len // 2

    n = jax.local_device_count()
    if args.batch_size % n:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {n} devices")
    mesh = make_mesh({"fsdp": n}, jax.devices()[:n])
    model = rc.resolve(rc.run_preset("phantom")).model
    batches = [packed_batch(args.batch_size, args.seq_len, model.vocab_size,
                            args.response_share, i) for i in range(args.steps + 1)]
    most = max(int((b["loss_mask"] > 0).sum(axis=1).max()) for b in batches)
    if most > k:
        parser.error(f"a row holds {most} loss tokens, more than --loss-positions {k}")
    share = float(np.mean([(b["loss_mask"] > 0).mean() for b in batches]))

    base = TrainConfig(learning_rate=1e-4, warmup_steps=0, global_batch=args.batch_size,
                       seq_len=args.seq_len)
    runs = {}
    for name, positions in (("every slot", 0), (f"{k} loss slots", k)):
        cfg = dataclasses.replace(base, loss_positions=positions)
        runs[name] = [make_train_step(model, cfg, mesh, 3), init_state(model, cfg, mesh)]

    def step(name: str, b: dict) -> tuple[float, float]:
        fn, state = runs[name]
        start = time.perf_counter()
        runs[name][1], metrics = fn(state, b)
        loss = float(jax.block_until_ready(metrics["loss"]))
        return time.perf_counter() - start, loss

    first = {name: step(name, batches[0]) for name in runs}
    (_, full_loss), (_, sliced_loss) = first.values()
    if abs(full_loss - sliced_loss) > 1e-4 * abs(full_loss):
        raise RuntimeError(f"first-step losses differ: {full_loss:.6f} vs {sliced_loss:.6f}")
    times = {name: [] for name in runs}
    for b in batches[1:]:
        for name in runs:
            times[name].append(step(name, b)[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    full_s, sliced_s = median.values()
    tokens = args.batch_size * args.seq_len

    print(f"train step: tiny phantom model (vocab {model.vocab_size}), B={args.batch_size}, "
          f"T={args.seq_len}, {share:.0%} of slots with loss (at most {most} in a row), fp32, "
          f"{n} CPU device(s), median of {args.steps}")
    print(f"{'logits at':>16} {'step s':>8} {'tokens/s':>10} {'first step s':>13} {'first loss':>11}")
    for name in runs:
        print(f"{name:>16} {median[name]:>8.3f} {tokens / median[name]:>10.1f} "
              f"{first[name][0]:>13.2f} {first[name][1]:>11.5f}")
    print(f"speedup (every slot / loss slots): {full_s / sliced_s:.2f}x")
    print(json.dumps({"bench": "loss_positions", "batch": args.batch_size,
                      "seq_len": args.seq_len, "loss_positions": k, "loss_share": share,
                      "most_loss_tokens_in_a_row": most, "devices": n, "steps": args.steps,
                      "quick": args.quick, "full_step_s": full_s, "sliced_step_s": sliced_s,
                      "speedup": full_s / sliced_s, "first_loss_full": full_loss,
                      "first_loss_sliced": sliced_loss}))


if __name__ == "__main__":
    main()
