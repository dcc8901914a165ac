"""Chest X-ray image files -> NHWC float arrays in [-1, 1], and back to 8-bit PNG.

The transform is the original LLM-CXR one (`encode_cxr_all.py`): convert to RGB, resize so the short
side is `size` with Lanczos (each side `round(size / short * side)`), centre-crop to `size` x `size`
(torchvision's `center_crop` offsets), scale to [-1, 1]. An image whose short side is below `size`
is an error, as in the original (no upscaling).

Inputs: anything Pillow reads (JPEG and PNG in particular: 8-bit L/RGB/RGBA/P, 16-bit grayscale
`I;16`) and DICOM through pydicom. 8-bit images follow the original exactly (RGBA drops alpha like
`convert("RGB")`). High bit-depth grayscale (16-bit PNG, DICOM) keeps its precision: it becomes a
float image in [0, 1] (16-bit PNG: value / 65535; DICOM: rescale slope/intercept, then the file's
VOI LUT or window centre/width, else min-max; MONOCHROME1 inverted), is resized in float with the
same Lanczos filter and replicated to three channels.

Errors are `ImageError(path, reason)` (a `ValueError`) whose message names the file and the reason.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail, never load partially. Pillow's default; stated here so that nothing
# in this process silently relies on another module having flipped it.
ImageFile.LOAD_TRUNCATED_IMAGES = False

PathLike = str | pathlib.Path

PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image file that cannot be used; `path` and `reason` are kept for reports."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def is_dicom(path: PathLike) -> bool:
    """True for a `.dcm`/`.dicom` suffix or a file with the DICOM preamble magic `DICM` at 128."""
    path = pathlib.Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: PathLike) -> Image.Image:
    """Decode a file into either an 8-bit `RGB` image or a float `F` image with values in [0, 1]."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found")
    if is_dicom(path):
        return Image.fromarray(read_dicom(path))
    try:
        with Image.open(path) as im:
            im.load()  # raises on truncated/corrupt data (LOAD_TRUNCATED_IMAGES is False)
            return _to_rgb_or_float(im, path)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not a readable image (Pillow does not recognise the format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _to_rgb_or_float(im: Image.Image, path: pathlib.Path) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float32) / 65535.0
        return Image.fromarray(arr)
    if im.mode == "I":  # 32-bit container; older Pillow opens 16-bit PNG this way
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(path, f"32-bit integer image with values outside 0..65535 "
                                   f"[{arr.min()}, {arr.max()}] is not supported")
        return Image.fromarray(arr.astype(np.float32) / 65535.0)
    if im.mode == "F":
        raise ImageError(path, "floating-point images are not supported (use 8/16-bit or DICOM)")
    return im.convert("RGB")


def read_dicom(path: PathLike) -> np.ndarray:
    """A DICOM file's first-frame grayscale pixels as float32 in [0, 1], display-ready.

    Order as in the DICOM standard: modality LUT (RescaleSlope/RescaleIntercept), then the VOI
    transform (a VOI LUT sequence, else WindowCenter/WindowWidth with its VOILUTFunction, else
    min-max over the image), then MONOCHROME1 inversion. RGB DICOMs are scaled by their bit depth
    and converted to luminance-free grayscale by averaging (CXRs are grayscale).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = pathlib.Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ImageError(path, f"not a valid DICOM file ({e})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise ImageError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(path, "DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types (missing codec, bad length)
        raise ImageError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour: RGB (pydicom converts YBR to RGB by default)
        bits = int(getattr(ds, "BitsStored", 8))
        return (arr.astype(np.float64).mean(-1) / (2**bits - 1)).clip(0, 1).astype(np.float32)
    if arr.ndim != 2:
        raise ImageError(path, f"unsupported DICOM pixel array shape {arr.shape}")
    x = arr.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    x = x * slope + intercept
    x = _voi(ds, arr, x, path)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return x.clip(0.0, 1.0).astype(np.float32)


def _first(value) -> float:
    """A DICOM value that may be multi-valued: the first entry."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi(ds, raw: np.ndarray, x: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """The VOI transform to [0, 1]."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        out_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # The VOI LUT indexes modality-LUT output.
        y = apply_voi_lut(apply_modality_lut(raw, ds), ds, index=0, prefer_lut=True)
        return np.asarray(y, np.float64) / float(2**out_bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function == "SIGMOID":
            if w <= 0:
                raise ImageError(path, f"DICOM WindowWidth {w} must be > 0")
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if function == "LINEAR_EXACT":
            if w <= 0:
                raise ImageError(path, f"DICOM WindowWidth {w} must be > 0")
            return np.clip((x - c) / w + 0.5, 0.0, 1.0)
        if w < 1:
            raise ImageError(path, f"DICOM WindowWidth {w} must be >= 1 for a LINEAR window")
        # DICOM PS3.3 C.11.2.1.2.1 (LINEAR), mapped to an output range of [0, 1].
        if w == 1:
            return (x >= c - 0.5).astype(np.float64)
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


# --------------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------------


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `size`, rounded as the original does."""
    r = size / min(width, height)
    return round(r * width), round(r * height)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision `center_crop` box (left, top, right, bottom) for a `size` x `size` crop."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def preprocess(im: Image.Image, size: int, path: PathLike = "<image>") -> np.ndarray:
    """An `RGB` or `F` image -> float32 [size, size, 3] in [-1, 1]."""
    width, height = im.size
    if min(width, height) < size:
        raise ImageError(path, f"image is {width}x{height}: its short side {min(width, height)} is "
                               f"smaller than the target size {size}")
    new_w, new_h = resized_shape(width, height, size)
    im = im.resize((new_w, new_h), Image.Resampling.LANCZOS)
    im = im.crop(center_crop_box(new_w, new_h, size))
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    if im.mode == "F":
        x = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0) * 2.0 - 1.0
        return np.repeat(x[..., None], 3, axis=-1)
    raise ImageError(path, f"internal: unexpected mode {im.mode!r} after reading")


def load_image(path: PathLike, size: int) -> np.ndarray:
    """Read and preprocess one file: float32 [size, size, 3] in [-1, 1]; `ImageError` if unusable."""
    return preprocess(read_image(path), size, path)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """The inverse for saving: [-1, 1] floats -> uint8 (clipped, rounded)."""
    x = np.asarray(x, dtype=np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_png(path: PathLike, x: np.ndarray) -> None:
    """Write one [H, W, 3] (or [H, W]) image in [-1, 1] as an 8-bit PNG."""
    Image.fromarray(to_uint8(x)).save(path, format="PNG")


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """[N, H, W, C] images -> one [rows*H, columns*W, C] mosaic (empty cells black = -1)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, c), -1.0, dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid


