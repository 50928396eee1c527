"""nav.serve: a real PyTriton server on 127.0.0.1 free ports, tritonclient requests, bad requests answered with
errors while the server keeps serving, blocking and background shutdown on signals. Servers are always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import navdeploy as nav
from navdeploy.serving import Tensor, infer_specs, serve_from_spec
from navdeploy.serving.bounds import RequestBounds

pytest.importorskip("pytriton")
from tritonclient.http import InferenceServerException, InferInput


class Scorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class TextPipeline:
    """prompt(s) -> a feature vector per prompt through a wrapped module; plain Python around it."""

    def __init__(self):
        self.scorer = nav.Module(Scorer().eval(), name="serving_scorer")

    @staticmethod
    def features(prompts):
        return torch.stack([torch.tensor([float(ord(c)) / 128 for c in (p + " " * 8)[:8]]) for p in prompts])

    @torch.no_grad()
    def __call__(self, prompt, scale=None):
        if "boom" in prompt:
            raise RuntimeError("the pipeline failed on this prompt")
        x = self.features(prompt)
        if scale is not None:
            x = x * torch.from_numpy(scale)
        return {"scores": self.scorer(x), "echo": [[p.upper()] for p in prompt]}


INPUTS = [Tensor("prompt", str, (1,)), Tensor("scale", np.float32, (8,), optional=True)]
OUTPUTS = [Tensor("scores", np.float32, (4,)), Tensor("echo", bytes, (1,))]


@pytest.fixture(scope="module")
def optimized(isolated_env):
    with isolated_env("serving_ws") as ws:
        pipe = TextPipeline()
        config = nav.OptimizeConfig(target_formats=(nav.Format.ONNX, nav.Format.TORCHSCRIPT), batch_sizes=(1, 2),
                                    max_batch_size=4, profile_time_s=0.05, use_multiprocessing=False)
        nav.optimize(pipe, [(1, (["a prompt"],)), (2, (["two", "prompts"],))], config=config)
        yield pipe, ws
        del pipe


def _prompt(prompts):
    p = InferInput("prompt", [len(prompts), 1], "BYTES")
    p.set_data_from_numpy(np.array([[s.encode()] for s in prompts], dtype=object))
    return p


def _tensor(name, array, dtype):
    t = InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _backend_stubs() -> set[int]:
    """Live Triton Python backend stub processes (one per served model, started by tritonserver)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"triton_python_backend_stub" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_serve_batched_pipeline_and_bad_requests(optimized):
    pipe, ws = optimized
    stubs_before = _backend_stubs()
    with nav.serve(pipe, inputs=INPUTS, outputs=OUTPUTS, name="scorer", max_batch_size=4, blocking=False,
                   workspace=ws) as server:
        assert pipe.scorer.is_optimized or pipe.scorer.nav_state.bound  # load_optimized rebound it from the workspace
        client = server.client()
        assert client.is_model_ready("scorer")
        res = client.infer("scorer", [_prompt(["hello", "world"])])
        expected = pipe(["hello", "world"])
        np.testing.assert_allclose(res.as_numpy("scores"), expected["scores"].numpy(), atol=1e-5)
        assert res.as_numpy("echo").reshape(-1).tolist() == [b"HELLO", b"WORLD"]
        # the optional input
        scale = np.full((1, 8), 0.5, np.float32)
        res = client.infer("scorer", [_prompt(["hello"]), _tensor("scale", scale, "FP32")])
        np.testing.assert_allclose(res.as_numpy("scores"), pipe(["hello"], scale)["scores"].numpy(), atol=1e-5)

        bad = {
            "missing input": ([], "prompt"),
            "wrong dtype": ([_prompt(["a"]), _tensor("scale", np.ones((1, 8), np.int32), "INT32")], "FP32"),
            "wrong shape": ([_prompt(["a"]), _tensor("scale", np.ones((1, 3), np.float32), "FP32")], "shape"),
            "batch over the limit": ([_prompt(["a"] * 5)], "batches of at most 4"),
            "pipeline error": ([_prompt(["boom"])], "the pipeline failed on this prompt"),
        }
        for label, (inputs, message) in bad.items():
            with pytest.raises(InferenceServerException) as err:
                client.infer("scorer", inputs)
            assert message in str(err.value), (label, str(err.value))
            # still serving after every bad request
            ok = client.infer("scorer", [_prompt(["still here"])])
            np.testing.assert_allclose(ok.as_numpy("scores"), pipe(["still here"])["scores"].numpy(), atol=1e-5)
        start = time.perf_counter()
    assert not server.running
    assert time.perf_counter() - start < 15
    assert _backend_stubs() <= stubs_before  # the model's stub process ended with the server


