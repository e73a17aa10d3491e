"""The scale-out model: what N replicas on N machines would reach, from one run's CPU costs.

Inputs, from the scaling row with 1 replica x 2 workers on Redis sessions and PostgreSQL
resources: the CPU milliseconds one handshake costs in the KBS servers (workers and policy
workers), in the Redis server and in PostgreSQL (every postgres process), each measured from
``/proc`` over the row's load (``kbsbench.cpu``).

Assumptions, stated in the result: each replica runs on its own machine of ``cores`` cores that
it does not share (no load generator, no stores on it); Redis is one server, whose commands run
on one thread, so it saturates at one core; PostgreSQL runs on one machine of ``cores`` cores;
the network adds latency but no CPU here; per-handshake costs stay what they were at one replica
(no contention in the stores). Then N replicas reach ``min(N x per_replica, redis_limit,
postgres_limit)`` handshakes per second, and the first limit reached is what saturates.
"""

from __future__ import annotations

from typing import Any


def scale_out(costs: dict[str, float], *, cores: int, replicas: list[int]) -> dict[str, Any]:
    """The model for ``costs`` (CPU ms per handshake by ``kbs``, ``redis``, ``postgres``)."""

    def rate(ms: float, cores_available: int) -> float | None:
        return round(1000 * cores_available / ms, 1) if ms > 0 else None

    per_replica = rate(costs["kbs"], cores)
    limits = {"redis": rate(costs.get("redis", 0.0), 1)}
    limits["postgres"] = rate(costs.get("postgres", 0.0), cores)
    rows = []
    for n in replicas:
        candidates = {"kbs replicas": None if per_replica is None else n * per_replica}
        candidates |= limits
        bounded = {k: v for k, v in candidates.items() if v is not None}
        first = min(bounded, key=lambda k: bounded[k]) if bounded else None
        rows.append(
            {
                "replicas": n,
                "handshakes_per_second": round(bounded[first], 1) if first else None,
                "saturates": first,
            }
        )
    return {
        "cores_per_machine": cores,
        "cpu_ms_per_handshake": costs,
        "per_replica": per_replica,
        "limits": limits,
        "rows": rows,
        "assumptions": (
            "each replica alone on a machine of cores_per_machine cores; one Redis server, one "
            "thread; PostgreSQL on one machine of cores_per_machine cores; per-handshake CPU "
            "costs as measured at 1 replica x 2 workers; network latency only"
        ),
    }
