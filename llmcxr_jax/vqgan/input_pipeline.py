"""grain pipeline of preprocessed CXR images for VQ-GAN training.

file list -> shuffle (reshuffled each epoch) -> repeat -> load + preprocess (`data/images.py`)
-> drop unreadable files (counted, each reported once) -> batch [B, size, size, 3] float32.
The iterator is a grain `DatasetIterator`, so its position is checkpointed with the train state.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Callable, Sequence

import grain
import numpy as np

from llmcxr_jax.data import images


@dataclasses.dataclass
class BadImages:
    """Thread-safe record of files skipped during training: {path: reason}."""

    total: int
    log: Callable[[str], None] = print
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    skips: int = 0  # every skip, counting repeats over epochs
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, err: images.ImageError) -> None:
        with self._lock:
            self.skips += 1
            new = err.path not in self.reasons
            self.reasons[err.path] = err.reason
            n_bad = len(self.reasons)
        if new:
            self.log(f"skipping unreadable image ({n_bad} so far): {err}")
        if n_bad >= self.total:
            raise RuntimeError(f"all {self.total} training images are unreadable; last: {err}")


class LoadImage:
    """grain map: path -> float32 [size, size, 3] in [-1, 1], or None for an unusable file."""

    def __init__(self, size: int, bad: BadImages):
        self.size = size
        self.bad = bad

    def __call__(self, path: str) -> np.ndarray | None:
        try:
            return images.load_image(path, self.size)
        except images.ImageError as e:
            self.bad.add(e)
            return None


def image_batches(paths: Sequence[str | pathlib.Path], size: int, batch_size: int, *,
                  seed: int = 0, read_threads: int = 0, prefetch: int = 64,
                  bad: BadImages | None = None) -> tuple[grain.DatasetIterator, BadImages]:
    """An endless, checkpointable iterator of [batch_size, size, size, 3] batches and the record
    of skipped files. `read_threads=0` decodes in the consuming thread (grain's fastest setting
    for cheap transforms); >0 uses that many reader threads."""
    if not paths:
        raise ValueError("no training images")
    bad = bad if bad is not None else BadImages(total=len(paths))
    ds = (grain.MapDataset.source([str(p) for p in paths])
          .shuffle(seed=seed)
          .repeat()
          .map(LoadImage(size, bad))
          .filter(lambda x: x is not None))
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(options).batch(batch_size, drop_remainder=True)
    return iter(it), bad
