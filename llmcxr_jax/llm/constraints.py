"""Logits-mask hooks that constrain decoding, run inside the jitted decode loop.

A hook is any callable `fn(state: DecodeState) -> mask` where `mask` is either a bool array
[batch, vocab] (True = allowed) or a float array [batch, vocab] added to the logits (a bias; -inf
forbids). It runs under `jax.jit` once per decode step, so it must be traceable: no host
callbacks, no Python branching on array values. Hooks are compared by value to reuse compiled
decode loops, so write them as frozen dataclasses (as below) rather than fresh closures.

`DecodeState.step` is the index of the token being chosen (0 = the first new token); every
sequence of a batch starts generating at the same step, so a hook may key on it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class DecodeState:
    """What a logits-mask hook sees at one decode step."""

    step: Array  # [] int32: index of the token being chosen (0 = first generated token)
    tokens: Array  # [batch, max_new_tokens] int32: tokens chosen so far, pad_id elsewhere
    lengths: Array  # [batch] int32: tokens generated so far (stop token included)
    finished: Array  # [batch] bool: the sequence has emitted a stop token
    vocab_size: int = flax.struct.field(pytree_node=False, default=0)  # rows of the logits


LogitsMaskFn = Callable[[DecodeState], Array]
Mask = Union[Array, np.ndarray]


def valid_vocab_mask(vocab_size: int, n_valid: int) -> np.ndarray:
    """[vocab_size] bool: True for the first `n_valid` ids, False for padding rows."""
    if not 0 < n_valid <= vocab_size:
        raise ValueError(f"n_valid must be in (0, vocab_size={vocab_size}], got {n_valid}")
    return np.arange(vocab_size) < n_valid


def apply_mask(logits: Array, mask: Array) -> Array:
    """Apply a hook's output: bool -> -inf where False; float -> added as a bias."""
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, logits, -jnp.inf)
    return logits + mask.astype(logits.dtype)


@dataclasses.dataclass(frozen=True)
class ImageThenEnd:
    """Force exactly `n_tokens` image ids, then `end_id` (and `end_id` at every later step).

    Image ids are `image_offset .. image_offset + n_image - 1`. Report -> image uses it with
    n_tokens=256 right after `### Response:\\n`; put `end_id` in the stop ids so the sequence
    finishes after it.
    """

    image_offset: int
    n_image: int
    end_id: int
    n_tokens: int = 256

    def __post_init__(self) -> None:
        if self.n_image < 1 or self.n_tokens < 1:
            raise ValueError(f"n_image ({self.n_image}) and n_tokens ({self.n_tokens}) must be >= 1")
        if self.image_offset < 0 or self.end_id < 0:
            raise ValueError(f"image_offset ({self.image_offset}) and end_id ({self.end_id}) "
                             "must be >= 0")
        if self.image_offset <= self.end_id < self.image_offset + self.n_image:
            raise ValueError(f"end_id {self.end_id} is an image id")

    def __call__(self, state: DecodeState) -> Array:
        vocab = state.vocab_size
        if max(self.image_offset + self.n_image, self.end_id + 1) > vocab:
            raise ValueError(f"image ids [{self.image_offset}, {self.image_offset + self.n_image}) "
                             f"or end_id {self.end_id} outside a vocabulary of {vocab} rows")
        ids = jnp.arange(vocab)
        is_image = (ids >= self.image_offset) & (ids < self.image_offset + self.n_image)
        allowed = jnp.where(state.step < self.n_tokens, is_image, ids == self.end_id)
        return jnp.broadcast_to(allowed, (state.finished.shape[0], vocab))


def image_then_end_mask(image_offset: int, n_image: int, end_id: int,
                        n_tokens: int = 256) -> ImageThenEnd:
    """The hook for report -> image: exactly `n_tokens` image ids, then `end_id`."""
    return ImageThenEnd(image_offset=image_offset, n_image=n_image, end_id=end_id,
                        n_tokens=n_tokens)
