"""Write the phantom CXR world in MIMIC-CXR-JPG's own layout.

    DIR/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    DIR/reports/files/pXX/pSUBJECT/sSTUDY.txt
    DIR/mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz
    DIR/phantom_labels.jsonl   (ground truth: labels + finding spec per study)
    DIR/vqa.jsonl  DIR/instructions.jsonl

The whole tree is written into a sibling temporary folder and renamed into place at the end, so
an interrupted run leaves nothing half-written. Outputs are byte-identical for the same arguments.
`stop` ends the drawing early, e.g. on SIGTERM: it is asked before each study. A signal to the
whole process group kills the render processes too, which breaks their pool (`concurrent.futures`
notices a dead worker, where `multiprocessing.Pool` waited forever for the studies it held); a
killed parent takes them with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import datetime
import gzip
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from llmcxr_jax.data import phantom_vqa, procedural_instructions
from llmcxr_jax.data.findings import CHEXPERT_LABELS, StudyFindings, labels_to_row
from llmcxr_jax.data.phantom_reports import examination, write_report
from llmcxr_jax.data.phantoms import FRONTAL_VIEWS, Anatomy, render, sample_findings

SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
CHEXPERT_COLUMNS = ("subject_id", "study_id") + CHEXPERT_LABELS
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                "LL": "left lateral"}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What to generate. `n_studies` studies over about n_studies / 2 subjects."""

    n_studies: int = 1000
    size: int = 256
    seed: int = 0
    n_instructions: int = 3000
    lateral_rate: float = 0.3  # studies with a lateral image beside the frontal one
    ap_rate: float = 0.35  # frontal images taken AP (portable) rather than PA
    mean_studies_per_subject: float = 2.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validate / test
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.n_studies < 1:
            raise ValueError(f"n_studies must be >= 1, got {self.n_studies}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions {self.split_fractions} must be >= 0 and sum to 1")


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    dicom_id: str
    view: str
    time: float  # HHMMSS.fff


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    index: int
    subject_index: int
    subject_id: int
    study_id: int
    split: str
    date: int  # YYYYMMDD
    images: tuple[ImagePlan, ...]

    @property
    def relative_dir(self) -> str:
        s = str(self.subject_id)
        return f"files/p{s[:2]}/p{s}/s{self.study_id}"


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2 ** 32, size=5, dtype=np.uint64))


def plan_world(cfg: WorldConfig) -> list[StudyPlan]:
    """Subjects, studies, images, ids, dates and splits; cheap and deterministic."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    counts: list[int] = []
    while sum(counts) < cfg.n_studies:
        counts.append(int(rng.geometric(1.0 / cfg.mean_studies_per_subject)))
    counts[-1] -= sum(counts) - cfg.n_studies
    n_subjects = len(counts)
    subject_ids = rng.choice(np.arange(10_000_000, 20_000_000), n_subjects, replace=False)
    study_ids = rng.choice(np.arange(50_000_000, 60_000_000), cfg.n_studies, replace=False)
    # Split by subject: a subject's studies all land in one split.
    order = rng.permutation(n_subjects)
    n_train = int(round(cfg.split_fractions[0] * n_subjects))
    n_val = int(round(cfg.split_fractions[1] * n_subjects))
    split_of = np.empty(n_subjects, dtype=object)
    split_of[order[:n_train]] = "train"
    split_of[order[n_train:n_train + n_val]] = "validate"
    split_of[order[n_train + n_val:]] = "test"
    plans: list[StudyPlan] = []
    base = datetime.date(2110, 1, 1)
    used_dicoms: set[str] = set()
    for subject_index, count in enumerate(counts):
        day = int(rng.integers(0, 365 * 20))
        for _ in range(count):
            day += int(rng.integers(1, 400))
            date = base + datetime.timedelta(days=day)
            t = float(rng.integers(0, 24)) * 10_000 + float(rng.integers(0, 60)) * 100 + round(
                float(rng.uniform(0, 59.999)), 3)
            frontal = "AP" if rng.random() < cfg.ap_rate else "PA"
            views = [frontal] + (["LATERAL" if rng.random() < 0.8 else "LL"]
                                 if rng.random() < cfg.lateral_rate else [])
            images = []
            for v in views:
                dicom = _dicom_id(rng)
                while dicom in used_dicoms:
                    dicom = _dicom_id(rng)
                used_dicoms.add(dicom)
                images.append(ImagePlan(dicom, v, round(t, 3)))
            if len(images) > 1 and rng.random() < 0.5:  # lateral listed first now and then
                images = images[::-1]
            k = len(plans)
            plans.append(StudyPlan(k, subject_index, int(subject_ids[subject_index]),
                                   int(study_ids[k]), str(split_of[subject_index]),
                                   int(date.strftime("%Y%m%d")), tuple(images)))
    return plans


def study_findings(cfg: WorldConfig, plan: StudyPlan) -> StudyFindings:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2, plan.index]))
    frontal = next(im.view for im in plan.images if im.view in FRONTAL_VIEWS)
    return sample_findings(rng, frontal)


def subject_anatomy(cfg: WorldConfig, subject_index: int) -> Anatomy:
    return Anatomy.sample(np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, subject_index])))


def study_report(cfg: WorldConfig, plan: StudyPlan, sf: StudyFindings) -> str:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3, plan.index]))
    return write_report(sf, [im.view for im in plan.images], rng)


def render_study(cfg: WorldConfig, plan: StudyPlan) -> list[bytes]:
    """JPEG bytes of every image of a study."""
    sf = study_findings(cfg, plan)
    anatomy = subject_anatomy(cfg, plan.subject_index)
    out = []
    for j, im in enumerate(plan.images):
        pixels = render(sf, anatomy, im.view, cfg.size,
                        np.random.SeedSequence([cfg.seed, 4, plan.index, j]))
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=cfg.jpeg_quality)
        out.append(buf.getvalue())
    return out


def _render_process_init(parent: int) -> None:
    """A render process's initializer: Ctrl-C is the parent's to act on (no traceback from each
    process), and the process ends with its parent even when that is killed outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _rendered(cfg: WorldConfig, plans: Sequence[StudyPlan],
              pool: concurrent.futures.Executor | None, stop: Callable[[], bool]
              ) -> Iterator[list[bytes]]:
    """Each study's JPEGs in order, rendered by `pool` (None: here), until `stop()` is true."""
    if pool is None:
        for plan in plans:
            if stop():
                return
            yield render_study(cfg, plan)
        return
    pending = collections.deque(pool.submit(render_study, cfg, plan) for plan in plans)
    while pending:
        if stop():
            return
        try:
            jpegs = pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool:
            if stop():  # the same signal killed the render processes
                return
            raise
        yield jpegs


