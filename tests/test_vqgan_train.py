"""VQ-GAN training: discriminator and losses vs taming / torch, the adaptive weight vs separate
jax.grad calls, loss decrease, dead-code restart, and exact checkpoint resume (LPIPS:
tests/test_lpips.py).

One trainer (test-tiny VQ-GAN, 32 px, batch 2) is compiled once for the module: the step's
compile dominates the runtime on CPU.
"""

import dataclasses
import functools
import json
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from llmcxr_jax import configs
from llmcxr_jax.vqgan import discriminator as disc_lib
from llmcxr_jax.vqgan import losses, train
from llmcxr_jax.vqgan.model import LAST_LAYER_KERNEL_PATH, last_layer_kernel
from vqgan_test_files import smooth_image

BATCH = 2


def _to_torch_disc(flax_vars, tdisc):
    """Copy our discriminator's variables into taming's NLayerDiscriminator (n_layers=3)."""
    seq = tdisc.main
    convs = {"conv_0": 0, "conv_1": 2, "conv_2": 5, "conv_3": 8, "conv_4": 11}
    norms = {"norm_1": 3, "norm_2": 6, "norm_3": 9}
    p, s = flax_vars["params"], flax_vars["batch_stats"]
    with torch.no_grad():
        for name, i in convs.items():
            seq[i].weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).transpose(3, 2, 0, 1).copy()))
            if "bias" in p[name]:
                seq[i].bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
        for name, i in norms.items():
            seq[i].weight.copy_(torch.from_numpy(np.asarray(p[name]["scale"])))
            seq[i].bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
            seq[i].running_mean.copy_(torch.from_numpy(np.asarray(s[name]["mean"])))
            seq[i].running_var.copy_(torch.from_numpy(np.asarray(s[name]["var"])))


