"""The demo page for real: `python launch/demo.py --workdir W --port P` in a subprocess on a tiny
run workdir (tests/eval_workdir.py: a random 2-layer GPT-NeoX, a random 32 px VQ-GAN of 8x8
codes, guidance 2 in its config.json), each tab driven through its HTTP API with gradio_client.

Outputs are checked against independent computations in this process: the drawn PNG is the
VQ-GAN's decoding of the codes the page reports, the view its nearest-neighbour upscaling, an
uploaded image's codes the VQ-GAN's encoding of the project's preprocessing of the file, the
findings the labeler's reading of the generated report. Bad input gets its message back and the
server keeps serving; nothing is written into W.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import eval_workdir
from llmcxr_jax import cli
from llmcxr_jax.data import images as image_lib
from llmcxr_jax.data import labeler
from llmcxr_jax.demo.session import findings
from llmcxr_jax.parallel.local_cluster import free_port
from llmcxr_jax.text import prompts
from llmcxr_jax.vqgan import encode as encode_lib
from vqgan_test_files import write_dicom
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
REPORT = "Moderate left pleural effusion. Mild cardiomegaly."
VIEW_FACTOR = 512 // 32  # the page shows the 32 px images at 512 px
# A context long enough that the instruction prompt falls in the image prompts' 128-token bucket:
# all text tasks then share one compiled decode loop.
CONTEXT = " ".join(["The lungs are clear."] * 14)


def _snapshot(root: pathlib.Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(workdir, client, log file): the page serving a tiny run workdir."""
    tmp = tmp_path_factory.mktemp("demo")
    root = eval_workdir.build(tmp / "run")
    before = _snapshot(root)
    port = free_port()
    # The launcher's own device split (not the suite's 8 simulated devices), one device: the
    # page's work is batch-1 decoding of a tiny model.
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    env.update(LLMCXR_CPU_DEVICES="1", GRADIO_TEMP_DIR=str(tmp / "gradio"))
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "demo.py"), "--workdir",
                                 str(root), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while "(Ctrl-C stops)" not in log.read_text():
            assert proc.poll() is None, f"the demo exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no page after 240 s: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False,
                        download_files=str(tmp / "downloads"))
        yield root, client, log
        assert proc.poll() is None, f"the demo died: {log.read_text()[-3000:]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # SIGTERM ignored: no server left behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert _snapshot(root) == before  # W is only read
    scratch = {pathlib.Path(line.split(" wrote ")[1]).parents[1]
               for line in log.read_text().splitlines() if " wrote " in line}
    assert scratch and not any(p.exists() for p in scratch)  # removed on SIGTERM


