"""From nav.optimize to a served Triton repository: emit with backend="python", start the tritonserver bundled
in nvidia-pytriton, call it with tritonclient over HTTP and gRPC, compare with eager; emit with backend="auto"
and validate offline; atomic writes; the CLI commands."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import navdeploy as nav
from navdeploy.cli import app
from navdeploy.errors import NavdeployError
from navdeploy.templates_dir import templates_dir
from navdeploy.triton import TritonServer, export_model_repository, model_name, validate_repository
from navdeploy.triton.validate import parse_config
from navdeploy.workspace.layout import artifact_path

ATOL, RTOL = 1e-4, 1e-3


class TwoInOut(nn.Module):
    """Two inputs (the second optional: two input structures, two graphs) and two outputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 6)

    def forward(self, x, y=None):
        h = self.linear(x)
        if y is not None:
            h = h + y[:, :6]
        return h, torch.relu(x).sum(dim=1)


class Pool(nn.Module):
    """A dynamic sequence axis: [B, T, 8] -> [B, 4]."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x.mean(dim=1))


def optimize_into(ws: Path) -> None:
    """Optimize two tiny modules (three graphs) into ``ws``; saves their weights as ``ws/eager.pt``."""
    torch.manual_seed(0)
    two = nav.Module(TwoInOut().eval(), name="twoio")
    pool = nav.Module(Pool().eval(), name="pool")

    def pipeline(x, y, seq):
        two(x, y)
        two(x)
        pool(seq)

    data = [(b, (torch.randn(b, 8), torch.randn(b, 8), torch.randn(b, t, 8))) for b, t in ((1, 3), (4, 5), (2, 4))]
    config = nav.OptimizeConfig(target_formats=(nav.Format.ONNX, nav.Format.TORCHSCRIPT), batch_sizes=(1, 4),
                                max_batch_size=4, profile_time_s=0.05, use_multiprocessing=False, workspace=ws)
    nav.optimize(pipeline, data, config=config)
    torch.save({"twoio": two.__wrapped__.state_dict(), "pool": pool.__wrapped__.state_dict()}, ws / "eager.pt")


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """(workspace, eager modules). The optimize runs in a fresh interpreter: nav.optimize takes every live
    nav.Module, and modules other tests keep alive must not take part."""
    ws = tmp_path_factory.mktemp("triton_ws")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_triton_serve import optimize_into; from pathlib import Path; optimize_into(Path({str(ws)!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    weights = torch.load(ws / "eager.pt", weights_only=True)
    eager = {"twoio": TwoInOut().eval(), "pool": Pool().eval()}
    for name, module in eager.items():
        module.load_state_dict(weights[name])
    return ws, eager


def _manifest(ws: Path, module: str) -> dict:
    return json.loads((ws / module / "manifest.json").read_text())


def _graph_models(ws: Path, module: str) -> dict:
    """Triton model name -> (graph json) for a module."""
    graphs = _manifest(ws, module)["graphs"]
    return {model_name(module, k, len(graphs)): g["graph"] for k, g in graphs.items()}


@pytest.fixture(scope="module")
def python_repo(optimized, tmp_path_factory):
    ws, _ = optimized
    return export_model_repository(tmp_path_factory.mktemp("repo") / "model_repository", backend="python",
                                   workspace=ws, warmup=True)


@pytest.fixture(scope="module")
def server(python_repo):
    srv = TritonServer(python_repo, startup_timeout_s=120)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _cases(ws, eager):
    """(model name, [input arrays], [eager output arrays]) at batch 1 and 4 for every emitted model."""
    torch.manual_seed(1)
    cases = []
    for name, graph in _graph_models(ws, "twoio").items():
        for b in (1, 4):
            inputs = [torch.randn(b, 8) for _ in graph["inputs"]]
            with torch.no_grad():
                out = eager["twoio"](*inputs)
            cases.append((name, [t.numpy() for t in inputs], [o.numpy() for o in out]))
    for b in (1, 4):
        x = torch.randn(b, 4, 8)
        with torch.no_grad():
            cases.append(("pool", [x.numpy()], [eager["pool"](x).numpy()]))
    return cases


def _infer(client_mod, client, name, arrays, n_out):
    inputs = []
    for i, a in enumerate(arrays):
        inp = client_mod.InferInput(f"input__{i}", list(a.shape), "FP32")
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    outputs = [client_mod.InferRequestedOutput(f"output__{i}") for i in range(n_out)]
    result = client.infer(name, inputs, outputs=outputs)
    return [result.as_numpy(f"output__{i}") for i in range(n_out)]


def test_python_repository_layout(optimized, python_repo):
    ws, _ = optimized
    names = sorted(p.name for p in python_repo.iterdir() if p.is_dir())
    twoio = sorted(_graph_models(ws, "twoio"))
    assert len(twoio) == 2 and all(n.startswith("twoio__") for n in twoio)  # one model per graph, stable names
    assert names == sorted(twoio + ["pool"])
    cfg = parse_config((python_repo / "pool" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.max_batch_size == 4
    assert list(cfg.input[0].dims) == [-1, 8]  # batch axis excluded, dynamic sequence axis -1
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    assert len(cfg.model_warmup) == 1
    assert (python_repo / "pool" / "1" / "model.py").is_file()
    assert validate_repository(python_repo, target="cpu") == []


def test_repository_documents_how_it_is_served(optimized, tmp_path):
    """serve.py beside the models: names them, serves the pipeline it was given, and runs (--help)."""
    ws, _ = optimized
    repo = export_model_repository(tmp_path / "repo", backend="python", workspace=ws,
                                   pipeline="my_pipelines:make_pipeline", pipeline_factory=True)
    script = (repo / "serve.py").read_text()
    for model in (p.name for p in repo.iterdir() if p.is_dir()):
        assert model in script
    assert '"my_pipelines:make_pipeline"' in script and "FACTORY = True" in script and str(ws) in script
    assert "python serve.py --repository" in script  # python-only repository: the bundled server can serve it
    compile(script, "serve.py", "exec")
    done = subprocess.run([sys.executable, str(repo / "serve.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--repository" in done.stdout, done.stderr
    plain = export_model_repository(tmp_path / "plain", backend="python", workspace=ws)
    assert "PIPELINE = null" not in (plain / "serve.py").read_text()
    assert "--pipeline package.module:function" in (plain / "serve.py").read_text()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_match_eager(optimized, server, protocol):
    ws, eager = optimized
    mod = httpclient if protocol == "http" else grpcclient
    client = mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        for name, arrays, expected in _cases(ws, eager):
            assert client.is_model_ready(name)
            got = _infer(mod, client, name, arrays, len(expected))
            for g, e in zip(got, expected):
                if e.ndim == 1:  # a scalar per batch item: dims [1] + reshape [], so clients see [B, 1]
                    assert g.shape == (e.shape[0], 1), (name, g.shape)
                    g = g[:, 0]
                assert g.shape == e.shape, (name, g.shape, e.shape)
                np.testing.assert_allclose(g, e, atol=ATOL, rtol=RTOL, err_msg=name)
    finally:
        client.close()


def test_concurrent_requests_are_batched_correctly(optimized, server):
    """Concurrent batch-1 requests reach model.py as one dynamic batch; each answer must be its own."""
    ws, eager = optimized
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        xs = [np.random.randn(1, 4, 8).astype(np.float32) for _ in range(12)]
        pending = []
        for x in xs:
            inp = grpcclient.InferInput("input__0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            results = []
            client.async_infer("pool", [inp], callback=lambda result, error, out=results: out.append((result, error)))
            pending.append(results)
        deadline = time.monotonic() + 30
        while any(not p for p in pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        for x, p in zip(xs, pending):
            result, error = p[0]
            assert error is None, error
            with torch.no_grad():
                expected = eager["pool"](torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(result.as_numpy("output__0"), expected, atol=ATOL, rtol=RTOL)
    finally:
        client.close()


def test_auto_repository_validates_offline(optimized, tmp_path):
    ws, _ = optimized
    repo = export_model_repository(tmp_path / "auto", backend="auto", workspace=ws)
    assert validate_repository(repo, target="cpu") == []
    for name in (p.name for p in repo.iterdir() if p.is_dir()):
        cfg = parse_config((repo / name / "config.pbtxt").read_text())
        module = "pool" if name == "pool" else "twoio"
        key = name.split("__")[1] if "__" in name else next(iter(_manifest(ws, module)["graphs"]))
        selected = _manifest(ws, module)["graphs"][key]["selected"]
        expected = {"OnnxCPU": ("onnxruntime", "onnxruntime_onnx", "input__0", "model.onnx"),
                    "TorchScriptCPU": ("pytorch", "pytorch_libtorch", "INPUT__0", "model.pt")}.get(
                        selected, ("python", "", "input__0", "model.py"))
        assert (cfg.backend, cfg.platform, cfg.input[0].name) == expected[:3], (name, selected)
        assert (repo / name / "1" / expected[3]).is_file()
        if expected[0] == "onnxruntime":  # names are the ONNX graph's own
            import onnx

            model = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False)
            assert [i.name for i in cfg.input] == [i.name for i in model.graph.input]


def test_auto_backend_per_selected_format(optimized, tmp_path):
    """Whatever won, each format maps to its backend: force each selection in a copy of the workspace."""
    ws, _ = optimized
    copy = tmp_path / "ws"
    shutil.copytree(ws / "pool", copy / "pool")
    manifest = _manifest(copy, "pool")
    (entry,) = manifest["graphs"].values()
    seen = {}
    for runner in ("OnnxCPU", "TorchScriptCPU", "TorchCPU"):
        entry["selected"] = runner
        (copy / "pool" / "manifest.json").write_text(json.dumps(manifest))
        repo = export_model_repository(tmp_path / "repo", modules=["pool"], backend="auto", workspace=copy)
        cfg = parse_config((repo / "pool" / "config.pbtxt").read_text())
        seen[runner] = (cfg.backend, cfg.platform, cfg.input[0].name, cfg.output[0].name,
                        sorted(p.name for p in (repo / "pool" / "1").iterdir()))
    assert seen["OnnxCPU"][:4] == ("onnxruntime", "onnxruntime_onnx", "input__0", "output__0")
    assert seen["TorchScriptCPU"] == ("pytorch", "pytorch_libtorch", "INPUT__0", "OUTPUT__0", ["model.pt"])
    assert seen["TorchCPU"][:2] == ("python", "")  # eager won: a Python model over the fastest verified artifact
    assert "model.py" in seen["TorchCPU"][4]


def test_failed_export_leaves_previous_repository(optimized, tmp_path):
    ws, _ = optimized
    repo = export_model_repository(tmp_path / "repo", backend="python", workspace=ws)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    bad = tmp_path / "templates"
    bad.mkdir()
    text = (templates_dir() / "config.pbtxt.j2").read_text()
    (bad / "config.pbtxt.j2").write_text(text.replace("kind: {{ instance_kind }}", "kind: KIND_BOGUS"))
    with pytest.raises(NavdeployError, match="KIND_BOGUS"):
        export_model_repository(repo, backend="python", workspace=ws, templates_dir=bad)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "templates"]  # no temporary folders left


def test_cli_export_validate_and_serve_refusal(optimized, tmp_path):
    ws, _ = optimized
    runner = CliRunner()
    result = runner.invoke(app, ["export-repo", str(tmp_path / "auto"), "-w", str(ws), "--backend", "auto"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate-repo", str(tmp_path / "auto"), "--target", "cpu"])
    assert result.exit_code == 0 and "pass Triton's checks" in result.output
    result = runner.invoke(app, ["export-repo", str(tmp_path / "x"), "-w", str(ws), "-m", "nosuchmodule"])
    assert result.exit_code == 1 and "nosuchmodule" in result.output
    configs = [parse_config(p.read_text()) for p in (tmp_path / "auto").glob("*/config.pbtxt")]
    if any(c.backend != "python" for c in configs):  # the bundled server has only the python backend
        result = runner.invoke(app, ["serve-repo", str(tmp_path / "auto")])
        assert result.exit_code == 1 and "backend='python'" in result.output


def test_cli_serve_repo_stops_on_sigterm(python_repo, process_output):
    proc = subprocess.Popen([sys.executable, "-m", "navdeploy.cli", "serve-repo", str(python_repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    output = process_output(proc)
    try:
        line = output.wait_for("serving", timeout=120)
        assert line and line.startswith("serving") and "HTTP " in line, output.text(0)[-3000:]
        http = line.split("HTTP ")[1].split()[0]
        client = httpclient.InferenceServerClient(http)
        assert client.is_server_ready()
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gpu_selections_map_to_tensorrt_and_ort_accelerator(optimized, tmp_path):
    """GPU winners (no GPU here: the manifest is edited, the ONNX artifact is real, the plan a stand-in file)."""
    ws, _ = optimized
    copy = tmp_path / "ws"
    shutil.copytree(ws / "pool", copy / "pool")
    manifest = _manifest(copy, "pool")
    manifest["device"] = "cuda"
    (key, entry), = manifest["graphs"].items()
    graph_dir = copy / "pool" / key
    onnx = artifact_path(graph_dir, "onnx", entry["formats"]["onnx"]["checksum"])  # the build the manifest names
    shutil.copytree(onnx, graph_dir / "onnx-fp16")  # the hand-made ones: one folder per format, as earlier versions
    (graph_dir / "trt-fp16").mkdir()
    (graph_dir / "trt-fp16" / "model.plan").write_bytes(b"engine")
    shutil.copy(onnx / "model.onnx", graph_dir / "trt-fp16" / "model.onnx")
    profile = [{"batch_size": 4, "p50_ms": 0.1, "p90_ms": 0.1, "throughput": 1.0}]
    entry["candidates"] += [
        {"name": "TensorRT[fp16]", "runner": "TensorRT", "format": "trt", "precision": "fp16", "device": "cuda",
         "status": "ok", "profile": profile},
        {"name": "OnnxTensorRT[fp16]", "runner": "OnnxTensorRT", "format": "onnx", "precision": "fp16",
         "device": "cuda", "status": "ok", "profile": profile}]
    results = {}
    for name in ("TensorRT[fp16]", "OnnxTensorRT[fp16]"):
        entry["selected"] = name
        (copy / "pool" / "manifest.json").write_text(json.dumps(manifest))
        repo = export_model_repository(tmp_path / "repo", backend="auto", workspace=copy)
        results[name] = parse_config((repo / "pool" / "config.pbtxt").read_text())
        assert validate_repository(repo, target="gpu") == []
        assert any(p.field == "instance_group[0].kind" for p in validate_repository(repo, target="cpu"))
        if name.startswith("TensorRT"):
            assert sorted(p.name for p in (repo / "pool" / "1").iterdir()) == ["model.plan"]
    trt = results["TensorRT[fp16]"]
    assert (trt.backend, trt.platform, trt.input[0].name) == ("tensorrt", "tensorrt_plan", "input__0")
    assert trt.instance_group[0].kind == trt.instance_group[0].KIND_GPU and trt.max_batch_size == 4
    ort = results["OnnxTensorRT[fp16]"]
    (acc,) = ort.optimization.execution_accelerators.gpu_execution_accelerator
    assert ort.backend == "onnxruntime" and acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
