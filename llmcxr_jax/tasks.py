"""The tasks LLM-CXR learns and serves, each named and described once.

The order is the data order: `DataConfig.weights` and the task ids of the training metrics follow
it, so a new task goes at the end. What each task reads and writes decides how the data pipeline,
generation (`llm/generate_job.py`) and `launch/generate.py` treat it; this module imports nothing
heavy, so configs and command-line parsers can use it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    inputs: tuple[str, ...]  # what a generation item must give (`generate_job.Item` fields)
    optional: tuple[str, ...] = ()  # what it may give besides
    # The response is an image: VQ-GAN codes sampled under the image constraint, decoded to
    # PNGs, with classifier-free guidance (its training examples may carry the null report).
    draws_image: bool = False
    # Trained on the world's image-report pairs, one direction of each (`data.direction`).
    paired: bool = False

    @property
    def reads_image(self) -> bool:
        """An input is an image (VQ-GAN codes in the prompt)."""
        return "image" in self.inputs

    @property
    def uses_vqgan(self) -> bool:
        """Generation needs the VQ-GAN: to encode input images or decode drawn codes."""
        return self.reads_image or self.draws_image


REPORT2IMAGE = Task("report2image", inputs=("report",), draws_image=True, paired=True)
IMAGE2REPORT = Task("image2report", inputs=("image",), paired=True)
INSTRUCT = Task("instruct", inputs=("instruction",), optional=("context",))
VQA = Task("vqa", inputs=("image", "question"))

TASKS: dict[str, Task] = {t.name: t for t in (REPORT2IMAGE, IMAGE2REPORT, INSTRUCT, VQA)}
NAMES: tuple[str, ...] = tuple(TASKS)


def get(name: str) -> Task:
    """The task called `name`; a ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {NAMES}")
    return TASKS[name]
