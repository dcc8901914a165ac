"""The tasks LLM-CXR learns and serves, each named and described once.

The order is the data order: `DataConfig.weights` and the task ids of the training metrics follow
it, so a new task goes at the end. What each task reads and writes decides how the data pipeline,
generation (`llm/generate_job.py`) and `launch/generate.py` treat it: which inputs a generation
item takes (flags or JSONL fields), whether the response is an image (sampled under the image
constraint with guidance, decoded to PNGs), whether it is a direction of the image-report pairs
(phrasings, the conditioning gap). This module imports nothing heavy, so configs and command-line
parsers can use it; the behaviour that needs the vocabulary lives with the module that owns it,
keyed by task name, and each such table is checked complete at import:

    text/prompts.py     TASK_PROMPTS: training example from a record, generation prompt, phrasings
    data/pipeline.py    SOURCES: where a task's training records come from (paired tasks: the pairs)

A new task is one entry here and one in each of those two tables (a new kind of input besides:
its `generate_job.Item` field and `launch/generate.py` flag).
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
    title: str = ""  # for plots and reports; default: the name
    short: str = ""  # for log lines; default: the name

    def __post_init__(self) -> None:
        object.__setattr__(self, "title", self.title or self.name)
        object.__setattr__(self, "short", self.short or self.name)

    @property
    def reads_image(self) -> bool:
        """An input is an image (VQ-GAN codes in the prompt)."""
        return "image" in self.inputs

    @property
    def uses_vqgan(self) -> bool:
        """Generation needs the VQ-GAN: to encode input images or decode drawn codes."""
        return self.reads_image or self.draws_image

    @property
    def record_inputs(self) -> tuple[str, ...]:
        """The inputs' fields in a training record (`prompts.TASK_PROMPTS`): an image is its
        VQ-GAN `codes`."""
        return tuple("codes" if field == "image" else field for field in self.inputs)


REPORT2IMAGE = Task("report2image", inputs=("report",), draws_image=True, paired=True,
                    title="report -> image", short="r2i")
IMAGE2REPORT = Task("image2report", inputs=("image",), paired=True, title="image -> report",
                    short="i2r")
INSTRUCT = Task("instruct", inputs=("instruction",), optional=("context",),
                title="text instruction")
VQA = Task("vqa", inputs=("image", "question"), title="VQA")

TASKS: dict[str, Task] = {t.name: t for t in (REPORT2IMAGE, IMAGE2REPORT, INSTRUCT, VQA)}
NAMES: tuple[str, ...] = tuple(TASKS)
# The two directions of the image-report pairs, in data order.
PAIRED: tuple[str, ...] = tuple(t.name for t in TASKS.values() if t.paired)


def get(name: str) -> Task:
    """The task called `name`; a ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {tuple(TASKS)}")
    return TASKS[name]


def mix(**weights: float) -> tuple[float, ...]:
    """Mixing weights in data order (`DataConfig.weights`) from weights by task name; the tasks
    not named weigh 0."""
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {tuple(TASKS)}")
    return tuple(float(weights.get(name, 0.0)) for name in TASKS)
