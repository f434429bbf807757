"""Tests for flip_fl.defenses.flip_defense: harden_batch, stamp_counts and TriggerCache."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from flip_fl.defenses.flip_defense.cache import UNIVERSAL, TriggerCache
from flip_fl.defenses.flip_defense.hardening import harden_batch
from flip_fl.defenses.flip_defense.inversion import stamp

C, H, W = 3, 6, 6


def make_batch(B: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g) * 0.8 + 0.1  # never equal to the patterns below
    y = torch.arange(B) % 10
    return x, y


def make_triggers():
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0, 0:2, 0:2] = 1.0
    masks[1, 0, 4:6, 4:6] = 0.5
    masks[2, 0, 2:4, 2:4] = 1.0
    patterns = torch.stack([torch.full((C, H, W), 1.0), torch.zeros(C, H, W), torch.full((C, H, W), 0.95)])
    return masks, patterns


def changed_rows(x, x2):
    return (x != x2).flatten(1).any(1)


@pytest.mark.parametrize("portion", [0.1, 0.5, 0.9, 1.0])
def test_exact_count_and_untouched_rows(portion):
    x, y = make_batch()
    y_before = y.clone()
    x_before = x.clone()
    masks, patterns = make_triggers()
    sources = [[1], [2, 3], [3]]  # eligible labels: 1, 2, 3
    x2, n = harden_batch(x, y, masks, patterns, portion, torch.Generator().manual_seed(1), sources=sources)
    eligible = (y == 1) | (y == 2) | (y == 3)
    assert n == int(int(eligible.sum()) * portion)
    ch = changed_rows(x, x2)
    assert int(ch.sum()) == n
    assert not ch[~eligible].any()  # non-eligible untouched
    assert torch.equal(x2[~ch], x[~ch])
    assert torch.equal(y, y_before) and torch.equal(x, x_before)  # inputs not modified
    assert x2 is not x
    # every stamped row is the clipped stamp with a trigger it is eligible for
    for b in torch.nonzero(ch).flatten().tolist():
        options = [j for j, src in enumerate(sources) if int(y[b]) in src]
        assert any(
            torch.allclose(x2[b], stamp(x[b], masks[j], patterns[j]).clamp(0, 1)) for j in options
        ), b
    assert x2.min() >= 0 and x2.max() <= 1


def test_portion_zero_is_identity():
    x, y = make_batch()
    masks, patterns = make_triggers()
    x2, n = harden_batch(x, y, masks, patterns, 0.0, torch.Generator().manual_seed(0), sources=[[1], [2], [3]])
    assert n == 0 and torch.equal(x2, x)


def test_trigger_choice_among_eligible_and_empty_masks_skipped():
    x, y = make_batch(200)
    masks, patterns = make_triggers()
    masks[2] = 0.0  # empty (failed) trigger: never used
    x2, n = harden_batch(x, y, masks, patterns, 1.0, torch.Generator().manual_seed(0), sources=[[3], [3], [3, 4]])
    # label 4 only has the empty trigger -> not eligible; label 3 uses triggers 0 and 1
    assert n == int((y == 3).sum())
    assert not changed_rows(x, x2)[y == 4].any()
    used = [0, 0]
    for b in torch.nonzero(y == 3).flatten().tolist():
        hit = [torch.allclose(x2[b], stamp(x[b], masks[j], patterns[j]).clamp(0, 1)) for j in (0, 1)]
        assert sum(hit) == 1
        used[hit.index(True)] += 1
    assert min(used) > 0  # both eligible triggers get used


def test_targets_mode_and_all_mode_and_clipping():
    x, y = make_batch(40)
    masks, patterns = make_triggers()
    _, n = harden_batch(x, y, masks[:1], patterns[:1], 1.0, torch.Generator().manual_seed(0), targets=[2])
    assert n == int((y != 2).sum())
    xo = x.clone()
    xo[:, :, 0, 0] = 1.5  # out-of-range input: stamped rows are clipped
    m = torch.zeros(1, 1, H, W)
    m[0, 0, 5, 5] = 1.0
    x2, n = harden_batch(xo, y, m, patterns[:1], 0.5, torch.Generator().manual_seed(0))
    assert n == 20
    ch = (x2[:, 0, 5, 5] == 1.0)
    assert int(ch.sum()) == 20
    assert torch.all(x2[ch] <= 1.0)
    assert torch.all(x2[~ch][:, :, 0, 0] == 1.5)  # untouched rows are not clipped


def test_deterministic_given_generator():
    x, y = make_batch()
    masks, patterns = make_triggers()
    a, _ = harden_batch(x, y, masks, patterns, 0.5, torch.Generator().manual_seed(7), sources=[[1, 2], [2], [5]])
    b, _ = harden_batch(x, y, masks, patterns, 0.5, torch.Generator().manual_seed(7), sources=[[1, 2], [2], [5]])
    assert torch.equal(a, b)


def test_no_triggers_or_bad_args():
    x, y = make_batch(8)
    x2, n = harden_batch(x, y, torch.zeros(0, 1, H, W), torch.zeros(0, C, H, W), 0.9)
    assert n == 0 and torch.equal(x2, x)
    masks, patterns = make_triggers()
    with pytest.raises(ValueError):
        harden_batch(x, y, masks, patterns, 1.5)
    with pytest.raises(ValueError):
        harden_batch(x, y, masks, patterns, 0.5, sources=[[1]])


# ----------------------------------------------------------------------------- TriggerCache


def filled_cache() -> TriggerCache:
    rng = np.random.default_rng(0)
    cache = TriggerCache(num_classes=10)
    for t in range(10):
        cache.record(UNIVERSAL, t, rng.random((1, H, W)), rng.random((C, H, W)), float(rng.uniform(5, 30)))
    cache.record(3, 5, rng.random((1, H, W)), rng.random((C, H, W)), 2.5, cost=0.02)
    cache.record(4, 1, None, None, float("inf"))  # inverted, nothing found
    cache.mask_sizes[7, 8] = np.nan  # unknown
    cache.warmed_up = True
    return cache


def assert_same(a: TriggerCache, b: TriggerCache):
    assert a.num_classes == b.num_classes and a.warmed_up == b.warmed_up
    for name in ("mask_sizes", "universal_sizes"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True)
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert list(a.masks) == list(b.masks) and list(a.patterns) == list(b.patterns) and a.costs == b.costs
    for k in a.masks:
        assert np.array_equal(a.masks[k], b.masks[k]) and a.masks[k].dtype == b.masks[k].dtype
        assert np.array_equal(a.patterns[k], b.patterns[k])


def test_cache_roundtrip_exact():
    cache = filled_cache()
    arrays = cache.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert_same(cache, TriggerCache.from_arrays(arrays))
    # through np.savez as well
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf) as z:
        assert_same(cache, TriggerCache.from_arrays({k: z[k] for k in z.files}))
    # empty cache
    empty = TriggerCache(num_classes=4)
    back = TriggerCache.from_arrays(empty.to_arrays())
    assert_same(empty, back)
    assert np.isnan(back.mask_sizes).all() and not back.warmed_up


def test_cache_record_and_lookup():
    cache = filled_cache()
    assert np.isnan(np.diag(cache.mask_sizes)).all()
    assert cache.mask_sizes[3, 5] == 2.5 and np.isinf(cache.mask_sizes[4, 1])
    assert np.isfinite(cache.universal_sizes).all() and np.isnan(cache.mask_sizes[0, 1])  # rows left alone
    assert cache.costs[(3, 5)] == 0.02 and (4, 1) not in cache.costs
    m, p = cache.get_trigger(3, 5)
    assert np.array_equal(m, cache.masks[(3, 5)])
    m, p = cache.get_trigger(2, 5)  # falls back to the universal trigger of target 5
    assert np.array_equal(m, cache.masks[(UNIVERSAL, 5)]) and p.shape == (C, H, W)
    assert TriggerCache(num_classes=3).get_trigger(0, 1) is None


def test_pair_sizes_fall_back_to_the_universal_size_of_the_target():
    cache = filled_cache()
    sizes = cache.pair_sizes()
    assert sizes[3, 5] == 2.5 and np.isinf(sizes[4, 1])
    assert sizes[0, 1] == cache.universal_sizes[1] and np.isnan(np.diag(sizes)).all()


def test_smallest_pairs_ranks_ties_at_random_and_can_avoid_a_source():
    cache = TriggerCache(num_classes=10)
    cache.mask_sizes[:] = 20.0
    np.fill_diagonal(cache.mask_sizes, np.nan)
    cache.mask_sizes[3, 5] = 2.0
    cache.mask_sizes[6, 2] = np.inf  # nothing found there: never ranked
    rng = np.random.default_rng(0)
    assert cache.smallest_pairs(1, rng, range(10)) == [(3, 5)]
    assert cache.smallest_pairs(1, rng, range(10), avoid_source=3)[0][0] != 3
    assert cache.smallest_pairs(1, rng, [3], avoid_source=3) == []
    ties = [tuple(cache.smallest_pairs(2, rng, range(10))[1]) for _ in range(2000)]
    assert (6, 2) not in ties and len(set(ties)) > 60  # the 88 pairs at 20.0 come up in random order
    assert TriggerCache(num_classes=4).smallest_pairs(3, rng, range(4)) == []  # nothing known yet
