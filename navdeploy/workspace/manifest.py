"""A module's manifest: validated on read, then built into a :class:`~navdeploy.workspace.records.Manifest`
(a manifest navdeploy did not write is ignored with a warning)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

from navdeploy.capture.graph import Graph
from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.layout import MANIFEST, plain_name_problem, remove_replaced_builds
from navdeploy.workspace.records import Manifest

log = logging.getLogger("navdeploy")


MANIFEST_VERSION = 1


class _Invalid(ValueError):
    pass


def need(cond: bool, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each value read from a manifest must be: (description, test). Every field ``records.py`` reads is here,
# so a hand-edited manifest is refused with the field named instead of failing later in a command.
STR = ("a string", lambda v: isinstance(v, str))
OPT_STR = ("a string or null", lambda v: v is None or isinstance(v, str))
OPT_NUMBER = ("a number or null", lambda v: v is None or _number(v))
NUMBER = ("a number", _number)
OPT_INT = ("an int or null", lambda v: v is None or _int(v))
COUNT = ("an int >= 0", lambda v: _int(v) and v >= 0)
BOOL = ("true or false", lambda v: isinstance(v, bool))
OPT_BATCH = ("an int >= 1 or null", lambda v: v is None or (_int(v) and v >= 1))
NAME = ("a plain name (no path)", lambda v: isinstance(v, str) and plain_name_problem(v) is None)
OPT_NAME = ("a plain name or null", lambda v: v is None or NAME[1](v))

_CANDIDATE = {"name": NAME, "runner": STR, "format": OPT_NAME, "precision": OPT_NAME, "device": OPT_STR,
              "status": STR, "error": OPT_STR, "step": OPT_STR, "max_abs_err": OPT_NUMBER, "max_rel_err": OPT_NUMBER,
              "exported": BOOL, "pid": OPT_INT, "artifact_checksum": OPT_STR, "cached": BOOL, "transient": BOOL,
              "retries": COUNT}
_PROFILE_POINT = {"batch_size": OPT_BATCH, "p50_ms": NUMBER, "p90_ms": NUMBER, "throughput": NUMBER,
                  "iterations": COUNT, "stable": BOOL}
_REQUIRED_POINT = ("p50_ms", "throughput")
_WINDOW = {"start": NUMBER, "verified": OPT_NUMBER, "profile": OPT_NUMBER, "end": OPT_NUMBER}
_FORMAT = {"status": STR, "checksum": OPT_STR, "export_s": OPT_NUMBER, "error": OPT_STR}
_ENTRY = {"selected": OPT_STR, "cache_key": STR, "updated": OPT_STR, "fallback": OPT_STR}
_MANIFEST = {"fingerprint": STR, "device": STR, "module": STR, "precision": STR, "navdeploy": OPT_STR,
             "torch": OPT_STR, "class": OPT_STR, "forward_func": OPT_STR, "updated": OPT_STR, "reverted": OPT_STR,
             "fell_back": OPT_STR, "precision_inferred": BOOL, "inductor_cache": OPT_STR,
             "max_batch_size": ("an int >= 1", lambda v: _int(v) and v >= 1)}


def _fields(data: dict, spec: dict, where: str, required: tuple[str, ...] = ()) -> None:
    """Each key of ``spec`` present in ``data`` passes its test; the ``required`` ones are present."""
    for key in required:
        need(key in data, f"{where}: {key!r} is missing")
    for key, (what, test) in spec.items():
        if key in data:
            need(test(data[key]), f"{where}: {key!r} is not {what}")


def _check_candidate(c: Any, where: str) -> None:
    need(isinstance(c, dict) and isinstance(c.get("runner"), str) and isinstance(c.get("status"), str),
         f"{where}: a candidate has no runner or status")
    where = f"{where}: candidate {c.get('name', c['runner'])}"
    _fields(c, _CANDIDATE, where)
    profile = c.get("profile", [])
    need(isinstance(profile, list) and all(isinstance(m, dict) for m in profile), f"{where} has a malformed profile")
    for point in profile:
        _fields(point, _PROFILE_POINT, f"{where}: profile", _REQUIRED_POINT)
    times = c.get("times", {})
    need(times is None or (isinstance(times, dict) and all(OPT_NUMBER[1](v) for v in times.values())),
         f"{where}: 'times' is not an object of numbers")
    screen = c.get("screen")
    need(screen is None or isinstance(screen, dict), f"{where}: 'screen' is not an object")
    if screen is not None:
        _fields(screen, _PROFILE_POINT, f"{where}: screen", _REQUIRED_POINT)
    window = c.get("window")
    need(window is None or isinstance(window, dict), f"{where}: 'window' is not an object")
    if window is not None:
        _fields(window, _WINDOW, f"{where}: window", ("start",))


def check_entry(key: Any, entry: Any, graph: bool = True) -> None:
    """The parts of a graph entry that optimize, bind and the commands read, with the types they expect."""

    need(isinstance(key, str) and isinstance(entry, dict), f"graph {key!r} is not an object")
    need(plain_name_problem(key) is None, f"graph key {key!r} is not a plain name")
    _fields(entry, _ENTRY, f"graph {key}")
    formats = entry.get("formats", {})
    need(isinstance(formats, dict) and all(isinstance(v, dict) for v in formats.values()),
          f"graph {key}: 'formats' is not an object of objects")
    for fmt, state in formats.items():
        need(plain_name_problem(fmt) is None, f"graph {key}: format {fmt!r} is not a plain name")
        _fields(state, _FORMAT, f"graph {key}: format {fmt}")
        need(state.get("status") != "failed" or isinstance(state.get("error"), str), f"graph {key}: format {fmt} "
              "failed without an error")
        need(state.get("status") != "ok" or isinstance(state.get("checksum"), str), f"graph {key}: format {fmt} has "
              "no checksum")
    candidates = entry.get("candidates")
    need(isinstance(candidates, list), f"graph {key}: 'candidates' is not a list")
    for c in candidates:
        _check_candidate(c, f"graph {key}")
    selected = entry.get("selected")
    need(selected is None or any(c.get("name", c["runner"]) == selected for c in candidates),
         f"graph {key}: 'selected' names {selected!r}, which is none of its candidates")
    fallback = entry.get("fallback")
    need(fallback is None or (fallback != selected and any(c.get("name", c["runner"]) == fallback
                                                            for c in candidates)),
         f"graph {key}: 'fallback' names {fallback!r}, which is the selected one or none of its candidates")
    if not graph:
        return
    try:
        Graph.from_json(entry["graph"])
    except Exception as exc:  # noqa: BLE001 - any shape problem makes the entry unusable
        raise _Invalid(f"graph {key}: malformed input/output description ({type(exc).__name__}: {exc})") from None


def _check_tolerances(tolerances: Any) -> None:
    need(isinstance(tolerances, dict) and all(
        isinstance(t, list) and len(t) == 2 and all(_number(x) for x in t) for t in tolerances.values()),
        "'tolerances' is not an object of [atol, rtol] pairs")


def validate_manifest(data: Any) -> None:
    """Raise ValueError naming the first part of ``data`` that is not what navdeploy writes."""
    need(isinstance(data, dict), "not a JSON object")
    need(data.get("version") == MANIFEST_VERSION, f"version {data.get('version')!r} is not {MANIFEST_VERSION}")
    _fields(data, _MANIFEST, "manifest", ("fingerprint", "device", "module"))
    batch_sizes = data.get("batch_sizes", [])
    need(isinstance(batch_sizes, list) and all(_int(b) and b >= 1 for b in batch_sizes),
         "'batch_sizes' is not a list of ints >= 1")
    _check_tolerances(data.get("tolerances", {}))
    need(isinstance(data.get("graphs"), dict), "'graphs' is not an object")
    for key, entry in data["graphs"].items():
        check_entry(key, entry)


def load_manifest(folder: Path) -> tuple[Optional[Manifest], Optional[str]]:
    """``(manifest, None)``, ``(None, None)`` when there is none, or ``(None, why)`` when it is unusable: not
    JSON, hand-edited into other types, or written by another version. Never raises."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    try:
        data = json.loads(text)
        validate_manifest(data)
        return Manifest.from_json(data), None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return None, f"{path} is not a valid navdeploy manifest ({exc})"
    except (KeyError, TypeError, IndexError) as exc:  # a part the validator does not check (e.g. tolerances)
        return None, f"{path} is not a valid navdeploy manifest ({type(exc).__name__}: {exc})"


