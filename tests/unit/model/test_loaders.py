"""Each loader on a small sample of its original format, the time split, and the real samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.data import DataFormatError, describe, load_events, sessionize, split_by_time
from model.events import EventType

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _check_table(df: pd.DataFrame) -> None:
    assert list(df.columns)[:4] == ["SessionId", "ItemId", "Time", "EventType"]
    assert set(df.columns[4:]) <= {"Category", "Price"}  # optional side features (model.features)
    assert df["SessionId"].dtype == np.int64
    assert df["Time"].dtype == np.float64
    assert df["EventType"].dtype == np.int8
    assert all(isinstance(x, str) for x in df["ItemId"])
    key = list(zip(df["SessionId"], df["Time"]))
    assert key == sorted(key)


def test_session_rec_tsv(tmp_path) -> None:
    p = tmp_path / "train.txt"
    p.write_text("SessionId\tItemId\tTime\n2\t214\t1396.5\n1\t99\t20.0\n1\t98\t10.0\n")
    df = load_events(p, "session-rec")
    _check_table(df)
    assert df["ItemId"].tolist() == ["98", "99", "214"]
    assert set(df["EventType"]) == {int(EventType.CLICK)}


def test_yoochoose_clicks_and_buys_from_file_or_directory(tmp_path) -> None:
    (tmp_path / "yoochoose-clicks.dat").write_text(
        "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n"
        "2,2014-04-07T13:56:37.614Z,214662742,S\n")
    (tmp_path / "yoochoose-buys.dat").write_text("1,2014-04-07T10:58:00.000Z,214536500,1200,1\n")
    for path in (tmp_path, tmp_path / "yoochoose-clicks.dat", tmp_path / "yoochoose-buys.dat"):
        df = load_events(path, "yoochoose")
        _check_table(df)
        assert len(df) == 4
        assert df["EventType"].tolist() == [EventType.CLICK, EventType.CLICK, EventType.PURCHASE, EventType.CLICK]
        assert df["Time"].iloc[0] == pytest.approx(1396867869.277)


def test_retailrocket_sessionised_by_gap(tmp_path) -> None:
    p = tmp_path / "events.csv"
    p.write_text("timestamp,visitorid,event,itemid,transactionid\n"
                 "1433221332117,257597,view,355908,\n"
                 "1433221400000,257597,addtocart,355908,\n"
                 "1433224214164,257597,transaction,355908,4000\n"  # 47 min later: new session
                 "1433221999827,111016,view,248676,\n")
    df = load_events(p, "retailrocket")
    _check_table(df)
    assert df["SessionId"].nunique() == 3
    assert sorted(df["EventType"].tolist()) == [0, 0, 2, 3]
    with pytest.raises(DataFormatError):
        bad = tmp_path / "bad" / "events.csv"
        bad.parent.mkdir()
        bad.write_text("timestamp,visitorid,event,itemid\n1,2,like,3\n")
        load_events(bad, "retailrocket")


def test_diginetica_views_with_purchases_beside(tmp_path) -> None:
    (tmp_path / "train-item-views.csv").write_text(
        "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n1;NA;31331;1031018;2016-05-09\n"
        "2;5;32118;0;2016-05-10\n")
    (tmp_path / "train-purchases.csv").write_text(
        "sessionId;userId;timeframe;eventdate;ordernumber;itemId\n1;NA;2000000;2016-05-09;7;31331\n"
        "777;NA;1;2016-05-09;8;1\n")
    df = load_events(tmp_path, "diginetica")
    _check_table(df)
    assert len(df) == 4  # purchase of session 777 has no views: dropped
    assert df["EventType"].tolist() == [EventType.VIEW, EventType.VIEW, EventType.PURCHASE, EventType.VIEW]
    assert df["Time"].iloc[1] - df["Time"].iloc[0] == pytest.approx(504.709)


def test_otto_jsonl(tmp_path) -> None:
    p = tmp_path / "train.jsonl"
    lines = [{"session": 0, "events": [{"aid": 5, "ts": 1659304800025, "type": "clicks"},
                                       {"aid": 5, "ts": 1659304900025, "type": "carts"},
                                       {"aid": 5, "ts": 1659305000025, "type": "orders"}]},
             {"session": 1, "events": [{"aid": 7, "ts": 1659304800000, "type": "clicks"}]}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    df = load_events(p, "otto")
    _check_table(df)
    assert df["EventType"].tolist() == [EventType.CLICK, EventType.CART, EventType.PURCHASE, EventType.CLICK]
    assert df["Time"].iloc[0] == pytest.approx(1659304800.025)
    p.write_text('{"session": 0}\n')
    with pytest.raises(DataFormatError):
        load_events(p, "otto")


def test_movielens_split_by_gap(tmp_path) -> None:
    p = tmp_path / "u.data"
    p.write_text("1\t10\t5\t1000\n1\t11\t3\t1100\n1\t12\t4\t9000\n2\t10\t1\t500\n")
    df = load_events(p, "movielens")
    _check_table(df)
    assert df["SessionId"].nunique() == 3
    assert df.groupby("SessionId").size().sort_values().tolist() == [1, 1, 2]


def test_synthetic_spec_and_unknown_format() -> None:
    df = load_events("synthetic:50", "synthetic")
    _check_table(df)
    assert df["SessionId"].nunique() == 50
    with pytest.raises(ValueError, match="unknown data format"):
        load_events("x", "parquet")


def test_sessionize_gap() -> None:
    sid = sessionize(np.array([1, 1, 1, 2]), np.array([0.0, 100.0, 5000.0, 50.0]), gap_s=1800)
    assert sid.tolist() == [0, 0, 1, 2]


def test_split_by_time_like_reference() -> None:
    day = 86400.0
    rows = [(1, "a", 0.0), (1, "b", 10.0), (2, "a", 5 * day), (2, "c", 5 * day + 1), (2, "b", 5 * day + 2),
            (3, "a", 0.5 * day), (3, "b", 5.5 * day), (4, "z", 5.8 * day), (4, "a", 5.9 * day)]
    df = pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time"]).assign(EventType=np.int8(1))
    train, test = split_by_time(df, days=1.0)
    assert sorted(train["SessionId"].unique()) == [1]
    # session 2 (ends after the cut) keeps a, b (c unseen in train); session 4 keeps only "a": dropped
    assert test.groupby("SessionId")["ItemId"].apply(list).to_dict() == {2: ["a", "b"], 3: ["a", "b"]}


needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"real data samples not found at {DATA}")


@needs_data
@pytest.mark.parametrize("fmt,rel,events", [
    ("session-rec", "yoochoose_rsc15_100k/yoochoose-clicks-100k_test.txt", None),
    ("diginetica", "diginetica/sample_train-item-views.csv", 12_647),
    ("otto", "otto_sample/train.jsonl", 862),
    ("movielens", "movielens_100k/u.data", 100_000),
])
def test_real_samples_load(fmt, rel, events) -> None:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} not present")
    df = load_events(path, fmt)
    _check_table(df)
    if events is not None:
        assert len(df) == events
    info = describe(df)
    assert info["events"] == len(df) and info["sessions"] > 1
