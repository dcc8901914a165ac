"""The generate job (llmcxr_jax.llm.generate_job) through `launch/generate.py`'s main(argv).

A tiny random GPT-NeoX (real GPT-NeoX tokenizer + 128 image ids) and a test-tiny VQ-GAN (32 px,
8x8 = 64 codes) laid out as a training run's workdir. Shapes are chosen so that the whole module
compiles two decode loops: report2image, and one text loop shared by image2report, vqa and
instruct (same batch size, prompt bucket and max_new_tokens).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import cli, configs
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.data import images as image_lib
from llmcxr_jax.llm import checkpoint as llm_checkpoint
from llmcxr_jax.llm import generate_job, serving
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import load_vocab
from llmcxr_jax.vqgan import encode as encode_lib
from llmcxr_jax.vqgan.checkpoint import save_vqgan
from llmcxr_jax.vqgan.model import init_params as vqgan_init

REPO = pathlib.Path(__file__).resolve().parents[1]
VQ = configs.vqgan_preset("test-tiny")
N_CODES = VQ.tokens_per_image  # 64
REPORTS = ("Mild cardiomegaly.", "No acute process.", "Small left effusion.")
TEXT_ARGS = ("--batch-size", "2", "--max-new-tokens", "6", "--greedy")  # one compiled loop


def _launch():
    path = REPO / "launch" / "generate.py"
    spec = importlib.util.spec_from_file_location("launch_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = _launch()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, neox_tokenizer_dir):
    vocab = load_vocab(neox_tokenizer_dir, n_image=VQ.n_embed)
    config = ModelConfig(vocab_size=vocab.embed_rows, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=512)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(a.dtype),
                          shardings_lib.abstract_params(config))
    root = tmp_path_factory.mktemp("run")
    llm_checkpoint.save_llm(root / "llm", config, params, vocab)
    save_vqgan(root / "vqgan_run" / "vqgan", VQ, vqgan_init(VQ, seed=5))
    return root


def _run(workdir, out, *argv) -> list[dict]:
    assert GENERATE.main(["--workdir", str(workdir), "--out", str(out), *map(str, argv)]) == 0
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


def _vqgan(workdir):
    """The VQ-GAN placed as the job places it (so its compiled encode/decode are reused)."""
    mesh = encode_lib.device_mesh()
    config, params, _ = encode_lib.load_model(workdir / "vqgan_run" / "vqgan", mesh)
    return mesh, config, params


@pytest.fixture(scope="module")
def report2image(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("r2i") / "a"
    args = [a for r in REPORTS for a in ("--report", r)]
    return out, _run(workdir, out, "--task", "report2image", *args, "--batch-size", "2",
                     "--seed", "5")


def test_report2image_writes_exact_codes_and_their_decoded_pngs(workdir, report2image):
    out, records = report2image
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["seed"] for r in records] == [5, 6, 7]
    mesh, config, params = _vqgan(workdir)
    codes = np.array([r["codes"] for r in records])
    assert codes.shape == (3, N_CODES) and codes.min() >= 0 and codes.max() < VQ.n_embed
    decoded = np.asarray(encode_lib.make_decode_fn(config, mesh)(
        params, np.pad(codes, ((0, 5), (0, 0))).reshape(8, 8, 8)))[:3]
    for r, report, image in zip(records, REPORTS, decoded):
        assert r["finished"] and r["n_tokens"] == N_CODES + 1  # codes, then `### End`
        assert r["phrasing"] == 0 and r["report"] == report
        assert r["prompt"] == prompts.format_prompt(prompts.REPORT_TO_IMAGE_INSTRUCTIONS[0],
                                                    input=report)
        png = np.asarray(Image.open(out / r["output"]))
        assert png.shape == (VQ.resolution, VQ.resolution, 3)
        np.testing.assert_array_equal(png, image_lib.to_uint8(image))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (VQ.resolution, 3 * VQ.resolution, 3)
    job = json.loads((out / "job.json").read_text())
    assert job["kind"] == "run" and job["generation"]["top_p"] == 1.0 and job["items"] == 3


def test_same_seed_same_outputs_and_items_reproduce_alone(workdir, report2image, tmp_path):
    """Rerun with the same seed, from a serving export of the run (`launch/export.py --format
    serving`): the same records and PNG bytes, from that folder alone."""
    out, records = report2image
    serving_dir = tmp_path / "serving"
    serving.export_bundle(serving.load_bundle(workdir, load_vqgan=False), serving_dir)
    again = _run(serving_dir, tmp_path / "b", "--task", "report2image",
                 *[a for r in REPORTS for a in ("--report", r)], "--batch-size", "2", "--seed", "5")
    assert again == records
    job = json.loads((tmp_path / "b" / "job.json").read_text())
    assert job["kind"] == "serving" and job["model"] == str(serving_dir)
    for r in records:
        assert (tmp_path / "b" / r["output"]).read_bytes() == (out / r["output"]).read_bytes()
    # Item 1 was drawn beside item 0; alone (seed 5 + 1) it comes out the same, and the same
    # report with the next seed comes out different.
    alone = _run(workdir, tmp_path / "c", "--task", "report2image", "--report", REPORTS[1],
                 "--report", REPORTS[1], "--batch-size", "2", "--seed", "6")
    assert alone[0]["codes"] == records[1]["codes"]
    assert alone[1]["codes"] != records[1]["codes"]


def test_guided_report2image_keeps_the_constraint_and_reproduces_alone(workdir, report2image,
                                                                       tmp_path):
    """`--guidance 3`: exactly the image codes then `### End`, other codes than plain sampling
    from the same seeds, each item the same alone; `--guidance 1` is plain sampling; a run's
    config.json and a serving export carry the model's guidance and code temperature, and
    generation uses them by default (the same codes as giving them as flags)."""
    _, plain = report2image
    reports = [a for r in REPORTS for a in ("--report", r)]
    common = ("--task", "report2image", "--batch-size", "2", "--seed", "5")
    guided = _run(workdir, tmp_path / "g", *common, *reports, "--guidance", "3")
    for r in guided:
        assert r["finished"] and r["n_tokens"] == N_CODES + 1 and r["guidance"] == 3.0
        assert len(r["codes"]) == N_CODES and 0 <= min(r["codes"]) <= max(r["codes"]) < VQ.n_embed
    assert json.loads((tmp_path / "g" / "job.json").read_text())["guidance"] == 3.0
    assert all(g["codes"] != p["codes"] for g, p in zip(guided, plain))
    alone = _run(workdir, tmp_path / "a", *common[:-1], "6", "--report", REPORTS[1],
                 "--guidance", "3")
    assert alone[0]["codes"] == guided[1]["codes"]
    one = _run(workdir, tmp_path / "one", *common, *reports, "--guidance", "1")
    assert [r["codes"] for r in one] == [r["codes"] for r in plain]
    exported = tmp_path / "serving"
    bundle = serving.load_bundle(workdir, load_vqgan=False)
    # the run's config.json names neither
    assert (bundle.guidance, bundle.image_temperature) == (1.0, 1.0)
    run = tmp_path / "run"  # a run whose config.json (launch/train.py's RunConfig) names both
    run.mkdir()
    for part in ("llm", "vqgan_run"):
        (run / part).symlink_to(workdir / part)
    (run / "config.json").write_text(json.dumps({"guidance": 2.5, "image_temperature": 0.25}))
    from_run = serving.load_bundle(run, load_vqgan=False)
    assert (from_run.guidance, from_run.image_temperature) == (2.5, 0.25)
    cooled = _run(workdir, tmp_path / "c", *common, *reports, "--guidance", "3",
                  "--temperature", "0.25")
    assert json.loads((tmp_path / "c" / "job.json").read_text())["generation"]["temperature"] == 0.25
    assert [r["codes"] for r in cooled] != [r["codes"] for r in guided]
    serving.export_serving(exported, bundle.model_config, bundle.params, bundle.vocab,
                           vqgan_dir=bundle.vqgan_dir, guidance=3.0, image_temperature=0.25)
    by_default = _run(exported, tmp_path / "d", *common, *reports)
    assert [r["codes"] for r in by_default] == [r["codes"] for r in cooled]
    assert json.loads((tmp_path / "d" / "job.json").read_text())["generation"]["temperature"] == 0.25


@pytest.fixture(scope="module")
def image_inputs(workdir, report2image, tmp_path_factory):
    """A folder with two PNGs (32 px) and one .npy of codes."""
    folder = tmp_path_factory.mktemp("images")
    out, records = report2image
    for r in records[:2]:
        (folder / f"img{r['index']}.png").write_bytes((out / r["output"]).read_bytes())
    np.save(folder / "codes.npy", np.arange(N_CODES, dtype=np.int64).reshape(8, 8) % VQ.n_embed)
    return folder


def test_image2report_encodes_images_or_reads_codes(workdir, image_inputs, tmp_path):
    records = _run(workdir, tmp_path / "o", "--task", "image2report", "--input", image_inputs,
                   *TEXT_ARGS)
    assert [r["id"] for r in records] == ["codes", "img0", "img1"]
    assert records[0]["image_codes"] == list(range(N_CODES))
    mesh, config, params = _vqgan(workdir)
    pixels = np.stack([image_lib.load_image(image_inputs / f"img{i}.png", VQ.resolution)
                       for i in range(2)] + [np.zeros((32, 32, 3), np.float32)] * 6)
    want = np.asarray(encode_lib.make_encode_fn(config, mesh)(params, pixels))[:2]
    for r, codes in zip(records[1:], want):
        assert r["image_codes"] == codes.reshape(-1).tolist()
    for r in records:
        assert isinstance(r["output"], str) and 1 <= r["n_tokens"] <= 6
        assert r["prompt"].endswith("Input:\n<image>\n\n### Response:\n")


def test_vqa_and_instruct(workdir, image_inputs, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": "codes.npy", "question": "Is there an effusion?"})
                         + "\n" + json.dumps({"image": str(image_inputs / "img0.png"),
                                              "question": "Is the heart enlarged?"}) + "\n")
    # The relative path resolves against the JSONL's folder.
    (tmp_path / "codes.npy").write_bytes((image_inputs / "codes.npy").read_bytes())
    vqa = _run(workdir, tmp_path / "vqa", "--task", "vqa", "--input", questions, *TEXT_ARGS)
    assert [r["question"] for r in vqa] == ["Is there an effusion?", "Is the heart enlarged?"]
    assert all(r["phrasing"] is None and isinstance(r["output"], str) for r in vqa)
    assert vqa[0]["prompt"].startswith(prompts.INTRO_BLURB + "\n\n### Instruction:\nIs there")

    context = " ".join(["The lungs are clear."] * 14)  # a prompt in the same 128-token bucket
    instruct = _run(workdir, tmp_path / "ins", "--task", "instruct", "--instruction",
                    "Summarise the findings.", "--context", context, *TEXT_ARGS)
    assert instruct[0]["prompt"] == prompts.format_prompt("Summarise the findings.",
                                                          input=context)
    again = _run(workdir, tmp_path / "ins2", "--task", "instruct", "--instruction",
                 "Summarise the findings.", "--context", context, *TEXT_ARGS, "--seed", "9")
    assert again[0]["output"] == instruct[0]["output"]  # greedy ignores the seed


def _error(capsys_free_argv) -> str:
    """The one line launch/generate.py prints for a bad input (exit 1, or 2 for a usage error)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = cli.call(GENERATE.main, [str(a) for a in capsys_free_argv])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    lines = stderr.getvalue().strip().splitlines()
    assert code in (1, 2) and len(lines) == 1, stderr.getvalue()
    return lines[0]


