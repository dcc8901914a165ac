"""What the demo page does, without the page: one loaded model and its four tasks.

Each request runs as a one-item generate job (`llm/generate_job.run_job`) into a scratch folder,
so the page draws and reads exactly as `launch/generate.py --batch-size 1` does: the same prompts,
sampling, guidance, image preprocessing (`data/images.py`) and per-item seeds. The seed a result
shows is the one it was drawn with; giving it again redraws the same output.

Uploads are checked before any work: nothing uploaded, more than `MAX_PIXELS` pixels (read from
the file's header, before any pixel is decoded), or (inside the job) a file that is not a readable
PNG/JPEG/DICOM or whose short side is below the VQ-GAN's resolution. Every refusal is a
`DemoInputError` or `generate_job.InputError` whose message the page shows as it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import secrets
import threading
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image

from llmcxr_jax.data import images as image_lib
from llmcxr_jax.data import labeler
from llmcxr_jax.llm import generate_job
from llmcxr_jax.llm.serving import Bundle

# About 6,300 x 6,300. MIMIC-CXR's largest radiographs are about 4,300 x 3,500 (15 megapixels).
MAX_PIXELS = 40_000_000
# Images are shown upscaled by a whole factor to at most this many pixels a side (nearest
# neighbour: each of the model's pixels a visible square, nothing invented between them).
VIEW_SIZE = 512
LABEL_NAMES = {labeler.POSITIVE: "positive", labeler.NEGATIVE: "negative",
               labeler.UNCERTAIN: "uncertain"}

Progress = Callable[[float, str], None]


class DemoInputError(ValueError):
    """Input the page refuses; the message says what to do instead."""


def _no_progress(fraction: float, what: str) -> None:
    del fraction, what


@dataclasses.dataclass(frozen=True)
class Result:
    """One request's output: the seed that reproduces it and the job's output record
    (`outputs.jsonl`: prompt, phrasing, tokens, codes), with the task's own parts."""

    seed: int
    record: dict[str, Any]
    text: str | None = None  # image2report, vqa, instruct: the generated text
    png: pathlib.Path | None = None  # report2image: the image at the VQ-GAN's resolution
    view: np.ndarray | None = None  # uint8 [H, W, 3], upscaled for viewing
    findings: tuple[tuple[str, str], ...] = ()  # image2report: the labeler's reading of `text`