def _write_csv_gz(path: pathlib.Path, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.getvalue().encode())


def _write_jsonl(path: pathlib.Path, records: Iterator[dict] | list[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
            n += 1
    return n


def write_world(out: str | os.PathLike, cfg: WorldConfig, workers: Optional[int] = None,
                overwrite: bool = False, progress: bool = True,
                stop: Callable[[], bool] | None = None) -> dict | None:
    """Generate the world into `out` atomically; returns a summary dict, or None when `stop()`
    said to stop before the last study: then nothing is written and `out` is as it was."""
    stop = stop or (lambda: False)
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        plans = plan_world(cfg)
        workers = workers or min(os.cpu_count() or 1, 16)
        n_images = sum(len(p.images) for p in plans)
        bar = tqdm(total=n_images, unit="img", disable=not progress, desc="phantoms")
        split_rows, meta_rows, chexpert_rows, label_records, vqa_records = [], [], [], [], []
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_render_process_init, initargs=(os.getpid(),)) if workers > 1 else None
        drawn = 0
        try:
            render_start = time.perf_counter()
            for plan, jpegs in zip(plans, _rendered(cfg, plans, pool, stop)):
                sf = study_findings(cfg, plan)
                study_dir = tmp / plan.relative_dir
                study_dir.mkdir(parents=True, exist_ok=True)
                for im, data in zip(plan.images, jpegs):
                    (study_dir / f"{im.dicom_id}.jpg").write_bytes(data)
                    split_rows.append((im.dicom_id, plan.study_id, plan.subject_id, plan.split))
                    exam = examination([i.view for i in plan.images])
                    meta_rows.append((
                        im.dicom_id, plan.subject_id, plan.study_id, exam, im.view, cfg.size,
                        cfg.size, plan.date, f"{im.time:.3f}", exam, VIEW_MEANING[im.view],
                        "Recumbent" if im.view == "AP" else "Erect"))
                report_path = tmp / "reports" / (plan.relative_dir + ".txt")
                report_path.parent.mkdir(parents=True, exist_ok=True)
                report_path.write_text(study_report(cfg, plan, sf))
                labels = sf.labels()
                chexpert_rows.append([plan.subject_id, plan.study_id] + labels_to_row(labels))
                frontal = next(im for im in plan.images if im.view in FRONTAL_VIEWS)
                label_records.append({
                    "subject_id": plan.subject_id, "study_id": plan.study_id,
                    "split": plan.split, "dicom_ids": [im.dicom_id for im in plan.images],
                    "views": [im.view for im in plan.images], "labels": labels,
                    "findings": [dataclasses.asdict(f) for f in sf.findings],
                    "negated": list(sf.negated)})
                vqa_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 5, plan.index]))
                vqa_records.extend(phantom_vqa.study_questions(
                    sf, plan.subject_id, plan.study_id, frontal.dicom_id, plan.split, vqa_rng))
                bar.update(len(plan.images))
                drawn += 1
            render_seconds = time.perf_counter() - render_start
        finally:
            bar.close()
            if pool:  # all studies are in, or an error or a stop drops the rest
                pool.shutdown(wait=True, cancel_futures=True)
        if drawn < len(plans):  # stopped
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        _write_csv_gz(tmp / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows)
        _write_csv_gz(tmp / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows)
        _write_csv_gz(tmp / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_COLUMNS, chexpert_rows)
        _write_jsonl(tmp / "phantom_labels.jsonl", label_records)
        _write_jsonl(tmp / "vqa.jsonl", vqa_records)
        _write_jsonl(tmp / "instructions.jsonl",
                     procedural_instructions.generate(cfg.n_instructions, cfg.seed))
        (tmp / "phantom_world.json").write_text(json.dumps(
            {"config": dataclasses.asdict(cfg), "format": "mimic-cxr-jpg-2.0.0-layout"}, indent=1))
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    return {"out": str(out), "studies": len(plans),
            "subjects": len({p.subject_id for p in plans}), "images": n_images,
            "size": cfg.size, "workers": workers, "vqa": len(vqa_records),
            "instructions": cfg.n_instructions, "seconds": round(seconds, 2),
            "images_per_s": round(n_images / max(render_seconds, 1e-9), 1),
            "splits": {s: sum(p.split == s for p in plans) for s in ("train", "validate", "test")}}
