"""Model FLOPs per token, peak FLOP/s per accelerator, and model FLOPs utilisation (MFU).

Training FLOPs per token (the PaLM paper's formula, arXiv 2204.02311 appendix B; Chinchilla's
6N rule plus attention):

    flops_per_token = 6 * N  +  12 * n_layers * seq_len * hidden

- `N` = every parameter except the input embedding (`embed_in`): the layers (matmul weights,
  biases, LayerNorms), the final LayerNorm and the output embedding (`embed_out`, an untied
  [hidden, vocab] matmul). The input embedding is a gather and costs no FLOPs. Each parameter costs
  2 FLOPs per token forward (multiply + add) and 4 backward (input and weight gradients): 6 N.
- Attention scores Q K^T and the weighted sum A V cost 2 * seq_len * hidden FLOPs each per token
  per layer forward, 3x that for forward + backward: 12 * n_layers * seq_len * hidden. The full
  row length counts (no halving for the causal mask or for packed segments): what dense attention
  computes, as PaLM counts it.
- Rematerialisation recomputes the forward pass but is not counted: MFU counts model FLOPs, not
  hardware FLOPs.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices). On CPU, or on a device missing
from the table, only FLOP/s is reported (MFU is None).
"""

from __future__ import annotations

from typing import Sequence

import jax

from llmcxr_jax.configs import ModelConfig

# Dense bf16 peak FLOP/s per JAX device (one chip; v4 and v5p chips are one megacore device).
# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "peak compute per chip" (bf16);
# NVIDIA H100 SXM / H200 datasheets, dense BF16 Tensor Core (the 1,979 TFLOPS figure is with
# 2:4 sparsity); NVIDIA A100 datasheet (312 TFLOPS dense BF16).
PEAK_BF16_FLOPS: dict[str, float] = {
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "tpu-v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}

# High-bandwidth memory per JAX device, bytes (same sources).
HBM_BYTES: dict[str, int] = {
    "tpu-v4": 32 * 2**30,
    "tpu-v5e": 16 * 2**30,
    "tpu-v5p": 95 * 2**30,
    "tpu-v6e": 32 * 2**30,
    "h100": 80 * 10**9,
    "h200": 141 * 10**9,
    "a100": 80 * 10**9,
}

# `jax.Device.device_kind` substrings -> table key; the first match wins, so the more specific
# strings come first ("TPU v5 lite" is v5e, plain "TPU v5" is v5p).
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "tpu-v5e"),
    ("tpu v5e", "tpu-v5e"),
    ("tpu v5p", "tpu-v5p"),
    ("tpu v5", "tpu-v5p"),
    ("tpu v6 lite", "tpu-v6e"),
    ("tpu v6e", "tpu-v6e"),
    ("tpu v4", "tpu-v4"),
    ("h100", "h100"),
    ("h200", "h200"),
    ("a100", "a100"),
)


def chip_key(device_kind: str) -> str | None:
    """Table key for a `device_kind` string (e.g. "TPU v5 lite" -> "tpu-v5e"); None if unknown."""
    kind = device_kind.lower()
    for needle, key in _DEVICE_KINDS:
        if needle in kind:
            return key
    return None


def resolve_chip(name: str) -> str:
    """A table key from a flag (`v5e`, `tpu-v5e`, `H100`, ...); raises naming the known chips."""
    key = name.lower().strip()
    for candidate in (key, f"tpu-{key}"):
        if candidate in PEAK_BF16_FLOPS:
            return candidate
    raise KeyError(f"unknown chip {name!r}; known: {sorted(PEAK_BF16_FLOPS)}")


def device_peak_flops(devices: Sequence[jax.Device] | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device of this run; None on CPU or an unknown accelerator."""
    devices = list(devices if devices is not None else jax.devices())
    key = chip_key(devices[0].device_kind)
    return PEAK_BF16_FLOPS.get(key) if key else None


def non_embedding_params(cfg: ModelConfig) -> int:
    """`N` of the formula: all GPT-NeoX parameters except the input embedding (see module doc)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    bias = 1 if cfg.attention_bias else 0
    per_layer = (
        2 * 2 * h  # input and post-attention LayerNorm (scale + bias)
        + h * 3 * h + 3 * h * bias  # fused QKV
        + h * h + h * bias  # attention output
        + h * i + i + i * h + h  # MLP in/out with biases
    )
    final_norm = 2 * h
    embed_out = h * cfg.vocab_size
    return cfg.num_layers * per_layer + final_norm + embed_out


def total_params(cfg: ModelConfig) -> int:
    """All parameters, input embedding included."""
    return non_embedding_params(cfg) + cfg.vocab_size * cfg.hidden_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per token of Q K^T and A V: 12 * layers * seq_len * hidden."""
    return 12 * cfg.num_layers * seq_len * cfg.hidden_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs per trained token: 6 * N + 12 * layers * seq_len * hidden."""
    return 6 * non_embedding_params(cfg) + attention_flops_per_token(cfg, seq_len)


def mfu(flops_per_s: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Achieved / (peak * devices) as a fraction; None where the peak is unknown (CPU)."""
    if not peak_per_device:
        return None
    return flops_per_s / (peak_per_device * n_devices)
