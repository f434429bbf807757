import torch

from flip_fl.attacks.flip_labels import AugmentSettings, augment, paired_augment


def test_paired_views_get_same_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 12, 12) * 0.5 + 0.25  # strictly positive: zero marks padding
    delta = torch.linspace(0, 0.2, 12).expand(3, 12, 12)  # column-dependent, detects flips
    a, b = paired_augment((x, x + delta), AugmentSettings(), g)
    assert a.shape == x.shape == b.shape
    pad = a == 0
    assert pad.any() and (pad == (b == 0)).all()
    # where not padding, b - a is the delta moved by the same crop/flip as a
    same = paired_augment((x, x + delta), AugmentSettings(), torch.Generator().manual_seed(0))
    assert torch.equal(same[0], a) and torch.equal(same[1], b)
    d_aug = paired_augment((delta.expand_as(x).contiguous(),), AugmentSettings(),
                           torch.Generator().manual_seed(0))[0]
    assert torch.allclose((b - a)[~pad], d_aug[~pad], atol=1e-6)


def test_augmentation_changes_images_and_keeps_pixels():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 10, 10) + 1.0
    a = augment(x, AugmentSettings(), g)
    assert not torch.equal(a, x)
    # every non-padding pixel of an output comes from its own input image
    for i in range(32):
        vals = a[i][a[i] != 0]
        assert torch.isin(vals, x[i]).all()


def test_flip_only_and_disabled():
    x = torch.rand(16, 2, 5, 5)
    a = augment(x, AugmentSettings(padding=0), torch.Generator().manual_seed(0))
    for i in range(16):
        assert torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1))
    off = AugmentSettings(enabled=False)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert augment(x, off, g) is x
    assert torch.equal(g.get_state(), state)  # no random numbers drawn
