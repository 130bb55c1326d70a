"""The models topic on a real broker: chunked publish, listing, reading back, tombstones."""

from __future__ import annotations

import os

import pytest

from stream.online import model_sync
from stream.kafka.config import MODEL_CHUNK_BYTES
from stream.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_publish_list_read_and_delete(kafka) -> None:
    settings = kafka.settings(partitions=1)
    ensure_topics(settings)
    assert model_sync.list_versions(settings) == []
    big = os.urandom(model_sync.CHUNK_BYTES * 2 + 123)  # three chunks
    small = os.urandom(1000)
    assert model_sync.CHUNK_BYTES < MODEL_CHUNK_BYTES
    n_big = model_sync.publish_version(settings, big, 1, 0, {"n_items": 3})
    n_small = model_sync.publish_version(settings, small, 2, 1)
    assert (n_big, n_small) == (3, 1)
    infos = model_sync.list_versions(settings)
    assert [(i.version, i.parent, i.chunks, i.size, i.complete) for i in infos] == [
        (1, 0, 3, len(big), True), (2, 1, 1, len(small), True)]
    assert infos[0].meta == {"n_items": 3}
    assert model_sync.read_version_bytes(settings, 1) == big
    assert model_sync.read_version_bytes(settings, 2) == small
    assert model_sync.read_version_bytes(settings, 3) is None
    model_sync.delete_version(settings, 1, n_big)
    assert [i.version for i in model_sync.list_versions(settings)] == [2]
    assert model_sync.read_version_bytes(settings, 1) is None
