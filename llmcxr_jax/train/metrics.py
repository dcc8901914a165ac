"""Training metrics: aggregation over a logging window (`clu.metrics`), TensorBoard event files
(tensorboardX) and `metrics.jsonl` in the workdir, and a periodic progress line.

The train loop hands every step's metrics dict (device arrays straight from the jitted step) to
`TrainLogger.add`; nothing is fetched from the devices until a logging step, so the loop keeps
dispatching asynchronously. At a logging step the window's metrics are fetched, merged with
`clu.metrics` (losses and accuracies weighted by response tokens, per task too), timed, turned
into tokens/s, FLOP/s and MFU (`train.flops`), written (process 0 only) and printed as

    stage 1 step 120/1000 loss 2.31 tok/s 5400 mfu 41% eta 3m

`clu.metric_writers` is not used: it imports TensorFlow. (No `from __future__ import annotations`
here: clu's `Collection` reads the metric classes from the raw `__annotations__`.)
"""

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

import flax
import jax
import numpy as np
from clu import metrics as clu_metrics

from llmcxr_jax import tasks
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.train import flops as flops_lib

METRICS_FILE = "metrics.jsonl"  # in each workdir that logs metrics (LLM stages, VQ-GAN, classifier)

# --------------------------------------------------------------------------------------------------
# clu metrics
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class WeightedMean(clu_metrics.Metric):
    """Mean weighted by a count (response tokens); works on scalars and per-task vectors.

    Entries with zero weight (a task absent from a step) carry NaN means and are ignored; an entry
    with no weight over the whole window computes to NaN.
    """

    total: Any
    weight: Any

    @classmethod
    def of(cls, mean: Any, weight: Any) -> "WeightedMean":
        mean, weight = np.asarray(mean, np.float64), np.asarray(weight, np.float64)
        return cls(total=np.where(weight > 0, mean * weight, 0.0), weight=weight)

    def merge(self, other: "WeightedMean") -> "WeightedMean":
        return type(self)(total=self.total + other.total, weight=self.weight + other.weight)

    def compute(self) -> Any:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.weight > 0, self.total / np.maximum(self.weight, 1e-30), np.nan)


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
    """Sum over the window (tokens, skipped steps)."""

    total: Any

    def merge(self, other: "Sum") -> "Sum":
        return type(self)(total=self.total + other.total)

    def compute(self) -> Any:
        return self.total


def _weighted(name: str, weight: str):
    @flax.struct.dataclass
    class _FromOutput(WeightedMean):
        @classmethod
        def from_model_output(cls, **outputs: Any) -> WeightedMean:
            return cls.of(outputs[name], outputs[weight])
    _FromOutput.__name__ = f"WeightedMean_{name}"
    return _FromOutput


def _summed(name: str):
    @flax.struct.dataclass
    class _FromOutput(Sum):
        @classmethod
        def from_model_output(cls, **outputs: Any) -> Sum:
            return cls(total=np.asarray(outputs[name], np.float64))
    _FromOutput.__name__ = f"Sum_{name}"
    return _FromOutput


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """One logging window of train steps. Keys of the step dict: loss, accuracy, tokens,
    task_loss, task_accuracy, task_tokens, grad_norm, learning_rate, skipped."""

    loss: _weighted("loss", "tokens")
    accuracy: _weighted("accuracy", "tokens")
    task_loss: _weighted("task_loss", "task_tokens")
    task_accuracy: _weighted("task_accuracy", "task_tokens")
    tokens: _summed("tokens")
    task_tokens: _summed("task_tokens")
    skipped: _summed("skipped")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    """Held-out evaluation over many batches (`loss.summarize` output per batch)."""

    loss: _weighted("loss", "tokens")
    accuracy: _weighted("accuracy", "tokens")
    task_loss: _weighted("task_loss", "task_tokens")
    task_accuracy: _weighted("task_accuracy", "task_tokens")
    tokens: _summed("tokens")


