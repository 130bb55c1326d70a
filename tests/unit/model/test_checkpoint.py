"""Checkpoint round trip and refusal of truncated, corrupt or incompatible bytes."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from model.checkpoint import (FORMAT_VERSION, CheckpointError, checkpoint_from_bytes, checkpoint_to_bytes,
                              load_checkpoint, save_checkpoint)
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary


@pytest.fixture()
def trained():
    params = GRU4RecParams(layers=(12, 10), n_sample=0, batch_size=8)
    net = GRU4RecNet(30, params)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    vocab = Vocabulary(f"item-{i}" for i in range(30))
    pop = np.arange(30, dtype=np.float64)
    return net, vocab, params, pop


def _resign(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_round_trip_keeps_weights_vocab_params_popularity_metadata(trained, tmp_path) -> None:
    net, vocab, params, pop = trained
    meta = {"data": {"events": 123}, "metrics": {"recall": {"20": 0.5}}}
    raw = checkpoint_to_bytes(net, vocab, params, pop, meta)
    ck = checkpoint_from_bytes(raw)
    assert ck.params == params
    assert ck.vocab.ids == vocab.ids
    assert ck.metadata == meta
    np.testing.assert_array_equal(ck.popularity, pop)
    for (name, a), b in zip(net.state_dict().items(), ck.net.state_dict().values()):
        assert torch.equal(a, b), name
    # the loaded model serves the same recommendations
    r1, r2 = ck.recommender(7), ck.recommender(7)
    h = r1.step(r1.zero_state(2), np.array([1, 2]), np.array([0, 3]))
    assert r1.version == 7
    np.testing.assert_array_equal(r1.top_k(h, 5)[0], r2.top_k(h, 5)[0])
    path = save_checkpoint(tmp_path / "m.ckpt", net, vocab, params, pop, meta)
    assert load_checkpoint(path).vocab.ids == vocab.ids
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_bytes_are_refused(trained) -> None:
    raw = checkpoint_to_bytes(*trained)
    for cut in (0, 5, 30, len(raw) // 2, len(raw) - 1):
        with pytest.raises(CheckpointError):
            checkpoint_from_bytes(raw[:cut])


def test_any_flipped_byte_is_refused(trained) -> None:
    raw = bytearray(checkpoint_to_bytes(*trained))
    for pos in (8, 20, len(raw) // 2, len(raw) - 40, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(CheckpointError):
            checkpoint_from_bytes(bytes(bad))


def test_not_a_checkpoint_and_pickle_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="magic"):
        checkpoint_from_bytes(b"\x80\x04\x95" + b"\x00" * 100)  # a pickle header
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_newer_format_version_is_refused_with_clear_message(trained) -> None:
    raw = checkpoint_to_bytes(*trained)[:-32]
    magic, _, n = struct.unpack_from("<8sIQ", raw)
    body = struct.pack("<8sIQ", magic, FORMAT_VERSION + 1, n) + raw[20:]
    with pytest.raises(CheckpointError, match="format version"):
        checkpoint_from_bytes(_resign(body))


def test_shape_mismatch_is_incompatible(trained) -> None:
    raw = checkpoint_to_bytes(*trained)[:-32]
    magic, version, n = struct.unpack_from("<8sIQ", raw)
    header = json.loads(raw[20:20 + n])
    header["params"]["layers"] = [12, 11]  # the tensors no longer fit this architecture
    new = json.dumps(header).encode()
    body = struct.pack("<8sIQ", magic, version, len(new)) + new + raw[20 + n:]
    with pytest.raises(CheckpointError, match="shape|missing"):
        checkpoint_from_bytes(_resign(body))