def test_discriminator_matches_taming():
    from taming.modules.discriminator.model import NLayerDiscriminator

    disc = disc_lib.NLayerDiscriminator(ndf=8, n_layers=3)
    variables = disc_lib.init_discriminator(disc, 32, seed=3)
    tdisc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3)
    _to_torch_disc(variables, tdisc)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    tdisc.train()
    ref = tdisc(xt).detach().numpy().transpose(0, 2, 3, 1)
    out, upd = disc.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (3, 2, 2, 1)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for name, i in {"norm_1": 3, "norm_2": 6, "norm_3": 9}.items():  # torch's running averages
        np.testing.assert_allclose(upd["batch_stats"][name]["mean"], tdisc.main[i].running_mean, atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"][name]["var"], tdisc.main[i].running_var, atol=1e-5)

    tdisc.eval()
    ref_eval = tdisc(xt).detach().numpy().transpose(0, 2, 3, 1)
    out_eval = disc.apply({**variables, "batch_stats": upd["batch_stats"]}, x, train=False)
    np.testing.assert_allclose(out_eval, ref_eval, atol=1e-5)


def test_gan_losses_match_taming(monkeypatch):
    # taming's vqperceptual imports its LPIPS, which needs torchvision (not installed here); the
    # loss functions we compare against do not use it.
    stub = types.ModuleType("taming.modules.losses.lpips")
    stub.LPIPS = object
    monkeypatch.setitem(sys.modules, "taming.modules.losses.lpips", stub)
    from taming.modules.losses.vqperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss

    rng = np.random.default_rng(1)
    real, fake = rng.normal(0.5, 1.5, (4, 3, 3, 1)), rng.normal(-0.2, 1.5, (4, 3, 3, 1))
    rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
    np.testing.assert_allclose(disc_lib.hinge_d_loss(real, fake), hinge_d_loss(rt, ft).item(), rtol=1e-6)
    np.testing.assert_allclose(disc_lib.vanilla_d_loss(real, fake), vanilla_d_loss(rt, ft).item(), rtol=1e-6)
    # Hand values: perfect separation gives 0, all-zero logits give 1.
    assert float(disc_lib.hinge_d_loss(jnp.full(3, 2.0), jnp.full(3, -2.0))) == 0.0
    assert float(disc_lib.hinge_d_loss(jnp.zeros(3), jnp.zeros(3))) == 1.0
    for step in (0, 9, 10, 11):
        assert float(disc_lib.adopt_weight(0.7, jnp.asarray(step), 10)) == pytest.approx(
            adopt_weight(0.7, step, threshold=10))


# --------------------------------------------------------------------------------------------------
# The jitted step (one compile for the module)
# --------------------------------------------------------------------------------------------------


def _taps(params, x):
    h1 = jax.nn.relu(jax.lax.conv_general_dilated(x, params["k1"], (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
    h2 = jax.nn.relu(jax.lax.conv_general_dilated(h1, params["k2"], (2, 2), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return [h1, h2]


def _features(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"])


def _nets():
    rng = np.random.default_rng(5)
    perceptual = losses.PerceptualNet(
        "taps", losses.tap_distance(_taps),
        {"k1": jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, 8)), jnp.float32),
         "k2": jnp.asarray(rng.normal(0, 0.3, (3, 3, 8, 8)), jnp.float32)})
    clinical = losses.FeatureNet("linear", _features,
                                 {"w": jnp.asarray(rng.normal(0, 0.02, (32 * 32 * 3, 6)), jnp.float32)})
    return train.FrozenNets(perceptual, clinical)


def _config(**kw):
    base = dict(vqgan="test-tiny", batch_size=BATCH, learning_rate=2e-3, disc_start=3, disc_ndf=16,
                perceptual_weight=0.5, clinical_weight=10.0, dead_code_restart=True,
                dead_code_window=2, dead_code_restart_every=4, log_every=1, checkpoint_every=2)
    return configs.VQGANTrainConfig(**{**base, **kw})


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # half the CPU compile time


@pytest.fixture(scope="module")
def trainer():
    return train.VQGANTrainer(configs.vqgan_preset("test-tiny"), _config(), _nets(),
                              compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def fixed_batch():
    imgs = np.stack([smooth_image(32, 32, seed=s) for s in range(BATCH)])
    return (imgs.astype(np.float32) / 127.5 - 1.0)


def test_adaptive_weight_matches_separate_grads(trainer, fixed_batch):
    cfg, model, disc = trainer.config, trainer.model, trainer.disc
    state = trainer.init_state()
    params = jax.device_get(state.g_params)
    d_vars = {"params": jax.device_get(state.d_params), "batch_stats": jax.device_get(state.d_batch_stats)}
    aux = trainer.nets.params()
    x = jnp.asarray(fixed_batch)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def last_conv_input(params, x):  # the activation entering decoder/conv_out, and xrec
        box = {}

        def grab(next_fun, args, kwargs, context):
            if (context.method_name == "__call__"
                    and tuple(context.module.scope.path) == LAST_LAYER_KERNEL_PATH[:-1]):
                box["h"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            xrec, _ = model.apply({"params": params}, x, train=True)
        return box["h"], xrec

    h, xrec0 = last_conv_input(params, x)
    bias = params["decoder"]["conv_out"]["bias"]

    def xrec_of(k):  # the decoder output as a function of its last layer's kernel
        return jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias

    def nll(k):  # taming's nll_loss (+ the clinical term)
        xrec = xrec_of(k)
        return (losses.l1_loss(x, xrec)
                + cfg.perceptual_weight * losses.perceptual_loss(trainer.nets.perceptual, aux["perceptual"], x, xrec)
                + cfg.clinical_weight * losses.clinical_feature_loss(trainer.nets.clinical, aux["clinical"], x, xrec))

    def g_loss(k):
        logits, _ = disc.apply(d_vars, xrec_of(k), train=True, mutable=["batch_stats"])
        return -jnp.mean(logits)

    @jax.jit
    def reference(k):  # torch.autograd.grad(nll_loss, last_layer), (g_loss, last_layer)
        return nll(k), g_loss(k), jax.grad(nll)(k), jax.grad(g_loss)(k)

    k0 = last_layer_kernel(params)
    np.testing.assert_allclose(xrec_of(k0), xrec0, atol=1e-5)  # it is the last layer
    nll_v, g_v, g_nll, g_g = reference(k0)
    expect = cfg.disc_weight * np.clip(np.linalg.norm(g_nll) / (np.linalg.norm(g_g) + 1e-4), 0, 1e4)

    _, m = trainer.jitted_step()(state, trainer.shard_batch(fixed_batch), trainer.aux_params())
    m = jax.device_get(m)
    np.testing.assert_allclose(m["nll_loss"], nll_v, rtol=1e-5)
    np.testing.assert_allclose(m["g_loss"], g_v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["d_weight"], expect, rtol=1e-4)
    assert 0 < expect < 1e4
    assert m["disc_factor"] == 0.0 and m["d_loss"] == 0.0  # step 0 < disc_start
    assert m["g_total_loss"] == pytest.approx(m["nll_loss"] + m["codebook_loss"], rel=1e-5)


def test_steps_reduce_loss_and_restart_dead_codes(trainer, fixed_batch):
    state = trainer.init_state()
    step, aux = trainer.jitted_step(), trainer.aux_params()
    history = []
    for i in range(8):
        before = np.asarray(state.g_params["quantize"]["embedding"])
        state, m = step(state, trainer.shard_batch(fixed_batch), aux)
        m = jax.device_get(m)
        history.append(m)
        after = np.asarray(state.g_params["quantize"]["embedding"])
        moved = np.abs(after - before).max(axis=1) > 0.05  # Adam moves a row by ~lr per step
        assert moved.sum() == m["codes_restarted"]
        if (i + 1) % 4:
            assert m["codes_restarted"] == 0
    rec = [h["rec_loss"] for h in history]
    assert rec[-1] < 0.7 * rec[0], rec
    assert [h["disc_factor"] for h in history[:4]] == [0, 0, 0, 1]
    assert all(h["d_loss"] > 0 for h in history[3:])
    # One fixed batch uses few of the 128 codes: the window marks the rest dead, and the restart
    # at step 4 re-seeded them from encoder outputs.
    assert history[3]["codes_restarted"] > 0 and history[2]["dead_code_frac"] > 0.3
    assert int(state.step) == 8


def test_step_before_disc_start_skips_the_discriminator(trainer, fixed_batch):
    """Before disc_start the adversarial factor is 0: the discriminator-free step makes the same
    generator update as the full step and leaves the discriminator's state untouched."""
    aux, batch = trainer.aux_params(), trainer.shard_batch(fixed_batch)
    full, m_full = trainer.jitted_step(gan=True)(trainer.init_state(), batch, aux)
    start = trainer.init_state()
    d_before = jax.device_get((start.d_params, start.d_batch_stats, start.d_opt_state))
    light, m_light = trainer.jitted_step(gan=False)(start, batch, aux)
    assert m_full["disc_factor"] == 0.0  # step 0 < disc_start = 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get((full.g_params, full.g_opt_state, full.code_last_used)),
                 jax.device_get((light.g_params, light.g_opt_state, light.code_last_used)))
    jax.tree.map(np.testing.assert_array_equal, d_before,
                 jax.device_get((light.d_params, light.d_batch_stats, light.d_opt_state)))
    for key in ("g_total_loss", "nll_loss", "rec_loss", "codebook_loss", "perplexity"):
        np.testing.assert_allclose(m_light[key], m_full[key], rtol=1e-5)
    assert m_light["d_loss"] == 0.0 and m_light["g_loss"] == 0.0 and int(light.step) == 1


def _image_dir(path, n=6):
    path.mkdir()
    for i in range(n):
        Image.fromarray(smooth_image(36, 40, seed=10 + i)).save(path / f"img{i}.png")
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return path


def test_checkpoint_resume_is_exact(trainer, tmp_path):
    from llmcxr_jax.data import images as images_lib
    from llmcxr_jax.data.images import list_images
    from llmcxr_jax.vqgan.checkpoint import load_vqgan
    from llmcxr_jax.vqgan.input_pipeline import image_batches

    paths = list_images(_image_dir(tmp_path / "imgs"))
    vq = trainer.vq_config

    def run(workdir, steps, preview=None, stop=None, log=lambda s: None):
        cfg = dataclasses.replace(trainer.config, steps=steps)
        it, bad = image_batches(paths, vq.resolution, BATCH, seed=cfg.seed)
        return train.train(vq, cfg, workdir, it, nets=trainer.nets, data_iter=it, progress=False,
                           log=log, trainer=trainer, preview=preview, stop=stop), bad

    preview = np.stack([smooth_image(32, 32, seed=40 + i) for i in range(3)]) / 127.5 - 1.0
    straight, bad = run(tmp_path / "a", 4, preview)
    assert list(bad.reasons) == [str(tmp_path / "imgs" / "broken.png")]
    # Pictures: held-out originals | their reconstructions by the final model, and the curves.
    sheet = np.asarray(Image.open(tmp_path / "a" / train.RECONSTRUCTIONS_FILE))
    cell = 256
    band = sheet.shape[0] - 3 * (cell + 4) + 4
    assert sheet.shape[1] == 2 * cell + 4 and band > 10
    recon = trainer.reconstruct(straight.g_params, preview)
    for column, images in enumerate((preview, recon)):
        np.testing.assert_array_equal(
            sheet[band:band + cell, column * (cell + 4):column * (cell + 4) + cell],
            np.kron(images_lib.to_uint8(images[0]), np.ones((8, 8, 1), np.uint8)))
    assert Image.open(tmp_path / "a" / "curves.png").size == (1200, 1080)
    run(tmp_path / "b", 2)
    # Continued to 4 but stopped (a preemption) after step 3, between checkpoint intervals (2):
    # it saves step 3; the rerun restores step 3 and the data position.
    lines: list[str] = []
    stopped, _ = run(tmp_path / "b", 4, stop=lambda step: step == 3, log=lines.append)
    assert int(stopped.step) == 3 and (tmp_path / "b" / "checkpoints" / "3").is_dir()
    resumed, _ = run(tmp_path / "b", 4, log=lines.append)
    assert "vqgan train: resumed at step 3" in " ".join(lines), lines
    assert int(resumed.step) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(straight), jax.device_get(resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["vqgan"]["resolution"] == 32
    config, params = load_vqgan(tmp_path / "b" / "vqgan")
    assert config == vq
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(resumed.g_params))


def test_overrides():
    vq, cfg = train.apply_overrides(configs.vqgan_preset("test-tiny"), configs.VQGANTrainConfig(),
                                    ["steps=7", "dead_code_restart=true", "vqgan.n_embed=64",
                                     "vqgan.ch_mult=1,2", "lpips_vgg_path=/x/vgg.pth"])
    assert (cfg.steps, cfg.dead_code_restart, vq.n_embed, vq.ch_mult, cfg.lpips_vgg_path) == (
        7, True, 64, (1, 2), "/x/vgg.pth")
    assert configs.VQGANTrainConfig(batch_size=4).lr == pytest.approx(4.5e-6 * 4)
    with pytest.raises(ValueError, match="unknown --set key 'nope'; VQGANTrainConfig keys: "):
        train.apply_overrides(vq, cfg, ["nope=1"])
    with pytest.raises(ValueError, match="unknown --set key 'vqgan.nope'; vqgan keys: .*n_embed"):
        train.apply_overrides(vq, cfg, ["vqgan.nope=1"])
    with pytest.raises(ValueError, match="--set steps=ten: expected a value like"):
        train.apply_overrides(vq, cfg, ["steps=ten"])
