"""Image preprocessing: the original LLM-CXR transform, bit depths, DICOM, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax.data import images
from vqgan_test_files import smooth_image, write_dicom, write_png16, write_truncated_jpeg


def reference_transform(path, size):
    """LLM-CXR's encode_cxr_all.py transform written out with PIL directly."""
    img = Image.open(path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    r = size / min(w, h)
    img = img.resize((round(r * w), round(r * h)), Image.LANCZOS)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, np.float32) / 255.0 * 2.0 - 1.0


@pytest.mark.parametrize("shape,fmt", [((45, 61), "PNG"), ((70, 37), "JPEG"), ((33, 32), "PNG")])
def test_rgb_matches_reference(tmp_path, shape, fmt):
    path = tmp_path / ("x.png" if fmt == "PNG" else "x.jpg")
    Image.fromarray(smooth_image(*shape, seed=1)).save(path, format=fmt)
    got = images.load_image(path, 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_transform(path, 32), atol=1e-6)
    assert -1.0 <= got.min() and got.max() <= 1.0


def test_grayscale_and_rgba(tmp_path):
    gray = smooth_image(40, 50, seed=2, channels=1)[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    got = images.load_image(tmp_path / "g.png", 32)
    np.testing.assert_allclose(got, reference_transform(tmp_path / "g.png", 32), atol=1e-6)
    assert np.array_equal(got[..., 0], got[..., 2])  # gray replicated to 3 channels

    rgb = smooth_image(40, 50, seed=3)
    alpha = np.full((40, 50, 1), 128, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    # Alpha is dropped as convert("RGB") does: the same as the plain RGB file.
    np.testing.assert_array_equal(images.load_image(tmp_path / "a.png", 32),
                                  images.load_image(tmp_path / "rgb.png", 32))


def test_png16_scaled_not_clipped(tmp_path):
    arr = write_png16(tmp_path / "g16.png", 48, 40, seed=4)
    got = images.load_image(tmp_path / "g16.png", 32)
    # Reference: float resize of value / 65535 with the same Lanczos filter and crop.
    f = Image.fromarray(arr.astype(np.float32) / 65535.0)
    w, h = f.size
    f = f.resize((32, round(32 / w * h)), Image.LANCZOS)
    top = int(round((f.size[1] - 32) / 2.0))
    ref = np.clip(np.asarray(f.crop((0, top, 32, top + 32))), 0, 1) * 2 - 1
    np.testing.assert_allclose(got[..., 1], ref, atol=1e-5)
    # Full range survives: a clip to 8 bit would make almost every pixel white.
    assert got.min() < -0.8 and got.max() > 0.8 and np.mean(got > 0.99) < 0.1


def test_dicom_monochrome1_rescale_window(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 4096, (40, 36)).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", pix, "MONOCHROME2", slope=2.0, intercept=-100.0,
                window=(2000.0, 3000.0))
    write_dicom(tmp_path / "m1.dcm", pix, "MONOCHROME1", slope=2.0, intercept=-100.0,
                window=(2000.0, 3000.0))
    m2 = images.read_dicom(tmp_path / "m2.dcm")
    m1 = images.read_dicom(tmp_path / "m1.dcm")
    x = pix * 2.0 - 100.0
    expect = np.clip((x - 1999.5) / 2999.0 + 0.5, 0, 1)  # DICOM LINEAR window
    np.testing.assert_allclose(m2, expect, atol=1e-6)
    np.testing.assert_allclose(m1, 1.0 - expect, atol=1e-6)  # MONOCHROME1 inverted
    a, b = images.load_image(tmp_path / "m2.dcm", 32), images.load_image(tmp_path / "m1.dcm", 32)
    np.testing.assert_allclose(a, -b, atol=1e-5)  # inversion commutes with the linear resize

    write_dicom(tmp_path / "plain.dcm", pix, "MONOCHROME2")  # no window: min-max
    plain = images.read_dicom(tmp_path / "plain.dcm")
    np.testing.assert_allclose(plain, (pix - pix.min()) / (pix.max() - pix.min()), atol=1e-6)
    # DICOM is found by its magic too, whatever the suffix.
    (tmp_path / "plain.dcm").rename(tmp_path / "noext")
    assert images.is_dicom(tmp_path / "noext")


def test_errors_name_file_and_reason(tmp_path):
    Image.fromarray(smooth_image(20, 40)).save(tmp_path / "small.png")
    with pytest.raises(images.ImageError, match=r"small\.png: image is 40x20: its short side 20 "
                                                r"is smaller than the target size 32"):
        images.load_image(tmp_path / "small.png", 32)

    write_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(images.ImageError, match=r"cut\.jpg: truncated or corrupt image data"):
        images.load_image(tmp_path / "cut.jpg", 32)

    write_dicom(tmp_path / "empty.dcm", None)
    with pytest.raises(images.ImageError, match=r"empty\.dcm: DICOM file has no pixel data"):
        images.load_image(tmp_path / "empty.dcm", 32)

    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(images.ImageError, match=r"junk\.png: not a readable image"):
        images.load_image(tmp_path / "junk.png", 32)
    with pytest.raises(images.ImageError, match="missing.png: file not found"):
        images.load_image(tmp_path / "missing.png", 32)
    assert issubclass(images.ImageError, ValueError)


def test_uint8_roundtrip_and_lists(tmp_path):
    x = np.linspace(-1, 1, 256, dtype=np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), np.arange(256))
    assert images.to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]
    (tmp_path / "d" / "p1").mkdir(parents=True)
    for name in ["d/p1/b.jpg", "d/a.png", "d/c.dcm", "d/notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    found = images.list_images(tmp_path / "d")
    assert [p.name for p in found] == ["a.png", "c.dcm", "b.jpg"]
    (tmp_path / "list.txt").write_text("# comment\nd/a.png\n\n" + str(tmp_path / "d/c.dcm") + "\n")
    assert images.list_images(tmp_path / "list.txt") == [tmp_path / "d/a.png", tmp_path / "d/c.dcm"]
    assert images.image_id("x/y/02aa804e-bde0afdd.jpg") == "02aa804e-bde0afdd"
    grid = images.image_grid(np.zeros((3, 4, 4, 3)), columns=2)
    assert grid.shape == (8, 8, 3) and grid[4:, 4:].min() == -1.0



def test_upscale_nearest_equals_pils_nearest_resize():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ours = images.upscale_nearest(image, 64, 96)  # a whole factor: each pixel a 4 x 4 square
    pil = Image.fromarray(image).resize((96, 64), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(ours, np.asarray(pil))
    np.testing.assert_array_equal(ours, image.repeat(4, axis=0).repeat(4, axis=1))
    # Other sizes: the source pixel under each output pixel's centre; PIL breaks exact ties
    # (a centre on a pixel boundary) to either side, so the two may differ there by one pixel.
    index = np.arange(24, dtype=np.uint8)[None, :]
    for width in (50, 11, 40):
        ours = images.upscale_nearest(index, 1, width)[0].astype(int)
        pil = np.asarray(Image.fromarray(index).resize((width, 1), Image.Resampling.NEAREST))[0]
        assert np.abs(ours - pil).max() <= 1 and np.mean(ours == pil) >= 0.8, (width, ours, pil)
