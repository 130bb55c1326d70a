"""Loaders for the original public session-data formats, all into one event table (:mod:`model.table`).

Every other part of gruflow (training, evaluation, the replay tools) reads only that table, so a new
format needs only a loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from model.events import EventType
from model.table import COLUMNS, DEFAULT_SESSION_GAP_S, event_table, sessionize, sort_events

__all__ = ["COLUMNS", "DEFAULT_SESSION_GAP_S", "FORMATS", "DataFormatError", "describe", "event_table", "load_events",
           "sessionize", "sort_events", "split_by_time", "split_latest_sessions"]

FORMATS = ("session-rec", "yoochoose", "retailrocket", "diginetica", "otto", "movielens", "synthetic")


class DataFormatError(ValueError):
    """The file does not look like the format it was loaded as; the message says what was expected."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def _check_columns(df: pd.DataFrame, needed: list[str], path: Path, fmt: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataFormatError(f"{path}: not a {fmt} file: missing column(s) {missing}; found {list(df.columns)}")


def load_session_rec(path: str | Path) -> pd.DataFrame:
    """session-rec / official GRU4Rec prepared TSV with header ``SessionId ItemId Time`` (epoch seconds)."""
    path = _require(Path(path))
    df = pd.read_csv(path, sep="\t", dtype={"ItemId": str})
    _check_columns(df, ["SessionId", "ItemId", "Time"], path, "session-rec TSV (SessionId<TAB>ItemId<TAB>Time)")
    if "EventType" in df.columns:
        types = df["EventType"].to_numpy()
    else:
        types = np.full(len(df), int(EventType.CLICK), dtype=np.int8)
    return event_table(df["SessionId"], df["ItemId"], df["Time"], types)


def _iso_to_epoch(values: pd.Series) -> np.ndarray:
    ts = pd.to_datetime(values, utc=True, format="ISO8601")
    return (ts - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)


def load_yoochoose(path: str | Path) -> pd.DataFrame:
    """RecSys Challenge 2015: ``yoochoose-clicks.dat`` (session,timestamp,item,category) as clicks and
    ``yoochoose-buys.dat`` (session,timestamp,item,price,quantity) as purchases.

    ``path`` may be either file or their directory; a file's sibling is loaded too when present."""
    path = _require(Path(path))
    folder = path if path.is_dir() else path.parent
    clicks, buys = folder / "yoochoose-clicks.dat", folder / "yoochoose-buys.dat"
    if path.is_file():
        if "buy" in path.name:
            buys = path
        else:
            clicks = path
    frames = []
    if clicks.exists():
        c = pd.read_csv(clicks, header=None, usecols=[0, 1, 2], names=["s", "t", "i"], dtype={"i": str, "t": str})
        frames.append((c, EventType.CLICK))
    if buys.exists():
        b = pd.read_csv(buys, header=None, usecols=[0, 1, 2], names=["s", "t", "i"], dtype={"i": str, "t": str})
        frames.append((b, EventType.PURCHASE))
    if not frames:
        raise DataFormatError(f"{path}: no yoochoose-clicks.dat or yoochoose-buys.dat found")
    parts = []
    for f, et in frames:
        if len(f) and not str(f["t"].iloc[0]).startswith(("19", "20")):
            raise DataFormatError(f"{path}: not a YooChoose .dat file (expected session,ISO-timestamp,item,...)")
        parts.append(pd.DataFrame({"s": f["s"], "i": f["i"], "t": _iso_to_epoch(f["t"]), "e": int(et)}))
    d = pd.concat(parts, ignore_index=True)
    return event_table(d["s"], d["i"], d["t"], d["e"])


_RETAILROCKET_TYPES = {"view": EventType.VIEW, "addtocart": EventType.CART, "transaction": EventType.PURCHASE}


def load_retailrocket(path: str | Path, gap_s: float = DEFAULT_SESSION_GAP_S) -> pd.DataFrame:
    """RetailRocket ``events.csv`` (timestamp ms, visitorid, event, itemid, transactionid); each visitor's
    events are split into sessions at gaps longer than ``gap_s``."""
    path = _require(Path(path))
    if path.is_dir():
        path = _require(path / "events.csv")
    df = pd.read_csv(path, dtype={"itemid": str, "event": str})
    _check_columns(df, ["timestamp", "visitorid", "event", "itemid"], path, "RetailRocket events.csv")
    unknown = set(df["event"].unique()) - set(_RETAILROCKET_TYPES)
    if unknown:
        raise DataFormatError(f"{path}: unknown RetailRocket event type(s) {sorted(unknown)}")
    times = df["timestamp"].to_numpy(dtype=np.float64) / 1000.0
    sid = sessionize(df["visitorid"].to_numpy(dtype=np.int64), times, gap_s)
    types = df["event"].map({k: int(v) for k, v in _RETAILROCKET_TYPES.items()}).to_numpy()
    return event_table(sid, df["itemid"], times, types)


