"""VQ-GAN model: presets, quantizer gradients (vs taming's VectorQuantizer2), logical axes and the
project checkpoint format."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from llmcxr_jax import configs
from llmcxr_jax.configs import vqgan_preset
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.vqgan.checkpoint import CONFIG_FILE, PARAMS_FILE, load_vqgan, save_vqgan
from llmcxr_jax.vqgan.model import (LAST_LAYER_KERNEL_PATH, VQGAN, abstract_params, init_params,
                                    last_layer_kernel)
from llmcxr_jax.vqgan.quantizer import VectorQuantizer

TINY = vqgan_preset("test-tiny")


@pytest.mark.parametrize("name,resolution,tokens", [("taming-f16-1024", 256, 256),
                                                    ("phantom-f8", 128, 256),
                                                    ("phantom-f16-64", 128, 64),
                                                    ("test-tiny", 32, 64)])
def test_preset_token_counts(name, resolution, tokens):
    cfg = vqgan_preset(name)
    assert cfg.resolution == resolution and cfg.tokens_per_image == tokens
    side = int(np.sqrt(tokens))
    x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
    model = VQGAN(cfg)
    q = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode),
                       abstract_params(cfg), x)
    assert q.indices.shape == (2, side, side) and q.indices.dtype == jnp.int32
    assert q.z_q.shape == (2, side, side, cfg.embed_dim)
    assert q.code_counts.shape == (cfg.n_embed,)


def test_paper_preset_matches_taming_parameter_tree():
    """The taming-f16-1024 tree has exactly the tensors (names and shapes) of taming's VQModel."""
    torch = pytest.importorskip("torch")
    taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
    from llmcxr_jax.vqgan.taming_import import flax_to_torch, taming_ddconfig, taming_key

    cfg = vqgan_preset("taming-f16-1024")
    dd = taming_ddconfig(cfg)
    with torch.device("meta"):  # shapes only, nothing allocated
        encoder, decoder = taming_model.Encoder(**dd), taming_model.Decoder(**dd)
    want = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    want.update({f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()})
    want.update({"quant_conv.weight": (256, 256, 1, 1), "quant_conv.bias": (256,),
                 "post_quant_conv.weight": (256, 256, 1, 1), "post_quant_conv.bias": (256,),
                 "quantize.embedding.weight": (1024, 256)})
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
    got = {taming_key(k): flax_to_torch(np.empty(v.shape, np.int8)).shape for k, v in flat.items()}
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) > 70_000_000


@pytest.mark.parametrize("groups,channels", [(32, 64), (16, 16), (16, 48)])
def test_group_norm_matches_torch(groups, channels):
    """`norm_groups` (taming's 32; 16 in phantom-f16-64, whose first level has 16 channels)
    normalises like torch.nn.GroupNorm with that many groups."""
    torch = pytest.importorskip("torch")
    from llmcxr_jax.vqgan.model import GroupNorm

    rng = np.random.default_rng(groups + channels)
    x = (3.0 + 2.0 * rng.standard_normal((2, 5, 7, channels))).astype(np.float32)
    scale = rng.standard_normal(channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    norm = GroupNorm(vqgan_preset("test-tiny", norm_groups=groups))
    got = norm.apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))
    ref = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_norm_groups_that_do_not_divide_a_level_are_refused_with_the_config():
    """phantom-f16-64's first level has 16 channels, which taming's 32 groups cannot split: the
    config refuses it when it is made (as `launch/train_vqgan.py --set vqgan.norm_groups=32`
    makes it), not when a run first builds the model."""
    from llmcxr_jax.configs import VQGANTrainConfig
    from llmcxr_jax.vqgan.train import apply_overrides

    with pytest.raises(ValueError, match=r"norm_groups 32 .*\[16, 32, 64, 128\]\); \[16\] do not"):
        vqgan_preset("phantom-f16-64", norm_groups=32)
    with pytest.raises(ValueError, match=r"norm_groups 32 .*\[16\] do not"):
        apply_overrides(vqgan_preset("phantom-f16-64"), VQGANTrainConfig(),
                        ["vqgan.norm_groups=32"])
    with pytest.raises(ValueError, match="norm_groups 0 "):
        vqgan_preset("test-tiny", norm_groups=0)
    assert vqgan_preset("phantom-f16-64", norm_groups=8).norm_groups == 8


