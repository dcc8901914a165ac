"""Image-token embeddings initialised from the VQ-GAN's codebook.

Randomly initialised image rows make the LLM first learn which of the K codes look alike. The
codebook already says so: code c's vector places it among the others. Each image id's input row
(and its output column) becomes its codebook vector, standardised per dimension and mapped to the
model width by a fixed random projection, scaled to the model's initializer range, so that
similar codes start with similar embeddings and no row is larger than a random one.
"""

from __future__ import annotations

import jax
import numpy as np

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.llm.model import Params


def codebook_rows(codebook: np.ndarray, hidden_size: int, scale: float, seed: int = 0
                  ) -> np.ndarray:
    """[K, D] codebook -> [K, hidden_size] rows with entries of standard deviation `scale`."""
    codebook = np.asarray(codebook, np.float64)
    standardised = (codebook - codebook.mean(0)) / np.maximum(codebook.std(0), 1e-8)
    projection = np.random.default_rng(seed).standard_normal((codebook.shape[1], hidden_size))
    rows = standardised @ projection / np.sqrt(codebook.shape[1])
    return (rows * (scale / max(float(rows.std()), 1e-8))).astype(np.float32)


def with_codebook_embeddings(params: Params, model_cfg: ModelConfig, codebook: np.ndarray,
                             image_offset: int, seed: int = 0) -> Params:
    """`params` with the image ids' rows of `embed_in` and columns of `embed_out` set from
    `codebook` (image id = image_offset + code); every other value and every sharding kept."""
    k = codebook.shape[0]
    if image_offset + k > model_cfg.vocab_size:
        raise ValueError(f"{k} image ids from {image_offset} do not fit {model_cfg.vocab_size} "
                         f"embedding rows")
    rows = codebook_rows(codebook, model_cfg.hidden_size, model_cfg.initializer_range, seed)

    def update(embedding: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
        embedding = embedding.at[image_offset:image_offset + k].set(
            rows.astype(embedding.dtype))
        kernel = kernel.at[:, image_offset:image_offset + k].set(rows.T.astype(kernel.dtype))
        return embedding, kernel

    embedding = params["embed_in"]["embedding"]
    kernel = params["embed_out"]["kernel"]
    new_embedding, new_kernel = jax.jit(
        update, out_shardings=(embedding.sharding, kernel.sharding))(embedding, kernel)
    out = dict(params)
    out["embed_in"] = {**params["embed_in"], "embedding": new_embedding}
    out["embed_out"] = {**params["embed_out"], "kernel": new_kernel}
    return out
