import math

import pytest
import torch

from flip_fl.attacks.triggers import TRIGGERS, Trigger, create_trigger

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)

# kwargs that make every trigger valid on both MNIST and CIFAR shapes
PORTABLE_KWARGS = {
    "pixel_pattern": {},
    "dba": {},
    "blended": {},
    "sinusoidal": {},
    "turner": {},
    "pixel": {"count": 1},
    "fixed_pixels": {"pixels": [(1, 2), (20, 25)], "colors": ["#650019", 0.5]},
}


def rand_batch(shape, n=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g).to(dtype)


def coords(mask):
    return {tuple(p) for p in mask.nonzero().tolist()}


def line(row, start, stop):
    return {(row, c) for c in range(start, stop + 1)}


def test_registry_is_complete():
    assert set(TRIGGERS) == {"pixel_pattern", "dba", "blended", "sinusoidal", "turner", "pixel", "fixed_pixels"}
    assert all(issubclass(cls, Trigger) for cls in TRIGGERS.values())


# ---------------------------------------------------------------- generic properties, all triggers


@pytest.mark.parametrize("name", sorted(PORTABLE_KWARGS))
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_apply_is_pure_in_range_and_keeps_shape_dtype(name, shape):
    trig = create_trigger(name, shape, **PORTABLE_KWARGS[name])
    for dtype in (torch.float32, torch.float64):
        x = rand_batch(shape, dtype=dtype)
        # include the extremes so clipping is exercised
        x[0].fill_(1.0)
        x[1].fill_(0.0)
        before = x.clone()
        out = trig.apply(x)
        assert torch.equal(x, before), "input was modified"
        assert out.data_ptr() != x.data_ptr()
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        # pixels outside the mask are unchanged, pixels inside differ for at least one sample
        m = trig.mask()
        assert m.shape == shape[1:] and m.dtype == torch.bool
        assert torch.equal(out[..., ~m], x[..., ~m])
        assert not torch.equal(out[..., m], x[..., m])


@pytest.mark.parametrize("name", sorted(PORTABLE_KWARGS))
def test_same_stamp_for_every_sample_and_single_image(name):
    trig = create_trigger(name, CIFAR, **PORTABLE_KWARGS[name])
    x = rand_batch(CIFAR, n=4)
    out = trig.apply(x)
    single = trig.apply(x[2])
    assert single.shape == CIFAR
    torch.testing.assert_close(single, out[2])


@pytest.mark.parametrize("name", sorted(set(PORTABLE_KWARGS) - {"dba"}))
def test_non_distributed_piece_argument(name):
    trig = create_trigger(name, CIFAR, **PORTABLE_KWARGS[name])
    assert trig.num_pieces == 1
    x = rand_batch(CIFAR)
    assert torch.equal(trig.apply(x, piece=0), trig.apply(x))
    assert torch.equal(trig.mask(piece=0), trig.mask())
    with pytest.raises(ValueError):
        trig.apply(x, piece=1)


def test_apply_rejects_wrong_shape_or_dtype():
    trig = create_trigger("pixel_pattern", CIFAR)
    with pytest.raises(ValueError):
        trig.apply(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError):
        trig.apply(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError):
        trig.apply((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8))
    with pytest.raises(ValueError):
        trig.mask((3, 28, 28))
    assert trig.mask((3, 32, 32)).shape == (32, 32)
    assert trig.mask((32, 32)).shape == (32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", sorted(PORTABLE_KWARGS))
def test_apply_on_gpu_matches_cpu(name):
    trig = create_trigger(name, CIFAR, **PORTABLE_KWARGS[name])
    x = rand_batch(CIFAR)
    out = trig.apply(x.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), trig.apply(x))


# ---------------------------------------------------------------- pixel_pattern


