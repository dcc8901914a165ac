"""Taming checkpoint import against the PyTorch reference (taming-transformers' own modules)."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llmcxr_jax.configs import vqgan_preset  # noqa: E402
from llmcxr_jax.vqgan.checkpoint import load_vqgan  # noqa: E402
from llmcxr_jax.vqgan.model import VQGAN  # noqa: E402
from llmcxr_jax.vqgan.taming_import import (  # noqa: E402
    TamingImportError, UnsafeCheckpointError, config_from_yaml, convert_state_dict,
    load_torch_checkpoint, taming_ddconfig)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = vqgan_preset("test-tiny")  # 32 px, ch 32, ch_mult (1, 1, 2), attention at 8, 128 codes


class ModelCheckpoint:
    """Stands in for a Lightning 1.x callback class, which keys `checkpoint['callbacks']`."""


class _RunsCommand:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_marker(path: str) -> None:
    pathlib.Path(path).write_text("executed")


class _CallsFunction:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (str(self.marker),))


class TorchVQModel(torch.nn.Module):
    """taming's VQModel without Lightning and the loss: the same submodules and state_dict keys."""

    def __init__(self, config):
        super().__init__()
        dd = taming_ddconfig(config)
        self.encoder = taming_model.Encoder(**dd)
        self.decoder = taming_model.Decoder(**dd)
        self.quantize = taming_quantize.VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


def _images(seed: int, n: int) -> np.ndarray:
    """Smooth random images in [-1, 1], NCHW."""
    g = np.random.default_rng(seed)
    low = g.uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32)
    return np.clip(np.kron(low, np.ones((1, 1, 4, 4), np.float32))
                   + 0.1 * g.standard_normal((n, 3, 32, 32)).astype(np.float32), -1, 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("taming"))


def write_reference(tmp: pathlib.Path):
    """A random taming VQModel whose codebook is drawn from its own encoder outputs, saved as a
    Lightning-style checkpoint (with loss.* tensors and a class-keyed callbacks dict) + yaml in
    `tmp`: (model, ckpt path, yaml path)."""
    torch.manual_seed(0)
    model = TorchVQModel(CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm starts at 1/0: perturb so the mapping of scale/bias matters
                p.add_(0.2 * torch.randn_like(p))
        z = model.quant_conv(model.encoder(torch.from_numpy(_images(1, 8))))
        z = z.permute(0, 2, 3, 1).reshape(-1, CONFIG.embed_dim)
        model.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:CONFIG.n_embed]])
    state_dict = dict(model.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state_dict["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    ckpt = tmp / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
                "state_dict": state_dict,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, ckpt)
    project = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                         "params": {"embed_dim": CONFIG.embed_dim, "n_embed": CONFIG.n_embed,
                                    "ddconfig": taming_ddconfig(CONFIG),
                                    "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                   "params": {"disc_start": 10000}}}}}
    yaml_path = tmp / "project.yaml"
    yaml_path.write_text(yaml.safe_dump(project))
    return model, ckpt, yaml_path


def _run_import_script(ckpt, yaml_path, out):
    spec = importlib.util.spec_from_file_location("import_taming", REPO / "launch" / "import_taming.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--ckpt", str(ckpt), "--yaml", str(yaml_path), "--out", str(out)])


def test_import_matches_taming(reference, tmp_path, capsys):
    model, ckpt, yaml_path = reference
    with pytest.raises(Exception):  # torch's own weights_only refuses the class-keyed callbacks
        torch.load(ckpt, map_location="cpu", weights_only=True)
    _run_import_script(ckpt, yaml_path, tmp_path)
    printed = capsys.readouterr().out
    assert "skipped 2 loss.* tensors" in printed

    config, params = load_vqgan(tmp_path / "vqgan")
    assert config == CONFIG  # yaml -> config, legacy beta placement included

    x = _images(2, 4)  # images the codebook was not drawn from
    with torch.no_grad():
        zq_ref, loss_ref, (_, _, idx_ref) = model.encode(torch.from_numpy(x))
        dec_ref = model.decode(zq_ref)
        dec_code_ref = model.decode(model.quantize.get_codebook_entry(idx_ref, (4, 8, 8, CONFIG.embed_dim)))
    idx_ref = idx_ref.numpy().reshape(4, 8, 8)
    assert len(np.unique(idx_ref)) > 40  # many codes in use, so the comparison means something

    vq = VQGAN(config)
    forward = jax.jit(lambda p, x: vq.apply({"params": p}, x))
    from_codes = jax.jit(lambda p, i: vq.apply({"params": p}, i, method=VQGAN.decode_code))
    dec, q = forward(params, jnp.asarray(x.transpose(0, 2, 3, 1)))

    np.testing.assert_array_equal(np.asarray(q.indices), idx_ref)
    np.testing.assert_allclose(np.asarray(q.z_q), zq_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dec), dec_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(float(q.loss), float(loss_ref), rtol=1e-5)
    dec_code = from_codes(params, q.indices.reshape(4, 64))
    np.testing.assert_allclose(np.asarray(dec_code), dec_code_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_convert_errors_name_the_tensors(reference):
    model, _, _ = reference
    sd = dict(model.state_dict())
    bad = dict(sd)
    bad["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(TamingImportError, match=r"decoder\.conv_out\.weight: checkpoint \(3, 32, 1, 1\) vs model \(3, 32, 3, 3\)"):
        convert_state_dict(bad, CONFIG)
    missing = {k: v for k, v in sd.items() if k != "encoder.mid.attn_1.q.bias"}
    with pytest.raises(TamingImportError, match=r"missing: \['encoder\.mid\.attn_1\.q\.bias'\]"):
        convert_state_dict(missing, CONFIG)
    with pytest.raises(TamingImportError, match=r"unexpected.*quantize\.used"):
        convert_state_dict({**sd, "quantize.used": torch.arange(4)}, CONFIG)
    # A yaml describing another shape than the checkpoint is a shape mismatch naming a tensor.
    with pytest.raises(TamingImportError, match=r"encoder\.conv_in\.weight"):
        convert_state_dict(sd, vqgan_preset("test-tiny", ch=64))


def test_yaml_errors(tmp_path):
    not_taming = tmp_path / "other.yaml"
    not_taming.write_text("model:\n  name: gpt\n")
    with pytest.raises(TamingImportError, match="no model.params.ddconfig"):
        config_from_yaml(not_taming)
    gumbel = tmp_path / "gumbel.yaml"
    gumbel.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": {
        "n_embed": 8, "embed_dim": 4, "ddconfig": taming_ddconfig(CONFIG)}}}))
    with pytest.raises(TamingImportError, match="GumbelVQ"):
        config_from_yaml(gumbel)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config_from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("payload", [_RunsCommand, _CallsFunction])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    marker = tmp_path / "executed"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": torch.zeros(2, 2)}, "x": payload(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_torch_checkpoint(ckpt)
    assert not marker.exists()


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(TamingImportError, match="broken.ckpt"):
        load_torch_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_torch_checkpoint(tmp_path / "absent.ckpt")
