"""``gruflow model rollback``: an old model version served again, published as the newest version.

Versions only ever go up on the models topic (readers refuse a version not newer than the one they serve), so
a rollback is a new version that carries an old version's weights and names it in ``rollback_of``.
"""

from __future__ import annotations

import time
from typing import Any

from stream.online.model_protocol import R_VOCAB, ModelSyncError, header_meta
from stream.online.model_sync import list_versions, publish_version, read_version_bytes, topic_name


def rollback(settings: Any, version: int, store: Any = None) -> int:
    """Republish the weights of ``version`` as a new, newest version (metadata ``rollback_of``).

    Items added to the vocabulary after ``version`` keep their rows (rows never change meaning, and
    workers refuse a vocabulary that shrinks); those rows take the newest version's vectors and are
    marked retired, so the rolled-back model does not recommend them until a fine-tune round has
    trained them again. Returns the new version number."""
    import numpy as np

    from model.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
    from model.item_growth import ITEM_ROW_PARAMS, grow_net
    from model.weight_check import weight_problem

    infos = [i for i in list_versions(settings) if i.complete]
    if not infos:
        raise LookupError(f"no model version on {topic_name(settings)}: nothing to roll back")
    newest = max(i.version for i in infos)
    data = read_version_bytes(settings, version)
    if data is None and store is not None:
        data = store.load(version)
    if data is None:
        where = f"{topic_name(settings)}" + (f" or in {store.root}" if store is not None else "")
        raise LookupError(f"model version {version} is not on {where}; available: "
                          f"{sorted({i.version for i in infos} | set(store.versions() if store else []))}")
    old = checkpoint_from_bytes(data)
    problem = weight_problem(old.net, old.popularity)
    if problem is not None:  # every reader would refuse it: say so here instead of publishing it
        raise ModelSyncError(problem.reason, f"cannot roll back to version {version}: {problem}")
    latest_data = read_version_bytes(settings, newest)
    if latest_data is None:
        raise LookupError(f"the newest model version {newest} could not be read from {topic_name(settings)}")
    latest = checkpoint_from_bytes(latest_data)
    n_old, n_new = len(old.vocab), len(latest.vocab)
    if latest.vocab.ids[:n_old] != old.vocab.ids:
        raise ModelSyncError(R_VOCAB, f"cannot roll back to version {version}: its vocabulary is not a prefix of the "
                                      f"newest version {newest}'s")
    net, vocab = old.net, old.vocab
    pop = np.asarray(old.popularity, dtype=np.float64)
    retired = set(int(r) for r in (old.metadata or {}).get("retired_rows", []))
    if n_new > n_old:
        state = latest.net.state_dict()
        init = {name: state[name][n_old:] for name in ITEM_ROW_PARAMS if name in state}
        net = grow_net(old.net, n_new, init)
        vocab = latest.vocab
        pop = np.concatenate([pop, np.asarray(latest.popularity, dtype=np.float64)[n_old:]])
        retired |= set(range(n_old, n_new))
    new_version = newest + 1
    meta = {**(old.metadata or {}), "version": new_version, "parent_version": newest, "rollback_of": version,
            "created_at": time.time(), "retired_rows": sorted(retired), "n_items": len(vocab)}
    meta.pop("guardrail", None)
    payload = checkpoint_to_bytes(net, vocab, old.params, pop, meta)
    publish_version(settings, payload, new_version, newest, header_meta(meta))
    if store is not None:
        store.save(new_version, payload, header_meta(meta))
    return new_version
