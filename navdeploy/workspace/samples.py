"""Captured inputs and eager outputs of a graph, saved as tensors only and loaded with ``weights_only``."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import torch

from navdeploy.capture.graph import Graph, Sample
from navdeploy.errors import WorkspaceError
from navdeploy.workspace.atomic import write_bytes_atomic

log = logging.getLogger("navdeploy")


def save_samples(graph: Graph, folder: Path) -> None:
    """Store the kept samples as plain tensors (loadable with ``weights_only=True``), atomically: a failed write
    (a full disk) leaves the previous file and no temporary one, and raises a WorkspaceError naming the path."""
    data = {"inputs": [[t.cpu() for t in s.inputs] for s in graph.samples],
            "outputs": [[t.cpu() for t in s.outputs] for s in graph.samples]}
    path = folder / "samples.pt"
    # Serialized in memory first: torch.save writing to a full disk raises a RuntimeError of its zip writer, not the
    # OSError that names the cause; the kept samples are small.
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_bytes_atomic(path, buffer.getvalue(), prefix=".samples.")


def load_samples(folder: Path, device: str = "cpu") -> list[Sample]:
    """The samples saved by :func:`save_samples`. Loaded with ``weights_only=True``: a file holding anything
    but tensors and plain containers is refused, never unpickled."""
    path = folder / "samples.pt"
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WorkspaceError(f"{path} holds data other than tensors; navdeploy refuses to unpickle it. Delete the "
                             f"folder and re-run nav.optimize. ({str(exc).splitlines()[0]})") from None
    try:
        return [Sample(list(i), list(o)) for i, o in zip(data["inputs"], data["outputs"], strict=True)]
    except (TypeError, KeyError, ValueError) as exc:
        raise WorkspaceError(f"{path} is not a navdeploy samples file ({type(exc).__name__}: {exc}); re-run "
                             "nav.optimize.") from None
