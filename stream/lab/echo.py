"""The latency peer of ``gruflow bench stream``: a plain confluent-kafka consume -> produce loop.

It answers every event on the clicks topic with a recommendation-shaped record without items (same key,
same partition, ``event_ts`` and ``published_ts`` stamped like the worker's) on the recommendations topic
of its own settings. Measured with the same load generator, reader, broker and offered rate as the
worker, in the same run, it is what two Kafka hops and a service that does nothing cost on this machine:
the floor the worker's latency is compared with. A bench tool, not part of the product:
``python -m stream.lab.echo`` with the ``GRUFLOW_*`` settings of its topics.
"""

from __future__ import annotations

import signal
import sys
import time

import orjson

from stream.settings import Settings


def run(settings: Settings) -> int:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer

    from stream.kafka.config import assign_whole_topic, consumer_config, load_generator, producer_config

    consumer = Consumer(consumer_config(settings, group_id=None))
    assign_whole_topic(consumer, settings.topic("clicks"), OFFSET_BEGINNING)
    # the load generator's producer settings: the events it answers came through the same client
    producer = Producer(producer_config(settings, **load_generator(settings)))
    out = settings.topic("recommendations")
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopped.append(1))
    print("echo ready", flush=True)
    while not stopped:
        # one message with a wait, then whatever else is queued without one (consume(n, t) would hold the
        # first message until n arrived or t passed)
        first = consumer.poll(0.05)
        if first is None:
            producer.poll(0)
            continue
        for m in [first, *consumer.consume(5000, 0)]:
            if m.error() is not None:
                continue
            try:
                event = orjson.loads(m.value())
                value = b'{"user_id":%s,"items":[],"model_version":0,"event_ts":%d,"published_ts":%d}' % (
                    orjson.dumps(event["user_id"]), int(event["ts"]), int(time.time() * 1000))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the bench only sends valid events; anything else has no latency to measure
            producer.produce(out, value, m.key(), partition=m.partition())
        producer.poll(0)
    producer.flush(10)
    consumer.close()
    return 0


def main() -> int:
    return run(Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
