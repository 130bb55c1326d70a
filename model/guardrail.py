"""The promotion guardrail of a fine-tune round: the served model and the candidate on the same
held-out recent sessions.

Pure (pandas/numpy/torch, no I/O). The held-out sessions are the most recently active ones of the
buffer, which the candidate did not train on; both models are scored on the items the served model
knows, so a candidate is never rewarded for items only it can recommend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from model.evaluate import evaluate
from model.exposure import (ITEM_EXPOSURE, ConcentrationLimits, Exposure, concentration_problem, item_jump,
                            topk_exposure)
from model.network import GRU4RecNet
from model.vocab import Vocabulary


def split_recent(df: pd.DataFrame, fraction: float, min_events: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole sessions, most recently active first, until ``fraction`` of the recent buffer's
    events (at least ``min_events``) is held out. Reservoir sessions always go to training."""
    recent = df[df["Recent"]] if "Recent" in df.columns else df
    if recent.empty:
        return df, df.iloc[:0]
    last = recent.groupby("SessionId", sort=False)["Time"].agg(["max", "size"]).sort_values("max", ascending=False)
    want = max(min_events, int(math.ceil(fraction * len(recent))))
    k = int(np.searchsorted(np.cumsum(last["size"].to_numpy()), want) + 1)
    held = last.index[:k]
    mask = df["SessionId"].isin(held)
    return df[~mask], df[mask]


def multi_event_sessions(df: pd.DataFrame) -> pd.DataFrame:
    """The events of sessions with at least two events (a session of one event predicts nothing)."""
    return df[df.groupby("SessionId")["SessionId"].transform("size") >= 2]


def known_holdout(holdout: pd.DataFrame, vocab: Vocabulary) -> pd.DataFrame:
    """The held-out events the served model can be scored on: known items, sessions of two or more."""
    return multi_event_sessions(holdout[vocab.rows(holdout["ItemId"].tolist()) >= 0])


@dataclass(frozen=True)
class Verdict:
    """Scores of both models (recall, MRR and exposure at the cutoff) and what they decide."""

    current: dict
    candidate: dict
    not_worse: bool  # recall and MRR within the tolerance of the served model's
    refusal: str  # the concentration check that refused the candidate (model.exposure), or ""
    detail: str  # its explanation
    held_back: tuple[int, ...] = ()  # rows whose output weights were taken back from the current model


def _scores(result: dict, k: int) -> dict:
    def pick(table: dict) -> float:
        return float(table.get(str(k), table.get(k, math.nan)))
    return {"recall": pick(result["recall"]), "mrr": pick(result["mrr"]),
            "n_events": int(result.get("n_events", 0))}


def judge(current: tuple[GRU4RecNet, Vocabulary], candidate: tuple[GRU4RecNet, Vocabulary], hold_eval: pd.DataFrame,
          cutoff: int, tolerance: float, limits: ConcentrationLimits) -> Verdict:
    """Score both (net, vocabulary) pairs on ``hold_eval``; ``tolerance`` is absolute, on recall@K and MRR@K.
    With ``limits.hold_back_items`` the candidate network may be changed in place (``_hold_back``); the
    verdict then scores the network as changed."""
    cur_x = topk_exposure(current[0], current[1], hold_eval, cutoff)
    cand_x = topk_exposure(candidate[0], candidate[1], hold_eval, cutoff)
    answer = concentration_problem(cur_x, cand_x, limits)
    held: list[int] = []
    if limits.hold_back_items > 0:
        cand_x, answer, held = _hold_back(current, candidate, hold_eval, cutoff, limits, cur_x, cand_x, answer)
    refusal, detail = answer
    cur_s = _scores(evaluate(current[0], current[1], hold_eval, cutoffs=(cutoff,)), cutoff)
    cand_s = _scores(evaluate(candidate[0], candidate[1], hold_eval, cutoffs=(cutoff,)), cutoff)
    ok = cand_s["recall"] >= cur_s["recall"] - tolerance and cand_s["mrr"] >= cur_s["mrr"] - tolerance
    # exposure is measured even with every concentration check off: it is reported with the scores
    cur_s["exposure"], cand_s["exposure"] = cur_x.summary(), cand_x.summary()
    cand_s["exposure"]["max_item_factor"] = item_jump(cur_x, cand_x, limits.smoothing_share)[1]
    cand_s["exposure"]["held_back_items"] = len(held)
    return Verdict(cur_s, cand_s, ok, refusal, detail, tuple(held))


def _hold_back(current: tuple[GRU4RecNet, Vocabulary], candidate: tuple[GRU4RecNet, Vocabulary],
               hold_eval: pd.DataFrame, cutoff: int, limits: ConcentrationLimits, cur_x: Exposure,
               cand_x: Exposure, answer: tuple[str, str]) -> tuple[Exposure, tuple[str, str], list[int]]:
    """While the item-exposure check refuses (``answer``), give the item whose exposure rises most its
    current output row back and check again, at most ``limits.hold_back_items`` times. An item the current
    model lacks has no row to go back to: the check's refusal then stands. Returns the candidate's
    exposure, the check's last answer and the rows taken back."""
    held: list[int] = []
    while answer[0] == ITEM_EXPOSURE and len(held) < limits.hold_back_items:
        row, _ = item_jump(cur_x, cand_x, limits.smoothing_share)
        if row < 0 or row >= len(current[1]) or row in held:
            break
        candidate[0].copy_item_outputs(current[0], [row])
        held.append(row)
        cand_x = topk_exposure(candidate[0], candidate[1], hold_eval, cutoff)
        answer = concentration_problem(cur_x, cand_x, limits)
    return cand_x, answer, held
