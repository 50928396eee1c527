"""ONNX Runtime sessions share the process with the torch work around them: no spinning threads after a run,
and a thread pool the size of torch's. A real session on a real ONNX file, in a pipeline that alternates it with
a torch module."""

from __future__ import annotations

import time

import torch

from navdeploy.capture.flat_module import FlatModule
from navdeploy.capture.recorder import Recorder
from navdeploy.formats.base import LoadContext
from navdeploy.formats.registry import RUNNERS


def test_onnx_runner_does_not_spin_and_fits_torch_threads_in_an_alternating_pipeline(tmp_path):
    torch.manual_seed(0)
    onnx_part, torch_part = torch.nn.Linear(8, 8).eval(), torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    recorder = Recorder("ort_part", 2, None)
    recorder.record(onnx_part, (x,), {})
    graph = recorder.finish()[0]
    path = tmp_path / "model.onnx"
    torch.onnx.export(onnx_part, (x,), str(path), dynamo=False, input_names=["input__0"], output_names=["output__0"],
                      dynamic_axes={"input__0": {0: "batch"}})  # the check below runs a batch large enough to thread
    run = RUNNERS["OnnxCPU"].load(LoadContext(path, FlatModule(onnx_part, graph.input_spec), graph, "cpu", "fp32"))

    options = run.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads()

    # Once a run returns its workers sleep: the process burns no CPU while it waits (ORT's defaults: ~40 ms of
    # CPU in a 50 ms sleep on 2 cores, a core spinning the whole time).
    big = torch.randn(4096, 8)
    with torch.no_grad():
        for _ in range(3):
            run([big])
        burnt = []
        for _ in range(3):
            run([big])
            start = time.process_time()
            time.sleep(0.05)
            burnt.append(time.process_time() - start)
    assert min(burnt) < 0.01, burnt

    with torch.no_grad():
        for _ in range(3):  # ORT, then torch, then ORT again: each result what eager gives
            hidden = run([x])[0]
            torch.testing.assert_close(hidden, onnx_part(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch_part(hidden), torch_part(onnx_part(x)), atol=1e-5, rtol=1e-4)
