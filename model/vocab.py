"""Item vocabulary: external item id (always a string) <-> embedding row.

Rows are append-only: a row never changes meaning once given out, so hidden states and
recommendation lists stored under an older model version stay readable.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class Vocabulary:
    __slots__ = ("_ids", "_rows")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        for item_id in ids:
            self.add(item_id)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def add(self, item_id: str) -> int:
        item_id = str(item_id)
        row = self._rows.get(item_id)
        if row is None:
            row = len(self._ids)
            self._ids.append(item_id)
            self._rows[item_id] = row
        return row

    def row(self, item_id: str, default: int = -1) -> int:
        return self._rows.get(str(item_id), default)

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows for many ids; -1 where the id is unknown."""
        get = self._rows.get
        return np.fromiter((get(str(i), -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def item_id(self, row: int) -> str:
        return self._ids[row]

    def item_ids(self, rows: Iterable[int]) -> list[str]:
        ids = self._ids
        return [ids[r] for r in rows]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def ids_view(self) -> Sequence[str]:
        """The ids by row without a copy, for hot paths that index it per batch. Read it only: rows are
        append-only, so a view taken earlier stays right for every row it has."""
        return self._ids
