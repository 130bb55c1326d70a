"""GRU4Rec hyperparameters under the official implementation's names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal


class ParamsError(ValueError):
    """A hyperparameter string that cannot be parsed; the message names the parameter."""


@dataclass(frozen=True)
class GRU4RecParams:
    """Defaults: the shipped configuration, tuned on the YooChoose sample's train_tr/train_valid split only
    (model/RESULTS.md): the official cross-entropy config with BPR-max (bpreg 1, ELU 0.5) and more hidden
    dropout (0.5). :data:`OFFICIAL` is the official GRU4Rec configuration, for comparisons."""

    loss: Literal["cross-entropy", "bpr-max"] = "bpr-max"
    layers: tuple[int, ...] = (100,)
    n_epochs: int = 5
    batch_size: int = 48
    n_sample: int = 2048
    sample_alpha: float = 0.2
    sample_cache_max_size: int = 10_000_000
    bpreg: float = 1.0
    logq: float = 0.0  # logQ correction applies to cross-entropy only
    elu_param: float = 0.5
    constrained_embedding: bool = True
    embedding: int = 0
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.5
    learning_rate: float = 0.07
    momentum: float = 0.0
    event_types: bool = True  # gruflow extension: add an event-type embedding to the item input
    # gruflow extensions (model/features.py, docs/features.md): embeddings of the event's category, its
    # log-bucketed price and the bucketed time since the previous event, summed into the item input
    category_feature: bool = False
    price_feature: bool = False
    time_feature: bool = False
    # 0: feature embeddings are summed into the item input; > 0: embeddings of this size are concatenated
    # to it (the first GRU layer weighs them apart from the item; needs a GRUCell first layer)
    feature_dim: int = 0
    seed: int = 42

    @classmethod
    def parse(cls, text: str, base: "GRU4RecParams | None" = None) -> "GRU4RecParams":
        """Parse ``"name=value,name=value"``; layers may be ``100`` or ``100/100``."""
        base = base or cls()
        if not text.strip():
            return base
        known = {f.name: f for f in fields(cls)}
        changes: dict[str, Any] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ParamsError(f"parameter {part!r} is not name=value")
            name, raw = (s.strip() for s in part.split("=", 1))
            if name not in known:
                raise ParamsError(f"unknown parameter {name!r}; known: {', '.join(sorted(known))}")
            current = getattr(base, name)
            changes[name] = _coerce(name, raw, current)
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GRU4RecParams":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "layers" in values:
            values["layers"] = tuple(int(x) for x in values["layers"])
        return cls(**values)


def _coerce(name: str, raw: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if isinstance(current, tuple):
            return tuple(int(x) for x in raw.replace("/", " ").replace(";", " ").split())
        if isinstance(current, int):
            return int(float(raw))
        if isinstance(current, float):
            return float(raw)
        return raw
    except ValueError:
        raise ParamsError(f"parameter {name}={raw!r}: expected a {type(current).__name__}") from None


# The official GRU4Rec configuration for YooChoose (the reference's example); the defaults above beat it there.
OFFICIAL = GRU4RecParams(loss="cross-entropy", bpreg=0.0, logq=1.0, elu_param=0.0, dropout_p_hidden=0.2)


PARAMS_FILE_KIND = "gruflow-params"
PARAMS_FILE_VERSION = 1


def write_params_file(path: str, params: GRU4RecParams, about: dict[str, Any] | None = None) -> None:
    """Write ``params`` as JSON (``{"kind", "version", "params", "about"}``); ``about`` says where they
    came from (e.g. a tuning run's data and validation figures) and is never read back as parameters."""
    import json
    from pathlib import Path

    doc = {"kind": PARAMS_FILE_KIND, "version": PARAMS_FILE_VERSION, "params": params.to_dict(), "about": about or {}}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def read_params_file(path: str) -> GRU4RecParams:
    """Read a file written by :func:`write_params_file`. Parameters it omits keep their defaults; an
    unknown name or a value of the wrong type is a :class:`ParamsError` naming the file."""
    import json
    from pathlib import Path

    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: not a params file (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != PARAMS_FILE_KIND or not isinstance(doc.get("params"), dict):
        raise ParamsError(f"{path}: not a params file (expected a JSON object with \"kind\": "
                          f"\"{PARAMS_FILE_KIND}\" and \"params\")")
    if doc.get("version") != PARAMS_FILE_VERSION:
        raise ParamsError(f"{path}: params file version {doc.get('version')!r}; "
                          f"this gruflow reads version {PARAMS_FILE_VERSION}")
    base = GRU4RecParams()
    known = {f.name for f in fields(GRU4RecParams)}
    changes: dict[str, Any] = {}
    for name, value in doc["params"].items():
        if name not in known:
            raise ParamsError(f"{path}: unknown parameter {name!r}; known: {', '.join(sorted(known))}")
        changes[name] = _checked(path, name, value, getattr(base, name))
    return dataclasses.replace(base, **changes)


def _checked(path: str, name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``; JSON has no tuples and writes whole floats as ints."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)
        value = tuple(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ParamsError(f"{path}: parameter {name}={value!r}: expected a {type(default).__name__}")
    return value
