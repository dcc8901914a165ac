"""VQ-GAN GAN training: train state, one jitted data-parallel step, code usage, the loop.

The step follows taming's `VQModel.training_step` + `VQLPIPSWithDiscriminator`:

    nll    = pixel_weight * mean|x - xrec| + perceptual_weight * LPIPS(x, xrec)
             + clinical_weight * mean (f(x) - f(xrec))^2                  (paper; if a net is given)
    g_loss = -mean D(xrec)
    d_weight = disc_weight * clamp(||dnll/dW_last|| / (||dg_loss/dW_last|| + 1e-4), 0, 1e4)  (no grad)
    loss_G = nll + d_weight * adopt_weight(disc_factor, step, disc_start) * g_loss
             + codebook_weight * quantizer loss
    loss_D = adopt_weight(...) * hinge(D(x), D(sg(xrec)))

Gradients w.r.t. the decoder's last conv kernel W_last inside one jitted step: the generator's
forward is run once under `jax.vjp` (outputs xrec and the quantizer loss). The loss heads are
differentiated w.r.t. xrec only (`value_and_grad` of nll(xrec) and g_loss(xrec)), giving the
cotangents gx_nll and gx_g. Pulling each back through the generator's VJP gives the exact
gradients of nll and g_loss w.r.t. every parameter; we keep only W_last's entry, and XLA removes
the rest of those two backward passes as dead code (W_last's gradient needs only the activation
feeding the last conv and the cotangent). Because d_weight is a constant for differentiation, the
total generator gradient is one more pull-back of gx_nll + d_weight * factor * gx_g (plus the
codebook-loss cotangent): three cheap pull-backs of a single forward, no recomputation.

Differences from taming, all deliberate: the discriminator step reuses this step's reconstruction
(Lightning recomputes it after the generator update); LPIPS heads run without dropout (taming's
LPIPS is switched back to train mode by Lightning); BatchNorm statistics are over the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmcxr_jax import configs
from llmcxr_jax.configs import VQGANConfig, VQGANTrainConfig
from llmcxr_jax.data.images import labeled_columns
from llmcxr_jax.io_utils import atomic_write, atomic_write_text
from llmcxr_jax.parallel.mesh import MeshError, mesh_from_flag
from llmcxr_jax.train import curves
from llmcxr_jax.train.metrics import MetricsWriter
from llmcxr_jax.vqgan import discriminator as disc_lib
from llmcxr_jax.vqgan import losses
from llmcxr_jax.vqgan.model import VQGAN, abstract_params, init_params, last_layer_kernel

DATA_AXIS = "data"
CODEBOOK_PATH = ("quantize", "embedding")
RECONSTRUCTIONS_FILE = "reconstructions.png"


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def data_axis_size(mesh_data: int, batch_size: int, n_devices: int, prefix: str = "") -> int:
    """Devices on the VQ-GAN's data axis: `mesh_data`, or with -1 the most devices that divide
    `batch_size` (gcd(batch, devices): all of them when the batch splits evenly). A count that
    cannot work raises `MeshError` naming the `--set {prefix}...` values that would."""
    if mesh_data == -1:
        return math.gcd(batch_size, n_devices)
    if mesh_data < 1:
        raise MeshError(f"{prefix}mesh_data={mesh_data}: expected a device count >= 1, or -1 "
                        f"(the most devices that divide {prefix}batch_size)")
    if mesh_data > n_devices:
        raise MeshError(f"{prefix}mesh_data={mesh_data} needs {mesh_data} devices but {n_devices} "
                        f"are available: --set {prefix}mesh_data=-1 uses "
                        f"{math.gcd(batch_size, n_devices)} of them")
    if batch_size % mesh_data:
        raise MeshError(f"{prefix}batch_size={batch_size} is not divisible by the {mesh_data} "
                        f"devices of {prefix}mesh_data={mesh_data}: --set {prefix}mesh_data="
                        f"{math.gcd(batch_size, mesh_data)} (or -1) or --set {prefix}batch_size="
                        f"{-(-batch_size // mesh_data) * mesh_data} works")
    return mesh_data


def data_mesh(n_data: int = 1) -> Mesh:
    """The project's mesh (`parallel.mesh`, Auto axes) with `data` over the first `n_data`
    devices (-1: all); `fsdp` and `tensor` have size 1."""
    devices = jax.devices() if n_data == -1 else jax.devices()[:max(n_data, 0)]
    try:
        return mesh_from_flag(f"data:{n_data}", devices)
    except MeshError as err:
        raise MeshError(f"mesh_data={n_data}: {err}") from None


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class VQGANTrainState:
    """Everything a resumed run needs; a pytree of arrays (saved whole by orbax)."""

    step: jax.Array  # int32 scalar: completed steps
    g_params: Any  # VQ-GAN params (plain, unboxed)
    d_params: Any
    d_batch_stats: Any
    g_opt_state: Any
    d_opt_state: Any
    rng: jax.Array  # raw uint32[2] run key; per-step keys are fold_in(rng, step)
    code_last_used: jax.Array  # int32 [n_embed]: the last step at which each code was picked


def _replace_in(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _replace_in(tree[path[0]], path[1:], value)}


def _get_in(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class FrozenNets:
    """The frozen loss networks; their params enter the step as an argument (`aux`)."""

    perceptual: losses.PerceptualNet | None = None
    clinical: losses.FeatureNet | None = None

    def params(self) -> dict[str, Any]:
        return {"perceptual": self.perceptual.params if self.perceptual else {},
                "clinical": self.clinical.params if self.clinical else {}}


class VQGANTrainer:
    """Builds the models, optimizers, shardings and the jitted step for one configuration."""

    def __init__(self, vq_config: VQGANConfig, config: VQGANTrainConfig,
                 nets: FrozenNets = FrozenNets(), mesh: Mesh | None = None,
                 compiler_options: Mapping[str, Any] | None = None):
        """`compiler_options` go to XLA for the step (tests use
        {"xla_backend_optimization_level": 0}: half the CPU compile time, slower steps)."""
        self.vq_config = vq_config
        self.compiler_options = dict(compiler_options or {})
        self.config = config
        self.nets = nets
        self.mesh = mesh if mesh is not None else data_mesh(data_axis_size(
            config.mesh_data, config.batch_size, jax.device_count()))
        n_data = self.mesh.shape[DATA_AXIS]
        if config.batch_size % n_data:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {n_data} "
                             f"devices of the data axis")
        self.model = VQGAN(vq_config)
        self.disc = disc_lib.NLayerDiscriminator(ndf=config.disc_ndf, n_layers=config.disc_layers,
                                                 dtype=vq_config.dtype)
        self.d_loss_fn = disc_lib.D_LOSSES[config.disc_loss]
        self.g_tx = optax.adam(config.lr, b1=config.adam_b1, b2=config.adam_b2)
        self.d_tx = optax.adam(config.lr, b1=config.adam_b1, b2=config.adam_b2)
        self.perceptual_weight = config.perceptual_weight if nets.perceptual else 0.0
        self.clinical_weight = config.clinical_weight if nets.clinical else 0.0
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self._steps: dict[bool, Callable] = {}
        self._reconstruct: Callable | None = None

    # ---- state ----

    def _abstract(self) -> VQGANTrainState:
        g = nn.meta.unbox(abstract_params(self.vq_config))
        res, ch = self.vq_config.resolution, self.vq_config.out_ch
        x = jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32)
        d = jax.eval_shape(lambda k, x: self.disc.init(k, x, train=False), jax.random.PRNGKey(0), x)
        i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        return VQGANTrainState(
            step=i32(()), g_params=g, d_params=d["params"], d_batch_stats=d["batch_stats"],
            g_opt_state=jax.eval_shape(self.g_tx.init, g),
            d_opt_state=jax.eval_shape(self.d_tx.init, d["params"]),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
            code_last_used=i32((self.vq_config.n_embed,)))

    def abstract_state(self) -> VQGANTrainState:
        """Shapes, dtypes and (replicated) shardings of the state, nothing allocated."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                            self._abstract())

    def state_shardings(self) -> Any:
        return jax.tree.map(lambda _: self.replicated, self._abstract())

    def init_state(self, seed: int | None = None) -> VQGANTrainState:
        """A fresh state: weights drawn on the host (taming's inits; no threefry compile), then
        placed replicated on the mesh; optimizer states built in their shardings."""
        seed = self.config.seed if seed is None else seed
        res, ch = self.vq_config.resolution, self.vq_config.out_ch
        g = jax.device_put(nn.meta.unbox(init_params(self.vq_config, seed)), self.replicated)
        d = jax.device_put(disc_lib.init_discriminator(self.disc, res, ch, seed + 1), self.replicated)
        rep = lambda f: jax.jit(f, out_shardings=self.replicated)  # noqa: E731
        return VQGANTrainState(
            step=jax.device_put(np.zeros((), np.int32), self.replicated),
            g_params=g, d_params=d["params"], d_batch_stats=d["batch_stats"],
            g_opt_state=rep(self.g_tx.init)(g), d_opt_state=rep(self.d_tx.init)(d["params"]),
            rng=jax.device_put(np.array([0, seed], np.uint32), self.replicated),
            code_last_used=jax.device_put(np.zeros((self.vq_config.n_embed,), np.int32),
                                          self.replicated))

    def aux_params(self) -> Any:
        """The frozen nets' params, replicated on the mesh."""
        return jax.device_put(self.nets.params(), self.replicated)

    def shard_batch(self, images: np.ndarray) -> jax.Array:
        """A host batch [B, H, W, C] -> a global array sharded over the data axis."""
        images = np.asarray(images, np.float32)
        if images.shape[0] != self.config.batch_size:
            raise ValueError(f"batch has {images.shape[0]} images, config batch_size is "
                             f"{self.config.batch_size}")
        return jax.device_put(images, self.batch_sharding)

    # ---- the step ----

    def nll_terms(self, aux: Any, x: jax.Array, xrec: jax.Array) -> tuple[jax.Array, dict]:
        """Reconstruction-side loss (taming's nll_loss plus the clinical term) and its parts."""
        cfg = self.config
        rec = losses.l1_loss(x, xrec)
        nll = cfg.pixel_weight * rec
        parts = {"rec_loss": rec}
        if self.nets.perceptual is not None:
            p = losses.perceptual_loss(self.nets.perceptual, aux["perceptual"], x, xrec)
            nll = nll + self.perceptual_weight * p
            parts["perceptual_loss"] = p
        if self.nets.clinical is not None:
            c = losses.clinical_feature_loss(self.nets.clinical, aux["clinical"], x, xrec)
            nll = nll + self.clinical_weight * c
            parts["clinical_loss"] = c
        return nll, parts

    def train_step(self, state: VQGANTrainState, x: jax.Array, aux: Any, gan: bool = True
                   ) -> tuple[VQGANTrainState, dict[str, jax.Array]]:
        """One generator and one discriminator update on the global batch `x` (NHWC, [-1, 1]).

        `gan=False` is the step before `disc_start`, where taming's adversarial factor is 0: the
        same generator update without any discriminator work (its params, optimizer and
        BatchNorm statistics are left as they are; taming would still run it and discard it).
        """
        cfg = self.config
        step = state.step
        # Per-step keys are folded from the fixed run key only where randomness is used:
        # threefry kernels are slow to compile on CPU, and most configs need none.
        step_key = lambda salt: jax.random.fold_in(jax.random.fold_in(state.rng, step), salt)  # noqa: E731
        rngs = {"dropout": step_key(0)} if self.vq_config.dropout > 0 else {}
        x = x.astype(jnp.float32)

        def generator(g_params):
            xrec, q = self.model.apply({"params": g_params}, x, train=True, rngs=rngs)
            return (xrec, q.loss), q

        (xrec, q_loss), pull_back, q = jax.vjp(generator, state.g_params, has_aux=True)

        (nll, parts), gx_nll = jax.value_and_grad(
            lambda xr: self.nll_terms(aux, x, xr), has_aux=True)(xrec)
        if not gan:
            return self._reconstruction_only_update(state, nll, gx_nll, parts, q_loss, q,
                                                    pull_back)

        def g_loss_fn(xr):
            logits, upd = self.disc.apply({"params": state.d_params, "batch_stats": state.d_batch_stats},
                                          xr, train=True, mutable=["batch_stats"])
            return disc_lib.generator_adversarial_loss(logits), upd["batch_stats"]

        (g_loss, batch_stats), gx_g = jax.value_and_grad(g_loss_fn, has_aux=True)(xrec)

        no_q = jnp.zeros_like(q_loss)
        nll_last = last_layer_kernel(pull_back((gx_nll, no_q))[0])
        g_last = last_layer_kernel(pull_back((gx_g, no_q))[0])
        d_weight = losses.adaptive_weight(nll_last, g_last, cfg.disc_weight)
        factor = disc_lib.adopt_weight(cfg.disc_factor, step, cfg.disc_start)
        g_total = nll + d_weight * factor * g_loss + cfg.codebook_weight * q_loss
        g_grads = pull_back((gx_nll + (d_weight * factor) * gx_g,
                             jnp.asarray(cfg.codebook_weight, q_loss.dtype)))[0]

        xrec_sg = jax.lax.stop_gradient(xrec)

        def d_loss_fn(d_params):
            variables = {"params": d_params, "batch_stats": batch_stats}
            real, upd = self.disc.apply(variables, x, train=True, mutable=["batch_stats"])
            variables = {"params": d_params, "batch_stats": upd["batch_stats"]}
            fake, upd = self.disc.apply(variables, xrec_sg, train=True, mutable=["batch_stats"])
            d_loss = factor * self.d_loss_fn(real, fake)
            return d_loss, (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

        (d_loss, (batch_stats, logits_real, logits_fake)), d_grads = jax.value_and_grad(
            d_loss_fn, has_aux=True)(state.d_params)

        g_updates, g_opt_state = self.g_tx.update(g_grads, state.g_opt_state, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        d_updates, d_opt_state = self.d_tx.update(d_grads, state.d_opt_state, state.d_params)
        d_params = optax.apply_updates(state.d_params, d_updates)

        g_params, last_used, dead, n_restarted = self._code_usage(state, g_params, q)
        new_state = VQGANTrainState(
            step=step + 1, g_params=g_params, d_params=d_params, d_batch_stats=batch_stats,
            g_opt_state=g_opt_state, d_opt_state=d_opt_state, rng=state.rng,
            code_last_used=last_used)
        return new_state, _metrics(
            g_total=g_total, nll=nll, g_loss=g_loss, d_loss=d_loss, d_weight=d_weight,
            factor=factor, q_loss=q_loss, logits_real=logits_real, logits_fake=logits_fake, q=q,
            dead=dead, n_restarted=n_restarted, parts=parts)

    def _reconstruction_only_update(self, state: VQGANTrainState, nll: jax.Array,
                                    gx_nll: jax.Array, parts: dict, q_loss: jax.Array, q: Any,
                                    pull_back: Callable
                                    ) -> tuple[VQGANTrainState, dict[str, jax.Array]]:
        """The generator update of a step before `disc_start` (no discriminator anywhere)."""
        cfg = self.config
        g_total = nll + cfg.codebook_weight * q_loss
        g_grads = pull_back((gx_nll, jnp.asarray(cfg.codebook_weight, q_loss.dtype)))[0]
        g_updates, g_opt_state = self.g_tx.update(g_grads, state.g_opt_state, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        g_params, last_used, dead, n_restarted = self._code_usage(state, g_params, q)
        new_state = state.replace(step=state.step + 1, g_params=g_params,
                                  g_opt_state=g_opt_state, code_last_used=last_used)
        zero = jnp.zeros((), jnp.float32)
        return new_state, _metrics(
            g_total=g_total, nll=nll, g_loss=zero, d_loss=zero, d_weight=zero, factor=zero,
            q_loss=q_loss, logits_real=zero, logits_fake=zero, q=q, dead=dead,
            n_restarted=n_restarted, parts=parts)

    def _code_usage(self, state: VQGANTrainState, g_params: Any, q: Any
                    ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
        """Code usage over a window of steps, and the optional dead-code restart."""
        cfg = self.config
        step = state.step
        last_used = jnp.where(q.code_counts > 0, step, state.code_last_used)
        dead = (step - last_used) >= cfg.dead_code_window
        n_restarted = jnp.zeros((), jnp.int32)
        if cfg.dead_code_restart:
            due = ((step + 1) % cfg.dead_code_restart_every) == 0
            restart = dead & due
            z = jax.lax.stop_gradient(q.z).reshape(-1, q.z.shape[-1])
            key = jax.random.fold_in(jax.random.fold_in(state.rng, step), 1)
            pick = jax.random.randint(key, (self.vq_config.n_embed,), 0, z.shape[0])
            codebook = _get_in(g_params, CODEBOOK_PATH)
            codebook = jnp.where(restart[:, None], z[pick].astype(codebook.dtype), codebook)
            g_params = _replace_in(g_params, CODEBOOK_PATH, codebook)
            last_used = jnp.where(restart, step, last_used)
            n_restarted = jnp.sum(restart).astype(jnp.int32)
        return g_params, last_used, dead, n_restarted

    def reconstruct(self, g_params: Any, images: np.ndarray) -> np.ndarray:
        """Eval-mode reconstructions of a few host images [N, H, W, C] (replicated: N need not
        split over the data axis), fetched to the host."""
        if self._reconstruct is None:
            self._reconstruct = jax.jit(
                lambda g, x: self.model.apply({"params": g}, x, train=False)[0],
                in_shardings=(self.replicated, self.replicated), out_shardings=self.replicated)
        return np.asarray(jax.device_get(self._reconstruct(g_params, np.asarray(images,
                                                                                np.float32))))

    def jitted_step(self, gan: bool = True) -> Callable:
        """`train_step` jitted with explicit shardings; the state argument is donated.
        `gan=False`: the discriminator-free step used before `disc_start` (compiled on first use,
        so a run that never reaches `disc_start` compiles only that one)."""
        if gan not in self._steps:
            state_sh = self.state_shardings()
            aux_sh = jax.tree.map(lambda _: self.replicated, self.nets.params())
            self._steps[gan] = jax.jit(
                functools.partial(self.train_step, gan=gan),
                in_shardings=(state_sh, self.batch_sharding, aux_sh),
                out_shardings=(state_sh, self.replicated), donate_argnums=(0,),
                compiler_options=self.compiler_options or None)
        return self._steps[gan]


def _metrics(*, g_total, nll, g_loss, d_loss, d_weight, factor, q_loss, logits_real,
             logits_fake, q, dead, n_restarted, parts) -> dict[str, jax.Array]:
    """The step's logged scalars, fp32."""
    metrics = {
        "g_total_loss": g_total, "nll_loss": nll, "g_loss": g_loss, "d_loss": d_loss,
        "d_weight": d_weight, "disc_factor": factor, "codebook_loss": q_loss,
        "logits_real": logits_real, "logits_fake": logits_fake,
        "perplexity": q.perplexity,
        "codes_used_batch_frac": jnp.mean(q.code_counts > 0),
        "dead_code_frac": jnp.mean(dead), "codes_restarted": n_restarted,
        **parts,
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints, metrics, the loop
# --------------------------------------------------------------------------------------------------


def _checkpoint_manager(workdir: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))


def _checkpoint_args(state_arg: Any, data_iter: Any, save: bool):
    import orbax.checkpoint as ocp

    items = {"state": ocp.args.StandardSave(state_arg) if save else ocp.args.StandardRestore(state_arg)}
    if data_iter is not None and hasattr(data_iter, "get_state"):
        import grain

        items["data"] = (grain.checkpoint.CheckpointSave(data_iter) if save
                         else grain.checkpoint.CheckpointRestore(data_iter))
    return ocp.args.Composite(**items)


def save_checkpoint(manager, state: VQGANTrainState, data_iter: Any = None) -> int:
    step = int(jax.device_get(state.step))
    manager.save(step, args=_checkpoint_args(state, data_iter, save=True), force=True)
    manager.wait_until_finished()
    return step


def restore_checkpoint(manager, trainer: VQGANTrainer, data_iter: Any = None
                       ) -> VQGANTrainState | None:
    """The latest checkpoint (state and, when saved, the data iterator position), or None."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=_checkpoint_args(trainer.abstract_state(), data_iter,
                                                           save=False))
    return restored["state"]


def write_run_config(workdir: pathlib.Path, vq_config: VQGANConfig, config: VQGANTrainConfig,
                     extra: Mapping[str, Any] | None = None) -> None:
    """WORKDIR/config.json: the resolved configs (plus run facts) a resume needs."""
    data = {"vqgan": configs.to_dict(vq_config), "train": configs.to_dict(config), **(extra or {})}
    atomic_write_text(workdir / "config.json", json.dumps(data, indent=2) + "\n")


def read_run_config(workdir: pathlib.Path) -> tuple[VQGANConfig, VQGANTrainConfig] | None:
    path = workdir / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return (configs.from_dict(VQGANConfig, data["vqgan"]),
            configs.from_dict(VQGANTrainConfig, data["train"]))


def apply_overrides(vq_config: VQGANConfig, config: VQGANTrainConfig, sets: Iterable[str]
                    ) -> tuple[VQGANConfig, VQGANTrainConfig]:
    """`key=value` overrides (`configs.with_override`): train fields by name, model fields as
    `vqgan.<field>`."""
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = key.strip(), raw.strip()
        if key.startswith("vqgan."):
            vq_config = configs.with_override(vq_config, key[len("vqgan."):], raw, key)
        else:
            config = configs.with_override(config, key, raw, key)
    return vq_config, config


def _step_fields(config: VQGANTrainConfig) -> VQGANTrainConfig:
    """The config with the fields that do not enter the jitted step neutralised."""
    return dataclasses.replace(config, steps=0, log_every=1, checkpoint_every=1,
                               keep_checkpoints=1, read_threads=0)


def write_pictures(trainer: VQGANTrainer, state: VQGANTrainState, workdir: pathlib.Path,
                   preview: np.ndarray | None) -> None:
    """WORKDIR/reconstructions.png (each `preview` image | its reconstruction; skipped without
    preview images) and WORKDIR/curves.png (the losses so far). Every process reconstructs (a
    global program); process 0 writes."""
    recon = trainer.reconstruct(state.g_params, preview) if preview is not None else None
    if jax.process_index() != 0:
        return
    if recon is not None:
        sheet = labeled_columns([("original", preview), ("reconstruction", recon)])
        atomic_write(workdir / RECONSTRUCTIONS_FILE, lambda tmp: sheet.save(tmp, format="PNG"))
    curves.write_vqgan_curves(workdir)


def train(vq_config: VQGANConfig, config: VQGANTrainConfig, workdir: str | pathlib.Path,
          batches: Iterable[np.ndarray], *, nets: FrozenNets = FrozenNets(),
          mesh: Mesh | None = None, data_iter: Any = None, progress: bool = True,
          log: Callable[[str], None] = print, extra_config: Mapping[str, Any] | None = None,
          trainer: VQGANTrainer | None = None,
          preview: np.ndarray | None = None,
          stop: Callable[[int], bool] | None = None) -> VQGANTrainState:
    """Train until `config.steps`, resuming from WORKDIR's latest checkpoint if there is one.

    `batches` yields host arrays [batch_size, H, W, 3] in [-1, 1]; `data_iter` (a grain iterator,
    usually the same object) is checkpointed with the state when given; `trainer` reuses an
    already compiled step for the same configs; `preview`: a few held-out images [N, H, W, 3]
    whose reconstructions are drawn at every checkpoint and at the end; `stop(step)`, asked
    after each step (a `PreemptionWatcher.should_stop`), ends training early: a checkpoint of
    that step is saved and the state returned before `config.steps` (no final model), so a rerun
    resumes exactly there. Writes WORKDIR/config.json, metrics.jsonl, tensorboard/, curves.png
    and reconstructions.png (process 0 only), checkpoints/ and the final model to WORKDIR/vqgan
    (`save_vqgan`).
    """
    from llmcxr_jax.vqgan.checkpoint import save_vqgan

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_run_config(workdir, vq_config, config, {
        "perceptual": nets.perceptual.name if nets.perceptual else None,
        "clinical": nets.clinical.name if nets.clinical else None,
        "effective_lr": config.lr, **(extra_config or {})})
    if trainer is None:
        trainer = VQGANTrainer(vq_config, config, nets, mesh)
    elif (trainer.vq_config, _step_fields(trainer.config)) != (vq_config, _step_fields(config)):
        raise ValueError("train(): the given trainer was built for other configs")
    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    state = restore_checkpoint(manager, trainer, data_iter)
    if state is None:
        state = trainer.init_state()
        log(f"vqgan train: fresh start, {config.steps} steps, global batch {config.batch_size}, "
            f"lr {config.lr:.3g}, mesh {dict(trainer.mesh.shape)}")
    else:
        log(f"vqgan train: resumed at step {int(state.step)} from {manager.directory}")
    aux = trainer.aux_params()
    writer = MetricsWriter(workdir)
    start = int(jax.device_get(state.step))
    it: Iterator[np.ndarray] = iter(batches)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)
    t0, images_seen = time.perf_counter(), 0
    try:
        for step in range(start, config.steps):
            batch = trainer.shard_batch(next(it))
            state, metrics = trainer.jitted_step(gan=step >= config.disc_start)(state, batch, aux)
            jax.block_until_ready(metrics)  # the bar and images/s show finished steps, not queued
            images_seen += config.batch_size
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["images_per_s"] = images_seen / max(time.perf_counter() - t0, 1e-9)
                writer.write(done, m)
                if bar is not None:
                    bar.set_postfix(rec=f"{m['rec_loss']:.4f}", g=f"{m['g_loss']:.3f}",
                                    d=f"{m['d_loss']:.3f}", ppl=f"{m['perplexity']:.1f}",
                                    dead=f"{m['dead_code_frac']:.2f}")
                else:
                    log(f"step {done}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
            if done % config.checkpoint_every == 0 and done != config.steps:
                save_checkpoint(manager, state, data_iter)
                write_pictures(trainer, state, workdir, preview)
            if bar is not None:
                bar.update(1)
            if stop is not None and done < config.steps and stop(done):
                if manager.latest_step() != done:
                    save_checkpoint(manager, state, data_iter)
                log(f"vqgan train: stopped at step {done} of {config.steps}; checkpoint saved, "
                    f"a rerun resumes from it")
                manager.close()
                return state
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    if int(jax.device_get(state.step)) > start or manager.latest_step() is None:
        save_checkpoint(manager, state, data_iter)
    save_vqgan(workdir / "vqgan", vq_config, jax.device_get(state.g_params))
    write_pictures(trainer, state, workdir, preview)
    log(f"vqgan train: done at step {int(state.step)}; model in {workdir / 'vqgan'}")
    manager.close()
    return state