def upscale_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, ...] resized to [height, width, ...] by nearest neighbour (PIL's pixel centres):
    with a whole factor each pixel becomes a square, nothing invented between them."""
    rows = ((np.arange(height) + 0.5) * image.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * image.shape[1] / width).astype(int)
    return np.asarray(image)[rows][:, cols]


def labeled_columns(columns: Sequence[tuple[str, np.ndarray]], cell: int = 256,
                    gap: int = 4) -> Image.Image:
    """Images side by side for a person to look at: column j shows `columns[j]`'s images
    ([N, H, W, C] in [-1, 1], the same N in every column) top to bottom, each scaled to `cell` px
    square (nearest: the pixels the model made stay visible), under a white band with the
    column's label (PIL's default font), wrapped at word breaks so that it stays over its own
    column. Columns and rows are `gap` px apart (white)."""
    from PIL import ImageDraw, ImageFont

    n = {len(images) for _, images in columns}
    if len(n) != 1:
        raise ValueError(f"labeled_columns: columns hold different image counts {sorted(n)}")
    rows = n.pop()
    font = ImageFont.load_default(size=max(10, cell // 14))  # FreeType (Pillow's wheels)
    lines = [_wrap(label, font, cell - 4) for label, _ in columns]
    line_height = int(font.size * 1.25)
    band = int(font.size * 0.55) * 2 + line_height * max(len(x) for x in lines)
    width = len(columns) * cell + (len(columns) - 1) * gap
    sheet = Image.new("RGB", (width, band + rows * (cell + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, (_, images) in enumerate(columns):
        x = j * (cell + gap)
        top = (band - line_height * len(lines[j])) // 2
        for k, line in enumerate(lines[j]):
            draw.text((x + cell // 2, top + k * line_height + line_height // 2), line,
                      fill=(0, 0, 0), font=font, anchor="mm")
        for i, image in enumerate(np.asarray(images)):
            tile = Image.fromarray(upscale_nearest(to_uint8(image), cell, cell).squeeze())
            sheet.paste(tile.convert("RGB"), (x, band + i * (cell + gap)))
    return sheet


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` in lines no wider than `width` px in `font`, broken between words (a single word
    wider than that keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


# --------------------------------------------------------------------------------------------------
# File lists
# --------------------------------------------------------------------------------------------------


def image_id(path: PathLike) -> str:
    """The image id: the file stem (MIMIC-CXR's dicom_id)."""
    return pathlib.Path(path).stem


def list_images(source: PathLike | Sequence[PathLike],
                suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[pathlib.Path]:
    """Image paths from a directory (recursive, by suffix, sorted), a text file of paths (one per
    line, relative ones resolved against the list's folder, `#` comments), or a sequence of paths."""
    if not isinstance(source, (str, pathlib.Path)):
        return [pathlib.Path(p) for p in source]
    source = pathlib.Path(source)
    if source.is_dir():
        wanted = {s.lower() for s in suffixes}
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if source.is_file():
        paths = []
        for line in source.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = pathlib.Path(line)
                paths.append(p if p.is_absolute() else source.parent / p)
        return paths
    raise FileNotFoundError(f"--images {source}: neither a directory nor a list file")
