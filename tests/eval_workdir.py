"""Builds a tiny training-run workdir for the evaluation tests, in the layout `train/run.py`
writes: config.json, world/ (a phantom world), vqgan_run/vqgan (random "test-tiny" VQ-GAN: 32 px,
8x8 = 64 tokens, 128 codes), codes/, tokenizer/ and llm/ (a tiny random GPT-NeoX), plus a tiny
random CXR classifier (passed with --classifier)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from llmcxr_jax import configs
from llmcxr_jax.configs import ModelConfig
from llmcxr_jax.data.phantom_world import WorldConfig, write_world
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.llm.checkpoint import save_llm
from llmcxr_jax.parallel import mesh as mesh_lib
from llmcxr_jax.parallel import shardings as shardings_lib
from llmcxr_jax.run_layout import RunLayout
from llmcxr_jax.text.bpe import train_bpe
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.vqgan import encode as encode_lib
from llmcxr_jax.vqgan.checkpoint import save_vqgan
from llmcxr_jax.vqgan.model import init_params as vqgan_init

WORLD = WorldConfig(n_studies=40, size=32, seed=3, n_instructions=40,
                    split_fractions=(0.6, 0.1, 0.3))
CLASSIFIER = clf.ClassifierConfig(widths=(8, 16), patch=4, groups=4, image_size=32)


def random_params(config: ModelConfig, seed: int = 0):
    """Random host values placed straight into the param shardings (no init compile)."""
    mesh = mesh_lib.mesh_from_flag("-1")
    shardings = shardings_lib.param_shardings(config, mesh)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a, s: jax.device_put((0.2 * rng.standard_normal(a.shape)).astype(a.dtype), s),
        shardings_lib.abstract_params(config), shardings)


def build(root: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    paths = RunLayout(root)
    write_world(paths.world, WORLD, workers=1, progress=False)
    vq_cfg = configs.vqgan_preset("test-tiny")
    save_vqgan(paths.vqgan_run / "vqgan", vq_cfg, vqgan_init(vq_cfg, seed=1))
    images = run_lib.split_images(paths.world, ("train", "validate", "test"))
    encode_lib.encode_images(paths.vqgan_run / "vqgan", images, paths.codes, batch_size=16,
                             progress=False, log=lambda s: None)
    vocab = train_bpe(run_lib.world_texts(paths.world), vocab_size=384, n_image=vq_cfg.n_embed)
    vocab.save(paths.tokenizer)
    model = ModelConfig(vocab_size=vocab.embed_rows, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    save_llm(paths.llm, model, random_params(model), vocab, step=7)
    cfg = dataclasses.replace(rc.RUN_PRESETS["tiny"], model=model, world=WORLD)
    (root / "config.json").write_text(rc.to_json(cfg))
    clf.save_classifier(root / "test_classifier", CLASSIFIER, clf.init_params(CLASSIFIER, seed=2))
    return root
