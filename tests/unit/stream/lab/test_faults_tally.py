"""The fault script's count of what happened to the events it sent."""

from __future__ import annotations

from collections import Counter

from stream.lab.faults import tally


def test_tally_counts_answered_duplicated_and_missing_events():
    sent = {0, 1, 2, 3, 4}
    answers = Counter({0: 1, 1: 3, 3: 2, 9: 1})  # 2 and 4 never answered; 9 answered but never acknowledged
    assert tally(sent, answers, failed=1) == {
        "sent": 5, "send_failed": 1, "answered": 3, "duplicated": 3, "missing": 2, "answered_unacknowledged": 1,
    }


def test_tally_of_a_clean_run():
    sent = set(range(100))
    assert tally(sent, Counter({s: 1 for s in sent})) == {
        "sent": 100, "send_failed": 0, "answered": 100, "duplicated": 0, "missing": 0, "answered_unacknowledged": 0,
    }
