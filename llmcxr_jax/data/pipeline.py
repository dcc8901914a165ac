"""The grain pipeline: task sources -> mix -> tokenise -> pack -> batch -> global jax.Arrays.

    per task (report2image, image2report, instruct, vqa):
        EpochShuffled(records[host shard])     seeded permutation per epoch, repeated forever
        .random_map(tokenise: prompts.build_example, phrasing drawn per element; too long, or
                    more loss tokens than loss_positions -> None; report2image:
                    prompts.NULL_REPORT for the report at null_report_rate)
        .to_iter_dataset(ReadOptions)          (None = dropped and counted)
    IterDataset.mix(sources, weights)          stratified: exact proportions, deterministic
    FirstFitPackIterDataset                    several examples per row (or one per row), at
                                               most loss_positions loss tokens in a row
    .batch(per-host batch) .map(to_training_batch)
    GlobalBatchIterator                        jax.make_array_from_process_local_data

Batch convention (numpy per host, then global `jax.Array`s of shape [global_batch, seq_len]):

    inputs       int32    the packed token ids; `pad_id` on padding
    targets      int32    targets[b, t] = inputs[b, t + 1] when t + 1 is in the same segment;
                          `pad_id` at the last token of each segment and on padding
    loss_mask    float32  the loss weight of targets[b, t]: 1 where it is a response token of the
                          same example (`image_loss_weight` for an image code), else 0; 0 on
                          padding (the prompt's loss weight of token t + 1)
    segment_ids  int32    1..n for the n examples of a row, 0 on padding; attention must only
                          connect equal non-zero ids (and be causal)
    positions    int32    0, 1, ... restarting at each segment; 0 on padding
    task_ids     int32    index in `TASKS` of the segment's task, -1 on padding

So the loss of a step is sum(loss_mask * CE(logits(inputs)[b, t], targets[b, t])) / sum(loss_mask),
and per-task losses select with `task_ids == k`. With `loss_positions` k > 0
(`TrainConfig.loss_positions`), no row holds more than k non-zero loss weights, so the train step
needs logits at k slots per row only (`train.loss.loss_slots`).

Mixing is stratified: grain's `mix` interleaves the sources in exact proportion to the weights
(each source is shuffled on its own), so every stretch of the stream holds the tasks in the weights'
ratio; dropped (too long) examples do not shift the mix, because they are dropped inside their own
source before mixing. The original mixes at random (datasets.interleave_datasets with
probabilities); stratification only removes the sampling noise.

Each host reads its own shard of every source (`grain.sharding.ShardByJaxProcess`), builds
`global_batch / process_count` rows per step, and the rows are assembled into global arrays
sharded over the mesh's batch axes (the `batch` rule of `parallel/rules.py`). The iterator's
`get_state()` / `set_state()` (JSON; saved by orbax with `grain.checkpoint.CheckpointSave`) resume
on exactly the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llmcxr_jax import tasks as tasks_lib
from llmcxr_jax.configs import DATA_TASKS, DataConfig
from llmcxr_jax.data import dolly, mimic, vqa
from llmcxr_jax.data.skips import SkipCounter
from llmcxr_jax.parallel.shardings import batch_sharding, batch_ways
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import Vocab

TASKS: tuple[str, ...] = DATA_TASKS
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")


# --------------------------------------------------------------------------------------------------
# Sources: records per task
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sources:
    """The records of each task (plain dicts with the fields `prompts.build_example` reads)."""

    records: dict[str, list[dict[str, Any]]]
    skips: SkipCounter

    def sizes(self) -> dict[str, int]:
        return {t: len(r) for t, r in self.records.items()}


def pair_records(pairs: Sequence[mimic.MimicRecord], direction: str) -> dict[str, list[dict]]:
    """report2image / image2report records from image-report pairs, one direction per pair
    (`alternate`, by the original's parity index) or both."""
    out: dict[str, list[dict]] = {task: [] for task in tasks_lib.PAIRED}
    for p in pairs:
        for task in prompts.direction_for_pair(p.pair_index, direction):
            out[task].append({"report": p.report, "codes": p.codes, "id": p.dicom_id,
                              "study": f"{p.subject_id}/{p.study_id}"})
    return out


def instruction_records(records: Sequence[dolly.DollyRecord]) -> list[dict]:
    return [{"instruction": r.instruction, "context": r.context, "response": r.response}
            for r in records]


def vqa_records(examples: Sequence[vqa.VQAExample]) -> list[dict]:
    return [{"question": e.question, "answer": e.answer, "codes": e.codes, "id": e.dicom_id}
            for e in examples]


def flat_codes(codes_dir: str) -> dict[str, np.ndarray]:
    """The encode step's codes ([h, w] per image) flattened row-major to the token order
    [h * w], as the original flattens taming's index map."""
    from llmcxr_jax.vqgan.encode import load_codes  # the encode step's reader

    return {k: np.asarray(v).reshape(-1) for k, v in load_codes(codes_dir).items()}


def _read_file(cfg: DataConfig, field: str, task: str, reader: Callable[[str], Any],
               skips: SkipCounter) -> Any:
    """`reader`'s records of the file `cfg.<field>` names (its skips counted)."""
    path = getattr(cfg, field)
    if not path:
        raise ValueError(f"DataConfig.{field} is empty but {task!r} has a positive weight")
    recs, s = reader(path)
    skips.update(s)
    return recs


def _read_instructions(cfg: DataConfig, codes: Mapping[str, np.ndarray] | None,
                       skips: SkipCounter) -> list[dict]:
    return instruction_records(_read_file(cfg, "instructions", "instruct", dolly.read_dolly,
                                          skips))


def _read_vqa(cfg: DataConfig, codes: Mapping[str, np.ndarray] | None,
              skips: SkipCounter) -> list[dict]:
    recs = _read_file(cfg, "vqa", "vqa", vqa.read_vqa, skips)
    # As the original: questions join the stage-2 images (frontal, earliest study), any stage.
    images = mimic.load_images(cfg.world, codes, splits=cfg.splits, stage2_only=True,
                               tokens_per_image=cfg.tokens_per_image,
                               codebook_size=cfg.codebook_size)
    skips.update(images.skips)
    joined, s = vqa.join_vqa(recs, images.by_study())
    skips.update(s)
    return vqa_records(joined)


# Where each task's training records come from, but for the paired tasks (both read the world's
# image-report pairs, `pair_records`): (cfg, codes, skips) -> records.
SOURCES: dict[str, Callable[[DataConfig, Mapping[str, np.ndarray] | None, SkipCounter],
                            list[dict]]] = {
    tasks_lib.INSTRUCT.name: _read_instructions,
    tasks_lib.VQA.name: _read_vqa,
}
if set(SOURCES) != {t.name for t in tasks_lib.TASKS.values() if not t.paired}:
    raise ImportError(f"data.pipeline.SOURCES covers {sorted(SOURCES)}: give every task that is "
                      f"not a direction of the image-report pairs its source")


def load_sources(cfg: DataConfig, codes: Mapping[str, np.ndarray] | None = None) -> Sources:
    """Reads the files `cfg` names for the tasks with a positive weight.

    `codes` (dicom_id -> codes) defaults to `vqgan.encode.load_codes(cfg.codes)`. A source with
    more than `cfg.max_skip_fraction` bad records raises `skips.TooManySkipped` naming it.
    """
    weights = cfg.task_weights()
    skips = SkipCounter(f"data sources (stage {cfg.stage})")
    records: dict[str, list[dict]] = {}
    if any(tasks_lib.get(t).uses_vqgan for t in weights):
        if not cfg.world:
            raise ValueError("DataConfig.world is empty but an image task has a positive weight")
        if codes is None:
            if not cfg.codes:
                raise ValueError("DataConfig.codes is empty but an image task has a positive weight")
            codes = flat_codes(cfg.codes)
    if any(tasks_lib.get(t).paired for t in weights):
        data = mimic.load_mimic(cfg.world, codes, stage=cfg.stage, splits=cfg.splits,
                                tokens_per_image=cfg.tokens_per_image,
                                codebook_size=cfg.codebook_size)
        skips.update(data.skips)
        pairs = pair_records(data.records, cfg.direction)
        for task in weights:
            if tasks_lib.get(task).paired:
                records[task] = pairs[task]
    for task in weights:
        if not tasks_lib.get(task).paired:
            records[task] = SOURCES[task](cfg, codes, skips)
    skips.check_fraction(cfg.max_skip_fraction)  # before "no usable records": it says why
    empty = [t for t in weights if not records.get(t)]
    if empty:
        raise ValueError(f"no usable records for task(s) {empty} (weights {cfg.weights}); "
                         f"{skips.summary()}")
    return Sources(records, skips)


# --------------------------------------------------------------------------------------------------
# Tokenisation with drop counting
# --------------------------------------------------------------------------------------------------


class DropCounter:
    """Examples dropped inside the pipeline (too long, or not a well-formed prompt), per task.

    Counted by this process as the pipeline meets them (an example dropped in every epoch counts
    every time; prefetching threads count ahead of consumption); not part of the iterator state.
    A task whose examples are all dropped stops the pipeline with an error instead of spinning.
    """

    def __init__(self, source_sizes: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.kept: collections.Counter[str] = collections.Counter()
        self._run: collections.Counter[str] = collections.Counter()
        self._limit = {t: 2 * n + 100 for t, n in source_sizes.items()}

    def keep(self, task: str) -> None:
        with self._lock:
            self.kept[task] += 1
            self._run[task] = 0

    def drop(self, task: str, reason: str, max_len: int) -> None:
        with self._lock:
            self.counts[f"{task}:{reason}"] += 1
            self._run[task] += 1
            run = self._run[task]
        if run > self._limit[task]:
            raise ValueError(f"the last {run} {task} examples were all dropped ({reason}); "
                             f"is seq_len={max_len} too short for them?")

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


def tokenise_fn(vocab: Vocab, task: str, max_len: int, n_codes: int, drops: DropCounter,
                image_loss_weight: float = 1.0, null_report_rate: float = 0.0,
                loss_positions: int = 0) -> Callable[[dict, np.random.Generator], dict | None]:
    """record, rng -> {tokens, loss_mask, task} (numpy, one example), or None if dropped.
    Image-code tokens weigh `image_loss_weight` in the loss mask, text tokens 1. A report2image
    record's report becomes `prompts.NULL_REPORT` with probability `null_report_rate` (drawn
    from the element's rng, which is not touched at rate 0). With `loss_positions` k > 0 the
    example also carries `loss_count`, one entry per token with loss (what the packer counts
    against k), and one with more than k is dropped."""
    task_id = TASK_INDEX[task]
    null_rate = null_report_rate if tasks_lib.get(task).draws_image else 0.0

    def tokenise(record: dict, rng: np.random.Generator) -> dict | None:
        if null_rate > 0.0 and rng.random() < null_rate:
            record = {**record, "report": prompts.NULL_REPORT}
        try:
            ex = prompts.build_example(vocab, task, record, phrasing=rng, n_codes=n_codes)
        except (prompts.PromptError, ValueError):
            drops.drop(task, "bad_prompt", max_len)
            return None
        if not prompts.fits(ex, max_len):
            drops.drop(task, "too_long", max_len)
            return None
        loss_mask = ex.loss_mask.astype(np.float32)
        if image_loss_weight != 1.0:
            loss_mask = np.where(vocab.is_image_id(ex.ids), loss_mask * image_loss_weight,
                                 loss_mask).astype(np.float32)
        example = {"tokens": ex.ids.astype(np.int32), "loss_mask": loss_mask,
                   "task": np.full(len(ex), task_id, np.int32)}
        if loss_positions:
            n_loss = int(np.count_nonzero(loss_mask))
            if n_loss > loss_positions:
                drops.drop(task, "more_loss_tokens_than_loss_positions", max_len)
                return None
            example["loss_count"] = np.zeros(n_loss, np.int8)
        drops.keep(task)
        return example

    return tokenise


# --------------------------------------------------------------------------------------------------
# Packing and the training batch
# --------------------------------------------------------------------------------------------------


def pad_to_row(example: dict, seq_len: int, pad_id: int) -> dict:
    """One example per row (no packing), in the packer's output format."""
    n = example["tokens"].shape[0]
    pad = seq_len - n

    def padded(x, value):
        return np.concatenate([x, np.full(pad, value, x.dtype)])

    return {"tokens": padded(example["tokens"], pad_id),
            "tokens_segment_ids": padded(np.ones(n, np.int32), 0),
            "tokens_positions": padded(np.arange(n, dtype=np.int32), 0),
            "loss_mask": padded(example["loss_mask"], 0.0),
            "task": padded(example["task"], -1)}


def to_training_batch(packed: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Packed rows [B, T] -> the batch convention of the module docstring (next-token targets
    within each segment, loss weights aligned with the targets)."""
    tokens = np.asarray(packed["tokens"], np.int32)
    seg = np.asarray(packed["tokens_segment_ids"], np.int32)
    pos = np.asarray(packed["tokens_positions"], np.int32)
    prompt_mask = np.asarray(packed["loss_mask"], np.float32)
    task = np.asarray(packed["task"], np.int32)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = np.where(same, tokens[:, 1:], pad_id)
    loss_mask = np.zeros_like(prompt_mask)
    loss_mask[:, :-1] = np.where(same, prompt_mask[:, 1:], 0.0)
    padding = seg == 0
    return {
        "inputs": np.where(padding, pad_id, tokens).astype(np.int32),
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": seg,
        "positions": np.where(padding, 0, pos).astype(np.int32),
        "task_ids": np.where(padding, -1, task).astype(np.int32),
    }


def padding_fraction(batch: Mapping[str, Any]) -> float:
    """Share of the batch's token slots that hold no example."""
    seg = np.asarray(batch["segment_ids"])
    return float((seg == 0).mean())


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def shard_for_process() -> tuple[int, int]:
    """(shard index, shard count) of this JAX process (grain's ShardByJaxProcess)."""
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return opts.shard_index, opts.shard_count


def per_host_batch(global_batch: int, shard_count: int) -> int:
    if global_batch % shard_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the number of "
                         f"processes {shard_count}")
    return global_batch // shard_count


@dataclasses.dataclass
class Pipeline:
    """A built pipeline: the grain dataset of per-host numpy batches, and its drop counts."""

    dataset: grain.IterDataset
    drops: DropCounter
    config: DataConfig
    seq_len: int
    global_batch: int
    local_batch: int
    shard_index: int
    shard_count: int
    pad_id: int

    def __iter__(self) -> grain.DatasetIterator:
        """A fresh iterator of per-host numpy batches (with get_state / set_state)."""
        return iter(self.dataset)

    def global_iterator(self, mesh: Mesh) -> "GlobalBatchIterator":
        """A fresh iterator of global `jax.Array` batches sharded over `mesh`'s batch axes."""
        return GlobalBatchIterator(iter(self.dataset), batch_sharding(mesh), self.global_batch)


def build_pipeline(sources: Sources, vocab: Vocab, cfg: DataConfig, *, seq_len: int,
                   global_batch: int, loss_positions: int = 0, shard_index: int | None = None,
                   shard_count: int | None = None) -> Pipeline:
    """The full pipeline of `cfg` over `sources` (see the module docstring), in batches of
    `global_batch` rows of `seq_len` tokens with at most `loss_positions` loss tokens each (0: no
    limit): the step's shape, `TrainConfig` (its `logit_slots`).

    `shard_index` / `shard_count` default to this JAX process's (one shard per host).
    """
    if shard_index is None or shard_count is None:
        shard_index, shard_count = shard_for_process()
    local_batch = per_host_batch(global_batch, shard_count)
    weights = cfg.task_weights()
    missing = [t for t in weights if not sources.records.get(t)]
    if missing:
        raise ValueError(f"tasks {missing} have a positive weight but no records")
    pad_id = vocab.pad_id
    shards = {t: sources.records[t][shard_index::shard_count] for t in weights}
    empty = [t for t, r in shards.items() if not r]
    if empty:
        raise ValueError(f"host shard {shard_index}/{shard_count} holds no {empty} records")
    drops = DropCounter({t: len(r) for t, r in shards.items()})
    read = grain.ReadOptions(num_threads=cfg.read_threads,
                             prefetch_buffer_size=cfg.prefetch_buffer)

    streams = []
    for task, recs in shards.items():
        k = TASK_INDEX[task]
        ds = (EpochShuffled(recs, seed=_seed(cfg.seed, k, 0))
              .random_map(tokenise_fn(vocab, task, seq_len, cfg.tokens_per_image, drops,
                                      cfg.image_loss_weight, cfg.null_report_rate,
                                      loss_positions),
                          seed=_seed(cfg.seed, k, 1)))
        streams.append(ds.to_iter_dataset(read))  # Nones (dropped examples) are skipped here
    ds = grain.IterDataset.mix(streams, list(weights.values())) if len(streams) > 1 else streams[0]

    if cfg.packing:
        bins = cfg.packing_bins or 4 * local_batch
        lengths = {"tokens": seq_len, "loss_mask": seq_len, "task": seq_len}
        padding = {"tokens": pad_id, "loss_mask": 0.0, "task": -1}
        if loss_positions:  # a second capacity per row: its loss tokens (`loss_count`)
            lengths["loss_count"], padding["loss_count"] = loss_positions, 0
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=bins, seed=_seed(cfg.seed, 0, 2),
            shuffle_bins=True, meta_features=("loss_mask", "task"), padding_struct=padding)
    else:
        ds = ds.map(lambda ex: pad_to_row(ex, seq_len, pad_id))
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(lambda b: to_training_batch(b, pad_id))
    return Pipeline(ds, drops, cfg, seq_len, global_batch, local_batch, shard_index, shard_count,
                    pad_id)


class EpochShuffled(grain.MapDataset):
    """`records` repeated forever, each epoch in its own seeded permutation (random access).

    The same order as `MapDataset.source(records).shuffle(seed).repeat()` would give in spirit,
    at a fraction of the cost: grain's index_shuffle is slow per element on a CPU (README,
    Performance), a cached per-epoch `numpy` permutation is one array lookup.
    """

    def __init__(self, records: Sequence[Any], seed: int) -> None:
        super().__init__()
        if not records:
            raise ValueError("EpochShuffled needs at least one record")
        self._records = records
        self._seed = seed
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # prefetch threads (read_threads > 0) share the cache

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffled({len(self._records)} records, seed={self._seed})"

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._records))
                if len(self._perms) >= 2:  # the current and the next epoch are enough
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self._records))
        return self._records[int(self._perm(epoch)[i])]


