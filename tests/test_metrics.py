"""Metrics: FLOPs formula (hand count and XLA's cost analysis), clu aggregation against the exact
window loss, metrics.jsonl and TensorBoard event contents, the progress line."""

import io
import json
import math
import pathlib
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.train import flops
from llmcxr_jax.train import metrics as metrics_lib
from llmcxr_jax.train.loss import loss_sums, summarize
from llmcxr_jax.train.state import abstract_params

SMALL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=128, max_position_embeddings=64)
TASKS = ("report2image", "image2report", "instruct", "vqa")


def test_flops_per_token_matches_a_hand_count():
    # Per layer: 2 LayerNorms 2*(64+64) = 256; QKV 64*192 + 192 = 12,480; attention out
    # 64*64 + 64 = 4,160; MLP 64*128 + 128 + 128*64 + 64 = 16,576 -> 33,472. Two layers 66,944,
    # final LayerNorm 128, output embedding 64*256 = 16,384: N = 83,456.
    assert flops.non_embedding_params(SMALL) == 83_456
    # 6 N + 12 * layers * seq_len * hidden at seq_len 16: 500,736 + 24,576.
    assert flops.train_flops_per_token(SMALL, 16) == 525_312
    # N is the model's real parameter tree minus the input embedding.
    params = nn.unbox(abstract_params(SMALL))
    counted = sum(x.size for x in jax.tree.leaves(params))
    assert counted - params["embed_in"]["embedding"].size == 83_456
    assert flops.total_params(SMALL) == counted


def test_flops_formula_agrees_with_xla_cost_analysis():
    # One layer: XLA's cost analysis counts a scanned body once. Matmuls dominate at this width;
    # the formula leaves out LayerNorm/softmax/GELU element-wise work and the embedding scatter.
    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=1, num_heads=4,
                      intermediate_size=1024, max_position_embeddings=256)
    batch, seq = 2, 128
    params = nn.unbox(abstract_params(cfg))
    model = GPTNeoX(cfg)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(p, x):
        return jnp.sum(model.apply({"params": p}, x))

    xla = jax.jit(jax.grad(loss)).lower(params, ids).cost_analysis()["flops"]
    ratio = xla / (flops.train_flops_per_token(cfg, seq) * batch * seq)
    assert 0.93 < ratio < 1.07, ratio


def test_peak_table_and_mfu():
    assert flops.chip_key("TPU v5 lite") == "tpu-v5e"
    assert flops.chip_key("TPU v5p") == "tpu-v5p"
    assert flops.chip_key("TPU v4") == "tpu-v4"
    assert flops.chip_key("NVIDIA H100 80GB HBM3") == "h100"
    assert flops.chip_key("NVIDIA H200") == "h200"
    assert flops.chip_key("cpu") is None
    assert flops.device_peak_flops(jax.devices()) is None  # CPU: FLOP/s only
    assert flops.resolve_chip("v5e") == "tpu-v5e" and flops.resolve_chip("H100") == "h100"
    with pytest.raises(KeyError, match="unknown chip 'v9'"):
        flops.resolve_chip("v9")
    assert flops.mfu(1e15, None, 16) is None
    assert flops.mfu(0.5 * 197e12 * 16, flops.PEAK_BF16_FLOPS["tpu-v5e"], 16) == pytest.approx(0.5)


@jax.jit
def _sums_and_summary(logits, targets, mask, task_ids):
    sums = loss_sums(logits, targets, mask, task_ids, len(TASKS))
    return sums, summarize(sums)