def read_manifest(folder: Path) -> Optional[Manifest]:
    """The module's manifest, or None when absent or unusable (a warning says why; the module is then
    treated as not optimized)."""
    data, problem = load_manifest(folder)
    if problem:
        log.warning("ignoring manifest: %s", problem)
        warnings.warn(f"navdeploy: ignoring an unusable manifest: {problem}. The module is treated as not "
                      "optimized; re-run nav.optimize to rebuild it.", RuntimeWarning, stacklevel=2)
    return data


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the module's manifest atomically: a run killed while writing leaves the old one."""
    write_json_atomic(folder / MANIFEST, manifest.to_json())


def remove_unnamed_builds(folder: Path, manifest: Manifest, previous: Optional[Manifest]) -> None:
    """After ``manifest`` replaced ``previous`` on disk: remove the artifact builds of its graphs' formats (and of
    the formats ``previous`` had) that it does not name. Until then a killed run leaves ``previous`` loadable."""
    for key, entry in manifest.graphs.items():
        in_use: dict[str, Optional[str]] = dict.fromkeys(previous.graphs[key].formats if previous is not None
                                                         and key in previous.graphs else ())
        in_use.update({fmt: state.checksum if state.status == "ok" else None for fmt, state in entry.formats.items()})
        remove_replaced_builds(folder / key, in_use)
