"""The conditioning gap: how much a pair's true input lowers the response loss.

For one direction (report -> image or image -> report) and a set of image-report pairs:

    gap = NLL(response | another study's input) - NLL(response | its own input)

in nats per response token, pooled over the pairs (sum of NLL over every response token, divided
by the number of response tokens; the response, and so the token count, is the same in both
terms). Each pair gets its input from another study by a seeded derangement: no pair keeps its
own input, nor one from a record of its own study (those share the report). The gap is zero when
the model ignores its input, and positive when the true input helps.

Examples are built by the training prompt builders (`text.prompts`), with one fixed phrasing per
pair, the same for the true and the mismatched example, and scored on the response tokens only
(the training loss mask). They are batched, padded to a bucketed length (one compiled program per
length) and, with a mesh, sharded over its batch axes.

    from llmcxr_jax.eval.conditioning import conditioning_gap
    result = conditioning_gap(params, model_cfg, vocab, records, "report2image")
    result.gap, result.nll_true, result.nll_mismatched, result.n_pairs

`GapResult.token_gaps` keeps each pair's gap per response token, so a report -> image gap can be
laid out over the VQ-GAN's grid (`cell_gaps`): where in the image the report lowers the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax import tasks
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.parallel.shardings import batch_sharding, batch_ways
from llmcxr_jax.text import prompts
from llmcxr_jax.text.vocab import Vocab
from llmcxr_jax.train.loss import token_nll_and_correct

DIRECTIONS = tasks.PAIRED
Pair = Any  # a data.mimic.MimicRecord, or a dict with `report`, `codes` (and `study`, `id`)


@dataclasses.dataclass(frozen=True)
class GapResult:
    """The gap of one direction on `n_pairs` pairs; NLLs in nats per response token.

    `pair_*` hold each pair's response NLL sums (true and mismatched input) and response token
    counts, so that intervals over pairs can be drawn from them; `token_gaps` each pair's
    mismatched - true NLL per response token, and `pairs` the index of each scored pair in the
    pairs given (longer ones are left out)."""

    direction: str
    n_pairs: int
    nll_true: float
    nll_mismatched: float
    gap: float
    pair_nll_true: tuple[float, ...]
    pair_nll_mismatched: tuple[float, ...]
    pair_tokens: tuple[float, ...]
    token_gaps: tuple[np.ndarray, ...] = ()
    pairs: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The summary numbers (no per-pair arrays), for JSON."""
        return {"n_pairs": self.n_pairs, "gap": self.gap, "nll_true": self.nll_true,
                "nll_mismatched": self.nll_mismatched}

    def gap_ci95(self, **kwargs: Any) -> list[float] | None:
        """95 % percentile bootstrap interval of the pooled gap over the pairs."""
        from llmcxr_jax.eval import bootstrap

        true, mismatched, tokens = (np.asarray(x) for x in (
            self.pair_nll_true, self.pair_nll_mismatched, self.pair_tokens))
        return bootstrap.ci95(
            lambda idx: float((mismatched[idx].sum() - true[idx].sum()) / tokens[idx].sum()),
            self.n_pairs, **kwargs)


def _field(pair: Pair, name: str) -> Any:
    return pair[name] if isinstance(pair, Mapping) else getattr(pair, name)


def study_key(pair: Pair) -> str:
    """The study a pair belongs to: `subject_id/study_id` of a MimicRecord, a dict's `study`
    (else its `id`, else its report text: pairs with one report are one study)."""
    if isinstance(pair, Mapping):
        return str(pair.get("study") or pair.get("id") or pair["report"])
    return f"{pair.subject_id}/{pair.study_id}"


def derangement(groups: Sequence[Any], seed: int) -> np.ndarray:
    """`donor[i]`: a permutation of range(n) in which every i gets a donor of another group.

    Groups are laid out contiguously in a seeded random order (members shuffled too), and each
    position takes the one `m` places further round the cycle, m = the largest group's size: a
    block of s <= m members never reaches itself in m steps forward, nor in n - m >= m steps.
    Raises ValueError when no such permutation exists (n < 2, or a group holds over half)."""
    n = len(groups)
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    largest = max((len(v) for v in by_group.values()), default=0)
    if n < 2 or 2 * largest > n:
        raise ValueError(f"no derangement across groups: {n} pairs, the largest study holds "
                         f"{largest} (need n >= 2 and no study with more than half)")
    rng = np.random.default_rng(seed)
    members = list(by_group.values())
    order = np.concatenate([rng.permutation(members[k]) for k in rng.permutation(len(members))])
    donor = np.empty(n, np.int64)
    donor[order] = np.roll(order, -largest)
    return donor