def _step_metrics(seed: int, tasks_present: tuple[int, ...]):
    """Metrics of one step as the train step makes them, plus its raw loss sums."""
    rng = np.random.default_rng(seed)
    b, t, v = 4, 8, 16
    logits = jnp.asarray(rng.standard_normal((b, t, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.6, jnp.float32)
    task_ids = jnp.asarray(rng.choice(tasks_present, (b, 1)).repeat(t, 1), jnp.int32)
    sums, m = _sums_and_summary(logits, targets, mask, task_ids)
    m.update(grad_norm=jnp.float32(seed + 1.0), learning_rate=jnp.float32(1e-4 * seed),
             skipped=jnp.int32(seed == 2))
    return m, sums


def test_window_aggregation_equals_the_loss_of_all_tokens():
    steps = [_step_metrics(0, (0, 1)), _step_metrics(1, (0, 2)), _step_metrics(2, (1,))]
    got = metrics_lib.merge_steps(metrics_lib.TrainMetrics, [m for m, _ in steps])
    window = summarize(jax.tree.map(lambda *x: sum(x), *[s for _, s in steps]))
    np.testing.assert_allclose(got["loss"], window["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], window["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(got["task_loss"], window["task_loss"], rtol=1e-6)  # NaN for vqa
    np.testing.assert_allclose(got["task_accuracy"], window["task_accuracy"], rtol=1e-6)
    assert math.isnan(got["task_loss"][3]) and not math.isnan(got["task_loss"][2])
    assert got["tokens"] == float(window["tokens"])
    assert got["grad_norm"] == pytest.approx(2.0)  # mean of 1, 2, 3
    assert got["learning_rate"] == pytest.approx(2e-4)  # the last step's
    assert got["skipped"] == 1


def read_tensorboard_scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under `directory` (TFRecord framing, no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_logger_writes_jsonl_tensorboard_and_progress_lines(tmp_path):
    out = io.StringIO()
    logger = metrics_lib.TrainLogger(tmp_path, stage=1, total_steps=6, model_cfg=SMALL,
                                     global_batch=4, seq_len=8, task_names=TASKS, log_every=3,
                                     stream=out, enabled=True)
    records = []
    for step in range(1, 7):
        m, _ = _step_metrics(step, (0, 1, 2))
        ev = {"loss": 3.5, "accuracy": 0.25, "task_loss": np.full(4, 3.5),
              "task_accuracy": np.full(4, 0.25)} if step == 5 else None
        rec = logger.add(step, m, eval_summary=ev)
        if rec is not None:
            records.append(rec)
    logger.close()

    lines = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [3, 5, 6]
    for rec in lines:
        for key in ("step", "stage", "loss", "accuracy", "tokens_per_s", "step_time",
                    "flops_per_s", "mfu", "learning_rate", "grad_norm", "skipped",
                    "loss/report2image", "accuracy/instruct", "loss/vqa"):
            assert key in rec, key
        assert rec["stage"] == 1 and rec["mfu"] is None  # CPU
        assert rec["loss/vqa"] is None  # absent task: NaN -> null, valid JSON
        assert rec["tokens_per_s"] > 0
        assert rec["flops_per_s"] == pytest.approx(
            rec["tokens_per_s"] * flops.train_flops_per_token(SMALL, 8))
    assert lines[1]["eval_loss"] == 3.5 and "eval_loss" not in lines[0]
    assert lines[1]["eval_loss/instruct"] == 3.5
    # Step 3's record is the token-weighted loss of steps 1-3.
    window = summarize(jax.tree.map(lambda *x: sum(x),
                                    *[_step_metrics(s, (0, 1, 2))[1] for s in (1, 2, 3)]))
    assert lines[0]["loss"] == pytest.approx(float(window["loss"]), rel=1e-6)
    # Every line is plain JSON (no NaN tokens).
    for raw in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    tb = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [3, 5, 6]
    assert tb["loss"][0][1] == pytest.approx(lines[0]["loss"], rel=1e-6)
    assert [s for s, _ in tb["eval_loss"]] == [5]

    printed = out.getvalue().splitlines()
    assert len(printed) == 3
    assert printed[0].startswith("stage 1 step 3/6 loss ") and " tok/s " in printed[0]
    assert "GFLOP/s" in printed[0] and "eta " in printed[0]


def test_progress_line_format_and_other_processes_write_nothing(tmp_path):
    line = metrics_lib.progress_line(1, 120, 1000, {"loss": 2.314, "tokens_per_s": 5400.4,
                                                    "mfu": 0.414}, eta_s=180)
    assert line == "stage 1 step 120/1000 loss 2.314 tok/s 5400 mfu 41% eta 3m"
    assert metrics_lib.format_duration(7500) == "2h05m"
    writer = metrics_lib.MetricsWriter(tmp_path / "other", enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "other").exists()


def test_read_jsonl_keeps_only_objects(tmp_path):
    path = tmp_path / metrics_lib.METRICS_FILE
    records = [{"step": 1, "loss": 2.5}, [1, 2], 3.0, "text", None, {"step": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 3, "lo')  # killed
    assert metrics_lib.read_jsonl(path) == [r for r in records if isinstance(r, dict)]
