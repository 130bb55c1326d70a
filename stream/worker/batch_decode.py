"""A micro-batch's records sorted out: valid events, dead letters (with their reasons counted) and
``gruflow forget`` requests from the control topic."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from stream.kafka.record_guard import unreadable_detail
from stream.pipeline.control import control_action
from stream.pipeline.events import UNREADABLE_RECORD, Event, InputShape, Limits, Rejected, decode_event
from stream.worker.batch_consumer import Batch
from stream.worker.sinks import Outgoing, dead_letter


@dataclass(frozen=True)
class BatchDecoder:
    control: str  # the control topic (forget requests)
    kinds: dict[str, str]  # input topic -> kind (clicks, purchases)
    limits: Limits
    shape: InputShape | None  # the shop's field and event-type names; None: gruflow's own
    dead_letter_bytes: int  # of a bad record's key + value (topics.dead_letter_budget)

    def decode(self, batch: Batch, now_ms: int) -> tuple[Outgoing, list[Event], Counter[str], dict[int, list[bytes]]]:
        """(outgoing records with the dead letters, valid events, dead letters per reason, partition -> users
        to forget)."""
        out = Outgoing()
        events: list[Event] = []
        dead: Counter[str] = Counter()
        forget: dict[int, list[bytes]] = defaultdict(list)
        budget = self.dead_letter_bytes
        for tp, records in batch:
            p = tp.partition
            if tp.topic == self.control:
                forget[p].extend(r.key for r in records if control_action(r.key, r.value) is not None)
                continue
            kind = self.kinds[tp.topic]
            for r in records:
                unreadable = unreadable_detail(r)
                if unreadable is not None:  # stored by the broker, not parseable by the client: what was read of it
                    out.dlq[p].append(dead_letter(r.key, r.value, UNREADABLE_RECORD, unreadable, tp.topic, p, r.offset,
                                                  r.timestamp, budget))
                    dead[UNREADABLE_RECORD] += 1
                    continue
                res = decode_event(r.value, r.key, kind, self.limits, topic=tp.topic, partition=p, offset=r.offset,
                                   append_ts_ms=r.timestamp or 0, now_ms=now_ms, shape=self.shape)
                if isinstance(res, Rejected):
                    out.dlq[p].append(dead_letter(r.key, r.value, res.reason, res.detail, tp.topic, p, r.offset,
                                                  r.timestamp, budget))
                    dead[res.reason] += 1
                else:
                    events.append(res)
        return out, events, dead, forget
