"""The sharded train step's communication, read from the compiled program (nothing executed):
1-D parameters replicated, collectives per layer independent of the small parameters, no
involuntary full rematerialisation, a tensor-parallel layer's reductions and gathers at
Megatron's count, old checkpoints restoring onto the new shardings."""

import dataclasses
import math
import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.parallel import collectives as coll
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.parallel.mesh import mesh_from_flag, replicated
from llmcxr_jax.parallel.rules import rules_for
from llmcxr_jax.train import checkpoint as ckpt
from llmcxr_jax.train.memory_plan import compile_train_step
from llmcxr_jax.train.optimizer import make_optimizer
from llmcxr_jax.train.state import state_shardings

# Scanned layers: each collective of a layer appears once in the loop body and runs per layer.
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_position_embeddings=64, scan_layers=True)
TRAIN = TrainConfig(learning_rate=1e-3, warmup_steps=1, global_batch=8, seq_len=16)
REMAT_WARNING = "Involuntary full rematerialization"


def _non_layer_dims(spec) -> int:
    return sum(name != "layers" for name in spec)


def test_one_dimensional_params_are_replicated_and_matrices_split():
    mesh = mesh_from_flag("2x2x2")
    for mode in ("fsdp", "data+fsdp"):
        logical = jax.tree.leaves(shardings_lib.logical_param_specs(MODEL),
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        mesh_specs = [s.spec for s in jax.tree.leaves(
            shardings_lib.param_shardings(MODEL, mesh, rules_for(mode)))]
        vectors = [m for l, m in zip(logical, mesh_specs) if _non_layer_dims(l) == 1]
        matrices = [m for l, m in zip(logical, mesh_specs)
                    if _non_layer_dims(l) >= 2 and "embed" in l]  # the weights, not the qkv bias
        # per layer: 2 LayerNorms x (scale, bias), attention dense bias, both MLP biases; final LN
        assert len(vectors) == 2 * 2 + 1 + 2 + 2
        assert all(all(axis is None for axis in spec) for spec in vectors), vectors
        assert all("fsdp" in jax.tree.leaves(tuple(spec)) for spec in matrices), matrices


def _compile_2x4(model: ModelConfig) -> tuple[list[coll.Collective], int]:
    """The train step on a 2x4 mesh with the state over fsdp only (data holds replicas): its
    collectives, and XLA's involuntary-rematerialisation warnings (C++ logging on fd 2) while
    compiling it."""
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            compiled = compile_train_step(model, TRAIN, mesh_from_flag("2x4"), rules_for("fsdp"))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        warnings = err.read().decode(errors="replace").count(REMAT_WARNING)
    return coll.collectives(compiled.as_text(), 8), warnings


@pytest.fixture(scope="module")
def step_2x4():
    return _compile_2x4(MODEL)


def test_collectives_scale_with_layers_not_with_small_params(step_2x4):
    base, warnings = step_2x4
    # Twice the layers, two fewer parameters per layer (the attention biases).
    other, _ = _compile_2x4(dataclasses.replace(MODEL, num_layers=4, attention_bias=False))

    def kinds(found, executions):
        return sorted(c.kind for c in found if c.executions == executions)

    # Each layer's collectives are the same and run once per layer; nothing outside grows. (How
    # many there are is XLA's choice, e.g. how it combines them: not asserted.)
    assert kinds(other, 4) == kinds(base, 2)
    assert kinds(other, 1) == kinds(base, 1)
    # A layer's weights are split over fsdp: it gathers them and reduce-scatters their gradients.
    assert {"all-gather", "reduce-scatter"} <= set(kinds(base, 2))
    # The embedding lookup's backward no longer replicates a whole activation tensor.
    assert warnings == 0


def test_bytes_sent_match_the_shardings(step_2x4):
    """Bytes per device from the parameter shapes (f32): on data=2 x fsdp=4, every weight
    matrix is all-gathered over fsdp at least once and at most for the forward and again for the
    backward (the LM head once: it is not rematerialised), its gradient reduce-scattered over
    fsdp and its shard all-reduced over data; the input embedding moves activations instead of
    its table."""
    summary = coll.summarize(step_2x4[0])
    named = {jax.tree_util.keystr(path): p.size * 4 for path, p in
             jax.tree_util.tree_leaves_with_path(shardings_lib.abstract_params(MODEL))}
    head, table = named["['embed_out']['kernel']"], named["['embed_in']['embedding']"]
    layers = sum(b for name, b in named.items() if "kernel" in name and "layers" in name)
    vectors = sum(b for name, b in named.items() if "norm" in name or name.endswith("['bias']"))
    gathered = summary.bytes_sent["all-gather"] / (3 / 4)  # bytes gathered, whole arrays
    assert 0.99 * (layers + head) <= gathered <= 1.01 * (2 * layers + head)
    assert summary.bytes_sent["reduce-scatter"] == pytest.approx((layers + head) * 3 / 4,
                                                                 rel=0.01)
    data_reduce = 2 * (layers + head + table) / 4 * 1 / 2
    assert data_reduce < summary.bytes_sent["all-reduce"] <= data_reduce + 2 * vectors * 7 / 8 \
        + 1024  # loss sums and metrics


def test_tensor_parallel_layer_reduces_three_activations_and_gathers_each_weight_twice():
    """data 2 x fsdp 2 x tensor 2, state over data x fsdp, full remat (dolly-v2-3b's 2x4x2 in
    miniature). Per layer the tensor axis all-reduces three activations, Megatron's count for
    GPT-NeoX's parallel residual: the block's output once in the forward (both branches' partial
    sums added first, not reduced one by one), the input gradients of `query_key_value` and
    `dense_h_to_4h` in the backward; the rematerialised forward needs none. Each weight matrix is
    gathered over data x fsdp twice, for the forward and for the backward (this width and head
    count are ones where XLA, left to itself, gathers some a third time)."""
    model = dataclasses.replace(MODEL, hidden_size=64, num_heads=8, intermediate_size=256,
                                remat_policy="full")
    mesh = mesh_from_flag("data:2,fsdp:2,tensor:2")
    compiled = compile_train_step(model, TRAIN, mesh, rules_for("data+fsdp"))
    per_layer = [c for c in coll.collectives(compiled.as_text(), mesh.size)
                 if c.executions == model.num_layers]
    tokens = TRAIN.global_batch * TRAIN.seq_len // (2 * 2)  # per device
    activation = tokens * model.hidden_size * 4  # f32
    tensor_reduced = [b for c in per_layer if c.kind == "all-reduce" and c.group_size == 2
                      for b in c.element_bytes if b >= activation]
    assert tensor_reduced == [activation] * 3, per_layer
    kernels = [p.size // model.num_layers // 2 * 4 for path, p in  # each split over tensor
               jax.tree_util.tree_leaves_with_path(shardings_lib.abstract_params(model))
               if "layers" in jax.tree_util.keystr(path) and path[-1].key == "kernel"]
    gathered = [b for c in per_layer if c.kind == "all-gather" and c.group_size == 4
                for b in c.element_bytes]
    assert len(kernels) == 4 and sorted(gathered) == sorted(kernels * 2), per_layer


def test_checkpoint_with_old_shardings_restores_onto_new(tmp_path):
    """A state saved while 1-D params were split over fsdp (the rules before `VECTOR`) restores
    onto today's shardings with the same values."""
    mesh = mesh_from_flag("2x4")
    rules = rules_for("fsdp")
    boxed = shardings_lib.abstract_params(MODEL, boxed=True)
    old_params = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    tx = make_optimizer(TRAIN)
    opt_abstract = jax.eval_shape(tx.init, shardings_lib.abstract_params(MODEL))
    old = state_shardings(MODEL, TRAIN, mesh, rules).replace(
        params=old_params,  # Adam's moments followed their params
        opt_state=optax.tree_map_params(tx, lambda _, s: s, opt_abstract, old_params,
                                        transform_non_params=lambda _: replicated(mesh)))
    assert "fsdp" in jax.tree.leaves(tuple(old_params["final_layer_norm"]["scale"].spec))
    rng = np.random.default_rng(0)
    abstract = ckpt.abstract_train_state(MODEL, TRAIN, mesh, rules)
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                          if np.issubdtype(a.dtype, np.floating)
                          else np.zeros(a.shape, a.dtype), abstract)
    saved = jax.tree.map(jax.device_put, values, old)
    with ckpt.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, saved)
        ck.wait()
        restored = ck.restore(1, abstract).state
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), values)
    scale = restored.params["final_layer_norm"]["scale"]
    assert all(axis is None for axis in scale.sharding.spec)
    assert math.prod(scale.addressable_shards[0].data.shape) == MODEL.hidden_size