def test_bad_input_errors_name_the_flag_or_file(workdir, image_inputs, tmp_path):
    w = ["--workdir", workdir, "--out", tmp_path / "o"]
    missing = tmp_path / "missing.jsonl"
    assert f"--input {missing}: no such file" in _error([*w, "--task", "report2image",
                                                         "--input", missing])
    assert "argument --task: invalid choice: 'draw'" in _error([*w, "--task", "draw",
                                                                "--report", "x"])
    assert "--task report2image does not take --image" in _error(
        [*w, "--task", "report2image", "--image", "a.png"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"report": "ok"}\n{"report": \n')
    assert f"{bad_json}:2: not valid JSON" in _error([*w, "--task", "report2image",
                                                      "--input", bad_json])
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n')
    assert f"{no_field}:1: a report2image record needs the field 'report'" in _error(
        [*w, "--task", "report2image", "--input", no_field])
    assert "2 --image for 3 --question" in _error(
        [*w, "--task", "vqa", "--image", "a.png", "--image", "b.png", "--question", "q1",
         "--question", "q2", "--question", "q3"])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    message = _error([*w, "--task", "image2report", "--image", corrupt])
    assert "--image #1" in message and str(corrupt) in message
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(10, np.int64))
    assert f"{short}: 10 codes, but the model's images have 64" in _error(
        [*w, "--task", "image2report", "--image", short])
    no_llm = tmp_path / "empty"
    no_llm.mkdir()
    assert f"--workdir: {no_llm} holds no LLM" in _error(
        ["--workdir", no_llm, "--task", "report2image", "--report", "x"])
    assert "--phrasing" in _error([*w, "--task", "report2image", "--report", "x",
                                   "--phrasing", "12"])
    assert "--guidance must be a finite number >= 0" in _error(
        [*w, "--task", "report2image", "--report", "x", "--guidance", "-1"])
    assert "--guidance applies to --task report2image only" in _error(
        [*w, "--task", "instruct", "--instruction", "x", "--guidance", "2"])


def test_items_from_flags_and_seeds():
    items = generate_job.read_items("vqa", images=["a.png"], questions=["q1", "q2"])
    assert [(i.image, i.question) for i in items] == [("a.png", "q1"), ("a.png", "q2")]
    assert generate_job.item_seed(5, 3) == 8
    job = generate_job.JobConfig(task="report2image", phrasing="random")
    drawn = {generate_job.phrasing_for(job, s) for s in range(40)}
    assert drawn <= set(range(10)) and len(drawn) > 3
    assert generate_job.phrasing_for(job, 3) == generate_job.phrasing_for(job, 3)
    assert generate_job.phrasing_for(generate_job.JobConfig(task="vqa"), 0) is None
    with pytest.raises(generate_job.InputError, match="no inputs"):
        generate_job.read_items("instruct")
    with pytest.raises(serving.BundleError):
        serving.locate("/nonexistent/model")
