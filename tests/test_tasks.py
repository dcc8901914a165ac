"""The task registry (`llmcxr_jax.tasks`): every task's behaviour is found through it.

A task added in one place (its `Task` and its `prompts.TASK_PROMPTS` entry) is read from flags and
JSONL, prompted and turned into training examples by the same code as the four real ones; a branch
on a task's name anywhere in that code would leave the new task out.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmcxr_jax import tasks
from llmcxr_jax.data import pipeline
from llmcxr_jax.llm import generate_job
from llmcxr_jax.text import prompts
from llmcxr_jax.text import vocab as V

SUMMARY = tasks.Task("summarise", inputs=("report",), title="report -> summary")
INSTRUCTION = "Summarise the report in one line."


def _summary_example(vocab, record, phrasing, n_codes):
    text = prompts.format_prompt(INSTRUCTION, input=record["report"], response=record["summary"])
    ids = np.asarray(vocab.encode(text), np.int32)
    return prompts.Example(ids, prompts.response_loss_mask(vocab, ids), SUMMARY.name)


def _summary_prompt(vocab, inputs, phrasing, codes, n_codes):
    text = prompts.format_prompt(INSTRUCTION, input=inputs["report"])
    return text, vocab.encode(text)


@pytest.fixture
def summary_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, SUMMARY.name, SUMMARY)
    monkeypatch.setitem(prompts.TASK_PROMPTS, SUMMARY.name,
                        prompts.TaskPrompts(example=_summary_example, prompt=_summary_prompt))
    return SUMMARY.name


@pytest.fixture(scope="module")
def vocab(neox_tokenizer_dir):
    return V.load_vocab(neox_tokenizer_dir)


def test_each_task_has_its_prompts_and_source():
    assert set(prompts.TASK_PROMPTS) == set(tasks.NAMES)
    assert set(pipeline.SOURCES) | set(tasks.PAIRED) == set(tasks.NAMES)
    assert tasks.PAIRED == ("report2image", "image2report")
    assert tasks.mix(instruct=1.0) == tuple(float(n == "instruct") for n in tasks.NAMES)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.mix(caption=1.0)


def test_a_task_added_in_one_place_is_read_prompted_and_trained(summary_task, vocab, tmp_path):
    items = generate_job.read_items(summary_task, reports=["Mild cardiomegaly.", "Clear."])
    assert [(i.id, i.source, i.report) for i in items] == [
        ("00000", "--report #1", "Mild cardiomegaly."), ("00001", "--report #2", "Clear.")]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"report": "Small effusion.", "id": "s1"}) + "\n")
    [item] = generate_job.read_items(summary_task, input_path=str(path))
    assert (item.id, item.source, item.report) == ("s1", f"{path}:1", "Small effusion.")
    with pytest.raises(generate_job.InputError, match=f"--task {summary_task} does not take "
                                                      "--image"):
        generate_job.read_items(summary_task, images=["a.png"])

    job = generate_job.JobConfig(summary_task)
    assert generate_job.phrasing_for(job, seed=0) is None  # no fixed phrasings
    text, ids = generate_job.prompt_for(summary_task, vocab, item, None, None, None)
    assert text == prompts.format_prompt(INSTRUCTION, input="Small effusion.")
    assert ids == vocab.encode(text) and ids[-1] == vocab.response_id

    ex = prompts.build_example(vocab, summary_task, {"report": "Clear.", "summary": "Normal."})
    assert ex.task == summary_task and vocab.decode(ex.ids[ex.loss_mask > 0]).strip() == (
        "Normal.\n\n### End")
    with pytest.raises(prompts.PromptError, match="'summary'"):
        prompts.build_example(vocab, summary_task, {"report": "Clear."})


def test_items_follow_each_tasks_inputs(tmp_path):
    """The four tasks' items from flags and JSONL, as `launch/generate.py` documents them."""
    [i2r] = generate_job.read_items("image2report", images=["scans/p10.png"])
    assert (i2r.id, i2r.source, i2r.image) == ("p10", "--image #1", "scans/p10.png")
    vqa = generate_job.read_items("vqa", images=["a.png", "b.png"], questions=["q1", "q2"])
    assert [(i.image, i.question, i.source) for i in vqa] == [
        ("a.png", "q1", "--question #1"), ("b.png", "q2", "--question #2")]
    with pytest.raises(generate_job.InputError, match="needs --image and --question"):
        generate_job.read_items("vqa", questions=["q1"])
    ins = generate_job.read_items("instruct", instructions=["a", "b"], contexts=["", "ctx"])
    assert [(i.instruction, i.context) for i in ins] == [("a", None), ("b", "ctx")]
    with pytest.raises(generate_job.InputError, match="1 --context for 2 --instruction"):
        generate_job.read_items("instruct", instructions=["a", "b"], contexts=["c"])

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "img/x.png", "question": "Effusion?"}) + "\n"
                    + json.dumps({"image": "/abs/y.npy", "question": "Edema?", "id": "y"}) + "\n")
    q = generate_job.read_items("vqa", input_path=str(path))
    assert [(i.id, i.image, i.question) for i in q] == [
        ("00000", str(tmp_path / "img" / "x.png"), "Effusion?"), ("y", "/abs/y.npy", "Edema?")]
    path.write_text(json.dumps({"image": "img/x.png"}) + "\n")
    [r] = generate_job.read_items("image2report", input_path=str(path))
    assert (r.id, r.image) == ("x", str(tmp_path / "img" / "x.png"))
    with pytest.raises(generate_job.InputError, match="is a folder; --task vqa reads a JSONL"):
        generate_job.read_items("vqa", input_path=str(tmp_path))
