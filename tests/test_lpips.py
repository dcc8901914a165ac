"""Our LPIPS-VGG (`vqgan/lpips.py`) against the real `lpips` package (0.1.4, installed with
--no-deps from requirements-nodeps.txt): its own `LPIPS` module, with its scaling layer, VGG16
slicing, feature normalisation and `NetLinLayer` heads loaded from the weights it ships
(lpips/weights/v0.1/vgg.pth), which our side also reads by default.

lpips imports torchvision at import time, and PyPI's torchvision wheels fail to load beside the
CPU torch here (torchvision::nms). So the test puts a stub `torchvision` in sys.modules whose
`models.vgg16` returns torchvision's vgg16 `features` layout (31 layers) built in plain torch
with seeded random weights: no ImageNet weights exist offline, and the heads are what is compared.
Everything after that constructor is the package's code.
"""

import sys
import types

import jax
import numpy as np
import pytest
import torch

from llmcxr_jax.vqgan import losses, lpips


def vgg16_features(seed: int) -> torch.nn.Sequential:
    """torchvision's `vgg16().features`: conv3x3 + ReLU(inplace) per VGG16_BLOCKS entry, a 2x2
    max-pool after each block (indices 0..30)."""
    torch.manual_seed(seed)
    layers, c_in = [], 3
    for block, c in zip(lpips.VGG16_BLOCKS, lpips.LPIPS_CHANNELS):
        for _ in block:
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU(inplace=True)]
            c_in = c
        layers.append(torch.nn.MaxPool2d(2, 2))
    features = torch.nn.Sequential(*layers)
    assert [i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv2d)] == \
        [i for block in lpips.VGG16_BLOCKS for i in block]
    return features


@pytest.fixture
def real_lpips(monkeypatch):
    """A function features -> the `lpips` package's LPIPS(net="vgg") in eval mode on them, with
    the package's shipped v0.1 heads; the stub and the package modules are gone afterwards."""
    imported = []

    def build(features: torch.nn.Sequential) -> torch.nn.Module:
        models = types.ModuleType("torchvision.models")
        models.vgg16 = lambda pretrained=False, **_: types.SimpleNamespace(features=features)
        torchvision = types.ModuleType("torchvision")
        torchvision.models = models
        monkeypatch.setitem(sys.modules, "torchvision", torchvision)
        monkeypatch.setitem(sys.modules, "torchvision.models", models)
        import lpips as lpips_package

        imported.extend(m for m in sys.modules if m == "lpips" or m.startswith("lpips."))
        return lpips_package.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True,
                                   verbose=False).eval()

    yield build
    for name in imported:
        sys.modules.pop(name, None)


def test_lpips_matches_the_lpips_package_with_its_shipped_heads(real_lpips, tmp_path):
    features = vgg16_features(seed=0)
    reference = real_lpips(features)
    # Our side: the same VGG16 weights as torchvision's state-dict keys, the heads from the
    # installed package's weights/v0.1/vgg.pth (the default when no heads file is given).
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()},
               tmp_path / "vgg16.pth")
    net = losses.lpips_net(tmp_path / "vgg16.pth")
    shipped = torch.load(lpips.packaged_lpips_heads_path(), map_location="cpu",
                         weights_only=True)
    for k, head in enumerate(net.params["heads"]):  # the heads we run are the package's
        np.testing.assert_array_equal(np.asarray(head),
                                      shipped[f"lin{k}.model.1.weight"].numpy().reshape(-1))

    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    got = np.asarray(jax.jit(net.distance)(net.params, x, y))
    to_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        want = reference(to_torch(x), to_torch(y)).reshape(-1).numpy()
    assert want.min() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert float(jax.jit(net.distance)(net.params, x, x).max()) < 1e-10


def test_without_vgg_weights_lpips_is_off_with_one_message():
    messages = []
    assert losses.lpips_net("", log=messages.append) is None and len(messages) == 1