@pytest.fixture(scope="module")
def vqgan(demo):
    root = demo[0]
    # One device: compiles faster than the suite's 8 and computes the same codes and pixels.
    mesh = jax.make_mesh((1,), (encode_lib.DATA_AXIS,), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    config, params, _ = encode_lib.load_model(root / "vqgan_run" / "vqgan", mesh)
    n = encode_lib.padded_batch_size(1, mesh)

    def decode(codes):
        side = config.latent_size
        batch = np.zeros((n, side, side), np.int32)
        batch[0] = np.reshape(codes, (side, side))
        out = encode_lib.make_decode_fn(config, mesh)(params, batch)
        return image_lib.to_uint8(np.asarray(out)[0])

    def encode(path):
        batch = np.zeros((n, config.resolution, config.resolution, 3), np.float32)
        batch[0] = image_lib.load_image(path, config.resolution)
        return np.asarray(encode_lib.make_encode_fn(config, mesh)(params, batch))[0].reshape(-1)

    return config, decode, encode


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _upscaled(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(image, VIEW_FACTOR, axis=0), VIEW_FACTOR, axis=1)


def _phantom(root: pathlib.Path) -> pathlib.Path:
    return sorted((root / "world" / "files").rglob("*.jpg"))[0]


def test_draw_shows_the_decoded_codes_upscaled_and_the_seed_reproduces_them(demo, vqgan):
    root, client, _ = demo
    config, decode, _ = vqgan
    view, png, seed, details = client.predict(report=REPORT, seed=11, api_name="/draw")
    assert seed == 11 and details["seed"] == 11 and details["report"] == REPORT
    # Guidance left at the page's default: the run's config value.
    assert details["guidance"] == json.loads((root / "config.json").read_text())["guidance"] == 2
    image = _png(png)
    assert image.shape == (config.resolution, config.resolution, 3)
    assert len(details["codes"]) == config.tokens_per_image
    np.testing.assert_array_equal(image, decode(details["codes"]))
    np.testing.assert_array_equal(_png(view), _upscaled(image))

    again = client.predict(report=REPORT, guidance=2.0, seed=11, api_name="/draw")
    assert again[3]["codes"] == details["codes"]
    np.testing.assert_array_equal(_png(again[1]), image)
    fresh = client.predict(report=REPORT, seed=-1, api_name="/draw")  # a new seed, shown
    assert fresh[2] == fresh[3]["seed"] and 0 <= fresh[2] < 2**31 and fresh[2] != 11
    assert fresh[3]["codes"] != details["codes"]
    redrawn = client.predict(report=REPORT, seed=fresh[2], api_name="/draw")
    assert redrawn[3]["codes"] == fresh[3]["codes"]


def test_read_writes_a_report_with_the_labelers_findings(demo, vqgan):
    root, client, _ = demo
    _, decode, encode = vqgan
    image = _phantom(root)
    view, report, table, seed, details = client.predict(handle_file(str(image)), 3,
                                                        api_name="/read")
    assert seed == details["seed"] == 3 and report.strip() and report == details["output"]
    names = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
    expected = [[k, names[v]] for k, v in labeler.label_report(report).items() if v is not None]
    assert table["headers"] == ["finding", "label"] and table["data"] == expected
    np.testing.assert_array_equal(details["image_codes"], encode(image))
    np.testing.assert_array_equal(_png(view), _upscaled(decode(details["image_codes"])))


def test_findings_name_each_mentioned_label():
    got = dict(findings("Cardiomegaly. Possible left pleural effusion. No pneumothorax."))
    assert got == {"Cardiomegaly": "positive", "Pleural Effusion": "uncertain",
                   "Pneumothorax": "negative"}


def test_vqa_on_a_dicom_and_an_instruction(demo, vqgan, tmp_path):
    root, client, _ = demo
    _, _, encode = vqgan
    pixels = np.asarray(Image.open(_phantom(root)).convert("L"), np.uint16) * 16
    write_dicom(tmp_path / "xray.dcm", pixels)
    question = "Is there a pleural effusion?"
    answer, seed, details = client.predict(handle_file(str(tmp_path / "xray.dcm")), question, 4,
                                           api_name="/answer")
    assert answer.strip() and answer == details["output"] and seed == 4
    assert details["question"] == question
    np.testing.assert_array_equal(details["image_codes"], encode(tmp_path / "xray.dcm"))

    response, seed, details = client.predict("Summarise the findings.", CONTEXT, 5,
                                             api_name="/instruct")
    assert response.strip() and response == details["output"] and seed == 5
    assert details["prompt"] == prompts.format_prompt("Summarise the findings.", input=CONTEXT)


def test_bad_input_gets_a_message_and_the_server_keeps_serving(demo, tmp_path):
    root, client, log = demo

    def refused(*args, api_name):
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name=api_name)
        return str(info.value)

    assert "report is empty" in refused("   ", 2.0, 1, api_name="/draw")
    assert "guidance scale -1: give a number >= 0" in refused(REPORT, -1.0, 1, api_name="/draw")
    (tmp_path / "notes.txt").write_text("not an image")
    assert "notes.txt: not a readable image" in refused(handle_file(str(tmp_path / "notes.txt")),
                                                        1, api_name="/read")
    Image.new("1", (7000, 7000)).save(tmp_path / "huge.png")  # 49 megapixels, a few kB
    assert "7000 x 7000 pixels is more than" in refused(handle_file(str(tmp_path / "huge.png")),
                                                        "Why?", 1, api_name="/answer")
    Image.new("L", (16, 40)).save(tmp_path / "small.png")
    assert "smaller than the target size 32" in refused(
        handle_file(str(tmp_path / "small.png")), 1, api_name="/read")
    assert "No image" in refused(None, 1, api_name="/read")
    # Still serving: a good request after the bad ones.
    response, seed, _ = client.predict("Summarise the findings.", CONTEXT, 5, api_name="/instruct")
    assert response.strip() and seed == 5
    assert "Traceback" not in log.read_text()  # refusals are messages, not server errors


def test_usage_and_model_errors_are_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("launch_demo", REPO / "launch" / "demo.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with pytest.raises(SystemExit) as info:
        launcher.parse_args(["--workdir", str(tmp_path), "--port", "70000"])
    assert info.value.code == 2 and "--port" in capsys.readouterr().err
    assert cli.call(launcher.main, ["--workdir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing does not exist" in err and "\n" not in err
