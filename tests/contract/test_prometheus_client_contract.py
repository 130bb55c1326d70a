"""prometheus_client's histogram internals as ``observe_many`` (stream/compat.py) uses them: per-bucket
(non-cumulative) counters in ``_buckets`` over ``_upper_bounds`` (+Inf last) and the sum in ``_sum``."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from stream.observe.metrics import LATENCY_BUCKETS


def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in h.collect() for s in m.samples if not s.name.endswith("_created")]


def test_observe_many_exports_what_observe_one_by_one_exports() -> None:
    from stream.compat import observe_many  # imports faust: a broken faust fails this test, not the module

    rng = np.random.default_rng(17)
    # on the bucket bounds too: a value equal to a bound counts in that bucket (le)
    values = np.concatenate([rng.exponential(0.01, 500), np.asarray(LATENCY_BUCKETS[:5]), [30.0, 0.0]])
    one, many = (Histogram("contract_latency_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
                 for _ in range(2))
    for v in values:
        one.observe(float(v))
    observe_many(many, values)
    got, want = samples(many), samples(one)
    assert [s[:2] for s in got] == [s[:2] for s in want]
    np.testing.assert_allclose([s[2] for s in got], [s[2] for s in want], rtol=1e-12)
    assert dict((name, v) for name, _, v in want)["contract_latency_seconds_sum"] > 0


def test_upper_bounds_end_with_infinity() -> None:
    h = Histogram("contract_size", "x", buckets=(1, 2, 5), registry=CollectorRegistry())
    assert list(h._upper_bounds) == [1.0, 2.0, 5.0, float("inf")]
    assert len(h._buckets) == len(h._upper_bounds)
