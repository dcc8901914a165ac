"""Writers for the small image files the image / VQ-GAN tests need (JPEG, PNG, DICOM, broken)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def smooth_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A uint8 image with smooth structure (blobs on a gradient), so resampling is non-trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 40 + 80 * xx / w + 40 * yy / h
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(h, w) / 3)
        img = img + rng.uniform(-60, 90) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = np.clip(img, 0, 255)
    out = np.stack([img * (0.8 + 0.1 * c) for c in range(channels)], -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_png16(path: pathlib.Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A 16-bit grayscale PNG using the full range; returns the uint16 pixels."""
    base = smooth_image(h, w, seed, channels=1)[..., 0].astype(np.float64)
    arr = ((base - base.min()) / max(base.max() - base.min(), 1) * 65535).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return arr


def write_truncated_jpeg(path: pathlib.Path, h: int = 48, w: int = 48) -> None:
    """A JPEG cut in half: the header parses, the scan data ends early."""
    full = path.with_suffix(".full.jpg")
    Image.fromarray(smooth_image(h, w, 3)).save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


def write_dicom(path: pathlib.Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2",
                slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None) -> None:
    """A minimal uncompressed (Explicit VR Little Endian) grayscale DICOM; `pixels=None` omits
    PixelData."""
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "phantom"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if pixels is not None:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