def _diginetica_time(dates: pd.Series, timeframe: pd.Series) -> np.ndarray:
    day = pd.to_datetime(dates, format="%Y-%m-%d", utc=True)
    base = (day - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)
    return base + timeframe.to_numpy(dtype=np.float64) / 1000.0


def _diginetica_categories(folder: Path) -> pd.Series | None:
    """itemId -> categoryId (strings) from ``product-categories.csv`` beside the views, if present."""
    f = folder / "product-categories.csv"
    if not f.exists():
        return None
    c = pd.read_csv(f, sep=";", dtype=str)
    c.columns = [x.strip() for x in c.columns]
    _check_columns(c, ["itemId", "categoryId"], f, "Diginetica product-categories.csv (itemId;categoryId)")
    return c.drop_duplicates("itemId").set_index("itemId")["categoryId"]


def load_diginetica(path: str | Path) -> pd.DataFrame:
    """CIKM Cup 2016 ``train-item-views.csv`` (session_id;user_id;item_id;timeframe;eventdate; timeframe is
    a ms offset within the session) as views, plus ``train-purchases.csv`` beside it as purchases (only
    rows whose session has views). ``path`` may be the views file or its directory. With
    ``product-categories.csv`` beside them, each event gets its item's ``Category`` (model.features)."""
    path = _require(Path(path))
    if path.is_dir():
        cands = sorted(path.glob("*train-item-views.csv"))
        if not cands:
            raise FileNotFoundError(f"{path}: no *train-item-views.csv in this directory")
        path = cands[0]
    views = pd.read_csv(path, sep=";", dtype={"item_id": str, "eventdate": str})
    views.columns = [c.strip() for c in views.columns]
    _check_columns(views, ["session_id", "item_id", "timeframe", "eventdate"], path,
                   "Diginetica train-item-views.csv (';'-separated)")
    sid = views["session_id"].to_numpy(dtype=np.int64)
    parts = [pd.DataFrame({"s": sid, "i": views["item_id"], "t": _diginetica_time(views["eventdate"], views["timeframe"]),
                           "e": int(EventType.VIEW)})]
    purchases = path.parent / "train-purchases.csv"
    if purchases.exists():
        p = pd.read_csv(purchases, sep=";", dtype={"itemId": str, "eventdate": str})
        _check_columns(p, ["sessionId", "timeframe", "eventdate", "itemId"], purchases, "Diginetica train-purchases.csv")
        p = p[np.isin(p["sessionId"].to_numpy(dtype=np.int64), np.unique(sid))]
        parts.append(pd.DataFrame({"s": p["sessionId"].to_numpy(dtype=np.int64), "i": p["itemId"],
                                   "t": _diginetica_time(p["eventdate"], p["timeframe"]), "e": int(EventType.PURCHASE)}))
    d = pd.concat(parts, ignore_index=True)
    df = event_table(d["s"], d["i"], d["t"], d["e"])
    categories = _diginetica_categories(path.parent)
    if categories is not None:
        df["Category"] = df["ItemId"].map(categories).to_numpy(dtype=object)
    return df


_OTTO_TYPES = {"clicks": EventType.CLICK, "carts": EventType.CART, "orders": EventType.PURCHASE}


def load_otto(path: str | Path) -> pd.DataFrame:
    """OTTO JSONL: one session per line, ``{"session": s, "events": [{"aid", "ts" (ms), "type"}]}``."""
    import orjson

    path = _require(Path(path))
    s_col: list[int] = []
    i_col: list[str] = []
    t_col: list[float] = []
    e_col: list[int] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                session = int(rec["session"])
                for ev in rec["events"]:
                    s_col.append(session)
                    i_col.append(str(ev["aid"]))
                    t_col.append(ev["ts"] / 1000.0)
                    e_col.append(int(_OTTO_TYPES[ev["type"]]))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataFormatError(f"{path}:{lineno}: not an OTTO JSONL session record ({exc!r})") from None
    return event_table(s_col, i_col, t_col, e_col)


