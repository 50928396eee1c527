"""torch.compile runners: many compiled modules in one process each stay compiled."""

from __future__ import annotations

import warnings

import torch
from torch._dynamo.utils import counters

from navdeploy.capture import Recorder
from navdeploy.flat_module import FlatModule
from navdeploy.formats import RUNNERS
from navdeploy.formats.base import LoadContext


def test_every_compiled_module_of_a_process_gets_its_own_compile():
    """Dynamo counts recompiles per code object (8 by default). Nine different modules bound to compile runners in
    one process (a pipeline of modules, or a benchmark binding each candidate) must each compile: before each
    runner got its own frame, the 9th shared FlatModule.forward's exhausted budget and ran uncompiled."""
    for width in range(1, 10):
        module = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU()).eval()
        x = torch.randn(2, 4)
        recorder = Recorder(f"m{width}", 4, None)
        recorder.record(module, (x,), {})
        graph = recorder.finish()[0]
        run = RUNNERS["TorchCompileCPU"].load(LoadContext(None, FlatModule(module, graph.input_spec), graph, "cpu", "fp32"))
        compiled = counters["stats"]["unique_graphs"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out,) = run([x])
        assert counters["stats"]["unique_graphs"] == compiled + 1, f"module {width} ran uncompiled"
        torch.testing.assert_close(out, module(x))
