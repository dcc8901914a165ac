"""Dataset encoding/decoding: codes equal the model's own encode, bad files are skipped with the
right reasons, resume skips done ids, decode writes one PNG per id and a grid."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import configs
from llmcxr_jax.data import images, phantoms
from llmcxr_jax.vqgan import encode
from llmcxr_jax.vqgan.checkpoint import load_vqgan, save_vqgan
from llmcxr_jax.vqgan.model import VQGAN, init_params
from vqgan_test_files import smooth_image, write_dicom, write_png16, write_truncated_jpeg


@pytest.fixture(scope="module")
def vqgan_workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("vq")
    save_vqgan(work / "vqgan", configs.vqgan_preset("test-tiny"),
               init_params(configs.vqgan_preset("test-tiny"), seed=7))
    return work


def _phantom(size):
    rng = np.random.default_rng(0)
    return phantoms.render(phantoms.sample_findings(rng), phantoms.Anatomy.sample(rng), "PA", size=size)


def _dataset(root):
    root.mkdir()
    (root / "p1").mkdir()
    Image.fromarray(_phantom(48)).save(root / "phantom-a.png")
    Image.fromarray(smooth_image(40, 52, seed=1)).save(root / "p1" / "rgb-b.jpg", quality=95)
    write_png16(root / "gray16-c.png", 36, 44, seed=2)
    pix = np.random.default_rng(3).integers(0, 4000, (40, 40)).astype(np.uint16)
    write_dicom(root / "dicom-d.dcm", pix, "MONOCHROME1", window=(2000.0, 4000.0))
    write_truncated_jpeg(root / "cut.jpg")
    Image.fromarray(smooth_image(20, 60, seed=4)).save(root / "small.png")
    write_dicom(root / "nopixels.dcm", None)
    (root / "z").mkdir()  # sorts after phantom-a.png: the first path of an id wins
    Image.fromarray(smooth_image(40, 40, seed=5)).save(root / "z" / "phantom-a.jpg")  # same id
    return root


GOOD = ["dicom-d", "gray16-c", "phantom-a", "rgb-b"]


def test_encode_resume_decode(vqgan_workdir, tmp_path):
    data = _dataset(tmp_path / "imgs")
    codes_dir = tmp_path / "codes"
    lines = []
    summary = encode.encode_images(vqgan_workdir, data, codes_dir, batch_size=3, threads=2,
                                   shard_size=2, progress=False, log=lines.append)
    assert summary["encoded"] == 4 and summary["failed"] == 3 and summary["already_done"] == 0
    assert "4 encoded" in lines[0] and "3 unreadable" in lines[0]

    codes = encode.load_codes(codes_dir)
    assert sorted(codes) == GOOD
    assert all(c.dtype == np.uint16 and c.shape == (8, 8) for c in codes.values())
    # Same codes as the model's encode called directly on the preprocessed images.
    config, params = load_vqgan(vqgan_workdir / "vqgan")
    paths = {images.image_id(p): p for p in reversed(images.list_images(data))}
    x = np.stack([images.load_image(paths[i], config.resolution) for i in GOOD])
    direct = jax.jit(lambda p, x: VQGAN(config).apply({"params": p}, x, method=VQGAN.encode).indices)(params, x)
    np.testing.assert_array_equal(np.stack([codes[i] for i in GOOD]), np.asarray(direct))

    failed = json.loads((codes_dir / "failed.json").read_text())
    assert failed[str(data / "cut.jpg")].startswith("truncated or corrupt image data")
    assert "smaller than the target size 32" in failed[str(data / "small.png")]
    assert failed[str(data / "nopixels.dcm")] == "DICOM file has no pixel data"
    assert failed[str(data / "z" / "phantom-a.jpg")] == (
        f"duplicate image id 'phantom-a' (also {data / 'phantom-a.png'})")
    index = json.loads((codes_dir / "index.json").read_text())
    assert index["count"] == 4 and len(index["shards"]) == 2 and index["latent_shape"] == [8, 8]

    # Resume: a new image is encoded, the done ones are skipped, the broken ones retried.
    Image.fromarray(smooth_image(33, 33, seed=9)).save(data / "new-e.png")
    again = encode.encode_images(vqgan_workdir, data, codes_dir, batch_size=3, progress=False,
                                 log=lambda s: None)
    assert (again["encoded"], again["already_done"], again["failed"]) == (1, 4, 3)
    codes2 = encode.load_codes(codes_dir)
    assert sorted(codes2) == sorted(GOOD + ["new-e"])
    for i in GOOD:
        np.testing.assert_array_equal(codes2[i], codes[i])

    # Decode: one PNG per id, equal to the model's decode_code, and a grid.
    out = tmp_path / "decoded"
    encode.decode_codes(vqgan_workdir, codes_dir, out, batch_size=2, ids=GOOD, progress=False,
                        log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in GOOD] + ["grid.png"])
    dec = jax.jit(lambda p, c: VQGAN(config).apply({"params": p}, c, method=VQGAN.decode_code))(
        params, np.stack([codes[i] for i in GOOD]).astype(np.int32))
    for i, img in zip(GOOD, np.asarray(dec)):
        np.testing.assert_allclose(np.asarray(Image.open(out / f"{i}.png"), np.int16),
                                   images.to_uint8(img), atol=1)
    assert Image.open(out / "grid.png").size == (4 * 32, 32)


def test_codes_from_another_model_are_refused(vqgan_workdir, tmp_path):
    other = tmp_path / "other"
    save_vqgan(other / "vqgan", configs.vqgan_preset("test-tiny"),
               init_params(configs.vqgan_preset("test-tiny"), seed=8))
    header = {"vqgan": configs.to_dict(configs.vqgan_preset("test-tiny")),
              "params_sha256": encode.params_digest(other / "vqgan"), "latent_shape": [8, 8]}
    writer = encode.CodesWriter(tmp_path / "codes", header)
    writer.add("x", np.zeros((8, 8)), "x.png")
    writer.flush()
    with pytest.raises(ValueError, match="holds codes from another VQ-GAN"):
        encode.encode_images(vqgan_workdir, [], tmp_path / "codes", progress=False, log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="not a codes directory"):
        encode.load_codes(tmp_path)
