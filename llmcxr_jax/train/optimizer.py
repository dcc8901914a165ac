"""AdamW with linear warmup then constant or cosine decay, and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmcxr_jax.configs import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then constant or cosine; past
    `total_steps` (a finished stage continued to more steps) it holds its value at `total_steps`,
    also when that falls inside the warmup."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio)
    schedule = optax.join_schedules([warmup, after], [cfg.warmup_steps])
    total = max(cfg.total_steps, 1)
    return lambda count: schedule(jnp.minimum(count, total))


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on biases, LayerNorm scales, or 1-D leaves.

    Scanned layers add a leading axis, so the rule is by name rather than by rank.
    """
    def keep(path: tuple, _leaf: Any) -> bool:
        names = [getattr(p, "key", str(p)) for p in path]
        return names[-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax chain: clip (optional) then AdamW with the schedule above."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw
