"""Batched augmentation: exact integer shifts, flips, fills, determinism per (seed, epoch), normalisation."""
import pytest
import torch

from allconv_hpc import augment as aug


def _images(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _const(v: int, b: int) -> torch.Tensor:
    return torch.full((b,), v, dtype=torch.int8)


@pytest.mark.parametrize("mode", ["paper", "seed", "none"])
def test_shapes_dtypes_and_ranges(mode):
    p = aug.draw_params(1000, 0, 0, mode)
    assert p.dx.dtype == p.dy.dtype == torch.int8 and p.flip.dtype == torch.bool
    assert p.dx.shape == p.dy.shape == p.flip.shape == (1000,)
    s = aug.MAX_SHIFT[mode]
    assert p.dx.abs().max() == s and p.dy.abs().max() == s  # the whole range is reached
    assert p.dx.min() == -s and p.dy.min() == -s
    flips = p.flip.float().mean().item()
    assert (0.4 < flips < 0.6) if mode == "paper" else flips == 0
    x = _images()
    out = aug.apply(x, p.dx[:6], p.dy[:6], p.flip[:6], aug.augment_mode_fill(mode))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_seed_mode_shifts_are_keras_rounded_continuous_shifts():
    # Keras draws U(-0.1, 0.1) x 32 px and samples nearest-neighbour: round(U(-3.2, 3.2)), so +-3 come
    # with probability 0.7/6.4 each and -2..2 with 1/6.4 each (not 1/7 for all seven)
    p = aug.draw_params(200_000, 0, 0, "seed")
    for d in (p.dx, p.dy):
        freq = torch.bincount(d.long() + 3, minlength=7).double() / len(d)
        expected = torch.tensor([0.7, 1, 1, 1, 1, 1, 0.7], dtype=torch.float64) / 6.4
        assert torch.allclose(freq, expected, atol=0.004), freq
    assert not torch.equal(p.dx, p.dy)


def test_determinism_per_seed_and_epoch():
    a, b = aug.draw_params(500, 3, 7, "paper"), aug.draw_params(500, 3, 7, "paper")
    assert torch.equal(a.dx, b.dx) and torch.equal(a.dy, b.dy) and torch.equal(a.flip, b.flip)
    for other in (aug.draw_params(500, 3, 8, "paper"), aug.draw_params(500, 4, 7, "paper")):
        assert not torch.equal(a.dx, other.dx) and not torch.equal(a.flip, other.flip)


def test_flip_only_equals_torch_flip():
    x = _images()
    z = _const(0, 6)
    out = aug.apply(x, z, z, torch.ones(6, dtype=torch.bool), "zero")
    assert torch.equal(out, x.flip(-1))
    assert torch.equal(aug.apply(x, z, z, torch.zeros(6, dtype=torch.bool), "nearest"), x)


@pytest.mark.parametrize("fill", ["zero", "nearest"])
@pytest.mark.parametrize("dx,dy", [(5, 0), (0, -5), (3, 2), (-4, 5), (-1, -3)])
def test_shift_moves_a_bright_pixel_exactly(fill, dx, dy):
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    y0, x0 = 12, 20
    x[:, 1, y0, x0] = 255
    no = torch.zeros(2, dtype=torch.bool)
    out = aug.apply(x, _const(dx, 2), _const(dy, 2), no, fill)
    assert out[:, 1, y0 + dy, x0 + dx].eq(255).all()
    assert out.sum() == 2 * 255  # nothing else lit, no interpolation
    # translate then flip: the pixel lands at the mirrored column
    out = aug.apply(x, _const(dx, 2), _const(dy, 2), ~no, fill)
    assert out[:, 1, y0 + dy, 31 - (x0 + dx)].eq(255).all()


def test_per_sample_shifts_in_one_batch():
    x = _images(4)
    dx, dy = torch.tensor([1, -2, 0, 5], dtype=torch.int8), torch.tensor([0, 3, -5, 1], dtype=torch.int8)
    out = aug.apply(x, dx, dy, torch.zeros(4, dtype=torch.bool), "zero")
    for i in range(4):  # reference: shift each image on its own with torch.roll and blank the wrap
        ref = torch.roll(x[i], shifts=(int(dy[i]), int(dx[i])), dims=(1, 2))
        if dy[i] > 0: ref[:, :dy[i]] = 0
        if dy[i] < 0: ref[:, dy[i]:] = 0
        if dx[i] > 0: ref[:, :, :dx[i]] = 0
        if dx[i] < 0: ref[:, :, dx[i]:] = 0
        assert torch.equal(out[i], ref), i


def test_zero_vs_nearest_fill_of_the_vacated_border():
    x = _images(1)
    dx, dy, no = _const(3, 1), _const(-2, 1), torch.zeros(1, dtype=torch.bool)
    zero = aug.apply(x, dx, dy, no, "zero")[0]
    near = aug.apply(x, dx, dy, no, "nearest")[0]
    # content moved right by 3 and up by 2: the interior is identical for both fills
    assert torch.equal(zero[:, :30, 3:], x[0, :, 2:, :29]) and torch.equal(near[:, :30, 3:], zero[:, :30, 3:])
    assert zero[:, :, :3].eq(0).all() and zero[:, 30:, :].eq(0).all()
    # nearest replicates the edge: the vacated left columns copy the old column 0, bottom rows the old row 31
    assert torch.equal(near[:, :30, :3], x[0, :, 2:, 0:1].expand(3, 30, 3))
    assert torch.equal(near[:, 30:, 3:], x[0, :, 31:32, :29].expand(3, 2, 29))
    assert near[:, 30:, :3].eq(x[0, :, 31:32, 0:1]).all()  # corner: the old bottom-left pixel


def test_none_mode_is_identity():
    x = _images()
    p = aug.draw_params(6, 5, 1, "none")
    assert torch.equal(aug.apply(x, p.dx, p.dy, p.flip, aug.augment_mode_fill("none")), x)


def test_empty_batch():
    x = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    e = torch.zeros(0, dtype=torch.int8)
    assert aug.apply(x, e, e, e.bool(), "zero").shape == (0, 3, 32, 32)
    assert aug.normalize(x, (0.5,) * 3, (0.25,) * 3).shape == (0, 3, 32, 32)


def test_fill_helper_and_bad_modes():
    assert aug.augment_mode_fill("paper") == "zero" and aug.augment_mode_fill("seed") == "nearest"
    with pytest.raises(ValueError):
        aug.draw_params(3, 0, 0, "bogus")
    with pytest.raises(ValueError):
        aug.apply(_images(1), _const(0, 1), _const(0, 1), torch.zeros(1, dtype=torch.bool), "reflect")


def test_normalize_standardises():
    x = _images(256, seed=1)
    f = x.float() / 255
    mean, std = f.mean(dim=(0, 2, 3)).tolist(), f.std(dim=(0, 2, 3)).tolist()
    y = aug.normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (y.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    assert torch.allclose(y[0, 2], (f[0, 2] - mean[2]) / std[2], atol=1e-5)
    cl = aug.normalize(x, mean, std, dtype=torch.bfloat16, channels_last=True)
    assert cl.dtype == torch.bfloat16 and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl.float(), y, atol=2e-2)