def test_captured_max_shapes_bound_a_served_input(optimized):
    """The scorer captured x of [1, 8] and [2, 8] and batches: one item is at most (8,), from its manifest."""
    pipe, ws = optimized
    caps = nav.serving.captured_max_shapes(pipe.scorer, ws)
    assert caps == {"x": (8,)}
    spec = Tensor("x", np.float32, (-1,), max_shape=caps["x"])
    bounds = RequestBounds.of([spec], max_batch_size=4)
    assert bounds.shape_problem("x", [2, 8]) is None
    assert "over its bound of 8" in bounds.shape_problem("x", [2, 9])
    assert nav.serving.captured_max_shapes(TextPipeline.features, ws) == {}  # not a wrapped module


def test_serve_unbatched_with_inferred_specs(optimized):
    pipe, _ = optimized

    def one(prompt):  # max_batch_size=0: one request per call, prompt is a str
        return {"scores": pipe([prompt])["scores"][0], "length": np.array([len(prompt)], np.int64)}

    inputs, outputs = infer_specs(one, {"prompt": "sample"}, batched=False)
    assert [(t.name, t.dtype, t.shape) for t in inputs] == [("prompt", str, (1,))]
    assert {t.name: t.shape for t in outputs} == {"scores": (4,), "length": (1,)}
    sigterm_before = signal.getsignal(signal.SIGTERM)
    stubs_before = _backend_stubs()
    # An exit timeout shorter than the stub's unload (~2.5 s here): Triton exits first and stop() must end the
    # stub it leaves behind, which otherwise runs on, orphaned, after every such stop.
    server = nav.serve(one, sample={"prompt": "sample"}, name="one", max_batch_size=0, blocking=False,
                       load_optimized=False, exit_timeout_secs=2)
    try:
        assert signal.getsignal(signal.SIGTERM) is not sigterm_before  # SIGTERM stops the background server
        res = server.client("grpc").infer("one", [_grpc_prompt("abc")])
        assert res.as_numpy("length").tolist() == [3]
        np.testing.assert_allclose(res.as_numpy("scores"), pipe(["abc"])["scores"][0].numpy(), atol=1e-5)
    finally:
        server.stop()
    server.stop()  # idempotent
    assert _backend_stubs() <= stubs_before
    # stopped: the previous SIGTERM handler is back, and no handler keeps the server (and the pipeline's
    # nav.Modules, through PyTriton's bound model) alive
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


def _grpc_prompt(text):
    from tritonclient.grpc import InferInput as GInput
    p = GInput("prompt", [1], "BYTES")
    p.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return p


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


