"""Dolly prompt formats, LLM-CXR's instruction phrasings, and tokenised training examples.

Every task is one Dolly record: `instruction`, optional `input`, `response`.

    report2image   instruction: one of REPORT_TO_IMAGE_INSTRUCTIONS  input: report   response: <image>
    image2report   instruction: one of IMAGE_TO_REPORT_INSTRUCTIONS  input: <image>  response: report
    vqa            instruction: the question                         input: <image>  response: answer
    instruct       a dolly-15k record (input only when its context is non-empty)

`TASK_PROMPTS` holds each task's builders (training example, generation prompt, phrasings), keyed
by the names of `llmcxr_jax.tasks`.

The loss covers only the response: weights are 0 up to and including `### Response:\\n` and 1
from the token after it through `### End` (LLM-CXR's DataCollatorForCompletionOnlyLM). Examples are
never truncated: `keep_if_fits` returns None for a too-long one so the caller can count the drop.

The Dolly strings follow databricks' dolly `training/consts.py` (Apache-2.0) and the twenty
instructions LLM-CXR's `training/mimiccxr_vq_dataset.py` (github.com/hyn2028/llm-cxr), word for word,
since a model tuned on them expects exactly these prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from llmcxr_jax import tasks
from llmcxr_jax.text.vocab import (END_KEY, IMAGE_PLACEHOLDER, INSTRUCTION_KEY, RESPONSE_KEY,
                                   RESPONSE_KEY_NL, Vocab)

__all__ = [
    "INTRO_BLURB", "INPUT_KEY", "IMAGE_PLACEHOLDER", "PROMPT_NO_INPUT_FORMAT",
    "PROMPT_WITH_INPUT_FORMAT", "PROMPT_FOR_GENERATION_FORMAT",
    "PROMPT_FOR_GENERATION_FORMAT_NOINPUT", "REPORT_TO_IMAGE_INSTRUCTIONS",
    "IMAGE_TO_REPORT_INSTRUCTIONS", "TASKS", "DIRECTION_MODES", "Example", "PromptError",
    "format_prompt", "response_loss_mask", "report_to_image_example", "image_to_report_example",
    "instruction_example", "vqa_example", "build_example", "report_to_image_prompt_ids",
    "image_to_report_prompt_ids", "instruction_prompt_ids", "vqa_prompt_ids", "prompt_ids",
    "direction_for_pair", "pick_instruction", "fits", "keep_if_fits", "NULL_REPORT",
    "TaskPrompts", "TASK_PROMPTS", "generation_prompt", "instructions_of",
]

INTRO_BLURB = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
INPUT_KEY = "Input:"

PROMPT_NO_INPUT_FORMAT = (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\n"
                          f"{RESPONSE_KEY}\n{{response}}\n\n{END_KEY}")
PROMPT_WITH_INPUT_FORMAT = (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\n"
                            f"{INPUT_KEY}\n{{input}}\n\n{RESPONSE_KEY}\n{{response}}\n\n{END_KEY}")
PROMPT_FOR_GENERATION_FORMAT = (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\n"
                                f"{INPUT_KEY}\n{{input}}\n\n{RESPONSE_KEY}\n")
PROMPT_FOR_GENERATION_FORMAT_NOINPUT = (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{{instruction}}\n\n"
                                        f"{RESPONSE_KEY}\n")

# LLM-CXR's CXR_VQ_OUTPUT_INSTRUCTION_LIST: the report is the input, the image the response.
REPORT_TO_IMAGE_INSTRUCTIONS: tuple[str, ...] = (
    "Generate a chest X-ray image that corresponds to the entered free-text radiology reports for the chest X-ray image.",
    "Use the free-text radiology reports for the chest X-ray image to produce a corresponding chest X-ray image.",
    "Utilize the entered free-text radiology reports for the chest X-ray image to create a corresponding chest X-ray image.",
    "Create a chest X-ray image that matches the free-text radiology reports entered for the chest X-ray image.",
    "Produce a chest X-ray image that is consistent with the free-text radiology reports entered for the chest X-ray image.",
    "Based on the free-text radiology reports for the chest X-ray image, generate a corresponding chest X-ray image.",
    "Use the free-text radiology reports entered for the chest X-ray image to create a corresponding chest X-ray image.",
    "Generate a chest X-ray image that is in accordance with the free-text radiology reports for the chest X-ray image entered.",
    "Create a chest X-ray image that corresponds to the free-text radiology reports entered for the chest X-ray image.",
    "Utilize the entered free-text radiology reports for the chest X-ray image to produce a corresponding chest X-ray image.",
)

# LLM-CXR's CXR_VQ_INPUT_INSTRUCTION_LIST: the image is the input, the report the response.
IMAGE_TO_REPORT_INSTRUCTIONS: tuple[str, ...] = (
    "Generate free-text radiology reports for the entered chest X-ray images.",
    "Use the entered chest X-ray images to create corresponding free-text radiology reports.",
    "Based on the entered chest X-ray images, produce free-text radiology reports.",
    "Create free-text radiology reports that correspond to the entered chest X-ray images.",
    "Utilize the entered chest X-ray images to generate corresponding free-text radiology reports.",
    "Generate free-text radiology reports in accordance with the entered chest X-ray images.",
    "Use the entered chest X-ray images to create accurate free-text radiology reports.",
    "Produce free-text radiology reports that match the entered chest X-ray images.",
    "Create free-text radiology reports that are consistent with the entered chest X-ray images.",
    "Utilize the entered chest X-ray images to generate comprehensive free-text radiology reports.",
)

# The empty condition of classifier-free guidance: the report of a report -> image example
# trained without one (`DataConfig.null_report_rate`) and of the unconditional twin a guided
# generation decodes beside each real prompt. Bracketed ASCII that no radiology report reads
# like, a valid report field (`_check_fields`), tokenised by any byte-level vocabulary.
NULL_REPORT = "[no report]"

TASKS = tasks.NAMES
DIRECTION_MODES = ("alternate", "both")

Phrasing = int | np.random.Generator | None


class PromptError(ValueError):
    """A record that cannot become a well-formed example (callers skip and count these)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised training example: ids, per-token loss weights (float32 0/1) and its task."""

    ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L]; 1 on response tokens through `### End`
    task: str

    def __post_init__(self) -> None:
        if self.ids.shape != self.loss_mask.shape or self.ids.ndim != 1:
            raise ValueError(f"ids {self.ids.shape} and loss_mask {self.loss_mask.shape} must be "
                             f"1-D of equal length")
        if self.task not in tasks.TASKS:
            raise ValueError(f"task {self.task!r} not in {tuple(tasks.TASKS)}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# ---- text formats --------------------------------------------------------------------------------


def format_prompt(instruction: str, input: str | None = None, response: str | None = None) -> str:
    """A Dolly prompt. With a response: the training text ending in `### End`; without: the
    generation prompt ending right after `### Response:\\n`. An empty input means no input."""
    if response is None:
        if input:
            return PROMPT_FOR_GENERATION_FORMAT.format(instruction=instruction, input=input)
        return PROMPT_FOR_GENERATION_FORMAT_NOINPUT.format(instruction=instruction)
    if input:
        return PROMPT_WITH_INPUT_FORMAT.format(instruction=instruction, input=input,
                                               response=response)
    return PROMPT_NO_INPUT_FORMAT.format(instruction=instruction, response=response)


def pick_instruction(instructions: Sequence[str], phrasing: Phrasing) -> str:
    """`instructions[phrasing]` for an int, a uniform draw for a numpy Generator (the original's
    `random.choice`), the first one for None."""
    if phrasing is None:
        return instructions[0]
    if isinstance(phrasing, np.random.Generator):
        return instructions[int(phrasing.integers(len(instructions)))]
    index = int(phrasing)
    if not 0 <= index < len(instructions):
        raise ValueError(f"phrasing index {index} outside [0, {len(instructions)})")
    return instructions[index]


def _check_fields(**fields: str | None) -> None:
    """Reject empty fields and fields that contain a Dolly key or the image placeholder: either
    would corrupt the example's structure (a second `### Response:\\n`, a second image)."""
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise PromptError(f"{name} must be a string, got {type(value).__name__}")
        for key in (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL, IMAGE_PLACEHOLDER):
            if key in value:
                raise PromptError(f"{name} contains the reserved string {key!r}")


