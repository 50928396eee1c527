"""The Triton releases navdeploy emits for and validates against, in one small table.

A release decides which platform/backend pairs the server's core accepts and how AOTInductor models are named.
Triton core learned the ``torch_aoti`` platform (pytorch backend, ``model.pt2``) in release 26.03; older cores
refuse it, so AOTInductor artifacts are served through a Python-backend model there. ``24.10`` is server 2.51,
the one inside ``nvidia-pytriton`` 0.7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from navdeploy.errors import NavdeployError


@dataclass(frozen=True)
class TritonRelease:
    """One Triton release (container tag) and what its core accepts."""

    release: str  # the container tag, e.g. "24.10"
    server: Optional[str]  # the tritonserver version it ships, where recorded here
    torch_aoti: bool  # the core knows platform "torch_aoti" (backend "pytorch", model.pt2)

    @property
    def platforms(self) -> dict[str, str]:
        """platform -> the backend that serves it, for this release's core (``ensemble`` has none)."""
        known = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch", "tensorrt_plan": "tensorrt",
                 "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow", "ensemble": ""}
        if self.torch_aoti:
            known["torch_aoti"] = "pytorch"
        return known

    def __str__(self) -> str:
        return f"Triton {self.release}" + (f" (server {self.server})" if self.server else "")


RELEASES: dict[str, TritonRelease] = {r.release: r for r in (
    TritonRelease("24.10", "2.51.0", torch_aoti=False),
    TritonRelease("26.03", None, torch_aoti=True),
)}
DEFAULT_RELEASE = max(RELEASES, key=lambda r: tuple(map(int, r.split("."))))


def resolve_release(version: Optional[str | TritonRelease] = None) -> TritonRelease:
    """The release a ``--triton-version`` names: a container tag (``"24.10"``) or a server version (``"2.51"``,
    ``"2.51.0"``); None means the newest one navdeploy supports."""
    if isinstance(version, TritonRelease):
        return version
    if version is None or version == "":
        return RELEASES[DEFAULT_RELEASE]
    text = str(version).strip()
    if text in RELEASES:
        return RELEASES[text]
    for release in RELEASES.values():
        if release.server and (text == release.server or release.server.startswith(text + ".")):
            return release
    known = ", ".join(f"{r.release}" + (f" (= server {r.server})" if r.server else "") for r in RELEASES.values())
    raise NavdeployError(f"unknown Triton version {text!r}; navdeploy knows {known}. Pass one of those, e.g. "
                         f"--triton-version {DEFAULT_RELEASE}.")
