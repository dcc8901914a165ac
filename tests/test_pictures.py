"""Pictures for people: the training curves (`train/curves.py`) drawn from the metrics a run
writes, the labelled image columns (`data/images.labeled_columns`), and a workdir's
samples/grid.png and samples.md (`train/run.write_samples`)."""

import dataclasses
import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from llmcxr_jax.data import images as images_lib
from llmcxr_jax.data import mimic
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.train import curves
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.train.metrics import read_jsonl

# A stage's metrics.jsonl as TrainLogger writes it: step 20 logged twice (a run resumed from
# its step-10 checkpoint logs it again; the last value counts), NaN for a task absent from a
# window (null in JSON), evaluation and gap records every 20 steps, a half-written last line.
RECORDS = [
    {"step": 10, "stage": 1, "loss": 3.0, "loss/report2image": 3.5, "loss/instruct": None,
     "learning_rate": 1e-3, "tokens_per_s": 900.0},
    {"step": 20, "stage": 1, "loss": 2.9, "loss/report2image": 3.1, "loss/instruct": 2.0,
     "learning_rate": 2e-3, "tokens_per_s": 1000.0, "eval_loss": 3.2,
     "gap/report2image/train": 0.05, "gap/report2image/heldout": -0.01},
    {"step": 20, "stage": 1, "loss": 2.5, "loss/report2image": 2.8, "loss/instruct": 1.5,
     "learning_rate": 2e-3, "tokens_per_s": 1100.0, "eval_loss": 3.0,
     "gap/report2image/train": 0.06, "gap/report2image/heldout": 0.01},
    {"step": 30, "stage": 1, "loss": 2.0, "loss/report2image": 2.2, "loss/instruct": 1.2,
     "learning_rate": 1e-3, "tokens_per_s": 1200.0},
]


