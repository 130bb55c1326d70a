"""Versioned, pickle-free checkpoint format: weights, hyperparameters, item vocabulary, metadata.

Layout (all integers little-endian)::

    b"GRUFLOWC"                 8-byte magic
    uint32 format version       (FORMAT_VERSION)
    uint64 header length N
    N bytes UTF-8 JSON header   {"params", "n_items", "tensors": [{name, dtype, shape, offset, nbytes}],
                                 "vocab": [item ids by row], "metadata", "gruflow_format",
                                 "categories": [category ids by row - 1] (only with the category feature)}
    tensor bytes                raw little-endian, at the offsets listed (relative to this section)
    32-byte sha256              over every byte before it

Loading checks the magic, the version, the checksum and every tensor's name, dtype and shape against
a freshly built network before copying values in, so a truncated, corrupt or incompatible file is
refused with a :class:`CheckpointError` and nothing is ever unpickled. The bytes are the primary API
(the online learner publishes them on Kafka); the path functions are thin wrappers.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary

MAGIC = b"GRUFLOWC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32
_DTYPES = {"float32": (torch.float32, "<f4"), "float64": (torch.float64, "<f8"), "int64": (torch.int64, "<i8")}
POPULARITY = "__popularity__"


class CheckpointError(ValueError):
    """The bytes are not a checkpoint this gruflow can load; the message says why."""


@dataclass
class Checkpoint:
    net: GRU4RecNet
    vocab: Vocabulary
    params: GRU4RecParams
    popularity: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def recommender(self, version: int = 0):
        from model.recommender import Recommender

        return Recommender(self.net, self.vocab, version, self.popularity, dict(self.metadata))


def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    for name, (dtype, np_dtype) in _DTYPES.items():
        if t.dtype == dtype:
            return name, t.numpy().astype(np_dtype, copy=False).tobytes()
    raise CheckpointError(f"cannot store tensor of dtype {t.dtype}")


def checkpoint_to_bytes(net: GRU4RecNet, vocab: Vocabulary, params: GRU4RecParams | None = None,
                        popularity: np.ndarray | None = None, metadata: dict | None = None) -> bytes:
    """Serialise a trained network with everything needed to serve it."""
    params = params or net.params
    if len(vocab) > net.n_items:
        raise CheckpointError(f"vocabulary has {len(vocab)} items but the network only {net.n_items} rows")
    tensors = [(name, t) for name, t in net.state_dict().items()]
    if popularity is not None:
        tensors.append((POPULARITY, torch.from_numpy(np.asarray(popularity, dtype=np.float64))))
    table, blobs, offset = [], [], 0
    for name, t in tensors:
        dtype, raw = _tensor_bytes(t)
        table.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    header = {
        "gruflow_format": FORMAT_VERSION,
        "params": params.to_dict(),
        "n_items": net.n_items,
        "tensors": table,
        "vocab": vocab.ids,
        "metadata": metadata or {},
    }
    if net.C is not None:
        header["categories"] = net.categories.ids
    try:
        header_raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata is not JSON-serialisable: {exc}") from None
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_raw)), header_raw, *blobs])
    return body + hashlib.sha256(body).digest()


def checkpoint_from_bytes(data: bytes | bytearray | memoryview) -> Checkpoint:
    """Parse and verify checkpoint bytes; raises :class:`CheckpointError` on anything suspicious."""
    data = memoryview(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise CheckpointError(f"not a gruflow checkpoint: only {len(data)} bytes (truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CheckpointError("not a gruflow checkpoint (bad magic bytes)")
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"checkpoint format version {version} is not supported by this gruflow "
                              f"(it reads version 1..{FORMAT_VERSION}); upgrade gruflow or re-export the model")
    body_end = len(data) - _DIGEST
    if _PREFIX.size + header_len > body_end:
        raise CheckpointError("checkpoint is truncated (header runs past the end of the data)")
    if hashlib.sha256(data[:body_end]).digest() != bytes(data[body_end:]):
        raise CheckpointError("checkpoint checksum mismatch: the file is truncated or corrupt")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + header_len]).decode("utf-8"))
        params = GRU4RecParams.from_dict(header["params"])
        n_items = int(header["n_items"])
        vocab = Vocabulary(header["vocab"])
        table = header["tensors"]
        metadata = header.get("metadata") or {}
        categories = Vocabulary(header.get("categories") or ())
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint header is unreadable: {exc}") from None
    if len(vocab) > n_items:
        raise CheckpointError(f"checkpoint vocabulary ({len(vocab)}) is larger than its item tables ({n_items})")
    base = _PREFIX.size + header_len
    arrays: dict[str, np.ndarray] = {}
    for entry in table:
        try:
            name, dtype, shape = entry["name"], entry["dtype"], tuple(int(s) for s in entry["shape"])
            start, nbytes = base + int(entry["offset"]), int(entry["nbytes"])
            np_dtype = _DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint tensor table entry is invalid: {entry!r} ({exc})") from None
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if nbytes != expected or start < base or start + nbytes > body_end:
            raise CheckpointError(f"checkpoint tensor {name!r} has an inconsistent size or offset")
        arrays[name] = np.frombuffer(data[start:start + nbytes], dtype=np_dtype).reshape(shape)
    try:
        net = GRU4RecNet(n_items, params, n_categories=len(categories) + 1)
    except Exception as exc:  # invalid hyperparameters in the header
        raise CheckpointError(f"checkpoint parameters cannot build a network: {exc}") from None
    state = net.state_dict()
    missing = sorted(set(state) - set(arrays))
    unexpected = sorted(set(arrays) - set(state) - {POPULARITY})
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match this gruflow's network: missing {missing}, "
                              f"unexpected {unexpected}")
    new_state = {}
    for name, ref in state.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"the network expects {tuple(ref.shape)}")
        native = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # a view of ``data`` unless swapped
        with warnings.catch_warnings():  # read only: load_state_dict copies into the network's own tensors
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            new_state[name] = torch.from_numpy(native).to(ref.dtype)
    # no second copy of the weights: at 1M items the tables are 400 MB each, and a model arriving on the models
    # topic is parsed while the served one is still in memory
    net.load_state_dict(new_state)
    del new_state
    net.categories = categories
    net.eval()
    popularity = None
    if POPULARITY in arrays:
        popularity = arrays[POPULARITY].astype(np.float64, copy=True)
        if popularity.shape != (n_items,) and popularity.shape != (len(vocab),):
            raise CheckpointError(f"checkpoint popularity has shape {popularity.shape}, expected ({n_items},)")
    return Checkpoint(net, vocab, params, popularity, metadata)


def save_checkpoint(path: str | Path, net: GRU4RecNet, vocab: Vocabulary, params: GRU4RecParams | None = None,
                    popularity: np.ndarray | None = None, metadata: dict | None = None) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a checkpoint."""
    path = Path(path)
    raw = checkpoint_to_bytes(net, vocab, params, popularity, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    try:
        return checkpoint_from_bytes(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