def merge_steps(collection: type[clu_metrics.Collection],
                steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fetch and merge per-step metric dicts with `collection`; returns its computed values."""
    if not steps:
        raise ValueError("no steps to merge")
    host = jax.device_get(list(steps))
    total = None
    for m in host:
        one = collection.single_from_model_output(**{k: np.asarray(v) for k, v in m.items()})
        total = one if total is None else total.merge(one)
    return total.compute()


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy -> Python, NaN/inf -> None."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """TensorBoard event files (tensorboardX) and `metrics.jsonl` under `workdir`; a no-op on
    processes other than 0. Each `write` is flushed at once, so a killed run loses nothing."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None) -> None:
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl: TextIO | None = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=1)
            self._jsonl = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """One JSON line `{"step": step, **record}` and a TensorBoard scalar per numeric field."""
        if not self.enabled:
            return
        clean = {"step": int(step), **{k: _clean(v) for k, v in record.items()}}
        self._jsonl.write(json.dumps(clean, sort_keys=False) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`: its JSON objects (a half-written last line, from a kill,
    and any line that is not an object are skipped)."""
    records = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    """Short human duration: 45s, 3m, 2h05m."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def progress_line(stage: Any, step: int, total_steps: int, record: Mapping[str, Any],
                  eta_s: float | None) -> str:
    """`stage 1 step 120/1000 loss 2.31 tok/s 5400 mfu 41% eta 3m` (+ eval loss, skipped)."""
    parts = [f"stage {stage}", f"step {step}/{total_steps}"]
    loss = record.get("loss")
    if loss is not None:  # an eval-only record has no train loss
        parts.append(f"loss {loss:.4g}" if math.isfinite(loss) else "loss nan")
    if record.get("eval_loss") is not None:
        parts.append(f"eval {record['eval_loss']:.4g}")
    for direction in tasks.PAIRED:
        if record.get(f"gap/{direction}/train") is not None:
            parts.append(f"gap {tasks.get(direction).short} "
                         f"{record[f'gap/{direction}/train']:.3g}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.0f}%")
    elif record.get("flops_per_s") is not None:
        parts.append(f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s")
    if record.get("skipped"):
        parts.append(f"skipped {int(record['skipped'])}")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# The logger the train loop uses
# --------------------------------------------------------------------------------------------------


class TrainLogger:
    """Collects step metrics, and every `log_every` steps (and on `flush`) writes one record:

    step, stage, loss, accuracy, tokens_per_s, step_time, flops_per_s, mfu (None on CPU),
    learning_rate, grad_norm, skipped, loss_tokens, loss/<task>, accuracy/<task>, eval_* when
    an eval summary is given at that step, and extra evaluation scalars as they are (the loop's
    conditioning gaps `gap/<direction>/<train|heldout>` and `gap_time_s`).

    Throughput counts every position of every row (`global_batch * seq_len` per step, padding
    included): the work the step does. The first window after `start` includes compilation, so
    `start` should be called again after the first step when timing matters.
    """

    def __init__(self, workdir: str | pathlib.Path, *, stage: Any, total_steps: int,
                 model_cfg: ModelConfig, global_batch: int, seq_len: int,
                 task_names: Sequence[str], log_every: int = 10, n_devices: int | None = None,
                 peak_flops: float | None = None, writer: MetricsWriter | None = None,
                 stream: TextIO | None = sys.stdout, enabled: bool | None = None) -> None:
        self.stage = stage
        self.total_steps = total_steps
        self.task_names = tuple(task_names)
        self.log_every = max(1, log_every)
        self.tokens_per_step = global_batch * seq_len
        self.flops_per_token = flops_lib.train_flops_per_token(model_cfg, seq_len)
        self.n_devices = n_devices if n_devices is not None else jax.device_count()
        self.peak = peak_flops if peak_flops is not None else flops_lib.device_peak_flops()
        self.writer = writer if writer is not None else MetricsWriter(workdir, enabled)
        self.stream = stream if self.writer.enabled else None
        self._window: list[Mapping[str, Any]] = []
        self._t0 = time.perf_counter()
        self._step_time: float | None = None
        self.last_record: dict[str, Any] | None = None

    def start(self) -> None:
        """(Re)start the clock and drop the window collected so far (e.g. after compilation)."""
        self._window.clear()
        self._t0 = time.perf_counter()

    def add(self, step: int, metrics: Mapping[str, Any],
            eval_summary: Mapping[str, Any] | None = None,
            extra: Mapping[str, float] | None = None) -> dict[str, Any] | None:
        """Add step `step`'s metrics (the step number after the update); at a logging step, or
        when an eval summary or extra evaluation scalars (e.g. `gap/report2image/train`) are
        given, write and print a record and return it."""
        self._window.append(metrics)
        if (step % self.log_every == 0 or step == self.total_steps or eval_summary is not None
                or extra):
            return self.flush(step, eval_summary, extra)
        return None

    def flush(self, step: int, eval_summary: Mapping[str, Any] | None = None,
              extra: Mapping[str, float] | None = None) -> dict[str, Any] | None:
        """Write the window collected so far (if any), the eval summary and the extra scalars
        as the record of `step`."""
        if not self._window and eval_summary is None and not extra:
            return None
        record: dict[str, Any] = {"stage": self.stage}
        if self._window:
            record.update(self._train_record())
        if eval_summary is not None:
            record.update(self.eval_record(eval_summary))
        record.update({k: float(v) for k, v in (extra or {}).items()})
        self.writer.write(step, record)
        eta = None
        if self._step_time is not None:
            eta = max(self.total_steps - step, 0) * self._step_time
        if self.stream is not None:
            print(progress_line(self.stage, step, self.total_steps, record, eta),
                  file=self.stream, flush=True)
        self.last_record = {"step": step, **record}
        return self.last_record

    def _train_record(self) -> dict[str, Any]:
        values = merge_steps(TrainMetrics, self._window)  # fetches: waits for the steps
        now = time.perf_counter()
        n = len(self._window)
        step_time = (now - self._t0) / n
        self._step_time = step_time
        self._window.clear()
        self._t0 = now
        tokens_per_s = self.tokens_per_step / step_time
        flops_per_s = tokens_per_s * self.flops_per_token
        record = {
            "loss": float(values["loss"]),
            "accuracy": float(values["accuracy"]),
            "tokens_per_s": tokens_per_s,
            "step_time": step_time,
            "flops_per_s": flops_per_s,
            "mfu": flops_lib.mfu(flops_per_s, self.peak, self.n_devices),
            "learning_rate": float(values["learning_rate"]),
            "grad_norm": float(values["grad_norm"]),
            "skipped": int(values["skipped"]),
            "loss_tokens": float(values["tokens"]),
        }
        record.update(self._per_task("", values))
        return record

    def _per_task(self, prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for i, name in enumerate(self.task_names):
            out[f"{prefix}loss/{name}"] = float(np.asarray(values["task_loss"])[i])
            out[f"{prefix}accuracy/{name}"] = float(np.asarray(values["task_accuracy"])[i])
        return out

    def eval_record(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """`eval_loss`, `eval_accuracy`, `eval_loss/<task>`, ... from an eval summary (the
        `EvalMetrics` values, or `loss.summarize` of summed eval batches)."""
        record = {"eval_loss": float(np.asarray(summary["loss"])),
                  "eval_accuracy": float(np.asarray(summary["accuracy"]))}
        if "task_loss" in summary:
            record.update(self._per_task("eval_", summary))
        return record

    def close(self) -> None:
        self.writer.close()
