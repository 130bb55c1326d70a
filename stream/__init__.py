"""gruflow's stream side: everything that talks to Kafka, arranged in rooms with one purpose each.

- ``pipeline``: the pure per-batch computation (event decoding, state stepping, prequential scoring); no Kafka.
- ``worker``: the faust worker that runs the pipeline on the input topics (consumer, state table, sinks).
- ``online``: online learning: the trainer, model distribution over the models topic, the model store.
- ``kafka``: client configuration, topic layout, the record guard, and the embedded broker.
- ``observe``: Prometheus metrics and the HTTP endpoints shared by worker and trainer.
- ``cli``: the ``gruflow`` command.
- ``tools``: developer tools (replay, tail, demo); ``lab``: measurement (bench, echo peer, experiments).

Import rules (tests/unit/test_import_rules.py): ``model`` and ``state`` never import ``stream`` or a Kafka
client; product rooms (``pipeline``, ``worker``, ``online``, ``kafka``, ``observe``) never import ``tools``
or ``lab``. ``settings`` is the one settings object, shared by every room.
"""
