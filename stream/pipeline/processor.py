"""The micro-batch computation of the worker: pure (no Kafka, no faust), run off the event loop.

Given a model, a batch of valid events (in offset order per partition) and the stored state of their
users, it returns the new state of each touched user, one recommendation message per event and the
counters the worker exports. Events of the same user are applied in order; the GRU advances in
"waves" (wave j = the j-th event of every user in the batch), then ONE top-K pass scores every event.

Rules (the worker's contract, see the issue):
- a new session starts (hidden state dropped) when an event comes more than ``session_gap_ms`` (event
  time) after the user's previous one; a stored hidden state of another size (a model with other
  layers) is dropped the same way;
- an item the model does not know is counted, moves the user's time on, and does not step the GRU;
  a user without a hidden state in the current session is shown the model's popular items;
- a hidden state that is NaN or infinite is never used or kept: a stored one is dropped before it is
  stepped or scored, one made by the GRU step right after it (that event is answered with the popular
  items), and the user starts a new session; ``BatchResult.state_resets`` counts both. Such a state
  would make every later answer of the user NaN until the session gap, and would be replicated through
  the changelog. The tests are whole-array (the wave's states before and after the step, then every
  state the batch scores), so they cost next to nothing while all is finite;
- a re-delivered event (offset at or below the user's applied offset for its topic) is answered from
  the current state but changes nothing (at-least-once redelivery keeps state exact);
- prequential (test-then-train): before an event updates the state, its item is looked up in the
  recommendations last published to that user. The same events are scored against a popularity
  baseline counted on this worker's stream (its top-K as of the start of the batch);
- with business rules (``rules``, stream/pipeline/ranking.py), each list is ranked with the rules of its user as
  they stand right after its event (an item bought by this event is already masked in its own list).

The parts: stream/pipeline/waves.py walks the users' states, stream/pipeline/ranking.py scores every list,
stream/pipeline/prequential.py scores the events against earlier lists, stream/pipeline/recommendation_json.py
(or because.py) writes the messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from model.recommender import Recommender
from state.codec import UserState
from stream.pipeline.answer_cache import FinalLists
from stream.pipeline.because import because_rows, encode_outputs_because
from stream.pipeline.events import Event
from stream.pipeline.exposure import PAD
from stream.pipeline.prequential import PopularityBaseline, Prequential, prequential_counts
from stream.pipeline.ranking import RuleContext, TopK, score_states
from stream.pipeline.recommendation_json import encode_outputs, vocab_ids
from stream.pipeline.waves import WaveWalk, batch_order

# reasons a user's hidden state is dropped (label values of gruflow_state_resets_total)
RESET_NON_FINITE_STEP = "non_finite_step"  # the GRU step produced NaN/inf
RESET_NON_FINITE_STORED = "non_finite_stored"  # the stored state was NaN/inf
STATE_RESET_REASONS = (RESET_NON_FINITE_STEP, RESET_NON_FINITE_STORED)


@dataclass(frozen=True)
class ProcessorConfig:
    k: int = 20
    session_gap_ms: int = 1_800_000
    # "because": > 0 keeps the user's last ``because_history`` item rows in the state and names, for each
    # recommended item, up to ``because_items`` of them (model/attribution.py); 0 = off
    because_history: int = 0
    because_items: int = 2


@dataclass
class BatchResult:
    outputs: list[tuple[bytes, bytes]]  # (key, JSON value), one per event, in event order
    states: dict[bytes, UserState]  # final state of every user in the batch
    unknown_items: int = 0
    duplicates: int = 0  # re-delivered events already applied: answered, state untouched
    # reason -> hidden states dropped: non_finite_stored counts users, non_finite_step counts steps
    state_resets: dict[str, int] = field(default_factory=dict)
    # (model, version) -> counts; model is "gru" or "popularity" (version "")
    prequential: dict[tuple[str, str], Prequential] = field(default_factory=dict)
    step_seconds: float = 0.0
    published_ms: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)  # rule -> items it masked from lists
    lists: FinalLists | None = None  # each user's list after its last event (requests are answered from it)


def process_batch(model: Recommender, events: list[Event], states: dict[bytes, UserState], cfg: ProcessorConfig,
                  popularity: PopularityBaseline | None = None, top_k: TopK | None = None,
                  rules: RuleContext | None = None) -> BatchResult:
    """Apply ``events`` to ``states`` (not modified) and recommend after each event. ``top_k`` replaces
    ``model.top_k`` (same results; e.g. ``model.topk.TopKScorer.top_k``)."""
    t0 = time.perf_counter()
    if not events:
        return BatchResult([], {})
    rows = model.vocab.rows([e.item_id for e in events])
    prev_event, wave_of, last_idx = batch_order(events)
    walk = WaveWalk(model, events, states, rows, cfg.session_gap_ms, cfg.because_history, rules)
    walk.run(wave_of)

    kk = min(cfg.k, model.n_items)
    rec_rows, rec_scores, rule_counts = score_states(model, walk.post_hidden, walk.has_hidden, kk, top_k, rules,
                                                     walk.users)
    published_ms = int(time.time() * 1000)

    result = BatchResult([], {}, published_ms=published_ms, rule_counts=rule_counts)
    fresh = ~walk.dup
    result.unknown_items = int(((rows < 0) & fresh).sum())
    result.duplicates = int(walk.dup.sum())
    result.state_resets = {reason: n for reason, n in ((RESET_NON_FINITE_STEP, walk.step_resets),
                                                      (RESET_NON_FINITE_STORED, len(walk.stored_resets))) if n}
    result.prequential = prequential_counts(events, states, rows, rec_rows, prev_event, fresh, model.version, cfg.k,
                                            popularity)
    # with "because": the lists with -1 for the padding, which the attribution and its messages both read
    listed = np.where(rec_rows == PAD, -1, rec_rows) if cfg.because_history else None
    because = (because_rows(model, listed, walk.recent_at, walk.has_hidden, cfg.because_items)
               if listed is not None else None)
    result.outputs = _encode(model, events, rec_rows, rec_scores, listed, because, published_ms)
    result.states = walk.final_states(last_idx, rec_rows, kk, int(model.version))
    last = np.fromiter(last_idx.values(), dtype=np.int64, count=len(last_idx))
    result.lists = FinalLists(list(last_idx), rec_rows[last], rec_scores[last],
                              because[last] if because is not None else None, walk.has_hidden[last])
    if popularity is not None:
        popularity.update(rows[fresh])
    result.step_seconds = time.perf_counter() - t0
    return result


def _encode(model: Recommender, events: list[Event], rec_rows: np.ndarray, rec_scores: np.ndarray,
            listed: np.ndarray | None, because: np.ndarray | None, published_ms: int) -> list[tuple[bytes, bytes]]:
    """The batch's recommendation messages, in event order; with "because" rows (and ``listed``, the lists
    with -1 for the padding), each item names the session items it is attributed to."""
    if listed is None or because is None:
        return encode_outputs(model, events, rec_rows, rec_scores, published_ms)
    return encode_outputs_because(vocab_ids(model), int(model.version), events, listed, rec_scores, because,
                                  published_ms)
