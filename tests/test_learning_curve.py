"""The learning-curve PNG from two stages' metrics.jsonl."""

import json

import numpy as np
from PIL import Image

from llmcxr_jax.eval import learning_curve


def _write(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_follow_the_stages_and_are_drawn(tmp_path):
    _write(tmp_path / "stage1", [
        {"step": 10, "loss/report2image": 3.0, "loss/image2report": 2.5},
        {"step": 20, "loss/report2image": 2.0, "gap/report2image/train": 0.01,
         "gap/report2image/heldout": -0.002, "eval_loss/report2image": 2.2},
        {"step": 20, "gap/report2image/train": 0.02}])  # a step logged twice keeps its last
    _write(tmp_path / "stage2", [{"step": 5, "loss/report2image": 1.5,
                                  "gap/report2image/train": 0.05}])
    curves, boundaries = learning_curve.read_curves(tmp_path)
    assert boundaries == [20]
    assert curves["loss/report2image"] == [[(10, 3.0), (20, 2.0)], [(25, 1.5)]]
    assert curves["gap/report2image/train"] == [[(20, 0.02)], [(25, 0.05)]]

    panels = {p.title: p for p in learning_curve.panels(curves, boundaries)}
    loss = panels["report -> image: loss"]
    assert loss.marks == (20,) and [s.label for s in loss.series] == ["train", "held-out"]
    np.testing.assert_array_equal(loss.series[0].steps, [10, 20, np.nan, 25])  # broken at 20
    np.testing.assert_array_equal(loss.series[0].values, [3.0, 2.0, np.nan, 1.5])
    assert panels["image -> report: conditioning gap"].series == ()  # drawn as "not logged"

    path = learning_curve.plot(tmp_path, tmp_path / "out" / "curve.png")
    assert Image.open(path).size == (1200, 720)
    assert learning_curve.plot(tmp_path / "nothing", tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
