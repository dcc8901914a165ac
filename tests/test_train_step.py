"""The sharded train step: same losses on 1 device and on a 2x4 mesh, accumulation, skipping,
logits at the loss slots only."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.configs import ModelConfig, TrainConfig
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel.mesh import mesh_from_flag, make_mesh
from llmcxr_jax.train import state as state_lib
from llmcxr_jax.train.loss import summarize
from llmcxr_jax.train.step import _micro_sums_fn, make_eval_step, make_train_step

MODEL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=128, max_position_embeddings=64)
TRAIN = TrainConfig(learning_rate=1e-2, warmup_steps=1, global_batch=8, seq_len=16)
NUM_TASKS = 4


def make_batch(seed: int, batch: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Two packed segments per row, targets within segment, loss on the second half of each."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, MODEL.vocab_size, (batch, length)).astype(np.int32)
    split = length // 2
    segment_ids = np.concatenate([np.full((batch, split), 1), np.full((batch, length - split), 2)],
                                 axis=1).astype(np.int32)
    segment_ids[:, -2:] = 0  # padding at the end
    positions = np.concatenate([np.arange(split), np.arange(length - split)])[None].repeat(batch, 0)
    targets = np.roll(inputs, -1, axis=1)
    same_next = (np.roll(segment_ids, -1, axis=1) == segment_ids) & (segment_ids != 0)
    same_next[:, -1] = False
    loss_mask = (same_next & (positions >= 3)).astype(np.float32)
    task_ids = rng.integers(0, NUM_TASKS, (batch, 1)).repeat(length, 1).astype(np.int32)
    return dict(inputs=inputs, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
                positions=positions.astype(np.int32), task_ids=task_ids)


_MESHES = {"1": lambda: make_mesh({"data": 1}, jax.devices()[:1]),
           "2x4": lambda: mesh_from_flag("2x4"),
           "tp": lambda: mesh_from_flag("data:2,fsdp:2,tensor:2")}


@functools.lru_cache(maxsize=None)
def setup(mesh_name: str, accum: int = 1):
    """(mesh, train config, jitted step), built once per module: compiles are the slow part."""
    mesh = _MESHES[mesh_name]()
    train_cfg = dataclasses.replace(TRAIN, grad_accum_steps=accum)
    return mesh, train_cfg, make_train_step(MODEL, train_cfg, mesh, NUM_TASKS)


@functools.lru_cache(maxsize=None)
def run_steps(mesh_name: str, accum: int = 1, n: int = 3):
    mesh, train_cfg, step = setup(mesh_name, accum)
    state = state_lib.init_state(MODEL, train_cfg, mesh)
    losses = []
    for _ in range(n):  # the same batch each step, so the loss must fall
        state, metrics = step(state, make_batch(0))
        losses.append(float(metrics["loss"]))
    return state, losses, metrics


def test_losses_on_one_device_equal_losses_on_2x4_mesh():
    _, losses_1, _ = run_steps("1")
    state_8, losses_8, _ = run_steps("2x4")
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
    assert losses_1[-1] < losses_1[0]  # it learns the fixed-seed batches
    # Params really are sharded: the embedding's embed axis over fsdp (4 ways).
    emb = state_8.params["embed_in"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (256, 16)


def test_tensor_parallel_mesh_matches_too():
    _, losses_1, _ = run_steps("1")
    _, losses_t, _ = run_steps("tp")
    np.testing.assert_allclose(losses_t, losses_1, rtol=2e-5)


def test_gradient_accumulation_equals_one_big_batch():
    _, plain, _ = run_steps("2x4")
    _, accum, _ = run_steps("2x4", accum=2)
    np.testing.assert_allclose(accum, plain, rtol=2e-5)


def test_per_task_metrics_add_up():
    _, _, metrics = run_steps("2x4")
    assert float(jnp.sum(metrics["task_tokens"])) == float(metrics["tokens"])
    seen = metrics["task_tokens"] > 0
    weighted = jnp.sum(jnp.where(seen, metrics["task_loss"] * metrics["task_tokens"], 0.0))
    np.testing.assert_allclose(float(weighted / metrics["tokens"]), float(metrics["loss"]),
                               rtol=1e-5)


def test_non_finite_step_is_skipped_and_counted():
    mesh, train_cfg, step = setup("2x4")
    state = state_lib.init_state(MODEL, train_cfg, mesh)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    bad = make_batch(0)
    # Poison one weight with inf: the loss becomes non-finite.
    params = state.params
    params["final_layer_norm"]["scale"] = params["final_layer_norm"]["scale"].at[0].set(jnp.inf)
    poisoned = jax.tree_util.tree_map(np.asarray, params)
    state = state.replace(params=params)
    state, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(state.skipped_steps) == 1 and int(state.step) == 1
    after = jax.tree_util.tree_map(np.asarray, state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, poisoned)
    assert not np.array_equal(before["final_layer_norm"]["scale"], poisoned["final_layer_norm"]["scale"])


def test_eval_step_matches_train_loss_before_update():
    mesh, train_cfg, step = setup("2x4")
    state = state_lib.init_state(MODEL, train_cfg, mesh)
    ev = summarize(make_eval_step(MODEL, mesh, NUM_TASKS)(state.params, make_batch(0)))
    _, metrics = step(state, make_batch(0))
    np.testing.assert_allclose(float(ev["loss"]), float(metrics["loss"]), rtol=1e-6)


def test_logits_at_the_loss_slots_only_give_the_same_loss_and_gradients():
    # Rows as the pipeline packs them for loss_positions=k: at most k loss tokens each, here
    # scattered over both segments (make_batch's mask, thinned at random per row).
    k = 6
    batch = make_batch(5)
    rng = np.random.default_rng(1)
    for row in batch["loss_mask"]:
        on = np.flatnonzero(row)
        row[rng.permutation(on)[:max(len(on) - int(rng.integers(1, k + 1)), 0)]] = 0.0
    counts = (batch["loss_mask"] > 0).sum(axis=1)
    assert counts.max() == k and counts.min() >= 1
    mesh = mesh_from_flag("2x4")
    metrics = {}
    for positions in (0, k):
        train_cfg = dataclasses.replace(TRAIN, loss_positions=positions)
        state = state_lib.init_state(MODEL, train_cfg, mesh)
        _, m = make_train_step(MODEL, train_cfg, mesh, NUM_TASKS)(state, batch)
        metrics[positions] = jax.device_get(m)
    for key in ("loss", "accuracy", "tokens", "grad_norm", "task_loss"):
        np.testing.assert_allclose(metrics[k][key], metrics[0][key], rtol=1e-5)
    # The gradients themselves, parameter by parameter (one Adam step would hide them: its
    # first update is about lr * sign(g), which rounding flips where g is near 0).
    params = state_lib.init_state(MODEL, TRAIN, make_mesh({"data": 1}, jax.devices()[:1])).params
    model = GPTNeoX(MODEL)
    grads = {n: jax.jit(jax.grad(_micro_sums_fn(model, NUM_TASKS, n), has_aux=True))(
        params, batch)[0] for n in (0, k)}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), grads[k], grads[0])
