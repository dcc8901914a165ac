"""Train-step throughput: our jitted AdamW step vs transformers + torch AdamW, same weights.

pythia-70m shape with the extended vocabulary (51,328 rows), B=8, T=512, fp32 on CPU, next-token
cross-entropy on every position, global-norm clipping at 1.0, weight decay 0 on both sides. Ours
is the project's train step (`llmcxr_jax.train.step.make_train_step`, one device); the reference
is `GPTNeoXForCausalLM(labels=...)` + `torch.optim.AdamW` + `clip_grad_norm_`. The first step
(compilation for us) is timed separately; the table shows the median of `--steps` timed steps,
ours and the reference interleaved so both see the same machine load.

    python bench/train_step.py            # B=8, T=512
    python bench/train_step.py --quick    # B=2, T=128 smoke run

Prints a table, then one JSON object as the last line; `ratio_vs_reference` is our tokens/s over
the reference's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.decode import hf_model  # noqa: E402
from llmcxr_jax.configs import DOLLY_TEXT_IDS, TrainConfig, model_preset  # noqa: E402
from llmcxr_jax.llm import hf_mapping  # noqa: E402
from llmcxr_jax.parallel.mesh import make_mesh  # noqa: E402
from llmcxr_jax.train.state import state_from_params  # noqa: E402
from llmcxr_jax.train.step import make_train_step  # noqa: E402

LEARNING_RATE = 1e-4


def make_batch(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random ids; the loss on every position that has a next token."""
    inputs = np.random.default_rng(seed).integers(0, DOLLY_TEXT_IDS, (batch, length))
    loss_mask = np.ones((batch, length), np.float32)
    loss_mask[:, -1] = 0
    return dict(inputs=inputs.astype(np.int32), targets=np.roll(inputs, -1, 1).astype(np.int32),
                loss_mask=loss_mask, segment_ids=np.ones((batch, length), np.int32),
                positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)),
                task_ids=np.zeros((batch, length), np.int32))


def _timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    loss = fn()
    return time.perf_counter() - start, loss


def run(batch: int, length: int, steps: int, threads: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    config = model_preset("pythia-70m")
    model = hf_model(config, seed).train()
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(state_dict, config, to_array=jnp.asarray)

    train_cfg = TrainConfig(learning_rate=LEARNING_RATE, warmup_steps=0, weight_decay=0.0,
                            grad_clip_norm=1.0, global_batch=batch, seq_len=length)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    step = make_train_step(config, train_cfg, mesh, num_tasks=1)
    state = state_from_params(params, config, train_cfg, mesh)

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0,
                                  betas=(train_cfg.b1, train_cfg.b2), eps=train_cfg.eps)
    batches = [make_batch(batch, length, seed + i) for i in range(steps + 1)]

    def ours(b: dict) -> float:
        nonlocal state
        state, metrics = step(state, b)
        return float(jax.block_until_ready(metrics["loss"]))

    def reference(b: dict) -> float:
        ids = torch.tensor(b["inputs"], dtype=torch.long)
        out = model(input_ids=ids, labels=ids)  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(out.loss.detach())

    first_ours, loss_ours = _timed(lambda: ours(batches[0]))
    first_ref, loss_ref = _timed(lambda: reference(batches[0]))
    times_ours, times_ref = [], []
    for b in batches[1:]:
        times_ours.append(_timed(lambda: ours(b))[0])
        times_ref.append(_timed(lambda: reference(b))[0])
    ours_s, ref_s = statistics.median(times_ours), statistics.median(times_ref)
    tokens = batch * length
    return {
        "ours_step_s": ours_s, "reference_step_s": ref_s,
        "ours_tokens_per_s": tokens / ours_s, "reference_tokens_per_s": tokens / ref_s,
        "ratio_vs_reference": ref_s / ours_s,
        "ours_first_step_s": first_ours, "reference_first_step_s": first_ref,
        "ours_compile_s": max(first_ours - ours_s, 0.0),
        "first_loss_ours": loss_ours, "first_loss_reference": loss_ref,
        "ours_all_s": times_ours, "reference_all_s": times_ref,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: B=2, T=128, 2 steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.steps = 2, 128, 2

    r = run(args.batch, args.seq_len, args.steps, args.threads)
    if abs(r["first_loss_ours"] - r["first_loss_reference"]) > 1e-3 * r["first_loss_reference"]:
        raise RuntimeError(f"first-step losses differ: ours {r['first_loss_ours']:.6f}, "
                           f"reference {r['first_loss_reference']:.6f}")
    print(f"train step: pythia-70m shape, vocab 51,328, B={args.batch}, T={args.seq_len}, fp32, "
          f"AdamW, median of {args.steps}")
    print(f"{'':>10} {'step s':>8} {'tokens/s':>10} {'first step s':>13} {'first loss':>11}")
    print(f"{'ours':>10} {r['ours_step_s']:>8.3f} {r['ours_tokens_per_s']:>10.1f} "
          f"{r['ours_first_step_s']:>13.2f} {r['first_loss_ours']:>11.5f}")
    print(f"{'reference':>10} {r['reference_step_s']:>8.3f} {r['reference_tokens_per_s']:>10.1f} "
          f"{r['reference_first_step_s']:>13.2f} {r['first_loss_reference']:>11.5f}")
    print(f"ratio (ours / reference tokens/s): {r['ratio_vs_reference']:.2f}")
    summary = {"bench": "train_step", "model": "pythia-70m", "vocab_rows": 51_328,
               "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
               "torch_threads": args.threads, "quick": args.quick,
               **{k: v for k, v in r.items() if not k.endswith("_all_s")}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
