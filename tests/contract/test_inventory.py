"""Every private name (and overridden or mirrored hook) gruflow touches still exists, with the kind and the
parameters gruflow's code uses; and docs/upgrading.md explains each one. Behaviour: the other modules here."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mode
import pytest
from prometheus_client import CollectorRegistry, Histogram

from contractkit import (AIOKAFKA_CONSUMER, CONSUMER, FAUST_PRODUCER, HISTOGRAM, HOOKS, PRIVATE, ROCKSDB_STORE,
                         SERVICE, Touch, is_coroutine, missing_params, resolve)

if TYPE_CHECKING:
    from stream.worker.app import Runtime

REPO = Path(__file__).resolve().parents[2]
UPGRADING = REPO / "docs" / "upgrading.md"
PRODUCT_DIRS = ("model", "state", "stream")


def _aiokafka_consumer() -> Any:
    """A consumer as aiokafka builds it (it binds to the running loop; never started)."""
    import aiokafka

    async def build() -> Any:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
        await consumer.stop()
        return consumer

    return asyncio.run(build())


def sample(owner: str, request: pytest.FixtureRequest) -> Any:
    """A live object of ``owner`` whose private attributes only exist once ``__init__`` ran. Only the
    faust owners build the worker app: aiokafka's and prometheus_client's rows stay checkable when a
    release breaks faust."""
    if owner == AIOKAFKA_CONSUMER:
        return _aiokafka_consumer()
    if owner == HISTOGRAM:
        return Histogram("contract_seconds", "a histogram", registry=CollectorRegistry())
    if owner == SERVICE:
        return mode.Service()
    rt: Runtime = request.getfixturevalue("eos_runtime")
    consumer = rt.app.consumer
    return {CONSUMER: consumer, FAUST_PRODUCER: consumer.transactions.producer,
            ROCKSDB_STORE: rt.pipeline.store.table.data}[owner]


@pytest.mark.parametrize("touch", PRIVATE + HOOKS, ids=lambda t: t.id)
def test_touch_exists_with_its_signature(touch: Touch, request: pytest.FixtureRequest) -> None:
    owner = resolve(touch.owner)
    if touch.kind == "attribute":
        obj = sample(touch.owner, request)
        assert hasattr(obj, touch.name), f"{touch.id} is gone (used by {touch.used_in})"
        return
    assert hasattr(owner, touch.name), f"{touch.id} is gone (used by {touch.used_in})"
    if touch.kind == "value":
        return
    fn = getattr(owner, touch.name)
    assert callable(fn), f"{touch.id} is no longer callable"
    if touch.kind == "coroutine":
        assert is_coroutine(fn), f"{touch.id} is no longer a coroutine function (gruflow awaits it)"
    else:
        assert not is_coroutine(fn), f"{touch.id} became a coroutine function (gruflow calls it synchronously)"
    if touch.params is not None:
        missing = missing_params(fn, touch.params)
        assert not missing, f"{touch.id}{inspect.signature(fn)} lacks {missing} (used by {touch.used_in})"


def test_upgrading_doc_names_every_touch() -> None:
    """docs/upgrading.md is the list a maintainer reads before an upgrade: it must not fall behind."""
    text = UPGRADING.read_text()
    absent = [t.id for t in PRIVATE + HOOKS if f"`{t.name}`" not in text]
    assert not absent, f"docs/upgrading.md does not explain: {absent}"


# the one module allowed to touch private names of faust, aiokafka, mode and prometheus_client
COMPAT = "stream/compat.py"
# product modules whose classes subclass faust's: their ``self._name`` may be faust's too
SUBCLASSING = (COMPAT, "stream/worker/batch_consumer.py", "stream/worker/table_store.py", "stream/worker/main.py")
_DOT_PRIVATE = re.compile(r"\._([a-z]\w*)")
_CHAIN_END = re.compile(r"(\w+\(\)|[\w.])*$")  # the expression before the dot: a.b.c or super()
_GETATTR = re.compile(r"getattr\([^,]+,\s*[\"']_([a-z]\w*)[\"']")
_SELF = re.compile(r"\bself\._([a-z]\w*)")


def _own_names(source: str) -> set[str]:
    """Private names a module defines itself: its methods, and what its ``__init__`` methods assign."""
    names = set(re.findall(r"def _([a-z]\w*)", source))
    for init in re.findall(r"def __init__\(.*?(?=\n    def |\nclass |\Z)", source, flags=re.S):
        names |= set(re.findall(r"self\._([a-z]\w*)\s*[:=]", init))
    return names


def _private_uses(path: Path) -> set[str]:
    """``obj._name`` and ``getattr(obj, "_name")`` in one module on objects that are not the code's own
    (self/cls), plus ``self._name`` in subclasses of faust's classes that the subclass does not define itself."""
    found: set[str] = set()
    source = path.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    for m in _DOT_PRIVATE.finditer(code):
        chain = _CHAIN_END.search(code, max(0, m.start() - 200), m.start())
        if chain is not None and chain.group(0) not in ("self", "cls"):
            found.add(m.group(1))
    found |= set(_GETATTR.findall(code))
    if str(path.relative_to(REPO)) in SUBCLASSING:
        found |= set(_SELF.findall(code)) - _own_names(source)
    return {"_" + n for n in found}


def _product_modules() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (REPO / d).rglob("*.py"))


def _private_uses_in_product_code() -> set[str]:
    return set().union(*(_private_uses(p) for p in _product_modules()))


# private names on gruflow's OWN objects (or torch/os), which the inventory does not cover
_OWN = {"_exit", "_int_mm", "_lock", "_instance", "_describe_log", "_ids", "_retired"}


def test_inventory_covers_the_product_code() -> None:
    """A new private touch in product code must be added to the inventory (and to the doc)."""
    known = {t.name for t in PRIVATE}
    new = _private_uses_in_product_code() - known - _OWN
    assert not new, f"private names used in model/, state/, stream/ but not pinned in contractkit.PRIVATE: {new}"


def test_private_touches_live_in_the_compat_module_only() -> None:
    """Upgrading faust-streaming, aiokafka, mode or prometheus_client means reading stream/compat.py: no
    other product module touches their private names, and every touch of the inventory is used there."""
    known = {t.name for t in PRIVATE}
    outside = {str(p.relative_to(REPO)): sorted((_private_uses(p) & known) | (_private_uses(p) - _OWN))
               for p in _product_modules() if str(p.relative_to(REPO)) != COMPAT}
    outside = {k: v for k, v in outside.items() if v}
    assert not outside, f"private framework names outside {COMPAT}: {outside}"
    assert all(t.used_in.startswith(COMPAT) for t in PRIVATE), [t.id for t in PRIVATE if not t.used_in.startswith(COMPAT)]
    unused = sorted(t.id for t in PRIVATE if f"_{t.name.lstrip('_')}" not in (REPO / COMPAT).read_text())
    assert not unused, f"inventory rows {COMPAT} does not use: {unused}"
