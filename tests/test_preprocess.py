"""data.preprocess=gcn_zca: pylearn2's contrast normalisation and ZCA whitening, checked against a
NumPy transcription of pylearn2's formulas and against what whitening means (unit covariance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allconv_hpc import augment as aug, preprocess
from allconv_hpc.config import ConfigError, DataConfig
from allconv_hpc.data import TrainBatches, eval_batches, model_input


def _images(n: int, seed: int = 0, side: int = 4) -> torch.Tensor:
    """uint8 [n, 3, side, side] with correlated pixels (a smooth random field plus noise), as photos have."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 2, 2, generator=g) * 200
    smooth = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)
    return (smooth + 30 * torch.rand(n, 3, side, side, generator=g)).round().clamp(0, 255).to(torch.uint8)


def _pylearn2(train: np.ndarray, other: np.ndarray, scale: float = 55.0, bias: float = 0.1) -> np.ndarray:
    """global_contrast_normalize(X, scale=55.) then ZCA(filter_bias=0.1).fit(train).apply(other)."""
    def gcn(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x - x.mean(axis=1)[:, None]
        norms = np.sqrt((x ** 2).sum(axis=1)) / scale
        norms[norms < 1e-8] = 1.0
        return x / norms[:, None]
    x = gcn(train)
    mean = x.mean(axis=0)
    xc = x - mean
    eigs, eigv = np.linalg.eigh(xc.T @ xc / len(xc) + bias * np.identity(xc.shape[1]))
    p = (eigv * np.sqrt(1.0 / eigs)) @ eigv.T
    return (gcn(other) - mean) @ p


def test_gcn_centres_each_image_and_scales_it_to_norm_55():
    x = preprocess.gcn(_images(50))
    assert x.dtype == torch.float64 and x.shape == (50, 48)
    assert torch.allclose(x.mean(dim=1), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x.norm(dim=1), torch.full((50,), 55.0, dtype=torch.float64))
    flat = preprocess.gcn(torch.full((2, 3, 4, 4), 77, dtype=torch.uint8))  # no contrast: stays 0, no NaN
    assert torch.equal(flat, torch.zeros_like(flat))


def test_fit_and_apply_match_pylearn2s_formulas():
    train, test = _images(500, seed=1), _images(40, seed=2)
    w = preprocess.fit(train)
    ref = _pylearn2(train.numpy(), test.numpy())
    out = w.apply(test)
    assert out.dtype == torch.float32 and out.shape == test.shape
    np.testing.assert_allclose(out.reshape(40, -1).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_whitened_training_images_have_unit_covariance_up_to_the_bias():
    # eigenvalue l of the GCN'd covariance becomes l / (l + bias): ~1 for l >> bias. GCN removes one
    # direction (each image's own mean), whose variance is 0 before and after.
    train = _images(4000, seed=3)
    bias = 1e-6
    y = preprocess.fit(train, bias=bias).apply(train).reshape(len(train), -1).to(torch.float64)
    cov = torch.cov(y.T, correction=0)
    lam = torch.linalg.eigvalsh(cov)
    assert lam[0].abs() < 1e-3, lam[:3]
    assert torch.allclose(lam[1:], torch.ones_like(lam[1:]), atol=2e-3), lam
    # the default bias keeps weak directions damped instead of amplified: nothing above 1
    lam_default = torch.linalg.eigvalsh(torch.cov(preprocess.fit(train).apply(train).reshape(len(train), -1)
                                                  .to(torch.float64).T, correction=0))
    assert lam_default.max() < 1.0 + 1e-6 and lam_default.min() > -1e-6
    assert lam_default.median() < lam[1:].median() - 0.01  # the bias did damp some directions


def test_fit_in_blocks_equals_fit_in_one(monkeypatch):
    train = _images(1000, seed=4)
    whole = preprocess.fit(train)
    monkeypatch.setattr(preprocess, "_CHUNK", 64)  # 16 blocks, the last one partial
    blocks = preprocess.fit(train)
    assert torch.allclose(whole.mean, blocks.mean, rtol=0, atol=1e-12)
    assert torch.allclose(whole.matrix, blocks.matrix, rtol=1e-9, atol=1e-9)
    assert torch.allclose(whole.apply(train), blocks.apply(train), atol=1e-5)


def test_to_device_channel_keeps_uint8_and_gcn_zca_whitens_every_split_with_one_fit():
    train, test = _images(300, seed=5), _images(20, seed=6)
    put = preprocess.to_device("channel", train, torch.device("cpu"))
    assert torch.equal(put(test), test) and put(test).dtype == torch.uint8
    put = preprocess.to_device("gcn_zca", train, torch.device("cpu"))
    np.testing.assert_allclose(put(test).reshape(20, -1).numpy(), _pylearn2(train.numpy(), test.numpy()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="data.preprocess='zca'"):
        preprocess.to_device("zca", train, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"data.preprocess='zca' is not one of channel, gcn_zca"):
        DataConfig(preprocess="zca")


def test_whitened_batches_are_augmented_in_whitened_space_with_zero_fill():
    """Float images go through TrainBatches as they are: translated and flipped like uint8 ones (the
    same gather), vacated pixels 0 (the whitened mean), no per-channel normalisation on top."""
    train = _images(64, seed=7, side=8)  # small D: the fit is the same code at any size
    labels = torch.arange(64) % 10
    white = preprocess.fit(train).apply(train)
    tb = TrainBatches(white, labels, 16, 0, 1, seed=3, augment="paper", mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y, n = next(tb.epoch(0))
    idx = tb.indices(0, 0)
    p = aug.draw_params(64, 3, 0, "paper")[idx]
    assert n == 16 and torch.equal(y, labels[idx])
    assert torch.equal(x, aug.apply(white[idx], p.dx, p.dy, p.flip, "zero"))
    moved = (p.dx != 0) | (p.dy != 0)
    assert moved.any() and (x[moved] == 0).any()  # the fill
    (ex, ey), = list(eval_batches(white[:16], labels[:16], 0, 1, 16, (0.5,) * 3, (0.25,) * 3))
    assert torch.equal(ex, white[:16]) and torch.equal(ey, labels[:16])
    cl = model_input(white[:4], (0.5,) * 3, (0.25,) * 3, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, white[:4])
    with pytest.raises(ValueError, match="uint8 or preprocessed float32"):
        TrainBatches(white.double(), labels, 16, 0, 1, 0, "none", (0.5,) * 3, (0.25,) * 3)