def _quantizer_fixture(legacy: bool):
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((16, 4)).astype(np.float32)
    z = (codebook[rng.integers(0, 16, 2 * 3 * 3)] + 0.3 * rng.standard_normal((18, 4))).astype(np.float32)
    return VectorQuantizer(16, 4, 0.25, legacy), codebook, z.reshape(2, 3, 3, 4)


def test_straight_through_gradient():
    vq, codebook, z = _quantizer_fixture(legacy=True)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(z.shape), jnp.float32)

    def loss_of_zq(zq):
        return jnp.sum(jnp.sin(zq) * weights)

    @jax.jit
    def grads(z):
        grad_z = jax.grad(lambda z: loss_of_zq(vq.apply({"params": {"embedding": codebook}}, z).z_q))(z)
        z_q = vq.apply({"params": {"embedding": codebook}}, z).z_q
        return grad_z, jax.grad(loss_of_zq)(z_q), z_q

    grad_z, grad_zq, z_q = grads(z)
    np.testing.assert_allclose(grad_z, grad_zq, rtol=1e-6)
    # The forward value is the nearest code, not z.
    np.testing.assert_allclose(z_q.reshape(-1, 4), codebook[np.argmin(
        ((z.reshape(-1, 1, 4) - codebook[None]) ** 2).sum(-1), axis=1)], atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_matches_taming_losses_and_grads(legacy):
    """Loss value and gradients w.r.t. z and the codebook equal taming's VectorQuantizer2 (both
    placements of beta)."""
    torch = pytest.importorskip("torch")
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    vq, codebook, z = _quantizer_fixture(legacy)

    ref = quantize.VectorQuantizer2(16, 4, beta=0.25, legacy=legacy)
    with torch.no_grad():
        ref.embedding.weight.copy_(torch.from_numpy(codebook))
    z_t = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    _, loss_t, (_, _, idx_t) = ref(z_t)
    loss_t.backward()

    def loss_fn(params, z):
        return vq.apply({"params": params}, z).loss

    q, (g_params, g_z) = jax.jit(lambda p, z: (vq.apply({"params": p}, z), jax.grad(loss_fn, argnums=(0, 1))(p, z)))(
        {"embedding": jnp.asarray(codebook)}, z)
    np.testing.assert_array_equal(np.asarray(q.indices).ravel(), idx_t.numpy())
    np.testing.assert_allclose(float(q.loss), loss_t.item(), rtol=1e-6)
    np.testing.assert_allclose(g_z, z_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_params["embedding"], ref.embedding.weight.grad.numpy(), rtol=1e-5, atol=1e-8)
    counts = np.bincount(idx_t.numpy(), minlength=16)
    assert np.asarray(q.code_counts).tolist() == counts.tolist()
    p = counts / counts.sum()
    np.testing.assert_allclose(float(q.perplexity), np.exp(-(p * np.log(p + 1e-10)).sum()), rtol=1e-5)


def test_logical_axes_shard_on_a_mesh():
    """Every param names known logical axes (one per dim) and divides evenly on fsdp=8."""
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    rules = dict(LOGICAL_AXIS_RULES)
    for preset in ("test-tiny", "phantom-f8", "taming-f16-1024"):
        boxed = abstract_params(vqgan_preset(preset))
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim
            for dim, name in zip(leaf.value.shape, leaf.names):
                assert name is None or name in known
                if rules.get(name) == "fsdp":
                    assert dim % 8 == 0, (preset, leaf.names, leaf.value.shape)
    spec = nn.get_partition_spec(boxed)
    assert spec["quantize"]["embedding"] == jax.sharding.PartitionSpec("codebook", "embed")


def test_decode_code_and_last_layer():
    params = init_params(TINY, 0)
    model = VQGAN(TINY)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)

    @jax.jit
    def run(params, x):
        xrec, q = model.apply({"params": params}, x)
        flat = model.apply({"params": params}, q.indices.reshape(2, -1), method=VQGAN.decode_code)
        return xrec, flat

    xrec, flat = run(params, x)
    assert xrec.shape == x.shape and xrec.dtype == jnp.float32
    np.testing.assert_allclose(flat, xrec, atol=1e-4)  # decode(z_q) == decode_code(indices)
    kernel = last_layer_kernel(params)
    assert kernel.shape == (3, 3, TINY.ch, 3)
    assert LAST_LAYER_KERNEL_PATH[-1] == "kernel"


