"""Print recommendations as they arrive on the recommendations topic.

CLI (wired by stream/cli/commands.py with :func:`add_tail_args` and :func:`run_tail`)::

    gruflow tail [--from-beginning] [--max N] [--json] [--items K]

Reads ``args.bootstrap`` too when the caller's parser defines it. The consumer joins no group (it
assigns every partition itself), so it starts at once, commits nothing and never disturbs workers; it
reads committed data only, which also suits the exactly-once mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, TextIO

import orjson

from stream.settings import Settings
from stream.tools.harness import cluster_settings


def format_recommendation(value: bytes, items: int = 5) -> str:
    """One readable line: user, model version, top items with scores, event-to-publish delay."""
    try:
        rec = orjson.loads(value)
        top = ", ".join(f"{i['item_id']}({i['score']:.3g})" for i in rec.get("items", [])[:items])
        more = len(rec.get("items", [])) - items
        delay = ""
        if isinstance(rec.get("published_ts"), (int, float)) and isinstance(rec.get("event_ts"), (int, float)):
            delay = f"  event->published {rec['published_ts'] - rec['event_ts']:.0f} ms"
        return (f"user={rec.get('user_id')}  model={rec.get('model_version')}  "
                f"[{top}{f', +{more}' if more > 0 else ''}]{delay}")
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return f"(unreadable) {value[:200]!r}"


def tail(settings: Settings, *, from_beginning: bool = False, max_messages: int | None = None,
         out: TextIO | None = None, as_json: bool = False, items: int = 5, idle_timeout: float | None = None,
         on_message: Callable[[Any], None] | None = None) -> int:
    """Print recommendations until ``max_messages`` were shown, ``idle_timeout`` seconds pass without one,
    or Ctrl-C. Returns how many were printed."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException

    from stream.kafka.config import ClusterUnreachable, assign_whole_topic, consumer_config
    from stream.kafka.topics import TopicError

    out = out if out is not None else sys.stdout
    topic = settings.topic("recommendations")
    consumer = Consumer(consumer_config(settings, isolation_level="read_committed", enable_partition_eof=False))
    shown = 0
    try:
        try:
            assign_whole_topic(consumer, topic, OFFSET_BEGINNING if from_beginning else OFFSET_END)
        except KafkaException as exc:
            raise ClusterUnreachable(f"cannot reach the Kafka cluster: {exc}") from None
        except LookupError:
            raise TopicError(f"topic {topic} does not exist yet (start a worker, or create the topics)") from None
        last = time.monotonic()
        while max_messages is None or shown < max_messages:
            msg = consumer.poll(0.5)
            if msg is None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(msg.error())
            last = time.monotonic()
            if on_message is not None:
                on_message(msg)
            line = msg.value().decode("utf-8", "replace") if as_json else format_recommendation(msg.value(), items)
            print(line, file=out, flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return shown


def add_tail_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--from-beginning", action="store_true", help="start at the oldest recommendation")
    parser.add_argument("--max", type=int, default=None, dest="max", help="stop after N recommendations")
    parser.add_argument("--json", action="store_true", help="print the raw JSON messages")
    parser.add_argument("--items", type=int, default=5, help="items shown per line (default 5)")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="stop after this many seconds without a recommendation")
    return parser


def run_tail(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = cluster_settings(args, settings, "tail")
    tail(settings, from_beginning=args.from_beginning, max_messages=args.max, as_json=args.json,
         items=args.items, idle_timeout=args.idle_timeout)
    return 0
