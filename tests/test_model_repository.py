"""The committed model_repository/ (the Python-backend export of examples/two_module_pipeline.py): regenerating it
gives the same text files, it validates with Triton's rules, and the bundled tritonserver serves it correctly."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from navdeploy.triton import validate_repository

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"
EXAMPLES = ROOT / "examples"
REGENERATE = "python examples/two_module_pipeline.py --model-repository model_repository"
# The generated text; the artifacts beside it hold the checkout's source paths (TorchScript debug info,
# ExportedProgram stack traces), so their bytes differ between checkouts and they are not compared.
TEXT_PATTERNS = ("serve.py", "*/config.pbtxt", "*/1/model.py")


def _text_files(repository: Path) -> list[str]:
    """The generated text files of a repository, relative to it, sorted."""
    return sorted(str(p.relative_to(repository)) for pattern in TEXT_PATTERNS for p in repository.glob(pattern))


def _all_files(repository: Path) -> list[str]:
    """Every file of a repository, relative to it (bytecode caches aside), sorted."""
    return sorted(str(p.relative_to(repository)) for p in repository.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _diff(committed: Path, regenerated: Path, name: str) -> str:
    """A unified diff of one file, committed -> regenerated; empty when they match."""
    lines = difflib.unified_diff(committed.read_text().splitlines(keepends=True),
                                 regenerated.read_text().splitlines(keepends=True),
                                 fromfile=f"model_repository/{name} (committed)",
                                 tofile=f"model_repository/{name} (regenerated)")
    return "".join(lines)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """The repository regenerated from this checkout, in a fresh interpreter (nav.optimize takes every live
    nav.Module, and modules other tests keep alive must not take part)."""
    out = tmp_path_factory.mktemp("regenerated") / "model_repository"
    env = {**os.environ, "NAVDEPLOY_USE_MULTIPROCESSING": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor")),
           # this checkout's navdeploy, whichever one is installed
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(EXAMPLES / "two_module_pipeline.py"), "--model-repository", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(out.parent), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_regenerated_repository_matches_committed(regenerated):
    assert _all_files(regenerated) == _all_files(COMMITTED), f"the files differ; regenerate with: {REGENERATE}"
    diffs = [d for name in _text_files(COMMITTED) if (d := _diff(COMMITTED / name, regenerated / name, name))]
    assert not diffs, "".join(diffs) + f"\nThe committed model_repository/ is stale; regenerate it with: {REGENERATE}"


def test_committed_repository_is_portable():
    """No trace of the machine or the day it was generated on: no absolute paths, no dates."""
    texts = _text_files(COMMITTED)
    assert len(texts) == 5, texts  # serve.py and config.pbtxt + model.py of encoder and head
    for name in texts:
        text = (COMMITTED / name).read_text()
        for machine in (str(ROOT), str(Path.home()), "/tmp/", "/work/"):
            assert machine not in text, (name, machine)
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), name


def test_committed_repository_validates():
    assert validate_repository(COMMITTED, target="cpu") == []


def _eager_pipeline():
    """The example's pipeline with plain (unwrapped) modules: the weights the repository was exported with."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import two_module_pipeline

    return two_module_pipeline.Pipeline()


def _infer(client, model: str, array: np.ndarray) -> np.ndarray:
    """One request to a model with one FP32 input and one output."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("input__0", list(array.shape), "FP32")
    inp.set_data_from_numpy(array)
    result = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("output__0")])
    return result.as_numpy("output__0")


@pytest.mark.slow
def test_committed_repository_serves(tmp_path):
    """The bundled tritonserver (what `navdeploy serve-repo model_repository` starts) answers the pipeline's
    two steps as eager does."""
    pytest.importorskip("pytriton")
    httpclient = pytest.importorskip("tritonclient.http")
    from navdeploy.triton import serve_repository

    # A copy: the Python stubs would leave bytecode caches inside the checkout.
    repository = shutil.copytree(COMMITTED, tmp_path / "model_repository")
    pipe = _eager_pipeline()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe(images, scale=0.5).numpy()
    server = serve_repository(repository, startup_timeout_s=120)
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            features = _infer(client, "encoder", images.numpy())
            logits = _infer(client, "head", features * np.float32(0.5))
        finally:
            client.close()
    finally:
        server.stop()
    served = torch.tensor(logits).softmax(dim=-1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=1e-4)
