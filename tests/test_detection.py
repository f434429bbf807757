"""`flip_fl.evaluation.detection`: a defense's rejections scored as detection of the attacking clients."""

from __future__ import annotations

import json

import pytest

from flip_fl.evaluation.detection import detection_scores


def test_detection_scores_hand_example():
    kept = [True, False, False, True, True, False]
    mal = [False, True, False, True, False, True]
    s = detection_scores(kept, mal)
    # rejected: 1 (mal), 2 (benign), 5 (mal) -> TP 2, FP 1; kept malicious: 3 -> FN 1
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 1, 1, 2)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["rejection_rate"] == pytest.approx(0.5)
    assert s["false_positive_rate"] == pytest.approx(1 / 3)


def test_detection_scores_undefined_cases_are_none():
    nothing = detection_scores([True, True], [False, False])
    assert nothing["precision"] is None and nothing["recall"] is None and nothing["f1"] is None
    assert nothing["rejection_rate"] == 0.0
    missed = detection_scores([True, False], [True, False])
    assert missed["precision"] == 0.0 and missed["recall"] == 0.0 and missed["f1"] == 0.0
    json.dumps(missed)