def test_pixel_pattern_default_bottom_right():
    trig = create_trigger("pixel_pattern", MNIST)
    expected = {(r, c) for r in range(24, 27) for c in range(24, 27)}
    assert coords(trig.mask()) == expected
    out = trig.apply(torch.zeros(2, *MNIST))
    assert out.sum() == 2 * 9
    assert torch.all(out[:, :, 24:27, 24:27] == 1.0)


def test_pixel_pattern_custom_rect_and_per_channel_value():
    trig = create_trigger("pixel_pattern", CIFAR, size=(2, 4), row=1, col=3, value=[0.25, 0.5, 0.75])
    assert coords(trig.mask()) == {(r, c) for r in (1, 2) for c in range(3, 7)}
    out = trig.apply(torch.zeros(1, *CIFAR))
    assert torch.equal(out[0, :, 1, 3], torch.tensor([0.25, 0.5, 0.75]))
    assert torch.all(out[0, 2, 1:3, 3:7] == 0.75)


# ---------------------------------------------------------------- dba


@pytest.mark.parametrize(
    "shape,pieces",
    [
        (MNIST, [line(0, 0, 3), line(0, 6, 9), line(3, 0, 3), line(3, 6, 9)]),
        (CIFAR, [line(0, 0, 5), line(0, 9, 14), line(4, 0, 5), line(4, 9, 14)]),
        ((1, 32, 32), [line(0, 0, 5), line(0, 9, 14), line(4, 0, 5), line(4, 9, 14)]),
    ],
)
def test_dba_default_pieces(shape, pieces):
    trig = create_trigger("dba", shape)
    assert trig.num_pieces == 4
    masks = [trig.mask(piece=i) for i in range(4)]
    assert [coords(m) for m in masks] == pieces
    for i in range(4):
        for j in range(i + 1, 4):
            assert not (masks[i] & masks[j]).any()
    union = masks[0] | masks[1] | masks[2] | masks[3]
    assert torch.equal(union, trig.mask())

    x = rand_batch(shape)
    full = trig.apply(x)
    # stamping the pieces one after another equals stamping the global trigger
    seq = x
    for i in range(4):
        seq = trig.apply(seq, piece=i)
    assert torch.equal(seq, full)
    # each piece sets exactly its pixels to 1 in every channel
    for i, m in enumerate(masks):
        out = trig.apply(x, piece=i)
        assert torch.all(out[:, :, m] == 1.0)
        assert torch.equal(out[:, :, ~m], x[:, :, ~m])
    assert torch.all(full[:, :, union] == 1.0)


def test_dba_custom_geometry_and_value():
    trig = create_trigger("dba", (1, 10, 12), rows=[2, 7, 9], cols=[[0, 1], [10, 11]], value=0.5)
    assert trig.num_pieces == 6
    assert coords(trig.mask(piece=3)) == line(7, 10, 11)  # row-major order
    out = trig.apply(torch.zeros(1, 1, 10, 12))
    assert out.sum() == pytest.approx(0.5 * 12)


def test_dba_piece_out_of_range():
    trig = create_trigger("dba", MNIST)
    x = rand_batch(MNIST)
    for bad in (4, -1, 1.0, True):
        with pytest.raises(ValueError):
            trig.apply(x, piece=bad)


def test_dba_errors():
    with pytest.raises(ValueError, match="no default geometry"):
        create_trigger("dba", (3, 64, 64))
    with pytest.raises(ValueError, match="outside"):
        create_trigger("dba", MNIST, rows=[0, 28])
    with pytest.raises(ValueError, match="outside"):
        create_trigger("dba", MNIST, cols=[[0, 3], [25, 28]])
    with pytest.raises(ValueError, match="overlaps"):
        create_trigger("dba", MNIST, cols=[[0, 3], [3, 6]])
    with pytest.raises(ValueError, match="stop < start"):
        create_trigger("dba", MNIST, cols=[[3, 0]])
    with pytest.raises(ValueError, match="value"):
        create_trigger("dba", MNIST, value=1.5)


# ---------------------------------------------------------------- blended