def _seed(seed: int, task: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, task, purpose]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------
# Global arrays on the mesh
# --------------------------------------------------------------------------------------------------


class GlobalBatchIterator(grain.DatasetIterator):
    """Per-host numpy batches -> global `jax.Array`s (`make_array_from_process_local_data`).

    A grain `DatasetIterator`: its state is the per-host pipeline's, so orbax saves it with
    `grain.checkpoint.CheckpointSave(it)` and `CheckpointRestore(it)` resumes on the next batch.
    """

    def __init__(self, local: grain.DatasetIterator, sharding: NamedSharding,
                 global_batch: int) -> None:
        super().__init__(local)
        self._sharding = sharding
        self._global_batch = global_batch
        n = batch_ways(sharding.mesh)
        if global_batch % n:
            raise ValueError(f"global batch {global_batch} is not divisible by the {n} devices of "
                             f"the mesh's batch axes {batch_axes(sharding.mesh)}")

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._parent)
        return {k: jax.make_array_from_process_local_data(
                    self._sharding, v, (self._global_batch,) + v.shape[1:])
                for k, v in local.items()}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def describe(pipeline: Pipeline, sources: Sources) -> str:
    """A few lines on what the pipeline reads: records per task, weights, skips."""
    cfg = pipeline.config
    lines = [f"data: stage {cfg.stage}, seq_len {pipeline.seq_len}, global batch "
             f"{pipeline.global_batch} "
             f"({pipeline.local_batch} per host, shard {pipeline.shard_index}/"
             f"{pipeline.shard_count}), packing {'on' if cfg.packing else 'off'}"]
    for task, w in cfg.task_weights().items():
        lines.append(f"  {task:<12} weight {w:.2f}  {len(sources.records[task])} records")
    lines.append(sources.skips.summary())
    return "\n".join(lines)


__all__ = ["TASKS", "BATCH_KEYS", "SOURCES", "Sources", "Pipeline", "DropCounter",
           "GlobalBatchIterator", "load_sources", "build_pipeline", "to_training_batch",
           "pad_to_row", "padding_fraction", "pair_records", "instruction_records", "vqa_records",
           "shard_for_process", "per_host_batch", "describe"]

