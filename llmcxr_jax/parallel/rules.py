"""The one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names only (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this table decides how they land on the mesh axes
`data`, `fsdp`, `tensor`. Parameter axes and activation axes have separate names so that FSDP can
shard a weight's `embed` dimension while activations keep `embed` whole.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("layers", None),
    # Convolutional parameters (VQ-GAN): output channels over fsdp, the rest replicated.
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("codebook", None),
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("height", None),
    ("width", None),
    ("channels", None),
)