def test_blended_formula_and_seed():
    trig = create_trigger("blended", CIFAR, alpha=0.3, seed=7)
    x = rand_batch(CIFAR)
    out = trig.apply(x)
    torch.testing.assert_close(out, 0.7 * x + 0.3 * trig.pattern)
    assert trig.mask().all()
    same = create_trigger("blended", CIFAR, alpha=0.3, seed=7)
    other = create_trigger("blended", CIFAR, alpha=0.3, seed=8)
    assert torch.equal(same.pattern, trig.pattern)
    assert not torch.equal(other.pattern, trig.pattern)
    assert create_trigger("blended", CIFAR).alpha == 0.2


def test_blended_named_and_tensor_patterns():
    trig = create_trigger("blended", MNIST, pattern="checkerboard", alpha=1.0)
    out = trig.apply(torch.full((1, *MNIST), 0.5))
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 1] == 0.0 and out[0, 0, 1, 1] == 1.0
    pat = torch.full((28, 28), 0.25)
    out = create_trigger("blended", MNIST, pattern=pat, alpha=0.5).apply(torch.ones(2, *MNIST))
    torch.testing.assert_close(out, torch.full((2, *MNIST), 0.625))
    with pytest.raises(ValueError, match="pattern"):
        create_trigger("blended", MNIST, pattern="kitty")
    with pytest.raises(ValueError, match="pattern"):
        create_trigger("blended", MNIST, pattern=torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="alpha"):
        create_trigger("blended", MNIST, alpha=-0.1)


# ---------------------------------------------------------------- sinusoidal


def test_sinusoidal_defaults_match_label_paper():
    trig = create_trigger("sinusoidal", CIFAR)
    x = torch.full((2, *CIFAR), 0.5)
    out = trig.apply(x)
    # uint8 formula from the paper: 6 * sin(linspace(0, 16 pi, 32)) per column
    expected_cols = 6 * torch.sin(torch.linspace(0, 16 * math.pi, 32, dtype=torch.float64)) / 255
    delta = out - x
    torch.testing.assert_close(delta[0, 1, 5], expected_cols.float(), atol=1e-6, rtol=0)
    # identical in every row, channel and sample
    assert torch.allclose(delta, delta[0, 0, 0].expand_as(delta), atol=1e-7)
    assert trig.mask().all()


def test_sinusoidal_clips_and_custom_params():
    trig = create_trigger("sinusoidal", (1, 4, 5), amplitude=0.5, frequency=0.25)
    # linspace(0, pi/2, 5): sin = 0, .383, .707, .924, 1
    out = trig.apply(torch.full((1, 1, 4, 5), 0.8))
    assert out[0, 0, 0, 0] == pytest.approx(0.8)
    assert out[0, 0, 0, 2] == 1.0 and out[0, 0, 0, 4] == 1.0
    out = create_trigger("sinusoidal", (1, 4, 5), amplitude=0.5, frequency=0.75).apply(torch.zeros(1, 1, 4, 5))
    assert out.min() == 0.0  # negative half of the wave clipped at 0
    with pytest.raises(ValueError, match="frequency"):
        create_trigger("sinusoidal", CIFAR, frequency="high")


# ---------------------------------------------------------------- turner


def official_stamp(image: torch.Tensor, pixel_ops) -> torch.Tensor:
    """Stamp a CHW float image the way the FLIP label code does: a uint8 PIL RGB image, PIL (x, y) access."""
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(arr, mode="RGB")
    pixel_ops(pil)
    return torch.from_numpy(__import__("numpy").asarray(pil).copy()).permute(2, 0, 1).float() / 255.0


def official_turner(pil, all_corners: bool) -> None:
    """The code's TurnerPoisoner.poison, restated: +-255 on the mask, PIL clips; `all-corners` mirrors."""
    mask = [((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1),
            ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1)]
    px = pil.load()
    w, h = pil.size
    for (x, y), sign in mask:
        r, g, b = px[x % w, y % h]
        shifted = tuple(max(0, min(255, v + sign * 255)) for v in (r, g, b))
        px[x % w, y % h] = shifted
        if all_corners:
            for xx, yy in ((-x - 1, y), (x, -y - 1), (-x - 1, -y - 1)):
                px[xx % w, yy % h] = shifted