@pytest.mark.parametrize("ld_library_path", [None, "/navdeploy-test/lib"])
def test_serve_sets_the_stub_environment_for_the_server_only(monkeypatch, ld_library_path):
    """The stub's PATH/LD_LIBRARY_PATH reach the server's processes; this process keeps its own, while the server
    runs and after it stops (unset stays unset)."""
    if ld_library_path is None:
        monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH", ld_library_path)
    names = ("PATH", "LD_LIBRARY_PATH")
    before = {k: os.environ.get(k) for k in names}
    stubs_before = _backend_stubs()

    def double(x):
        return {"y": x * 2}

    server = nav.serve(double, inputs=[Tensor("x", np.float32, (2,))], outputs=[Tensor("y", np.float32, (2,))],
                       name="env_scope", max_batch_size=0, blocking=False, load_optimized=False, exit_timeout_secs=2)
    try:
        assert {k: os.environ.get(k) for k in names} == before  # while it runs
        res = server.client().infer("env_scope", [_tensor("x", np.array([1.5, -2.0], np.float32), "FP32")])
        np.testing.assert_allclose(res.as_numpy("y"), [3.0, -4.0])
        stubs = _backend_stubs() - stubs_before
        assert stubs, "no Python-backend stub runs the model"
        for pid in stubs:  # the stub got this Python's LIBDIR and bin from nav.serve
            env = _environ_of(pid)
            assert sysconfig.get_config_var("LIBDIR") in env["LD_LIBRARY_PATH"].split(os.pathsep), env
            assert str(Path(sys.executable).parent) in env["PATH"].split(os.pathsep), env
    finally:
        server.stop()
    assert {k: os.environ.get(k) for k in names} == before


def test_serve_rejects_bad_arguments():
    with pytest.raises(nav.ConfigError, match="inputs= and outputs="):
        nav.serve(lambda x: x, load_optimized=False)
    with pytest.raises(nav.ConfigError, match="max_batch_size"):
        nav.serve(lambda x: x, sample={"x": "a"}, max_batch_size=-1, load_optimized=False)
    with pytest.raises(nav.ConfigError, match="ports"):
        nav.serve(lambda x: x, inputs=[Tensor("x", str, (1,))], outputs=[Tensor("y", str, (1,))], ports=(1, 1),
                  load_optimized=False, blocking=False)
    with pytest.raises(nav.ConfigError, match="module:function"):
        serve_from_spec("no_colon_here")


_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import navdeploy as nav
    from navdeploy.serving import Tensor

    def echo(text):
        return {"out": [[t.upper()] for t in text]}

    echo.navdeploy_serve = {"inputs": [Tensor("text", str, (1,))], "outputs": [Tensor("out", bytes, (1,))],
                            "name": "echo", "max_batch_size": 2}

    if __name__ == "__main__":
        mode = sys.argv[1]
        if mode == "blocking":
            handle = nav.serving.serve_from_spec(__file__ + ":echo", load_optimized=False)
            print("STOPPED", handle.running, flush=True)
        else:
            handle = nav.serve(echo, **echo.navdeploy_serve, load_optimized=False, blocking=False)
            print("READY", handle.http_url, flush=True)
            open("ready", "w").write(handle.http_url)  # Triton's log can land inside the printed line
            try:
                while True:
                    time.sleep(0.1)
            except KeyboardInterrupt:
                handle.stop()
                print("INTERRUPTED", handle.running, flush=True)
""")


@pytest.mark.parametrize("mode,sig", [("blocking", signal.SIGTERM), ("background", signal.SIGINT),
                                      ("background", signal.SIGTERM)])
def test_signals_stop_the_server_cleanly(tmp_path, mode, sig, process_output):
    script = tmp_path / "serve_echo.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    output = process_output(proc)
    try:
        if mode == "blocking":
            started = output.wait_for("serving model 'echo'", timeout=60)
        else:
            deadline = time.monotonic() + 60
            while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            started = (tmp_path / "ready").exists()
        assert started, "server did not start:\n" + output.text(0)[-3000:]
        time.sleep(0.5)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{sig.name} did not stop the server within 30 s:\n" + output.text(0)[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.text()
    if mode == "blocking":
        assert proc.returncode == 0 and "STOPPED False" in text, text[-3000:]
    elif sig == signal.SIGINT:
        assert proc.returncode == 0 and "INTERRUPTED False" in text, text[-3000:]
    else:  # SIGTERM in the background: the server is stopped, then the process exits as SIGTERM asks
        assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
