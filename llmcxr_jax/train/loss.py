"""Response-only next-token cross-entropy, with per-task sums for logging.

Batches follow the data pipeline's convention: `targets[b, t]` is the token after `inputs[b, t]`
within the same packed segment, and `loss_mask[b, t]` is 1 exactly where that target is a response
token (through `### End`). Losses are returned as sums so that gradient accumulation over
micro-batches divides once, by the total number of response tokens of the whole step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def loss_slots(loss_mask: Array, k: int) -> Array:
    """[batch, k] int32: each row's slots with a non-zero loss weight, in order, then slots
    without (weight 0, so they add nothing). Every loss slot is among them when no row holds
    more than k, as the pipeline packs them (`TrainConfig.loss_positions`)."""
    return jnp.argsort(loss_mask == 0, axis=1, stable=True)[:, :k].astype(jnp.int32)


def token_nll_and_correct(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token negative log-likelihood (fp32) and whether the argmax equals the target."""
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    return nll, correct


def loss_sums(logits: Array, targets: Array, loss_mask: Array, task_ids: Array,
              num_tasks: int) -> dict[str, Array]:
    """Sums over the masked tokens: total and per task (`task_ids` per token, in [0, num_tasks)).

    Keys: loss_sum, weight, correct; task_loss_sum, task_weight, task_correct ([num_tasks] each).
    """
    nll, correct = token_nll_and_correct(logits, targets)
    w = loss_mask.astype(jnp.float32)
    onehot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32) * w[..., None]
    return {
        "loss_sum": jnp.sum(nll * w),
        "weight": jnp.sum(w),
        "correct": jnp.sum(correct * w),
        "task_loss_sum": jnp.einsum("bt,btk->k", nll, onehot),
        "task_weight": jnp.sum(onehot, axis=(0, 1)),
        "task_correct": jnp.einsum("bt,btk->k", correct.astype(jnp.float32), onehot),
    }


def summarize(sums: dict[str, Array]) -> dict[str, Array]:
    """Means from `loss_sums` output: loss, accuracy, and per-task loss/accuracy (NaN if absent)."""
    weight = jnp.maximum(sums["weight"], 1.0)
    task_weight = sums["task_weight"]
    safe = jnp.maximum(task_weight, 1.0)
    return {
        "loss": sums["loss_sum"] / weight,
        "accuracy": sums["correct"] / weight,
        "tokens": sums["weight"],
        "task_loss": jnp.where(task_weight > 0, sums["task_loss_sum"] / safe, jnp.nan),
        "task_accuracy": jnp.where(task_weight > 0, sums["task_correct"] / safe, jnp.nan),
        "task_tokens": task_weight,
    }