def _write_metrics(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "lo'
    (directory / curves.METRICS_FILE).write_text(text)


def _lines(fig):
    return {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_stage_curves_draw_the_logged_values(tmp_path):
    _write_metrics(tmp_path, RECORDS)
    path = curves.write_stage_curves(tmp_path, 1)
    assert path == tmp_path / "curves.png"
    assert Image.open(path).size == (1200, 720)  # 2 x 2 panels of 600 x 360 px

    fig = curves.figure(curves.stage_panels(read_jsonl(tmp_path / "metrics.jsonl")), "stage 1")
    gap = "conditioning gap (loss without - with the input)"
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "throughput", gap]
    assert _lines(fig) == {
        ("loss", "all tasks"): ([10, 20, 30], [3.0, 2.5, 2.0]),
        ("loss", "report2image"): ([10, 20, 30], [3.5, 2.8, 2.2]),
        ("loss", "instruct"): ([20, 30], [1.5, 1.2]),
        ("loss", "held-out, all tasks"): ([20], [3.0]),
        ("learning rate", "learning rate"): ([10, 20, 30], [1e-3, 2e-3, 1e-3]),
        ("throughput", "tokens/s"): ([10, 20, 30], [900.0, 1100.0, 1200.0]),
        (gap, "report -> image, train pairs"): ([20], [0.06]),
        (gap, "report -> image, held-out pairs"): ([20], [0.01]),
    }

    # The PNG shows the throughput line where its values map (the line's colour at each point).
    out = curves.save_png(fig, tmp_path / "again.png")
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ax = fig.axes[2]
    line = ax.get_lines()[0]
    color = np.round(255 * np.array(to_rgb(line.get_color())))
    for px, py in ax.transData.transform(np.c_[line.get_xdata(), line.get_ydata()]):
        row, col = pixels.shape[0] - int(round(py)), int(round(px))
        window = pixels[row - 2:row + 3, col - 2:col + 3].reshape(-1, 3)
        assert np.abs(window - color).sum(-1).min() < 60, (px, py)

    assert curves.write_stage_curves(tmp_path / "none", 1) is None
    assert not (tmp_path / "none" / "curves.png").exists()


def test_vqgan_curves_show_the_adversarial_losses_once_the_discriminator_is_on(tmp_path):
    base = {"rec_loss": 0.4, "nll_loss": 0.4, "codebook_loss": 0.1, "g_loss": 0.0,
            "d_loss": 0.0, "disc_factor": 0.0, "perplexity": 30.0, "images_per_s": 5.0}
    records = [{"step": s, **base} for s in (50, 100)]
    titles = [p.title for p in curves.vqgan_panels(records)]
    assert titles == ["reconstruction", "codebook", "code usage", "throughput"]
    records.append({"step": 150, **base, "disc_factor": 1.0, "g_loss": -0.2, "d_loss": 1.0})
    assert "adversarial" in [p.title for p in curves.vqgan_panels(records)]
    _write_metrics(tmp_path, records)
    assert Image.open(curves.write_vqgan_curves(tmp_path)).size == (1200, 1080)  # 5 panels


def test_labeled_columns_upscale_each_image_under_its_label():
    rng = np.random.default_rng(0)
    left, right = rng.uniform(-1, 1, (3, 8, 8, 3)), rng.uniform(-1, 1, (3, 8, 8, 3))
    sheet = images_lib.labeled_columns([("original", left), ("reconstruction", right)],
                                       cell=32, gap=4)
    width, height = sheet.size
    band = height - (3 * 32 + 2 * 4)
    assert width == 2 * 32 + 4 and band > 10
    pixels = np.asarray(sheet)
    for j, images in enumerate((left, right)):
        x = j * 36
        assert pixels[:band, x:x + 32].min() < 100  # the label's dark text
        for i, image in enumerate(images):
            y = band + i * 36
            want = np.kron(images_lib.to_uint8(image), np.ones((4, 4, 1), np.uint8))
            np.testing.assert_array_equal(pixels[y:y + 32, x:x + 32], want)
    with pytest.raises(ValueError, match="different image counts"):
        images_lib.labeled_columns([("a", left), ("b", right[:2])])


def test_a_long_label_wraps_within_its_own_column():
    """The samples grid's third label ('from its report (guidance 2, temperature 0.5)') is wider
    than a cell: it must wrap onto more lines over its own column, not spill over its neighbours'."""
    rng = np.random.default_rng(0)
    images = [rng.uniform(-1, 1, (2, 8, 8, 3)) for _ in range(3)]
    long = "from its report (guidance 2, temperature 0.5)"
    cell, gap = 128, 4
    sheet = images_lib.labeled_columns([("", images[0]), (long, images[1]), ("", images[2])],
                                       cell=cell, gap=gap)
    band = sheet.size[1] - (2 * cell + gap)
    pixels = np.asarray(sheet)[:band]
    dark = pixels.min(axis=2) < 128
    x = cell + gap
    assert dark[:, x:x + cell].any()  # the label is drawn ...
    assert not dark[:, :x].any() and not dark[:, x + cell:].any()  # ... over its column alone
    rows_with_text = np.flatnonzero(dark[:, x:x + cell].any(axis=1))
    one_line = images_lib.labeled_columns([("x", images[0])], cell=cell, gap=gap)
    one_band = one_line.size[1] - (2 * cell + gap)
    assert band > one_band and rows_with_text.max() - rows_with_text.min() > one_band // 2


def test_samples_grid_is_labelled_and_samples_md_links_the_training_pictures(tmp_path,
                                                                            monkeypatch):
    import eval_workdir

    root = eval_workdir.build(tmp_path / "run")
    paths = RunLayout(root)
    _write_metrics(paths.stage(1), RECORDS)
    curves.write_stage_curves(paths.stage(1), 1)
    cfg = rc.from_json((root / "config.json").read_text())
    cfg = dataclasses.replace(cfg, samples=2, vqgan_dir=str(paths.vqgan_run / "vqgan"))
    # The pictures are under test, not generation (tests/test_generate*.py): fixed outputs.
    monkeypatch.setattr(run_lib.inference, "reports_from_images",
                        lambda params, model, vocab, codes, rng: ["a report"] * len(codes))
    monkeypatch.setattr(run_lib.inference, "images_from_reports",
                        lambda params, model, vocab, reports, rng, n, gen, guidance:
                        np.zeros((len(reports), n), np.int32))
    run_lib.write_samples(cfg, paths, paths.world, paths.vqgan_run / "vqgan", None, None,
                          lambda line: None)

    grid = Image.open(paths.samples / "grid.png")
    cell, gap = run_lib.GRID_CELL, 4
    width, height = grid.size
    band = height - (2 * cell + gap)
    assert width == 3 * cell + 2 * gap and band > 10  # original | reconstruction | generated
    # The first column is the test image itself, at the VQ-GAN's 32 px, shown 8x (nearest).
    first = mimic.load_mimic(paths.world, run_lib.pipeline_lib.flat_codes(str(paths.codes)),
                             stage=2, splits=("test",), tokens_per_image=64,
                             codebook_size=128).records[0]
    original = images_lib.load_image(
        mimic.image_path(paths.world, first.subject_id, first.study_id, first.dicom_id), 32)
    np.testing.assert_array_equal(
        np.asarray(grid.convert("RGB"))[band:band + cell, :cell],
        np.kron(images_lib.to_uint8(original), np.ones((cell // 32, cell // 32, 1), np.uint8)))
    text = (paths.samples / "samples.md").read_text()
    assert "![samples](grid.png)" in text
    assert "(../stage1/curves.png)" in text
    assert "vqgan_run/curves.png" not in text and "stage2" not in text  # only what exists