# ---- loss mask -----------------------------------------------------------------------------------


def response_loss_mask(vocab: Vocab, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """float32 weights: 0 through the first `### Response:\\n`, 1 after it through the first
    `### End` that follows, 0 after that. Raises PromptError if either key is missing."""
    arr = np.asarray(ids)
    responses = np.flatnonzero(arr == vocab.response_id)
    if responses.size == 0:
        raise PromptError(f"no {RESPONSE_KEY_NL!r} (id {vocab.response_id}) in the sequence")
    start = int(responses[0]) + 1
    ends = np.flatnonzero(arr[start:] == vocab.end_id)
    if ends.size == 0:
        raise PromptError(f"no {END_KEY!r} (id {vocab.end_id}) after the response key")
    stop = start + int(ends[0]) + 1
    mask = np.zeros(arr.shape, np.float32)
    mask[start:stop] = 1.0
    return mask


def _example(vocab: Vocab, ids: list[int], task: str) -> Example:
    arr = np.asarray(ids, np.int32)
    for key_id, key in ((vocab.response_id, RESPONSE_KEY_NL), (vocab.end_id, END_KEY)):
        count = int((arr == key_id).sum())
        if count != 1:
            raise PromptError(f"expected one {key!r} in a {task} example, found {count}")
    return Example(ids=arr, loss_mask=response_loss_mask(vocab, arr), task=task)


# ---- training examples ---------------------------------------------------------------------------


def report_to_image_example(vocab: Vocab, report: str, codes: Any, phrasing: Phrasing = None,
                            n_codes: int | None = None) -> Example:
    """Report as input, the image's ids as the response."""
    _check_fields(report=report)
    instruction = pick_instruction(REPORT_TO_IMAGE_INSTRUCTIONS, phrasing)
    text = format_prompt(instruction, input=report, response=IMAGE_PLACEHOLDER)
    return _example(vocab, vocab.ids_with_image(text, codes, expected=n_codes), "report2image")


def image_to_report_example(vocab: Vocab, codes: Any, report: str, phrasing: Phrasing = None,
                            n_codes: int | None = None) -> Example:
    """Image ids as input, the report as the response."""
    _check_fields(report=report)
    instruction = pick_instruction(IMAGE_TO_REPORT_INSTRUCTIONS, phrasing)
    text = format_prompt(instruction, input=IMAGE_PLACEHOLDER, response=report)
    return _example(vocab, vocab.ids_with_image(text, codes, expected=n_codes), "image2report")


def vqa_example(vocab: Vocab, codes: Any, question: str, answer: str,
                n_codes: int | None = None) -> Example:
    """The question as the instruction, the image as input, the answer as the response."""
    _check_fields(question=question, answer=answer)
    text = format_prompt(question, input=IMAGE_PLACEHOLDER, response=answer)
    return _example(vocab, vocab.ids_with_image(text, codes, expected=n_codes), "vqa")


def instruction_example(vocab: Vocab, instruction: str, context: str | None,
                        response: str) -> Example:
    """A plain-text Dolly record (with an input section only when `context` is non-empty)."""
    _check_fields(instruction=instruction, context=context, response=response)
    if not instruction or not response:
        raise PromptError("an instruction record needs a non-empty instruction and response")
    text = format_prompt(instruction, input=context or None, response=response)
    return _example(vocab, vocab.encode(text), "instruct")


def build_example(vocab: Vocab, task: str, record: Mapping[str, Any], phrasing: Phrasing = None,
                  n_codes: int | None = None) -> Example:
    """`task`'s training example from a record's fields (`TASK_PROMPTS`): `report`/`codes` for
    the two directions, `question`/`answer`/`codes` for vqa, `instruction`/`context`/`response`
    for instruct."""
    entry = _task_prompts(task)
    try:
        return entry.example(vocab, record, phrasing, n_codes)
    except KeyError as e:
        raise PromptError(f"a {task} record needs the field {e.args[0]!r}") from e


# ---- inference prompts (end right after `### Response:\n`) ---------------------------------------


def report_to_image_prompt_ids(vocab: Vocab, report: str, phrasing: Phrasing = None) -> list[int]:
    _check_fields(report=report)
    instruction = pick_instruction(REPORT_TO_IMAGE_INSTRUCTIONS, phrasing)
    return vocab.encode(format_prompt(instruction, input=report))


def image_to_report_prompt_ids(vocab: Vocab, codes: Any, phrasing: Phrasing = None,
                               n_codes: int | None = None) -> list[int]:
    instruction = pick_instruction(IMAGE_TO_REPORT_INSTRUCTIONS, phrasing)
    return vocab.ids_with_image(format_prompt(instruction, input=IMAGE_PLACEHOLDER), codes,
                                expected=n_codes)


def vqa_prompt_ids(vocab: Vocab, codes: Any, question: str, n_codes: int | None = None) -> list[int]:
    _check_fields(question=question)
    return vocab.ids_with_image(format_prompt(question, input=IMAGE_PLACEHOLDER), codes,
                                expected=n_codes)


def instruction_prompt_ids(vocab: Vocab, instruction: str, context: str | None = None) -> list[int]:
    _check_fields(instruction=instruction, context=context)
    return vocab.encode(format_prompt(instruction, input=context or None))


def prompt_ids(vocab: Vocab, instruction: str, input: str | None = None,
               codes: Any = None) -> list[int]:
    """A generation prompt for any instruction; with `codes`, `input` must hold the placeholder
    (default: the input is just the image)."""
    if codes is None:
        return vocab.encode(format_prompt(instruction, input=input))
    return vocab.ids_with_image(format_prompt(instruction, input=input or IMAGE_PLACEHOLDER), codes)


# ---- the tasks' prompts -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskPrompts:
    """How one task (`llmcxr_jax.tasks`) becomes Dolly records.

    `example(vocab, record, phrasing, n_codes)`: its training example from a data record.
    `prompt(vocab, inputs, phrasing, codes, n_codes)`: its generation prompt from a generation
    item's inputs (`Task.inputs` fields; `codes`: the input image's) as (text with `<image>` for
    the image, token ids). `instructions`: its fixed phrasings (empty: the record gives them)."""

    example: Callable[[Vocab, Mapping[str, Any], Phrasing, int | None], Example]
    prompt: Callable[[Vocab, Mapping[str, Any], Phrasing, Any, int | None], tuple[str, list[int]]]
    instructions: tuple[str, ...] = ()


TASK_PROMPTS: dict[str, TaskPrompts] = {
    tasks.REPORT2IMAGE.name: TaskPrompts(
        example=lambda vocab, r, phrasing, n_codes: report_to_image_example(
            vocab, r["report"], r["codes"], phrasing, n_codes),
        prompt=lambda vocab, i, phrasing, codes, n_codes: (
            format_prompt(pick_instruction(REPORT_TO_IMAGE_INSTRUCTIONS, phrasing), i["report"]),
            report_to_image_prompt_ids(vocab, i["report"], phrasing)),
        instructions=REPORT_TO_IMAGE_INSTRUCTIONS),
    tasks.IMAGE2REPORT.name: TaskPrompts(
        example=lambda vocab, r, phrasing, n_codes: image_to_report_example(
            vocab, r["codes"], r["report"], phrasing, n_codes),
        prompt=lambda vocab, i, phrasing, codes, n_codes: (
            format_prompt(pick_instruction(IMAGE_TO_REPORT_INSTRUCTIONS, phrasing),
                          IMAGE_PLACEHOLDER),
            image_to_report_prompt_ids(vocab, codes, phrasing, n_codes)),
        instructions=IMAGE_TO_REPORT_INSTRUCTIONS),
    tasks.INSTRUCT.name: TaskPrompts(
        example=lambda vocab, r, phrasing, n_codes: instruction_example(
            vocab, r["instruction"], r.get("context"), r["response"]),
        prompt=lambda vocab, i, phrasing, codes, n_codes: (
            format_prompt(i["instruction"], i.get("context")),
            instruction_prompt_ids(vocab, i["instruction"], i.get("context")))),
    tasks.VQA.name: TaskPrompts(
        example=lambda vocab, r, phrasing, n_codes: vqa_example(
            vocab, r["codes"], r["question"], r["answer"], n_codes),
        prompt=lambda vocab, i, phrasing, codes, n_codes: (
            format_prompt(i["question"], IMAGE_PLACEHOLDER),
            vqa_prompt_ids(vocab, codes, i["question"], n_codes))),
}
if set(TASK_PROMPTS) != set(tasks.NAMES):
    raise ImportError(f"text.prompts.TASK_PROMPTS covers {sorted(TASK_PROMPTS)}, the tasks are "
                      f"{sorted(tasks.NAMES)}: give every task its prompts")


def _task_prompts(task: str) -> TaskPrompts:
    if task not in TASK_PROMPTS:
        raise ValueError(f"unknown task {task!r}; known: {tuple(TASK_PROMPTS)}")
    return TASK_PROMPTS[task]


def generation_prompt(vocab: Vocab, task: str, inputs: Mapping[str, Any], phrasing: Phrasing,
                      codes: Any = None, n_codes: int | None = None) -> tuple[str, list[int]]:
    """`task`'s generation prompt (`TaskPrompts.prompt`): (text with `<image>` for the input
    image, token ids), ending right after `### Response:\\n`."""
    return _task_prompts(task).prompt(vocab, inputs, phrasing, codes, n_codes)


def instructions_of(task: str) -> tuple[str, ...]:
    """`task`'s fixed instruction phrasings (empty where its records give the instruction)."""
    return _task_prompts(task).instructions


# ---- direction and length ------------------------------------------------------------------------


def direction_for_pair(index: int, mode: str = "alternate") -> tuple[str, ...]:
    """The task(s) an (image, report) pair contributes.

    `alternate` is LLM-CXR's rule: the i-th pair (sorted by dicom_id, before the stage-2 filter)
    is image -> report when i is even and report -> image when i is odd. `both` gives both.
    """
    if mode == "alternate":
        return (tasks.IMAGE2REPORT.name,) if index % 2 == 0 else (tasks.REPORT2IMAGE.name,)
    if mode == "both":
        return tasks.PAIRED
    raise ValueError(f"direction mode {mode!r} not in {DIRECTION_MODES}")


def fits(example: Example, max_len: int) -> bool:
    """Whether the whole example fits in `max_len` tokens (examples are never truncated)."""
    return len(example) <= max_len


def keep_if_fits(example: Example, max_len: int) -> Example | None:
    """The example, or None when it is longer than `max_len` (the caller counts the drop)."""
    return example if fits(example, max_len) else None
