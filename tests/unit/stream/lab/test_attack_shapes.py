"""The attack experiment's pure parts: fake-session shapes, target choice, and the normal-user measures
read back from published lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stream.lab import attack
from stream.lab.attack import SHAPES, exposure_report, fake_sessions, normal_hr, pick_targets
from stream.settings import SettingsError


def _stream(n_sessions: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        t = 1_000_000.0 + rng.uniform(0, 86_400)
        for _ in range(int(rng.integers(2, 9))):
            t += float(rng.lognormal(np.log(50), 1.0))
            rows.append((s, str(int(rng.zipf(1.3)) % 300), t, 1))
    return pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time", "EventType"])


def test_bot_sessions_end_on_the_target_on_a_timer() -> None:
    rest = _stream()
    known = sorted(rest["ItemId"].unique())
    targets = pick_targets(rest, known, 1, seed=0)
    fakes = fake_sessions(rest, 0.05, SHAPES["bot"], targets, known, seed=1)
    assert fakes["SessionId"].nunique() == round(0.05 * rest["SessionId"].nunique())
    assert fakes["SessionId"].min() > rest["SessionId"].max()
    for _, s in fakes.groupby("SessionId"):
        assert s["ItemId"].iloc[-1] == targets[0]
        assert SHAPES["bot"].filler_min + 1 <= len(s) <= SHAPES["bot"].filler_max + 1
        assert np.allclose(np.diff(s["Time"].to_numpy()), SHAPES["bot"].gap_s)
    assert fakes["Time"].between(rest["Time"].min(), rest["Time"].max()).all()


def test_human_sessions_have_irregular_gaps_and_a_category_of_targets() -> None:
    rest = _stream()
    known = sorted(rest["ItemId"].unique())
    targets = pick_targets(rest, known, 3, seed=2)
    fakes = fake_sessions(rest, 0.1, SHAPES["human"], targets, known, seed=3)
    last = fakes.groupby("SessionId")["ItemId"].last()
    assert set(last) == set(targets)
    gaps = fakes.groupby("SessionId")["Time"].diff().dropna().to_numpy()
    assert gaps.std() / gaps.mean() > 0.5


def test_exposure_and_hr_count_normal_users_only() -> None:
    stream = pd.DataFrame({"SessionId": [1, 1, 1, 2, 2], "ItemId": ["a", "b", "c", "x", "T"],
                           "Time": [1.0, 2.0, 3.0, 1.5, 2.5], "EventType": 1})
    lists = pd.DataFrame({"user": ["1", "1", "1", "2", "2"], "ts": [1.0, 2.0, 3.0, 1.5, 2.5],
                          "items": [["b", "T"], ["x"], ["c"], ["T"], ["T"]],
                          "partition": 0, "offset": [0, 2, 4, 1, 3]})
    exp = exposure_report(lists, {"2"}, {"T"}, 2, 1.0, 3.0)
    assert exp["share"] == 1 / 3 and exp["mean_rank"] == 2.0 and exp["lists"] == 3
    hr = normal_hr(lists, stream, {"2"}, 20)
    assert hr["n"] == 2 and hr["hr"]["20"] == 0.5  # b was in the first list, c not in the second


def test_defence_changes_parse_by_the_settings_type_and_override_the_defaults() -> None:
    changed = attack.defence_settings(["guardrail_max_item_exposure_factor=0", "guardrail_hold_back_items = 7"])
    assert changed["guardrail_max_item_exposure_factor"] == 0.0
    assert changed["guardrail_hold_back_items"] == 7 and isinstance(changed["guardrail_hold_back_items"], int)
    assert changed["training_filter"] is attack.DEFENCES["training_filter"]
    assert attack.defence_settings([]) == attack.DEFENCES


@pytest.mark.parametrize("change", ["no_such_setting=1", "guardrail_hold_back_items=many", "=3", "top_k"])
def test_a_bad_defence_change_is_refused_with_its_reason(change: str) -> None:
    with pytest.raises((SettingsError, SystemExit)):
        attack.defence_settings([change])
