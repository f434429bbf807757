import pytest
import torch

from flip_fl.attacks.flip_labels import flips

# margins: [4, -2, -2, -5, -3, -1]; highest incorrect class: [1, 1, 2, 2, 1, 0]
LOGITS = torch.tensor(
    [
        [5.0, 1.0, 0.0],
        [1.0, 3.0, 0.0],
        [0.0, 0.0, 2.0],
        [2.0, 0.0, 7.0],
        [0.0, 4.0, 1.0],
        [3.0, 1.0, 2.0],
    ]
)
Y = torch.tensor([0, 0, 1, 0, 2, 2])


def test_margins():
    assert flips.margins(LOGITS, Y).tolist() == [4.0, -2.0, -2.0, -5.0, -3.0, -1.0]


def test_select_flips_count():
    idx, new = flips.select_flips(LOGITS, Y, 3)
    assert idx.tolist() == [3, 4, 1]
    assert new.tolist() == [2, 1, 1]


def test_select_flips_ties_lower_index_first():
    # images 1 and 2 tie at margin -2: the lower index comes first
    idx, new = flips.select_flips(LOGITS, Y, 4)
    assert idx.tolist() == [3, 4, 1, 2]
    assert new.tolist() == [2, 1, 1, 2]
    idx, _ = flips.select_flips(LOGITS, Y, 3)
    assert 2 not in idx.tolist()


def test_select_flips_fraction():
    assert flips.select_flips(LOGITS, Y, 0.5)[0].tolist() == [3, 4, 1]  # round(3.0)
    assert flips.select_flips(LOGITS, Y, 0.34)[0].tolist() == [3, 4]  # round(2.04)


def test_full_budget_flips_positive_margins_to_best_wrong_class():
    idx, new = flips.select_flips(LOGITS, Y, 6)
    assert idx.tolist() == [3, 4, 1, 2, 5, 0]
    assert new.tolist() == [2, 1, 1, 2, 0, 1]
    assert (new != Y[idx]).all()


def test_zero_budget():
    idx, new = flips.select_flips(LOGITS, Y, 0)
    assert idx.numel() == 0 and new.numel() == 0


@pytest.mark.parametrize("bad", [7, -1, 0.0, 1.0, 1.5, True, "3"])
def test_bad_budgets(bad):
    with pytest.raises(ValueError):
        flips.resolve_budget(bad, 6)


def test_aggregate_margins_worst_case_over_runs():
    run2 = LOGITS.clone()
    run2[3] = torch.tensor([8.0, 0.0, 7.0])  # margin +1 instead of -5
    run2[5] = torch.tensor([0.0, 0.0, 9.0])  # margin +9 instead of -1
    assert flips.aggregate_margins([LOGITS, run2], Y).tolist() == [4.0, -2.0, -2.0, 1.0, -3.0, 9.0]
    assert flips.aggregate_margins([LOGITS, run2], Y, "min").tolist() == [4.0, -2.0, -2.0, -5.0, -3.0, -1.0]
    # with two runs image 3 is no longer a top flip; new labels come from the mean logits
    idx, new = flips.select_flips([LOGITS, run2], Y, 3)
    assert idx.tolist() == [4, 1, 2]
    assert new.tolist() == [1, 1, 2]


def test_flip_labels_at_budgets():
    out = flips.flip_labels_at_budgets(LOGITS, Y, [0, 2, 0.5])
    assert set(out) == {0, 2, 0.5}
    assert out[0].tolist() == Y.tolist()
    assert out[2].tolist() == [0, 0, 1, 2, 1, 2]
    assert out[0.5].tolist() == [0, 1, 1, 2, 1, 2]
    assert out[2].dtype == torch.long


def test_apply_flips_does_not_modify_input():
    y = Y.clone()
    out = flips.apply_flips(y, torch.tensor([0]), torch.tensor([2]))
    assert out.tolist() == [2, 0, 1, 0, 2, 2] and y.tolist() == Y.tolist()


def test_random_flips():
    y = torch.arange(100) % 10
    idx, new = flips.random_flips(y, 20, 4, torch.Generator().manual_seed(0))
    assert len(idx) == 20 == len(set(idx.tolist()))
    assert (y[idx] != 4).all() and (new == 4).all()
    idx2, _ = flips.random_flips(y, 20, 4, torch.Generator().manual_seed(0))
    assert idx.tolist() == idx2.tolist()
    assert len(flips.random_flips(y, 0.1, 4, torch.Generator())[0]) == 10
    with pytest.raises(ValueError):
        flips.random_flips(y, 91, 4, torch.Generator())


def test_matched_random_flips_keep_the_class_make_up_and_labels():
    y = torch.arange(200) % 10
    indices = torch.tensor([9, 19, 29, 39, 3, 13])  # four of class 9, two of class 3
    new = torch.tensor([4, 4, 4, 1, 4, 7])
    idx, labels = flips.matched_random_flips(y, indices, new, torch.Generator().manual_seed(0))
    assert len(idx) == 6 == len(set(idx.tolist()))
    assert sorted(y[idx].tolist()) == [3, 3, 9, 9, 9, 9]
    assert sorted(labels[y[idx] == 9].tolist()) == [1, 4, 4, 4] and sorted(labels[y[idx] == 3].tolist()) == [4, 7]
    draws = {tuple(flips.matched_random_flips(y, indices, new, torch.Generator().manual_seed(s))[0].tolist())
             for s in range(5)}
    assert len(draws) > 1  # random images of those classes, not the given ones
    empty_idx, empty_labels = flips.matched_random_flips(y, indices[:0], new[:0], torch.Generator())
    assert empty_idx.numel() == 0 and empty_labels.numel() == 0