def test_init_params_follow_torch_defaults():
    """Host-side init: same tree as `model.init`, torch's default Conv2d bound, taming's codebook."""
    torch = pytest.importorskip("torch")
    boxed = init_params(TINY, 3)
    abstract = abstract_params(TINY)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert jax.tree.structure(boxed, is_leaf=is_box) == jax.tree.structure(abstract, is_leaf=is_box)
    for got, want in zip(jax.tree.leaves(boxed, is_leaf=is_box), jax.tree.leaves(abstract, is_leaf=is_box)):
        assert got.names == want.names and got.value.shape == want.value.shape
        assert got.value.dtype == want.value.dtype
    kernel = boxed["encoder"]["down_2_block_0"]["conv1"]["kernel"].value  # 3x3, 32 -> 64
    ref = torch.nn.Conv2d(32, 64, 3).weight.detach().numpy()
    assert abs(np.abs(kernel).max() - np.abs(ref).max()) < 0.01 and abs(kernel.std() - ref.std()) < 0.005
    codes = boxed["quantize"]["embedding"].value
    assert np.abs(codes).max() <= 1 / TINY.n_embed
    np.testing.assert_array_equal(init_params(TINY, 3)["quantize"]["embedding"].value, codes)


def test_checkpoint_round_trip(tmp_path):
    params = init_params(TINY, 0)
    out = save_vqgan(tmp_path / "vq", TINY, params)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, PARAMS_FILE]  # no temp files left
    assert json.loads((out / CONFIG_FILE).read_text()) == json.loads(json.dumps(configs.to_dict(TINY)))
    config, loaded = load_vqgan(out)
    assert config == TINY
    want = traverse_util.flatten_dict(nn.meta.unbox(params))
    got = traverse_util.flatten_dict(loaded)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(want[k]), got[k])

    bf16 = vqgan_preset("test-tiny", param_dtype="bfloat16")
    save_vqgan(tmp_path / "bf16", bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nn.meta.unbox(params)))
    _, loaded16 = load_vqgan(tmp_path / "bf16")
    assert loaded16["decoder"]["conv_out"]["kernel"].dtype == jnp.bfloat16


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_vqgan(tmp_path / "nothing_here")
    out = save_vqgan(tmp_path / "vq", TINY, init_params(TINY, 0))
    data = (out / PARAMS_FILE).read_bytes()
    (out / PARAMS_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="params.safetensors is corrupt"):
        load_vqgan(out)
    # Params written for another config: every mismatch is named.
    save_vqgan(out, vqgan_preset("test-tiny", n_embed=64), init_params(vqgan_preset("test-tiny", n_embed=64)))
    (out / CONFIG_FILE).write_text(json.dumps(configs.to_dict(TINY)))
    with pytest.raises(ValueError, match=r"quantize/embedding: file \(64, 32\) vs config \(128, 32\)"):
        load_vqgan(out)
    (out / CONFIG_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not a valid VQGANConfig"):
        load_vqgan(out)
