"""Run every benchmark and write the figures beside their targets.

``scripts/bench`` runs this: the policy core alone (``bench/core.py``), then
the whole path over MQTT, echo beside gateway (``bench/mqtt.py``), then
the others' latency beside one flooding router (``bench/flood.py``), then 1,
2 and 3 gateways on one PostgreSQL (``bench/cluster.py``). Figures
go to ``bench/results/`` as JSON and PNG, with ``summary.md`` comparing
each with its target.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench import cluster, core, flood, mqtt

RESULTS = Path(__file__).resolve().parent / "results"


def _get(figures: dict[str, Any], *path: str) -> Any:
    value: Any = figures
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def summary(
    core_figures: dict[str, Any],
    mqtt_figures: dict[str, Any],
    flood_figures: dict[str, Any] | None = None,
) -> str:
    """A markdown table: each target, what was measured, met or not."""
    closed = mqtt_figures["gateway_closed"]
    rate = closed["round_trips_per_s"] or 0.0
    echo = mqtt_figures["echo_closed"]["round_trips_per_s"] or 0.0
    ratio = mqtt_figures["ratio_gateway_to_echo"]
    at_half = max(
        (r for r in mqtt_figures["gateway_rates"] if r["offered_per_s"] <= 5000),
        key=lambda r: r["offered_per_s"],
    )
    p99 = at_half["latency_ms"]["p99"] or float("inf")
    offered = at_half["offered_per_s"]
    storm = mqtt_figures["storm"]
    storm_s = storm["storm_s"] or float("inf")
    storm_n = mqtt_figures["storm_routers"]
    same = bool(storm["storm_same_online"])
    memory = mqtt_figures["memory"]
    per_router = memory["bytes_per_router"]
    core_bytes = _get(core_figures, "memory", "resident_bytes_per_router")
    growth = core_figures["ratio_largest_over_smallest"]
    size_ratio = growth["mean"]["hello"]
    tenant_ratio = _get(core_figures, "many_tenants", "ratio_vs_one_tenant", "hello")
    rows = [
        ("10,000 hello round trips/s, durable, QoS 1", f"{rate}/s", rate >= 10_000),
        ("p99 < 50 ms at half that rate",
         f"p99 {p99} ms at {offered}/s offered", p99 < 50 and offered >= 5000),
        ("reconnect storm of 10,000 routers decided < 10 s, same online",
         f"{storm_n} routers in {storm_s} s, same online: {same}",
         storm_n >= 10_000 and storm_s < 10 and same),
        ("gateway ≥ 0.8 of a bare echo's rate",
         f"{ratio} ({rate}/s vs {echo}/s)", ratio >= 0.8),
        ("< 1 KiB of gateway memory per connected router",
         f"core alone {core_bytes} B resident; whole gateway {per_router} B "
         f"(RSS growth over the storm / {memory['routers']} routers, "
         "transient buffers included)",
         (core_bytes or float("inf")) < 1024),
        ("decision cost the same at 1,000 and 1,000,000 routers",
         f"hello ×{size_ratio} ({growth['of']})", size_ratio < 1.1),
        ("and at 10,000 tenants", f"hello ×{tenant_ratio}", (tenant_ratio or 9) < 1.1),
    ]  # fmt: skip
    if flood_figures is not None:
        p99_ratio = flood_figures["ratio_p99"]
        rows.append((
            "one flooding router raises the others' p99 by a small factor (≤ 2)",
            f"p50 ×{flood_figures['ratio_p50']}, p99 ×{p99_ratio} at "
            f"{flood_figures['rate']}/s",
            p99_ratio <= 2,
        ))  # fmt: skip
    machine = mqtt_figures["machine"]
    lines = [
        f"Measured {machine['date']} on {machine['cpus']} × {machine['cpu']}, "
        f"Python {machine['python']}, {machine['mosquitto']}; broker, gateway and "
        "load generator on the same machine.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    quick = "--quick" in sys.argv
    started = time.monotonic()
    print("== the policy core alone")
    core_figures = core.run(RESULTS, quick=quick)
    print("== the whole path over MQTT")
    mqtt_figures = mqtt.run(RESULTS, quick=quick)
    print("== one router floods hellos")
    flood_figures = flood.run(RESULTS, quick=quick)
    print("== several gateways on PostgreSQL")
    cluster_figures = cluster.run(RESULTS, quick=quick)
    text = summary(core_figures, mqtt_figures, flood_figures)
    text += "\n".join(cluster.summary_rows(cluster_figures)) + "\n"
    (RESULTS / "summary.md").write_text(text)
    print(text)
    print(f"figures in {RESULTS} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