def phrasings(n: int, seed: int) -> np.ndarray:
    """One instruction phrasing index per pair (both directions have ten phrasings)."""
    count = len(prompts.instructions_of(DIRECTIONS[0]))
    assert all(len(prompts.instructions_of(d)) == count for d in DIRECTIONS)
    return np.random.default_rng([seed, 1]).integers(count, size=n)


def example(vocab: Vocab, direction: str, input_pair: Pair, target_pair: Pair,
            phrasing: int) -> prompts.Example:
    """The training example of `direction` with `input_pair`'s input and `target_pair`'s
    response (the same pair for the true example)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} not in {DIRECTIONS}")
    # A pair's record (`pipeline.pair_records`): the response from `target_pair`, the input
    # from `input_pair`.
    record = {field: _field(target_pair, field) for field in ("report", "codes")}
    record.update({field: _field(input_pair, field)
                   for field in tasks.get(direction).record_inputs})
    return prompts.build_example(vocab, direction, record, int(phrasing))


def gap_examples(vocab: Vocab, pairs: Sequence[Pair], direction: str, seed: int = 0,
                 max_len: int | None = None
                 ) -> tuple[list[prompts.Example], list[prompts.Example], list[int]]:
    """(true examples, mismatched examples, the index in `pairs` of each), the k-th scored
    pair's at index k in each. Pairs whose true example is longer than `max_len` are left out
    first (training drops them too)."""
    phrase = phrasings(len(pairs), seed)
    true = [example(vocab, direction, p, p, phrase[i]) for i, p in enumerate(pairs)]
    kept = [i for i, ex in enumerate(true) if max_len is None or len(ex) <= max_len]
    donor = derangement([study_key(pairs[i]) for i in kept], seed)
    mismatched = [example(vocab, direction, pairs[kept[donor[k]]], pairs[i], phrase[i])
                  for k, i in enumerate(kept)]
    return [true[i] for i in kept], mismatched, kept


@functools.lru_cache(maxsize=16)
def _row_nll_fn(model_cfg: ModelConfig, mesh: Mesh | None, rules: Any) -> Any:
    """jitted (params, inputs, targets, segment_ids, weights) -> weighted NLL per position."""
    model = GPTNeoX(model_cfg)

    def row_nll(params, inputs, targets, segment_ids, weights):
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        with nn.logical_axis_rules(rules):
            logits = model.apply({"params": params}, inputs, positions, segment_ids)
        nll, _ = token_nll_and_correct(logits, targets)
        return nll * weights

    if mesh is None:
        return jax.jit(row_nll)
    rows = batch_sharding(mesh)
    jitted = jax.jit(row_nll, in_shardings=(None, rows, rows, rows, rows),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))

    def run(params, *arrays):
        # The same host arrays on every process (the pairs are not host-sharded): each process
        # places the rows its devices hold; the NLLs come back whole to every process.
        placed = [jax.make_array_from_callback(a.shape, rows, lambda index, a=a: a[index])
                  for a in arrays]
        with jax.set_mesh(mesh):
            return jitted(params, *placed)
    return run


def _batch_rows(mesh: Mesh | None, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the mesh's batch-axis devices."""
    if mesh is None:
        return batch_size
    n = batch_ways(mesh)
    return -(-batch_size // n) * n


def response_token_nll(params: Any, model_cfg: ModelConfig, examples: Sequence[prompts.Example],
                       *, batch_size: int = 8, bucket: int = 64, mesh: Mesh | None = None,
                       rules: Any = LOGICAL_AXIS_RULES) -> list[np.ndarray]:
    """The NLL of each response token, one array per example, in input order.

    Token t is scored by the logits at t - 1 with the loss mask's weight at t, as in training
    (the response tokens are those of weight > 0). Examples are length-sorted into batches of
    `batch_size` rows padded to a multiple of `bucket` tokens (padding weighs nothing)."""
    fn = _row_nll_fn(model_cfg, mesh, rules)
    rows = _batch_rows(mesh, batch_size)
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        longest = max(len(examples[i]) for i in idx)
        if longest > model_cfg.max_position_embeddings:
            raise ValueError(f"an example of {longest} tokens exceeds the model's "
                             f"{model_cfg.max_position_embeddings} positions")
        length = -(-(longest - 1) // bucket) * bucket
        inputs = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        weights = np.zeros((rows, length), np.float32)
        for row, i in enumerate(idx):
            ids, mask = examples[i].ids, examples[i].loss_mask
            n = len(ids) - 1
            inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
            segments[row, :n] = 1
            weights[row, :n] = mask[1:]
        nll = np.asarray(jax.device_get(fn(params, inputs, targets, segments, weights)))
        for row, i in enumerate(idx):
            out[i] = nll[row][weights[row] > 0].astype(np.float64)
    return out


def cell_gaps(result: GapResult, tokens_per_image: int,
              select: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """A report -> image gap over the VQ-GAN grid: the mean over the (selected) pairs of the gap
    at each of the first `tokens_per_image` response tokens (the codes, in raster order), as a
    [side, side] array. `select` is a mask over the scored pairs (`result.pairs` order)."""
    if result.direction != "report2image":
        raise ValueError(f"cell gaps are of report2image, not {result.direction}")
    side = int(round(tokens_per_image ** 0.5))
    if side * side != tokens_per_image:
        raise ValueError(f"{tokens_per_image} tokens per image is not a square grid")
    chosen = [g for k, g in enumerate(result.token_gaps) if select is None or select[k]]
    if not chosen:
        raise ValueError("no pairs selected")
    if min(len(g) for g in chosen) < tokens_per_image:
        raise ValueError(f"a response holds fewer than {tokens_per_image} tokens")
    return np.mean([g[:tokens_per_image] for g in chosen], axis=0).reshape(side, side)


def conditioning_gap(params: Any, model_cfg: ModelConfig, vocab: Vocab, records: Sequence[Pair],
                     direction: str, *, batch_size: int = 8, seed: int = 0, bucket: int = 64,
                     max_len: int | None = None, mesh: Mesh | None = None,
                     rules: Any = LOGICAL_AXIS_RULES) -> GapResult:
    """The conditioning gap of `direction` on `records` (MimicRecords or pipeline pair dicts).

    `seed` fixes the derangement and the phrasings; pairs whose true example is longer than
    `max_len` are left out (`n_pairs` counts those scored); `mesh` shards the batches over its
    batch axes (params stay as they are placed). Raises ValueError when no derangement across
    studies exists (fewer than 2 pairs, or one study holds over half)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} not in {DIRECTIONS}")
    true, mismatched, kept = gap_examples(vocab, records, direction, seed, max_len)
    params = nn.meta.unbox(params)
    score = functools.partial(response_token_nll, params, model_cfg, batch_size=batch_size,
                              bucket=bucket, mesh=mesh, rules=rules)
    token_true, token_mismatched = score(true), score(mismatched)
    if [len(t) for t in token_true] != [len(t) for t in token_mismatched]:
        raise AssertionError("true and mismatched examples score different response tokens")
    nll_true = np.array([t.sum() for t in token_true])
    nll_mismatched = np.array([t.sum() for t in token_mismatched])
    tokens = np.array([float(len(t)) for t in token_true])
    total = float(tokens.sum())
    mean_true, mean_mismatched = float(nll_true.sum()) / total, float(nll_mismatched.sum()) / total
    return GapResult(direction=direction, n_pairs=len(true), nll_true=mean_true,
                     nll_mismatched=mean_mismatched, gap=mean_mismatched - mean_true,
                     pair_nll_true=tuple(nll_true.tolist()),
                     pair_nll_mismatched=tuple(nll_mismatched.tolist()),
                     pair_tokens=tuple(tokens.tolist()),
                     token_gaps=tuple(m - t for m, t in zip(token_mismatched, token_true)),
                     pairs=tuple(kept))


__all__ = ["DIRECTIONS", "GapResult", "cell_gaps", "conditioning_gap", "derangement",
           "gap_examples", "response_token_nll", "study_key", "phrasings", "example"]
