"""Train-step throughput: our jitted AdamW step vs transformers + torch AdamW, same weights;
with `--mesh`, the full sharded train step on a device mesh (tokens/s, step time, FLOP/s, MFU).

pythia-70m shape with the extended vocabulary (51,328 rows), B=8, T=512, fp32 on CPU, next-token
cross-entropy on every position, global-norm clipping at 1.0, weight decay 0 on both sides. Ours
is the project's train step (`llmcxr_jax.train.step.make_train_step`), timed on one XLA CPU
device (one process, all cores, like the reference: this gives `ratio_vs_reference`) and on all
the CPU devices the launch scripts split the host into, one per core (`parallel/cpu_devices.py`;
batch split over them, params FSDP-sharded: `ratio_vs_reference_<n>_devices`); `--devices`
picks the counts. The reference is `GPTNeoXForCausalLM(labels=...)` + `torch.optim.AdamW` +
`clip_grad_norm_` with `--threads` torch threads (default: one per core). The first step
(compilation for us) is timed separately; the table shows the median of `--steps` timed steps,
ours and the reference interleaved so all see the same machine load.

    python bench/train_step.py            # B=8, T=512
    python bench/train_step.py --quick    # B=2, T=128 smoke run

Prints a table, then one JSON object as the last line; `ratio_vs_reference` is our tokens/s over
the reference's.

Sharded mode (`--mesh`, any form `parallel.mesh` accepts: 2x4, 4x4, data:2,fsdp:4,tensor:2, -1)
runs the trainer's own step: state initialised straight into `train.state.state_shardings` under
`parallel.rules.rules_for(--param-sharding)`, the batch split over data x fsdp
(`train.step.batch_shardings`), `train.step.make_train_step` compiled ahead of time (its
per-device memory is read from XLA). It reports step time, tokens/s (global and per device),
model FLOP/s (`train.flops`: 6 N + 12 L T H per token) and MFU against the chip's peak (None on
CPU, where only FLOP/s is meaningful). The reference here is the same step on one device from the
same initial state (first-step losses cross-checked; `speedup_vs_1_device` is the ratio of
tokens/s); skip it with `--no-baseline` when the model does not fit one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train_step.py --mesh 2x4 --quick
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train_step.py --mesh 2x4 \
        --batch-size 8 --seq-len 128 --steps 2                                 # pythia-70m shape
    python bench/train_step.py --mesh 4x4 --model dolly-v2-3b --batch-size 16 --seq-len 1024 \
        --param-sharding data+fsdp --remat full --no-baseline          # e.g. a v5e-16 slice

Simulated CPU devices share the host's cores, so their numbers say the step runs and how much
the sharding costs there, not how a pod will perform.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices  # noqa: E402

split_cpu_into_devices()  # as the launch scripts do: one XLA CPU device per core

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from decode import hf_model  # noqa: E402  (bench/ is the script folder)
from llmcxr_jax.configs import DOLLY_TEXT_IDS, TrainConfig, model_preset  # noqa: E402
from llmcxr_jax.llm import hf_mapping  # noqa: E402
from llmcxr_jax.parallel.mesh import (MeshError, check_global_batch,  # noqa: E402
                                      data_parallel_size, make_mesh, mesh_from_flag)
from llmcxr_jax.parallel.rules import PARAM_SHARDING_MODES, rules_for  # noqa: E402
from llmcxr_jax.train import flops as flops_lib  # noqa: E402
from llmcxr_jax.train.state import init_state, state_from_params  # noqa: E402
from llmcxr_jax.train.step import batch_shardings, make_train_step  # noqa: E402

LEARNING_RATE = 1e-4


def make_batch(batch: int, length: int, seed: int,
               n_ids: int = DOLLY_TEXT_IDS) -> dict[str, np.ndarray]:
    """Random ids below `n_ids`; the loss on every position that has a next token."""
    inputs = np.random.default_rng(seed).integers(0, n_ids, (batch, length))
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


def _suffix(i: int, n: int) -> str:
    """Result-key suffix of the i-th device count: none for the first (the headline)."""
    return "" if i == 0 else f"_{n}_devices"


def run(batch: int, length: int, steps: int, threads: int, device_counts: tuple[int, ...],
        seed: int = 0) -> dict:
    """Ours on each of `device_counts` XLA devices (batch split, params FSDP) and the reference,
    all from the same weights, timed interleaved; keys of the first count are unsuffixed."""
    torch.set_num_threads(threads)
    config = model_preset("pythia-70m")
    model = hf_model(config, seed).train()
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(state_dict, config, to_array=jnp.asarray)

    train_cfg = TrainConfig(learning_rate=LEARNING_RATE, warmup_steps=0, weight_decay=0.0,
                            grad_clip_norm=1.0, global_batch=batch, seq_len=length)
    ours = {}
    for n in device_counts:
        if batch % n:
            raise SystemExit(f"--batch-size {batch} is not divisible by the {n} devices")
        mesh = make_mesh({"fsdp": n}, jax.devices()[:n])
        own_params = jax.tree_util.tree_map(jnp.copy, params)  # each state's buffers donated
        ours[n] = [make_train_step(config, train_cfg, mesh, num_tasks=1),
                   state_from_params(own_params, config, train_cfg, mesh)]

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0,
                                  betas=(train_cfg.b1, train_cfg.b2), eps=train_cfg.eps)
    batches = [make_batch(batch, length, seed + i) for i in range(steps + 1)]

    def ours_step(n: int, b: dict) -> float:
        step, state = ours[n]
        ours[n][1], metrics = step(state, b)
        return float(jax.block_until_ready(metrics["loss"]))

    def reference(b: dict) -> float:
        ids = torch.tensor(b["inputs"], dtype=torch.long)
        out = model(input_ids=ids, labels=ids)  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(out.loss.detach())

    first = {n: _timed(lambda: ours_step(n, batches[0])) for n in device_counts}
    first_ref, loss_ref = _timed(lambda: reference(batches[0]))
    times = {n: [] for n in device_counts}
    times_ref = []
    for b in batches[1:]:
        for n in device_counts:
            times[n].append(_timed(lambda: ours_step(n, b))[0])
        times_ref.append(_timed(lambda: reference(b))[0])
    ref_s = statistics.median(times_ref)
    tokens = batch * length
    result = {"reference_step_s": ref_s, "reference_tokens_per_s": tokens / ref_s,
              "reference_first_step_s": first_ref, "first_loss_reference": loss_ref,
              "reference_all_s": times_ref, "ours_platform": jax.devices()[0].platform,
              "ours_devices": list(device_counts)}
    for i, n in enumerate(device_counts):
        ours_s = statistics.median(times[n])
        suffix = _suffix(i, n)
        result.update({
            f"ours_step_s{suffix}": ours_s, f"ours_tokens_per_s{suffix}": tokens / ours_s,
            f"ratio_vs_reference{suffix}": ref_s / ours_s,
            f"ours_first_step_s{suffix}": first[n][0],
            f"ours_compile_s{suffix}": max(first[n][0] - ours_s, 0.0),
            f"first_loss_ours{suffix}": first[n][1], f"ours_all_s{suffix}": times[n]})
    return result


def _timed_step(step, state, batch: dict) -> tuple[Any, float, float]:
    """One step, blocked on; (new state, seconds, loss)."""
    start = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    return state, time.perf_counter() - start, loss


def run_sharded(model: str, mesh_flag: str, param_sharding: str, batch: int, length: int,
                steps: int, dtype: str, remat: str, baseline: bool, seed: int = 0) -> dict:
    """The trainer's jitted step on `mesh_flag`'s mesh (see the module docstring); with
    `baseline`, the same step on one device from the same initial state, timed interleaved."""
    devices = jax.devices()
    dtype = dtype if dtype != "auto" else (
        "float32" if devices[0].platform == "cpu" else "bfloat16")
    config = model_preset(model, dtype=dtype, remat_policy=remat)
    mesh = mesh_from_flag(mesh_flag)
    check_global_batch(batch, mesh)
    rules = rules_for(param_sharding)
    train_cfg = TrainConfig(learning_rate=LEARNING_RATE, warmup_steps=0, weight_decay=0.0,
                            grad_clip_norm=1.0, global_batch=batch, seq_len=length, seed=seed)
    host_batches = [make_batch(batch, length, seed + i, min(DOLLY_TEXT_IDS, config.vocab_size))
                    for i in range(steps + 1)]

    # The trainer's state (initialised in its shardings) and step, compiled ahead of time.
    state = init_state(config, train_cfg, mesh, rules)
    batches = [jax.device_put(b, batch_shardings(mesh)) for b in host_batches]
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = make_train_step(config, train_cfg, mesh, 1, rules).jitted.lower(
            state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def sharded(state, b):
        with jax.set_mesh(mesh):
            return compiled(state, b)

    state, first_s, loss = _timed_step(sharded, state, batches[0])
    losses, times = [loss], []
    if baseline:  # random init is sharding-independent (partitionable threefry): same params
        one = make_mesh({"data": 1}, devices[:1])
        single = make_train_step(config, train_cfg, one, 1, rules)
        state1 = init_state(config, train_cfg, one, rules)
        state1, _, first_loss_1 = _timed_step(single, state1, host_batches[0])
        if abs(first_loss_1 - loss) > 1e-3 * abs(first_loss_1):
            raise RuntimeError(f"first-step losses differ: {mesh_flag} mesh {loss:.6f}, "
                               f"1 device {first_loss_1:.6f}")
        times1 = []
    for b, host in zip(batches[1:], host_batches[1:]):
        state, seconds, loss = _timed_step(sharded, state, b)
        times.append(seconds)
        losses.append(loss)
        if baseline:
            state1, seconds, _ = _timed_step(single, state1, host)
            times1.append(seconds)
    step_s = statistics.median(times)
    tokens_per_s = batch * length / step_s
    flops_per_token = flops_lib.train_flops_per_token(config, length)
    peak = flops_lib.device_peak_flops(list(mesh.devices.flat))
    result = {
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.size),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "dtype": dtype, "remat": remat, "param_sharding": param_sharding,
        "step_s": step_s, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / mesh.size,
        "flops_per_token": flops_per_token, "flops_per_s": tokens_per_s * flops_per_token,
        "peak_flops_per_device": peak,
        "mfu": flops_lib.mfu(tokens_per_s * flops_per_token, peak, int(mesh.size)),
        "compile_s": compile_s, "first_step_s": first_s, "losses": losses,
        "argument_bytes_per_device": int(memory.argument_size_in_bytes) if memory else None,
        "temp_bytes_per_device": int(memory.temp_size_in_bytes) if memory else None,
        "params": flops_lib.total_params(config), "all_step_s": times,
    }
    if baseline:
        step1_s = statistics.median(times1)
        result.update(baseline_step_s=step1_s, baseline_tokens_per_s=batch * length / step1_s,
                      speedup_vs_1_device=step1_s / step_s, first_loss_1_device=first_loss_1)
    return result


def _bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def print_sharded(r: dict, args: argparse.Namespace) -> None:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"sharded train step: {args.model}, {r['params'] / 1e6:.1f} M params, B={args.batch_size}, "
          f"T={args.seq_len}, {r['dtype']}, remat {r['remat']}, params over "
          f"{r['param_sharding']}, median of {args.steps}")
    print(f"mesh {mesh} on {r['devices']} {r['platform']} device(s) ({r['device_kind']})")
    if r["mfu"] is not None:
        mfu = f"{100 * r['mfu']:.1f} % of {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s x " \
              f"{r['devices']}"
    else:
        mfu = "n/a (CPU: FLOP/s only)" if r["platform"] == "cpu" else "n/a (chip not in table)"
    rows = [("step time", f"{r['step_s']:.3f} s"),
            ("tokens/s", f"{r['tokens_per_s']:.1f}"),
            ("tokens/s per device", f"{r['tokens_per_s_per_device']:.1f}"),
            ("model FLOP/s", f"{r['flops_per_s'] / 1e9:.2f} GFLOP/s "
                             f"({r['flops_per_token'] / 1e6:.1f} MFLOP/token)"),
            ("MFU", mfu),
            ("compile", f"{r['compile_s']:.1f} s (first step {r['first_step_s']:.2f} s)"),
            ("per device: arguments", _bytes(r["argument_bytes_per_device"])),
            ("per device: temporaries", _bytes(r["temp_bytes_per_device"])),
            ("losses", " ".join(f"{x:.4f}" for x in r["losses"]))]
    if "baseline_step_s" in r:
        rows += [("1 device: step time", f"{r['baseline_step_s']:.3f} s "
                                         f"({r['baseline_tokens_per_s']:.1f} tokens/s)"),
                 ("speedup vs 1 device", f"{r['speedup_vs_1_device']:.2f}x "
                                         f"(first loss {r['first_loss_1_device']:.5f})")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B=2, T=128, 2 steps (sharded: the tiny model, one row "
                             "per batch-parallel device)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument("--devices", default=f"1,{jax.local_device_count()}",
                        help="default mode: comma-separated XLA device counts for ours; the "
                             "first gives ratio_vs_reference (default: 1, then all local "
                             "devices = the launch scripts' CPU split)")
    parser.add_argument("--mesh", default=None,
                        help="sharded mode on this mesh (2x4, data:2,fsdp:4, -1, ...); default: "
                             "one device against transformers")
    parser.add_argument("--model", default=None,
                        help="sharded mode: model preset (default pythia-70m; tiny with --quick)")
    parser.add_argument("--param-sharding", default="fsdp", choices=PARAM_SHARDING_MODES,
                        help="sharded mode: weights over fsdp, or data+fsdp (ZeRO-3)")
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="sharded mode: compute dtype (auto: fp32 on CPU, else bf16)")
    parser.add_argument("--remat", default="none",
                        choices=("none", "full", "dots", "dots_with_no_batch_dims"),
                        help="sharded mode: rematerialisation policy")
    parser.add_argument("--no-baseline", action="store_true",
                        help="sharded mode: skip the same step on one device")
    args = parser.parse_args()

    if args.mesh is not None:
        try:
            mesh = mesh_from_flag(args.mesh)
            ways = data_parallel_size(mesh)
            check_global_batch(max(ways, 2) if args.quick else args.batch_size, mesh)
        except MeshError as err:
            parser.error(str(err))
        if args.quick:
            args.batch_size, args.seq_len, args.steps = max(ways, 2), 128, 2
            args.model = args.model or "tiny"
        args.model = args.model or "pythia-70m"
        r = run_sharded(args.model, args.mesh, args.param_sharding, args.batch_size, args.seq_len,
                        args.steps, args.compute_dtype, args.remat, not args.no_baseline)
        print_sharded(r, args)
        summary = {"bench": "train_step_sharded", "model": args.model, "mesh_flag": args.mesh,
                   "batch": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                   "quick": args.quick,
                   **{k: v for k, v in r.items() if not k.startswith("all_")}}
        print(json.dumps(summary))
        return

    if args.quick:
        args.batch_size, args.seq_len, args.steps = 2, 128, 2

    counts = tuple(dict.fromkeys(int(x) for x in args.devices.split(",")))
    if not counts or min(counts) < 1 or max(counts) > jax.local_device_count():
        parser.error(f"--devices {args.devices}: counts between 1 and the "
                     f"{jax.local_device_count()} local devices")
    r = run(args.batch_size, args.seq_len, args.steps, args.threads, counts)
    for i, n in enumerate(counts):
        suffix = _suffix(i, n)
        loss = r[f"first_loss_ours{suffix}"]
        if abs(loss - r["first_loss_reference"]) > 1e-3 * r["first_loss_reference"]:
            raise RuntimeError(f"first-step losses differ: ours on {n} device(s) {loss:.6f}, "
                               f"reference {r['first_loss_reference']:.6f}")
    print(f"train step: pythia-70m shape, vocab 51,328, B={args.batch_size}, T={args.seq_len}, fp32, "
          f"AdamW, median of {args.steps}; ours on {r['ours_platform']} XLA devices, "
          f"reference with {args.threads} torch thread(s)")
    print(f"{'':>18} {'step s':>8} {'tokens/s':>10} {'first step s':>13} {'first loss':>11} "
          f"{'ratio':>6}")
    for i, n in enumerate(counts):
        suffix = _suffix(i, n)
        print(f"{f'ours, {n} device(s)':>18} {r[f'ours_step_s{suffix}']:>8.3f} "
              f"{r[f'ours_tokens_per_s{suffix}']:>10.1f} {r[f'ours_first_step_s{suffix}']:>13.2f} "
              f"{r[f'first_loss_ours{suffix}']:>11.5f} {r[f'ratio_vs_reference{suffix}']:>5.2f}x")
    print(f"{'reference':>18} {r['reference_step_s']:>8.3f} {r['reference_tokens_per_s']:>10.1f} "
          f"{r['reference_first_step_s']:>13.2f} {r['first_loss_reference']:>11.5f}")
    print(f"ratio (ours on {counts[0]} device(s) / reference tokens/s): "
          f"{r['ratio_vs_reference']:.2f}")
    summary = {"bench": "train_step", "model": "pythia-70m", "vocab_rows": 51_328,
               "batch": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
               "torch_threads": args.threads, "quick": args.quick,
               **{k: v for k, v in r.items() if "_all_s" not in k}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
