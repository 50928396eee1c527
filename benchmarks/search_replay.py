"""Replay the search policy on the figures of an exhaustive run: would the default search have picked the same
winner? No model runs; each candidate's screen is taken to be its recorded p50 at the compared batch size.

    python benchmarks/search_replay.py [benchmarks/results/pipelines_cpu.json]

For every module and every batch size in the file: the exhaustive winner (MinLatency with the routing-cost rule),
the search's (``candidates/search.py``: the twin skipped when AOTInductor verified, the leaders within the screen
margin of the best, eager among them where the best beats it by less than a routed call costs, selection among
the leaders) and the ratio of their latencies. A screen is noisier than the recorded full-profile p50, so this
checks the policy's rules, not the screen's noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from navdeploy.candidates.search import graph_search, twin_skip_reason
from navdeploy.candidates.select import select
from navdeploy.config import MinLatency
from navdeploy.formats.registry import RUNNERS
from navdeploy.workspace.records import CandidateRecord, ProfilePoint


def _records(candidates: list[dict], batch: int) -> list[CandidateRecord]:
    records = []
    for c in candidates:
        if c.get("status") != "ok" or str(batch) not in (c.get("p50_ms_by_batch") or {}):
            continue
        p50 = c["p50_ms_by_batch"][str(batch)]
        record = CandidateRecord(c["name"], c["name"], "", "fp32", "cpu", status="ok")
        record.profile = [ProfilePoint(batch, p50, p50, batch / p50 * 1e3, 100, True)]
        records.append(record)
    return records


def replay(candidates: list[dict], batch: int) -> dict:
    exhaustive = _records(candidates, batch)
    if not exhaustive or exhaustive[0].name != "TorchCPU":
        return {}
    best = select(exhaustive, MinLatency(), batch, "TorchCPU")
    search = graph_search(MinLatency(), False, True, batch, (batch,))
    by_name = {r.name: r for r in exhaustive}
    built = [r for r in exhaustive
             if not twin_skip_reason(RUNNERS[r.name], [by_name.get(t) for t in RUNNERS[r.name].twin_of], search)]
    leaders = {r.name for r in search.leaders(built, "TorchCPU")}
    quick = select([r for r in built if r.name in leaders], MinLatency(), batch, "TorchCPU")
    ratio = quick.profile[0].p50_ms / best.profile[0].p50_ms
    return {"batch": batch, "exhaustive": best.name, "search": quick.name, "ratio": ratio,
            "profiled_in_full": sorted(leaders), "not_built": sorted(set(by_name) - {r.name for r in built})}


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "pipelines_cpu.json")
    data = json.loads(path.read_text())
    rows = []
    for pipeline in data["pipelines"].values():
        for name, module in (pipeline.get("optimize", {}).get("status", {}).get("modules") or {}).items():
            for graph in module["graphs"]:
                sizes = sorted({int(b) for c in graph["candidates"] for b in (c.get("p50_ms_by_batch") or {})})
                for batch in sizes:
                    row = replay(graph["candidates"], batch)
                    if row:
                        rows.append({"module": name, **row})
    for r in rows:
        print(f"{r['module']:16s} batch {r['batch']}: exhaustive {r['exhaustive']:16s} search {r['search']:16s} "
              f"{r['ratio']:.2f}x  profiled in full: {', '.join(r['profiled_in_full'])}")
    same = sum(r["exhaustive"] == r["search"] for r in rows)
    within = sum(r["ratio"] <= 1.05 for r in rows)
    print(f"same winner {same}/{len(rows)}, within 5% {within}/{len(rows)}")
    return 0 if within == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
