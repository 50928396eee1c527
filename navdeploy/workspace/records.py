"""The typed records of a workspace: what navdeploy keeps about each candidate, format and graph of a module.

Everything in memory works on these records; JSON exists only at the disk boundary, through each record's
``to_json()`` / ``from_json()``. The JSON is the manifest's format, one for every navdeploy version:
``from_json`` fills what manifests of earlier versions lack (a candidate's ``name``, its ``precision``; a failure
without ``transient`` is deterministic) and ``to_json`` writes optional keys (``pid``, ``window``,
``artifact_checksum``, ``cached``, ``retries``, the manifest's ``inductor_cache``) only when they are set, so a
record without them has the same JSON in every version; a failed record always says whether it is ``transient``;
``screen`` (a screened candidate's short measurement) is written only when taken. ``from_json`` expects JSON that
passed :mod:`navdeploy.workspace.manifest`'s validation, which names what is wrong with a malformed manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from navdeploy.capture.graph import Graph
from navdeploy.workspace.layout import artifact_dir, artifact_path


@dataclass
class ProfilePoint:
    """Latency percentiles (ms) and throughput (samples/s) at one batch size (None: the module does not batch)."""

    batch_size: Optional[int]
    p50_ms: float
    p90_ms: float
    throughput: float
    iterations: int = 0
    stable: bool = False

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms,
                "throughput": self.throughput, "iterations": self.iterations, "stable": self.stable}

    @classmethod
    def from_json(cls, data: dict) -> "ProfilePoint":
        return cls(data.get("batch_size"), data["p50_ms"], data.get("p90_ms", data["p50_ms"]), data["throughput"],
                   data.get("iterations", 0), data.get("stable", False))


@dataclass
class BuildWindow:
    """Wall-clock (epoch) times of a candidate's start, end of verification, start of profiling (after any wait
    for the timing gate) and end: which candidates were built side by side, and that each profiled alone."""

    start: float
    verified: Optional[float] = None
    profile: Optional[float] = None
    end: Optional[float] = None

    def to_json(self) -> dict:
        return {"start": self.start, "verified": self.verified, "profile": self.profile, "end": self.end}

    @classmethod
    def from_json(cls, data: dict) -> "BuildWindow":
        return cls(data["start"], data.get("verified"), data.get("profile"), data.get("end"))


@dataclass
class CandidateRecord:
    """One candidate (a runner in one precision) of one graph: how it went and what it measured.

    ``status`` is "ok" (verified and fully profiled), "screened" (verified and timed on a few calls at one batch
    size, ``screen``, but not profiled in full: it could not win; ``error`` says why), "built" (verified, not timed
    yet: a build that waits for its screen until every build of the graph is done; never in a finished manifest),
    "failed" or "skipped" (not
    run: its package is missing, or the search did not build it; ``error`` says why); ``step`` the step that
    failed (export, load, verify, profile, isolation); ``times`` seconds per step (``export_s``, ``load_s``,
    ``verify_s``, ``screen_s``, ``profile_s``).

    ``transient``: the failure came from outside the candidate (its worker was killed by a signal such as the OOM
    killer's SIGKILL, it timed out, the disk was full), so the next run tries it again; a deterministic failure
    (an exporter error, wrong outputs, a segfault) stays cached. ``retries``: how many runs already retried it
    after a transient failure; a candidate is retried once."""

    name: str
    runner: str
    format: str
    precision: Optional[str]  # None only in manifests of versions without candidate precisions: the module's own
    device: Optional[str]
    status: str = "failed"
    error: Optional[str] = None
    step: Optional[str] = None
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    profile: list[ProfilePoint] = field(default_factory=list)
    times: dict[str, Optional[float]] = field(default_factory=dict)
    exported: bool = False
    pid: Optional[int] = None
    window: Optional[BuildWindow] = None
    artifact_checksum: Optional[str] = None
    cached: bool = False  # reused from an earlier run, not run this time
    transient: bool = False
    retries: int = 0
    screen: Optional[ProfilePoint] = None  # the screening measurement (few calls at the batch the strategy compares)

    @property
    def ok(self) -> bool:
        """Verified and fully profiled: a candidate selection may pick."""
        return self.status == "ok"

    @property
    def verified(self) -> bool:
        """Its outputs matched eager's: fully profiled ("ok"), screened out, or built and not timed yet."""
        return self.status in ("ok", "screened", "built")

    def screen_ms(self, batch_size: Optional[int]) -> Optional[float]:
        """p50 latency (ms) by which the search compares it at ``batch_size``: its screening measurement, else the
        point of its full profile at that batch size (the first point when the graph does not batch)."""
        if self.screen is not None:
            return self.screen.p50_ms
        point = next((m for m in self.profile if m.batch_size == batch_size), None)
        return point.p50_ms if point is not None else None

    def worth_retrying(self, max_retries: int = 1) -> bool:
        """Whether a cached record is a transient failure that has not been retried ``max_retries`` times yet."""
        return self.status == "failed" and self.transient and self.retries < max_retries

    def precision_in(self, module_precision: str) -> str:
        """The candidate's precision; the module's own for records without one (manifests of earlier versions)."""
        return self.precision or module_precision

    def artifact_dir(self, module_precision: str) -> str:
        """The key of this candidate's format in its graph's ``formats`` (see :meth:`GraphEntry.artifact_folder`
        for the folder of its build)."""
        return artifact_dir(self.format, self.precision_in(module_precision), module_precision)

    def first_p50_ms(self) -> Optional[float]:
        """p50 latency of the first measurement (the captured or smallest profiled batch), None if not profiled."""
        return self.profile[0].p50_ms if self.profile else None

    def shown_p50_ms(self) -> Optional[float]:
        """The p50 latency a table shows: the first profiled point, else the screening measurement."""
        first = self.first_p50_ms()
        return first if first is not None else (self.screen.p50_ms if self.screen is not None else None)

    def best_throughput(self) -> Optional[float]:
        return max((m.throughput for m in self.profile), default=None)

    def to_json(self) -> dict:
        data: dict[str, Any] = {"name": self.name, "runner": self.runner, "format": self.format}
        if self.precision is not None:
            data["precision"] = self.precision
        data.update({"device": self.device, "status": self.status, "error": self.error, "step": self.step,
                     "max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err,
                     "profile": [m.to_json() for m in self.profile], "times": dict(self.times),
                     "exported": self.exported})
        if self.pid is not None:
            data["pid"] = self.pid
        if self.window is not None:
            data["window"] = self.window.to_json()
        if self.artifact_checksum is not None:
            data["artifact_checksum"] = self.artifact_checksum
        if self.cached:
            data["cached"] = True
        if self.status == "failed":
            data["transient"] = self.transient
        if self.retries:
            data["retries"] = self.retries
        if self.screen is not None:
            data["screen"] = self.screen.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CandidateRecord":
        window = data.get("window")
        return cls(name=data.get("name", data["runner"]), runner=data["runner"], format=data.get("format", ""),
                   precision=data.get("precision"), device=data.get("device"), status=data["status"],
                   error=data.get("error"), step=data.get("step"), max_abs_err=data.get("max_abs_err"),
                   max_rel_err=data.get("max_rel_err"),
                   profile=[ProfilePoint.from_json(m) for m in data.get("profile") or []],
                   times=dict(data.get("times") or {}), exported=bool(data.get("exported", False)),
                   pid=data.get("pid"), window=BuildWindow.from_json(window) if isinstance(window, dict) else None,
                   artifact_checksum=data.get("artifact_checksum"), cached=bool(data.get("cached", False)),
                   transient=data.get("transient") is True, retries=int(data.get("retries") or 0),
                   screen=ProfilePoint.from_json(data["screen"]) if isinstance(data.get("screen"), dict) else None)


def find_candidate(candidates: Sequence[CandidateRecord], name: Optional[str]) -> Optional[CandidateRecord]:
    """The record named ``name`` (a candidate name such as ``TensorRT[fp16]``, not a runner name), if any."""
    if not name:
        return None
    return next((c for c in candidates if c.name == name), None)


@dataclass
class FormatState:
    """One exported format folder of a graph: built (with the checksum of its files) or failed (with why)."""

    status: str
    checksum: Optional[str] = None
    export_s: Optional[float] = None
    error: Optional[str] = None

    def to_json(self) -> dict:
        if self.status == "ok":
            return {"status": self.status, "checksum": self.checksum, "export_s": self.export_s}
        data: dict[str, Any] = {"status": self.status, "error": self.error}
        if self.checksum is not None:
            data["checksum"] = self.checksum
        return data

    @classmethod
    def from_json(cls, data: dict) -> "FormatState":
        return cls(data.get("status", ""), data.get("checksum"), data.get("export_s"), data.get("error"))


@dataclass
class GraphEntry:
    """One input structure of a module in the manifest: its shapes, the cache key its results hold for, the
    formats built, every candidate and the winner's candidate name. A checkpoint holds the same without
    ``graph`` and ``selected``."""

    graph: Optional[Graph]
    cache_key: str = ""
    formats: dict[str, FormatState] = field(default_factory=dict)
    candidates: list[CandidateRecord] = field(default_factory=list)
    selected: Optional[str] = None
    updated: Optional[str] = None
    # When the selected candidate runs in another precision than the module's (fp16 on CUDA, bf16 on the CPU):
    # the best candidate in the module's own precision, which the pipeline check binds instead when the other
    # precision changes what the pipeline returns. Its build is kept for that.
    fallback: Optional[str] = None

    def selected_candidate(self) -> Optional[CandidateRecord]:
        """The record of the selected candidate, None when nothing was selected."""
        return find_candidate(self.candidates, self.selected)

    def fallback_candidate(self) -> Optional[CandidateRecord]:
        """The record of the fallback in the module's own precision, None when there is none."""
        return find_candidate(self.candidates, self.fallback)

    def artifact_folder(self, graph_dir: Path, fmt_key: str) -> Path:
        """The folder of the build of format ``fmt_key`` this entry names (its checksum's build folder; the
        format's one folder in manifests of earlier versions)."""
        state = self.formats.get(fmt_key)
        return artifact_path(graph_dir, fmt_key, state.checksum if state is not None else None)

    def to_json(self) -> dict:
        data: dict[str, Any] = {}
        if self.graph is not None:
            data["graph"] = self.graph.to_json()
        data.update({"cache_key": self.cache_key, "formats": {k: v.to_json() for k, v in self.formats.items()},
                     "candidates": [c.to_json() for c in self.candidates], "selected": self.selected,
                     "updated": self.updated})
        if self.fallback:
            data["fallback"] = self.fallback
        return data

    @classmethod
    def from_json(cls, data: dict) -> "GraphEntry":
        graph = Graph.from_json(data["graph"]) if data.get("graph") is not None else None
        return cls(graph, data.get("cache_key", ""),
                   {k: FormatState.from_json(v) for k, v in (data.get("formats") or {}).items()},
                   [CandidateRecord.from_json(c) for c in data.get("candidates") or []], data.get("selected"),
                   data.get("updated"), data.get("fallback"))


@dataclass
class Manifest:
    """A module's manifest: what it was optimized as (fingerprint, device, precision, batch sizes, tolerances)
    and one :class:`GraphEntry` per input structure."""

    module: str
    fingerprint: str
    device: str
    version: int = 1
    navdeploy: Optional[str] = None
    torch: Optional[str] = None
    class_name: Optional[str] = None  # "class" on disk
    precision: str = "fp32"
    forward_func: Optional[str] = None
    max_batch_size: int = 1
    batch_sizes: list[int] = field(default_factory=list)
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # precision -> (atol, rtol)
    graphs: dict[str, GraphEntry] = field(default_factory=dict)
    updated: Optional[str] = None
    # Why the pipeline check put this module back to eager (its runners made the pipeline no faster); bind then
    # leaves it eager. The next nav.optimize decides again.
    reverted: Optional[str] = None
    # Why the pipeline check bound the graphs' fallbacks in the module's own precision instead of the winners
    # in another one (``GraphEntry.fallback``). The next nav.optimize decides again.
    fell_back: Optional[str] = None
    precision_inferred: bool = False  # ``precision`` was read from the weights, not given to nav.Module
    # The checksum of the module's inductor cache (navdeploy.workspace.inductor) when this manifest was written;
    # None: no cache of its own (a user-set TORCHINDUCTOR_CACHE_DIR, or a manifest of an earlier version).
    inductor_cache: Optional[str] = None

    def to_json(self) -> dict:
        extra = {"reverted": self.reverted} if self.reverted else {}
        if self.fell_back:
            extra["fell_back"] = self.fell_back
        if self.precision_inferred:
            extra["precision_inferred"] = True
        if self.inductor_cache is not None:
            extra["inductor_cache"] = self.inductor_cache
        return {**extra, "version": self.version, "navdeploy": self.navdeploy, "torch": self.torch,
                "module": self.module, "class": self.class_name, "fingerprint": self.fingerprint, "device": self.device,
                "precision": self.precision, "forward_func": self.forward_func,
                "max_batch_size": self.max_batch_size, "batch_sizes": list(self.batch_sizes),
                "tolerances": {p: list(t) for p, t in self.tolerances.items()},
                "graphs": {k: e.to_json() for k, e in self.graphs.items()}, "updated": self.updated}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        tolerances = {p: (float(t[0]), float(t[1])) for p, t in (data.get("tolerances") or {}).items()}
        return cls(module=data["module"], fingerprint=data["fingerprint"], device=data["device"],
                   version=data.get("version", 1), navdeploy=data.get("navdeploy"), torch=data.get("torch"),
                   class_name=data.get("class"), precision=data.get("precision", "fp32"),
                   forward_func=data.get("forward_func"), max_batch_size=data.get("max_batch_size", 1),
                   batch_sizes=list(data.get("batch_sizes") or []), tolerances=tolerances,
                   graphs={k: GraphEntry.from_json(e) for k, e in data["graphs"].items()},
                   updated=data.get("updated"), reverted=data.get("reverted"), fell_back=data.get("fell_back"),
                   precision_inferred=bool(data.get("precision_inferred", False)),
                   inductor_cache=data.get("inductor_cache"))
