"""stream/compat.py overrides private methods of faust's classes: each override must still override
something, with the parameters faust passes, and gruflow's subclasses must use the public hooks only."""

from __future__ import annotations

import inspect

import pytest

from stream import compat
from stream.worker.batch_consumer import BatchConsumer, BatchConsumerThread
from stream.worker.table_store import ChangelogGuardRecovery

HOOK_CLASSES = (compat.ConsumerHooks, compat.ConsumerThreadHooks, compat.RecoveryHooks)


def _private_overrides(cls: type) -> list[str]:
    return [name for name, value in vars(cls).items()
            if name.startswith("_") and not name.startswith("__") and callable(value)]


@pytest.mark.parametrize("cls", HOOK_CLASSES, ids=lambda c: c.__name__)
def test_every_private_override_overrides_the_framework_method_with_its_parameters(cls: type) -> None:
    overrides = _private_overrides(cls)
    assert overrides, f"{cls.__name__} overrides nothing private"
    base = cls.__mro__[1]
    for name in overrides:
        assert hasattr(base, name), f"{base.__name__}.{name} is gone: compat.{cls.__name__} overrides nothing"
        ours = list(inspect.signature(getattr(cls, name)).parameters)
        theirs = list(inspect.signature(getattr(base, name)).parameters)
        assert ours == theirs, f"{base.__name__}.{name}{theirs} vs compat's {ours}"
        assert inspect.iscoroutinefunction(getattr(cls, name)) == inspect.iscoroutinefunction(getattr(base, name))


@pytest.mark.parametrize("cls", (BatchConsumer, BatchConsumerThread, ChangelogGuardRecovery), ids=lambda c: c.__name__)
def test_gruflow_subclasses_override_only_public_hooks(cls: type) -> None:
    """The batch consumer and the changelog guard go through compat's public hooks; overriding faust's
    private methods directly would bypass the one module an upgrade reads."""
    framework = {n for c in cls.__mro__ if c.__module__.split(".")[0] in ("faust", "mode", "aiokafka")
                 for n in vars(c) if n.startswith("_") and not n.startswith("__")}
    assert not set(_private_overrides(cls)) & framework, set(_private_overrides(cls)) & framework


def test_the_batch_consumer_is_wired_through_the_hooks() -> None:
    assert issubclass(BatchConsumer, compat.ConsumerHooks) and BatchConsumer.consumer_thread_class is BatchConsumerThread
    assert issubclass(BatchConsumerThread, compat.ConsumerThreadHooks)
    assert {"drain", "tag_fetched", "consumer_created", "log_end_offsets"} <= \
        set(vars(BatchConsumer)) | set(vars(BatchConsumerThread))
