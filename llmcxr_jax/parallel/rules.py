"""The one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names only (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this table decides how they land on the mesh axes
`data`, `fsdp`, `tensor`. Parameter axes and activation axes have separate names so that FSDP can
shard a weight's `embed` dimension while activations keep `embed` whole.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

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
    # The one axis of a 1-D parameter (LayerNorm scales and biases, biases; `layers` aside; see
    # `parallel.shardings.logical_param_specs`): replicated. Each is a few KB, so splitting it
    # costs a collective per parameter (forward gather, backward reduction) and saves nothing.
    ("vector", None),
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
    # The input embedding's lookup as it comes out of the table ([lookup_batch, length, embed]):
    # rows over the batch axes the table's `embed` axis does not use (`rules_for`), features
    # over those it does. Stated so that XLA moves it to ("batch", ..) with one all-to-all;
    # left to itself it replicates the whole tensor in the backward pass.
    ("lookup_batch", "data"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("height", None),
    ("width", None),
    ("channels", None),
)

# Where the weights' `embed` dimension (and with it every Adam moment) is split:
# "fsdp"      - over the fsdp axis only; the `data` axis holds replicas (plain data parallelism).
# "data+fsdp" - over data x fsdp as well (ZeRO-3, as DeepSpeed runs the reference): each device
#               keeps 1/(data*fsdp) of the state, e.g. 1/16 of dolly-v2-3b's on a 4x4 mesh.
PARAM_SHARDING_MODES = ("fsdp", "data+fsdp")


def rules_for(param_sharding: str = "fsdp") -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`LOGICAL_AXIS_RULES` with the parameter `embed` axis mapped per `param_sharding`."""
    if param_sharding not in PARAM_SHARDING_MODES:
        raise ValueError(f"param_sharding {param_sharding!r} not in {PARAM_SHARDING_MODES}")
    embed = "fsdp" if param_sharding == "fsdp" else ("data", "fsdp")
    lookup_batch = "data" if param_sharding == "fsdp" else None
    changed = {"embed": embed, "lookup_batch": lookup_batch}
    return tuple((name, changed.get(name, axes)) for name, axes in LOGICAL_AXIS_RULES)


def gathered(names: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """A weight's logical names as its matmul reads it: the `embed` axis whole (FSDP gathers
    it over the batch axes), every other axis split as the weight is stored."""
    return tuple("act_embed" if name == "embed" else name for name in names)


def logical_axis_size(name: str) -> int:
    """Into how many shards the current mesh (`jax.set_mesh`) splits the logical axis `name`
    under the current rules (`nn.logical_axis_rules`); 1 outside them (no constraint applies)."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((name,), rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape.get(axis, 1) for axis in axes)
