"""One GRU step for a few sessions, in numpy: the request-time path of anonymous visitors.

A request steps one visitor's handful of items through the network, one row at a time. At that size
torch's per-call overhead is the whole cost (about 0.15 ms per step here, for a 100-wide layer), and every
torch call releases the GIL and takes it back, which hands the GIL to the worker's other threads and makes
them wait for it again: at 50 such requests a second the stream's p99 rose by half (docs/serving-cost.md).
The same step in numpy is a few small vector operations that keep the GIL for some tens of microseconds.

Supported: the networks whose first recurrent layer is a ``GRUCell`` over summed inputs (constrained
embedding or an item embedding, with or without the event-type embedding) and no feature embeddings; other
networks (the one-hot input layer, feature embeddings) are stepped by torch (``supports``). The result equals
``GRU4RecNet.step`` at inference up to float32 rounding (a unit test pins it).

Invariant: nothing is copied or kept: the weights are read as numpy views of the network's current
parameters on each call, so a grown or replaced parameter is never stepped with stale weights.
"""

from __future__ import annotations

import numpy as np

from model.network import GRU4RecNet


def supports(net: GRU4RecNet) -> bool:
    return net.start == 0 and not net.concat and not net.uses_features


def _view(t: object) -> np.ndarray:
    return t.detach().numpy()  # type: ignore[attr-defined]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warning for large negative inputs


def step_few(net: GRU4RecNet, hidden: np.ndarray, rows: np.ndarray, event_types: np.ndarray) -> np.ndarray:
    """``hidden`` [B, state_size] advanced by one event per row (``rows`` valid item rows, ``event_types``
    their types); a new array. Only for a network that ``supports``."""
    x = _view(net.input_table())[rows]
    if net.T is not None:
        x = x + _view(net.T.weight)[event_types]
    out = np.empty_like(hidden)
    offset = 0
    for cell, width in zip(net.G, net.layers):
        h = hidden[:, offset:offset + width]
        gi = x @ _view(cell.weight_ih).T + _view(cell.bias_ih)
        gh = h @ _view(cell.weight_hh).T + _view(cell.bias_hh)
        r = _sigmoid(gi[:, :width] + gh[:, :width])
        z = _sigmoid(gi[:, width:2 * width] + gh[:, width:2 * width])
        n = np.tanh(gi[:, 2 * width:] + r * gh[:, 2 * width:])
        x = (1.0 - z) * n + z * h
        out[:, offset:offset + width] = x
        offset += width
    return out