def load_movielens(path: str | Path, gap_s: float = DEFAULT_SESSION_GAP_S) -> pd.DataFrame:
    """MovieLens ``u.data`` (user, item, rating, timestamp; TAB): each user's ratings in time order,
    split into sessions at gaps longer than ``gap_s``. Ratings count as views."""
    path = _require(Path(path))
    if path.is_dir():
        path = _require(path / "u.data")
    df = pd.read_csv(path, sep="\t", header=None, names=["user", "item", "rating", "ts"], dtype={"item": str})
    if df["ts"].isna().any() or df["user"].isna().any():
        raise DataFormatError(f"{path}: not a MovieLens u.data file (user<TAB>item<TAB>rating<TAB>timestamp)")
    times = df["ts"].to_numpy(dtype=np.float64)
    sid = sessionize(df["user"].to_numpy(dtype=np.int64), times, gap_s)
    return event_table(sid, df["item"], times, np.full(len(df), int(EventType.VIEW), dtype=np.int8))


def load_synthetic(spec: str | Path = "synthetic") -> pd.DataFrame:
    """``synthetic`` or ``synthetic:N`` (N sessions; default 20,000) from :mod:`model.synthetic`."""
    from model import synthetic

    text = str(spec)
    n = 20_000
    if ":" in text:
        try:
            n = int(text.rsplit(":", 1)[1])
        except ValueError:
            raise DataFormatError(f"synthetic spec {text!r}: expected synthetic:N_SESSIONS") from None
    return synthetic.generate(n_sessions=n)


LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "session-rec": load_session_rec,
    "yoochoose": load_yoochoose,
    "retailrocket": load_retailrocket,
    "diginetica": load_diginetica,
    "otto": load_otto,
    "movielens": load_movielens,
    "synthetic": load_synthetic,
}


def load_events(path: str | Path, fmt: str) -> pd.DataFrame:
    """Load ``path`` in format ``fmt`` (one of :data:`FORMATS`) into an event table."""
    if fmt not in LOADERS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return LOADERS[fmt](path)


def split_by_time(df: pd.DataFrame, days: float = 1.0, min_test_length: int = 2,
                  end: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train/test split as in the official GRU4Rec preprocessing.

    Sessions whose last event is within ``days`` of the data's end (or of ``end``, epoch seconds) go to
    test, the rest to train; test events whose item never occurs in train are dropped, then test
    sessions shorter than ``min_test_length`` are dropped."""
    if df.empty:
        return df.copy(), df.copy()
    cut = (float(df["Time"].max()) if end is None else float(end)) - days * 86400.0
    last = df.groupby("SessionId")["Time"].max()
    test_sessions = last.index[last.to_numpy() >= cut]
    in_test = np.isin(df["SessionId"].to_numpy(), test_sessions.to_numpy())
    train = df[~in_test]
    test = df[in_test]
    test = test[np.isin(test["ItemId"].to_numpy(), train["ItemId"].unique())]
    lengths = test.groupby("SessionId").size()
    test = test[np.isin(test["SessionId"].to_numpy(), lengths.index[lengths.to_numpy() >= min_test_length].to_numpy())]
    return train.reset_index(drop=True), test.reset_index(drop=True)


def split_latest_sessions(df: pd.DataFrame, fraction: float,
                          min_test_length: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Time-based split by share of sessions: the latest-ending ``fraction`` of sessions (ties by session
    id) go to test, the rest to train; test is then filtered as in :func:`split_by_time`.

    Unlike a split by days it suits samples whose sessions are spread thinly over months (a few late
    outliers would leave the last days almost empty). Every train session ends no later than every
    test session."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if df.empty:
        return df.copy(), df.copy()
    last = df.groupby("SessionId")["Time"].max()
    order = np.lexsort((last.index.to_numpy(), last.to_numpy()))
    n_test = int(np.ceil(fraction * len(last)))
    test_sessions = last.index.to_numpy()[order[len(order) - n_test:]]
    in_test = np.isin(df["SessionId"].to_numpy(), test_sessions)
    train, test = df[~in_test], df[in_test]
    test = test[np.isin(test["ItemId"].to_numpy(), train["ItemId"].unique())]
    lengths = test.groupby("SessionId").size()
    test = test[np.isin(test["SessionId"].to_numpy(), lengths.index[lengths.to_numpy() >= min_test_length].to_numpy())]
    return train.reset_index(drop=True), test.reset_index(drop=True)


def describe(df: pd.DataFrame) -> dict:
    """Counts used in logs, checkpoint metadata and reports."""
    if df.empty:
        return {"events": 0, "sessions": 0, "items": 0}
    return {
        "events": int(len(df)),
        "sessions": int(df["SessionId"].nunique()),
        "items": int(df["ItemId"].nunique()),
        "time_min": float(df["Time"].min()),
        "time_max": float(df["Time"].max()),
        "event_types": {EventType(int(k)).name.lower(): int(v) for k, v in df["EventType"].value_counts().sort_index().items()},
    }