def upscale(image: np.ndarray, size: int = VIEW_SIZE) -> np.ndarray:
    """[H, W, C] repeated by the largest whole factor (at least 1) that keeps the long side
    within `size`."""
    factor = max(1, size // max(image.shape[:2]))
    return image_lib.upscale_nearest(image, factor * image.shape[0], factor * image.shape[1])


def findings(report: str) -> tuple[tuple[str, str], ...]:
    """(label, positive / negative / uncertain) for each CheXpert label the labeler
    (`data/labeler.label_report`) finds mentioned in `report`, in the labeler's order."""
    return tuple((name, LABEL_NAMES[value]) for name, value in labeler.label_report(report).items()
                 if value is not None)


def resolve_seed(seed: float | None) -> int:
    """A request's seed: the given one, or a fresh random one for None or -1."""
    if seed is None or seed == -1:
        return secrets.randbelow(generate_job.SEED_MODULUS)
    if seed != int(seed) or not 0 <= seed < generate_job.SEED_MODULUS:
        raise DemoInputError(f"seed {seed:g}: give a whole number from 0 to "
                             f"{generate_job.SEED_MODULUS - 1}, or -1 for a new random one")
    return int(seed)


def _text(value: str | None, what: str) -> str:
    if value is None or not value.strip():
        raise DemoInputError(f"The {what} is empty: type one first.")
    return value.strip()


def image_size(path: pathlib.Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, no pixels decoded; None when the header is
    unreadable (the job then says why)."""
    if image_lib.is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Image.DecompressionBombError as e:
        raise DemoInputError(f"{path.name}: too large to read ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def check_upload(path: str | pathlib.Path | None) -> pathlib.Path:
    """The uploaded file, or a DemoInputError when there is none or it has too many pixels."""
    if not path:
        raise DemoInputError("No image: upload a chest X-ray (PNG, JPEG or DICOM) first.")
    path = pathlib.Path(path)
    if not path.is_file():
        raise DemoInputError(f"{path.name}: the upload is gone; upload it again.")
    size = image_size(path)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise DemoInputError(f"{path.name}: {size[0]} x {size[1]} pixels is more than this page "
                             f"reads ({MAX_PIXELS:,} pixels); downscale it first.")
    return path


class DemoSession:
    """A loaded model (`serving.load_bundle`) answering the page's requests one at a time, each
    job written to its own folder under `scratch`."""

    def __init__(self, bundle: Bundle, scratch: str | pathlib.Path, *,
                 view_size: int = VIEW_SIZE, say: Callable[[str], None] = print):
        self.bundle = bundle
        self.scratch = pathlib.Path(scratch)
        self.view_size = view_size
        self.say = say
        self._lock = threading.Lock()
        self._jobs = itertools.count()
        self._codec: Any = None  # the VQ-GAN codec, made on first use

    @property
    def guidance(self) -> float:
        """The model's default report -> image guidance scale (a run's `guidance`)."""
        return self.bundle.guidance

    @property
    def resolution(self) -> int | None:
        """The VQ-GAN's image size in pixels (None without a VQ-GAN)."""
        return self.bundle.vqgan_config.resolution if self.bundle.vqgan_config else None

    def draw(self, report: str | None, seed: float | None = None, guidance: float | None = None,
             progress: Progress = _no_progress) -> Result:
        """report -> a chest X-ray, at `guidance` (None: the model's default)."""
        item = generate_job.Item(0, "demo", "the report", report=_text(report, "report"))
        if guidance is not None and not 0.0 <= guidance < float("inf"):
            raise DemoInputError(f"guidance scale {guidance:g}: give a number >= 0 (1 = plain "
                                 f"sampling; this model's default is {self.guidance:g})")
        seed = resolve_seed(seed)
        job = generate_job.JobConfig("report2image", batch_size=1, seed=seed, guidance=guidance)
        record, out = self._run(job, item, progress)
        png = out / record["output"]
        with Image.open(png) as im:
            image = np.asarray(im.convert("RGB"))
        return Result(seed, record, png=png, view=upscale(image, self.view_size))

    def read(self, image: str | pathlib.Path | None, seed: float | None = None,
             progress: Progress = _no_progress) -> Result:
        """A chest X-ray -> its report, the labeler's findings for that report, and the image as
        the model reads it (the VQ-GAN's decoding of its codes)."""
        item = generate_job.Item(0, "demo", "the image", image=str(check_upload(image)))
        seed = resolve_seed(seed)
        job = generate_job.JobConfig("image2report", batch_size=1, seed=seed)
        record, _ = self._run(job, item, progress)
        text = record["output"]
        return Result(seed, record, text=text, view=self._as_read(record["image_codes"]),
                      findings=findings(text))

    def answer(self, image: str | pathlib.Path | None, question: str | None,
               seed: float | None = None, progress: Progress = _no_progress) -> Result:
        """VQA: a question about a chest X-ray."""
        question = _text(question, "question")
        item = generate_job.Item(0, "demo", "the image", image=str(check_upload(image)),
                                 question=question)
        seed = resolve_seed(seed)
        record, _ = self._run(generate_job.JobConfig("vqa", batch_size=1, seed=seed), item,
                              progress)
        return Result(seed, record, text=record["output"])

    def instruct(self, instruction: str | None, context: str | None = None,
                 seed: float | None = None, progress: Progress = _no_progress) -> Result:
        """A plain text instruction, with optional context (dolly's format)."""
        item = generate_job.Item(0, "demo", "the instruction",
                                 instruction=_text(instruction, "instruction"),
                                 context=(context or "").strip() or None)
        seed = resolve_seed(seed)
        record, _ = self._run(generate_job.JobConfig("instruct", batch_size=1, seed=seed), item,
                              progress)
        return Result(seed, record, text=record["output"])

    def _run(self, job: generate_job.JobConfig, item: generate_job.Item,
             progress: Progress) -> tuple[dict[str, Any], pathlib.Path]:
        progress(0.1, f"{job.task}: generating (a task's first request also compiles it)")
        with self._lock:
            out = self.scratch / f"{next(self._jobs):06d}-{job.task}"
            generate_job.run_job(self.bundle, [item], job, out,
                                 say=lambda line: self.say(f"demo: {line}"))
        progress(1.0, f"{job.task}: done")
        return json.loads((out / generate_job.OUTPUTS_FILE).read_text().splitlines()[0]), out

    def _as_read(self, codes: list[int]) -> np.ndarray:
        with self._lock:
            if self._codec is None:
                self._codec = generate_job.image_codec(self.bundle)
            image = self._codec.decode(np.asarray([codes], np.int32))[0]
        return upscale(image_lib.to_uint8(image), self.view_size)