def test_turner_is_the_official_bottom_right_pattern_with_its_odd_pixel():
    trig = create_trigger("turner", CIFAR)
    assert coords(trig.mask()) == {(r, c) for r in (29, 30, 31) for c in (29, 30, 31)}
    out = trig.apply(torch.full((2, *CIFAR), 0.5))
    expected = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])  # rows 29..31, cols 29..31
    assert torch.equal(out[:, :, 29:, 29:], expected.expand(2, 3, 3, 3))
    assert out[0, 0, 29, 29] == 0.0  # the -255 pixel where a checkerboard would be white
    assert torch.all(out[..., ~trig.mask()] == 0.5)
    image = rand_batch(CIFAR, n=1, seed=3)[0]
    image = (image * 255).round() / 255
    assert torch.equal(trig.apply(image), official_stamp(image, lambda pil: official_turner(pil, False)))


def test_turner_all_corners_mirrors_the_pattern_like_the_official_4xl():
    trig = create_trigger("turner", CIFAR, corners="all")
    assert trig.mask().sum() == 4 * 9
    image = (rand_batch(CIFAR, n=1, seed=4)[0] * 255).round() / 255
    out = trig.apply(image)
    assert torch.equal(out, official_stamp(image, lambda pil: official_turner(pil, True)))
    assert torch.equal(out[0, :3, :3], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 0]]))  # top-left: both flips
    grey = create_trigger("turner", MNIST, corners="all").apply(torch.full((1, *MNIST), 0.5))[0, 0]
    assert torch.equal(grey[:3, -3:], grey[:3, :3].flip(1)) and torch.equal(grey[-3:, :3], grey[:3, :3].flip(0))
    with pytest.raises(ValueError, match="corners"):
        create_trigger("turner", MNIST, corners="four")
    with pytest.raises(ValueError, match="at least 6x6"):
        create_trigger("turner", (1, 5, 5), corners="all")


# ---------------------------------------------------------------- pixel (the FLIP label code's "p")


def official_pixel(pil, pos, col) -> None:
    """The code's PixelPoisoner(method="pixel"): one putpixel at PIL (x, y)."""
    pil.putpixel(pos, col)


OFFICIAL_PIXELS = [((11, 16), (101, 0, 25)), ((5, 27), (101, 123, 121)), ((30, 7), (0, 36, 54))]


def test_pixel_positions_and_colours_are_the_official_column_first_ones():
    image = (rand_batch(CIFAR, n=1, seed=5)[0] * 255).round() / 255
    for count in (1, 2, 3):
        trig = create_trigger("pixel", CIFAR, count=count, stamp="all")
        assert coords(trig.mask()) == {(y, x) for (x, y), _ in OFFICIAL_PIXELS[:count]}
        expected = image
        for pos, col in OFFICIAL_PIXELS[:count]:
            expected = official_stamp(expected, lambda pil, pos=pos, col=col: official_pixel(pil, pos, col))
        assert torch.equal(trig.apply(image), expected)
    one = create_trigger("pixel", CIFAR, count=1).apply(torch.zeros(1, *CIFAR))
    assert torch.equal(one[0, :, 16, 11], torch.tensor([101, 0, 25]) / 255.0) and (one != 0).sum() == 2


