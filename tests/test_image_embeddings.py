"""Image-token embeddings from the VQ-GAN codebook: geometry kept, nothing else touched."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.spatial.distance as ssd
import scipy.stats

from llmcxr_jax import configs
from llmcxr_jax.llm.image_embeddings import codebook_rows, with_codebook_embeddings
from llmcxr_jax.parallel.mesh import mesh_from_flag
from llmcxr_jax.parallel.rules import LOGICAL_AXIS_RULES
from llmcxr_jax.train.state import init_state


def _codebook(k=64, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic, offset codebook: standardisation must undo the scale and the offset.
    return rng.standard_normal((k, d)) * np.linspace(0.1, 5.0, d) + 3.0


def test_rows_keep_the_codebooks_geometry():
    book = _codebook()
    rows = codebook_rows(book, hidden_size=256, scale=0.02, seed=1)
    assert rows.shape == (64, 256) and rows.dtype == np.float32
    np.testing.assert_allclose(rows.std(), 0.02, rtol=1e-5)
    standardised = (book - book.mean(0)) / book.std(0)
    # A random projection to a wider space nearly preserves pairwise distances (Johnson-
    # Lindenstrauss): the rank correlation with the standardised codebook's distances is high.
    rho = scipy.stats.spearmanr(ssd.pdist(standardised), ssd.pdist(rows)).statistic
    assert rho > 0.9, rho
    # ... and is not an artefact: a permuted codebook's rows do not match.
    shuffled = codebook_rows(book[np.random.default_rng(2).permutation(64)], 256, 0.02, 1)
    assert scipy.stats.spearmanr(ssd.pdist(standardised), ssd.pdist(shuffled)).statistic < 0.5


def test_only_image_rows_change_and_shardings_are_kept():
    cfg = configs.model_preset("tiny")
    train = configs.TrainConfig(total_steps=1, global_batch=8, seq_len=64)
    mesh = mesh_from_flag("2x4")
    params = init_state(cfg, train, mesh, LOGICAL_AXIS_RULES).params
    offset, book = 2048, _codebook(k=1024, d=64)
    new = with_codebook_embeddings(params, cfg, book, offset, seed=3)
    rows = codebook_rows(book, cfg.hidden_size, cfg.initializer_range, 3)
    emb, new_emb = np.asarray(params["embed_in"]["embedding"]), np.asarray(new["embed_in"]["embedding"])
    np.testing.assert_array_equal(new_emb[offset:offset + 1024], rows)
    np.testing.assert_array_equal(new_emb[:offset], emb[:offset])
    np.testing.assert_array_equal(new_emb[offset + 1024:], emb[offset + 1024:])
    ker, new_ker = np.asarray(params["embed_out"]["kernel"]), np.asarray(new["embed_out"]["kernel"])
    np.testing.assert_array_equal(new_ker[:, offset:offset + 1024], rows.T)
    np.testing.assert_array_equal(new_ker[:, :offset], ker[:, :offset])
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        leaf = new
        for key in path:
            leaf = leaf[key.key]
        assert leaf.sharding == old.sharding, path
        if "embed_in" not in str(path) and "embed_out" not in str(path):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(old))


def test_the_run_starts_stage_1_from_the_codebook_only_when_asked(tmp_path):
    """`image_embeddings="codebook"`: stage 1's starting params hold the saved VQ-GAN's codebook
    rows (random params made as run_stage would); "random" leaves the params untouched."""
    import dataclasses

    from llmcxr_jax.train import run as run_lib
    from llmcxr_jax.train import run_config as rc
    from llmcxr_jax.vqgan.checkpoint import save_vqgan
    from llmcxr_jax.vqgan.model import init_params as vqgan_init

    vq_cfg = configs.vqgan_preset("test-tiny")
    vq_params = vqgan_init(vq_cfg, seed=5)
    save_vqgan(tmp_path / "vqgan", vq_cfg, vq_params)
    codebook = np.asarray(jax.device_get(nn.unbox(vq_params)["quantize"]["embedding"]))
    cfg = rc.run_preset("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=2048 + 128),
                              train=dataclasses.replace(cfg.train, global_batch=8))

    class FakeVocab:
        image_offset = 2048

    mesh = mesh_from_flag("-1")
    start = run_lib.with_image_embeddings(dataclasses.replace(cfg, image_embeddings="codebook"),
                                          None, mesh, tmp_path / "vqgan", FakeVocab())
    rows = codebook_rows(codebook, cfg.model.hidden_size, cfg.model.initializer_range,
                         cfg.train.seed)
    np.testing.assert_allclose(np.asarray(start["embed_in"]["embedding"])[2048:], rows)
    random_init = init_state(cfg.model, rc.stage_train(cfg, 1), mesh, LOGICAL_AXIS_RULES).params
    np.testing.assert_array_equal(np.asarray(start["embed_in"]["embedding"])[:2048],
                                  np.asarray(random_init["embed_in"]["embedding"])[:2048])
    assert run_lib.with_image_embeddings(dataclasses.replace(cfg, image_embeddings="random"),
                                         random_init, mesh, tmp_path / "vqgan",
                                         FakeVocab()) is random_init
    with pytest.raises(ValueError, match="image_embeddings"):
        dataclasses.replace(cfg, image_embeddings="pretrained")
