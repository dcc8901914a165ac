"""Parameter shardings of the GPT-NeoX model, from its logical axis names and the rules table.

Shapes come from `jax.eval_shape` (nothing is allocated); each parameter's logical names
(`nn.with_logical_partitioning`) go through `LOGICAL_AXIS_RULES` to a `NamedSharding` on the mesh;
1-D parameters (LayerNorm scales and biases, biases) are named `VECTOR` here, which the rules
replicate, whatever the model named their axis.
Batches (`batch_sharding`): rows over the mesh axes the rules give the `batch` logical axis.
Meshes themselves are built in `llmcxr_jax.parallel.mesh`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES

Rules = Sequence[tuple[str, Any]]


@functools.lru_cache(maxsize=32)
def _boxed_abstract_params(config: ModelConfig) -> Any:
    """Traced once per config: a train stage asks for the shapes several times (state, shardings,
    restore target), and each trace of the model's init costs about half a second on a CPU."""
    from llmcxr_jax.llm.model import GPTNeoX  # the model imports configs only; no cycle

    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(GPTNeoX(config).init, jax.random.key(0), ids)["params"]


def abstract_params(config: ModelConfig, boxed: bool = False) -> Any:
    """Param shapes/dtypes (`jax.ShapeDtypeStruct`) without allocating; `boxed=True` keeps the
    `nn.LogicallyPartitioned` boxes that carry the logical axis names. Each call returns a new
    tree (callers may change it), over shapes traced once per config."""
    params = jax.tree.map(lambda x: x, _boxed_abstract_params(config))
    return params if boxed else nn.unbox(params)


VECTOR = "vector"  # the logical name of a 1-D parameter's axis (replicated by the rules)


def _vector_spec(spec: PartitionSpec) -> PartitionSpec:
    """A parameter with one axis besides `layers` (LayerNorm scales and biases, biases) gets the
    logical name `VECTOR` on it, whatever the model called it: the rules replicate it."""
    axes = [i for i, name in enumerate(spec) if name != "layers"]
    if len(axes) != 1:
        return spec
    return PartitionSpec(*(VECTOR if i == axes[0] else name for i, name in enumerate(spec)))


def logical_param_specs(config: ModelConfig) -> Any:
    """Logical `PartitionSpec`s (axis names like "embed", "layers") of every parameter, with
    1-D parameters' axis renamed `VECTOR`."""
    specs = nn.get_partition_spec(abstract_params(config, boxed=True))
    return jax.tree.map(_vector_spec, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """A `NamedSharding` for every parameter, in the params tree's structure."""
    return nn.logical_to_mesh_sharding(logical_param_specs(config), mesh, rules)


def abstract_sharded_params(config: ModelConfig, shardings: Any = None, mesh: Mesh | None = None,
                            rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """`ShapeDtypeStruct`s carrying their target sharding (the restore/import target): the given
    `shardings` tree, or the rules' shardings on `mesh`."""
    if shardings is None:
        if mesh is None:
            raise ValueError("give either shardings or a mesh")
        shardings = param_shardings(config, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(config), shardings)


def batch_axes(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes the `batch` logical axis maps to (the rules table), those present in `mesh`."""
    rule = dict(rules)["batch"]
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    return tuple(a for a in axes if a in mesh.axis_names)


def batch_ways(mesh: Mesh) -> int:
    """Devices a batch's rows are split over: the product of the batch axes' sizes."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)] or [1]))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """The one batch layout of training, evaluation and data loading: the leading (row) axis over
    the batch axes, the other `ndim - 1` axes whole."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None, *([None] * (ndim - 1))))
