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
from navdeploy.workspace.layout import MANIFEST
from navdeploy.workspace.records import Manifest

log = logging.getLogger("navdeploy")


MANIFEST_VERSION = 1


class _Invalid(ValueError):
    pass


def need(cond: bool, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def check_entry(key: Any, entry: Any, graph: bool = True) -> None:
    """The parts of a graph entry that optimize and bind read, with the types they expect."""

    need(isinstance(key, str) and isinstance(entry, dict), f"graph {key!r} is not an object")
    need(entry.get("selected") is None or isinstance(entry["selected"], str),
         f"graph {key}: 'selected' is not a string")
    need(isinstance(entry.get("cache_key", ""), str), f"graph {key}: 'cache_key' is not a string")
    formats = entry.get("formats", {})
    need(isinstance(formats, dict) and all(isinstance(v, dict) for v in formats.values()),
          f"graph {key}: 'formats' is not an object of objects")
    for fmt, state in formats.items():
        need(state.get("status") != "failed" or isinstance(state.get("error"), str), f"graph {key}: format {fmt} "
              "failed without an error")
        need(state.get("status") != "ok" or isinstance(state.get("checksum"), str), f"graph {key}: format {fmt} has "
              "no checksum")
    candidates = entry.get("candidates")
    need(isinstance(candidates, list), f"graph {key}: 'candidates' is not a list")
    for c in candidates:
        need(isinstance(c, dict) and isinstance(c.get("runner"), str) and isinstance(c.get("status"), str)
              and isinstance(c.get("name", ""), str), f"graph {key}: a candidate has no runner or status")
        need(isinstance(c.get("profile", []), list) and all(isinstance(m, dict) for m in c.get("profile", [])),
              f"graph {key}: candidate {c.get('runner')} has a malformed profile")
    if not graph:
        return
    try:
        Graph.from_json(entry["graph"])
    except Exception as exc:  # noqa: BLE001 - any shape problem makes the entry unusable
        raise _Invalid(f"graph {key}: malformed input/output description ({type(exc).__name__}: {exc})") from None


def validate_manifest(data: Any) -> None:
    """Raise ValueError naming the first part of ``data`` that is not what navdeploy writes."""
    need(isinstance(data, dict), "not a JSON object")
    need(data.get("version") == MANIFEST_VERSION, f"version {data.get('version')!r} is not {MANIFEST_VERSION}")
    for name in ("fingerprint", "device", "module"):
        need(isinstance(data.get(name), str), f"{name!r} is missing or not a string")
    need(isinstance(data.get("precision", ""), str), "'precision' is not a string")
    mbs = data.get("max_batch_size", 1)
    need(isinstance(mbs, int) and not isinstance(mbs, bool) and mbs >= 1, "'max_batch_size' is not an int >= 1")
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