def test_pixel_3xp_stamps_one_of_three_pixels_per_image_reproducibly():
    trig = create_trigger("pixel", CIFAR)
    out = trig.apply(torch.full((300, *CIFAR), 0.5))
    changed = (out != 0.5).any(dim=1)  # N x H x W
    per_image = [coords(c) for c in changed]
    spots = [{(16, 11)}, {(27, 5)}, {(7, 30)}]
    assert all(p in spots for p in per_image)
    counts = [sum(p == s for p in per_image) for s in spots]
    assert min(counts) > 70  # all three in use, about a third each
    assert [spots.index(p) for p in per_image] == trig.choices(300).tolist()
    assert torch.equal(trig.apply(torch.full((300, *CIFAR), 0.5)), out)  # the same call stamps the same way
    assert not torch.equal(create_trigger("pixel", CIFAR, seed=1).apply(torch.full((300, *CIFAR), 0.5)), out)
    with pytest.raises(ValueError, match="pixel"):
        create_trigger("pixel", MNIST)  # column 30 does not fit a 28x28 image
    with pytest.raises(ValueError, match="count"):
        create_trigger("pixel", CIFAR, count=4)
    with pytest.raises(ValueError, match="stamp"):
        create_trigger("pixel", CIFAR, stamp="some")


# ---------------------------------------------------------------- fixed_pixels


def test_fixed_pixels_defaults_cifar():
    trig = create_trigger("fixed_pixels", CIFAR)
    assert coords(trig.mask()) == {(16, 11), (27, 5), (7, 30)}  # the FLIP code's putpixel (x, y), as (row, col)
    out = trig.apply(torch.full((2, *CIFAR), 0.5))
    assert torch.equal(out[1, :, 16, 11], torch.tensor([0x65, 0x00, 0x19]) / 255.0)
    assert torch.equal(out[0, :, 27, 5], torch.tensor([0x65, 0x7B, 0x79]) / 255.0)
    assert torch.equal(out[0, :, 7, 30], torch.tensor([0x00, 0x24, 0x36]) / 255.0)
    assert (out != 0.5).any(dim=1).sum() == 2 * 3


def test_fixed_pixels_grey_uses_mean_and_rejects_outside():
    trig = create_trigger("fixed_pixels", (1, 32, 32))
    out = trig.apply(torch.zeros(1, 1, 32, 32))
    assert out[0, 0, 16, 11].item() == pytest.approx((0x65 + 0x00 + 0x19) / 3 / 255)
    with pytest.raises(ValueError, match=r"pixel \(7, 30\).*outside"):
        create_trigger("fixed_pixels", MNIST)  # the CIFAR defaults do not fit 28x28
    with pytest.raises(ValueError, match="outside"):
        create_trigger("fixed_pixels", CIFAR, pixels=[(0, 32)], colors=[1.0])
    with pytest.raises(ValueError, match="colors"):
        create_trigger("fixed_pixels", CIFAR, pixels=[(0, 0)], colors=["#12"])
    with pytest.raises(ValueError, match="colors"):
        create_trigger("fixed_pixels", CIFAR, pixels=[(0, 0), (1, 1)], colors=[1.0])


# ---------------------------------------------------------------- factory errors


def test_factory_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="unknown trigger 'badnet'") as exc:
        create_trigger("badnet", CIFAR)
    for name in TRIGGERS:
        assert name in str(exc.value)


def test_factory_unknown_kwarg_names_it_and_lists_accepted():
    with pytest.raises(ValueError) as exc:
        create_trigger("dba", MNIST, colums=[[0, 3]])
    msg = str(exc.value)
    assert "colums" in msg and "rows" in msg and "cols" in msg and "value" in msg


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("pixel_pattern", {"row": 26}),
        ("pixel_pattern", {"col": -1}),
        ("pixel_pattern", {"size": 29}),
        ("dba", {"rows": [30]}),
        ("turner", {"corners": "left"}),
        ("pixel", {"count": 3}),
        ("fixed_pixels", {"pixels": [(28, 0)], "colors": [1.0]}),
    ],
)
def test_factory_out_of_image_geometry(name, kwargs):
    with pytest.raises(ValueError):
        create_trigger(name, MNIST, **kwargs)


@pytest.mark.parametrize("shape", [(3, 32), (0, 32, 32), "abc"])
def test_factory_bad_image_shape(shape):
    with pytest.raises(ValueError, match="image_shape"):
        create_trigger("dba", shape)
