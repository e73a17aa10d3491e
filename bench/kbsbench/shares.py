"""Every throughput of a run as a share of the bare-HTTP ceiling measured in the same run.

A row's share is its HTTP requests per second (a handshake is three requests: ``/auth``,
``/attest`` and the resource GET) divided by the ceiling's requests per second on the same
stack (replicas, workers per replica) at the same number of concurrent guests. Both come from
one run, so a faster or slower machine moves both and not the share.

The servers section (uvicorn against granian) is compared by ``compare_servers``: each server's
rows against its own ceiling, and granian's figures over uvicorn's.

Does not: measure anything (``kbsbench.__main__`` does), or judge a share against a target.
"""

from __future__ import annotations

from typing import Any

# HTTP requests per completion of each load-generator mode
REQUESTS = {"handshake": 3, "get": 1, "bearer": 1, "healthz": 1}


def _stack_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any], int, int]]:
    """(name, row, replicas, workers) for every throughput row of the run."""
    rows: list[tuple[str, dict[str, Any], int, int]] = []
    hs = results["handshakes"]
    for level, row in hs["levels"].items():
        rows.append((f"memory handshake {level} guests", row, 1, hs["workers"]))
    for section in ("handshakes", "upstream"):
        part = results[section]
        store = part["store"]
        if "handshake" in part:
            rows.append((f"{store} handshake", part["handshake"], 1, part["workers"]))
        for mode in ("get", "bearer", "healthz"):
            if mode in part:
                rows.append((f"{store} {mode}", part[mode], 1, part["workers"]))
        for mode, row in part["spread"].items():
            rows.append((f"{store} {mode} spread", row, 1, part["workers"]))
    for row in results["scaling"]["rows"]:
        name = f"scaling {row['replicas']}x{row['workers']} {row['store']} metrics {row['metrics']}"
        rows.append((name, row, row["replicas"], row["workers"]))
    return rows


def add_ceiling_shares(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Give every throughput row ``requests_per_second`` and ``ceiling_share``; return the
    list of them all (``results["ratios"]``)."""
    ceilings = {
        (row["replicas"], row["workers"], row["concurrency"]): row["per_second"]
        for row in results["ceiling"]["rows"]
    }
    ratios = []
    for name, row, replicas, workers in _stack_rows(results):
        requests = row["per_second"] * REQUESTS[row["mode"]]
        ceiling = ceilings[(replicas, workers, row["concurrency"])]
        row["requests_per_second"] = round(requests, 1)
        row["ceiling_share"] = round(requests / ceiling, 4) if ceiling else 0.0
        ratios.append(
            {
                "name": name,
                "mode": row["mode"],
                "replicas": replicas,
                "workers": workers,
                "concurrency": row["concurrency"],
                "spread": row["spread"],
                "per_second": row["per_second"],
                "p99_ms": row["p99_ms"],
                "requests_per_second": row["requests_per_second"],
                "ceiling_per_second": ceiling,
                "ceiling_share": row["ceiling_share"],
            }
        )
    return ratios


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The comparison of the issue's table: one stack, one concurrency, every kind of request."""
    hs = results["handshakes"]
    level = hs["get"]["concurrency"]
    [ceiling] = [
        row
        for row in results["ceiling"]["rows"]
        if (row["replicas"], row["workers"], row["concurrency"]) == (1, hs["workers"], level)
    ]
    lines = [
        f"\nShares of the bare-HTTP ceiling, 1 replica x {hs['workers']} workers, {level} guests"
        " (in HTTP requests; a handshake is 3):",
        f"  {'what':<44} {'per s':>8} {'req/s':>8} {'p99 ms':>8} {'share':>7}",
        f"  {'bare app, one ' + str(results['ceiling']['reply_bytes']) + '-byte JSON reply':<44}"
        f" {ceiling['per_second']:>8.0f} {ceiling['per_second']:>8.0f}"
        f" {ceiling['p99_ms']:>8.1f} {1:>7.1%}",
    ]
    up = results["upstream"]
    named = [
        ("Keybroker /healthz", hs["healthz"]),
        ("resource GET, cookie", hs["get"]),
        ("resource GET, bearer", hs["bearer"]),
        ("full handshake", hs["levels"][str(level)]),
        ("resource GET, cookie, spread", hs["spread"]["get"]),
        ("full handshake, spread", hs["spread"]["handshake"]),
        ("upstream config: full handshake", up["handshake"]),
        ("upstream config: resource GET, cookie", up["get"]),
        ("upstream config: resource GET, bearer", up["bearer"]),
        ("upstream config: GET, cookie, spread", up["spread"]["get"]),
        ("upstream config: full handshake, spread", up["spread"]["handshake"]),
    ]
    for what, row in named:
        lines.append(
            f"  {what:<44} {row['per_second']:>8.0f} {row['requests_per_second']:>8.0f}"
            f" {row['p99_ms']:>8.1f} {row['ceiling_share']:>7.1%}"
        )
    spread = hs["spread"]["get"]["spread"]
    lines.append(f"  (spread: each guest's requests in turn over {spread} connections)")
    return lines


def compare_servers(
    rows: dict[str, dict[str, Any]], ceilings: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """One row of the servers section (issue 23), ``rows`` keyed by server (``uvicorn``,
    ``granian``): each measurement gets its share of its own server's ceiling (``ceilings``,
    keyed the same), in requests; the row gets the ratios granian/uvicorn of throughput
    (``ratio``) and of p99 latency (``p99_ratio``)."""
    for server, row in rows.items():
        requests = row["per_second"] * REQUESTS[row["mode"]]
        ceiling = ceilings[server]["per_second"]
        row["ceiling_share"] = round(requests / ceiling, 4) if ceiling else 0.0
    uvicorn, granian = rows["uvicorn"], rows["granian"]
    return {
        **rows,
        "ratio": _ratio(granian["per_second"], uvicorn["per_second"]),
        "p99_ratio": _ratio(granian["p99_ms"], uvicorn["p99_ms"]),
    }


def _ratio(over: float, under: float) -> float:
    return round(over / under, 3) if under else 0.0
