"""torch.compile runners: many compiled modules in one process each stay compiled."""

from __future__ import annotations

import warnings

import torch
from torch._dynamo.utils import counters

from navdeploy.capture.flat_module import FlatModule
from navdeploy.capture.recorder import Recorder
from navdeploy.formats.base import LoadContext
from navdeploy.formats.compile import own_frame
from navdeploy.formats.registry import RUNNERS


def test_every_compiled_module_of_a_process_gets_its_own_compile():
    """Dynamo counts recompiles per code object (8 by default). Nine different modules bound to compile runners in
    one process (a pipeline of modules, or a benchmark binding each candidate) must each compile: each runner
    compiles its own frame (own_frame), as with one shared FlatModule.forward the 9th finds the budget spent and
    runs uncompiled."""
    for width in range(1, 10):
        module = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU()).eval()
        x = torch.randn(2, 4)
        recorder = Recorder(f"m{width}", 4, None)
        recorder.record(module, (x,), {})
        graph = recorder.finish()[0]
        ctx = LoadContext(None, FlatModule(module, graph.input_spec), graph, "cpu", "fp32")
        run = RUNNERS["TorchCompileCPU"].load(ctx)
        compiled = counters["stats"]["unique_graphs"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out,) = run([x])
        assert counters["stats"]["unique_graphs"] == compiled + 1, f"module {width} ran uncompiled"
        torch.testing.assert_close(out, module(x))


def test_a_new_compiled_module_does_not_inherit_another_modules_dynamic_shapes():
    """Automatic dynamic shapes: a module compiles static on its first call even after another compiled module saw
    two batch sizes (and so went symbolic). With a shared frame name the third module here compiled with batch,
    height and width symbolic on its first call, as the diffusion UNet would have after ResNet-50 in one process."""
    symbolic: dict[str, list] = {}

    def recording(tag):
        def backend(gm, example_inputs):
            symbolic.setdefault(tag, []).append([i for i in example_inputs if isinstance(i, torch.SymInt)])
            return gm.forward
        return backend

    first = torch.nn.Conv2d(3, 8, 3).eval()
    other_rank = torch.nn.Linear(16, 4).eval()
    new = torch.nn.Conv2d(4, 4, 3).eval()
    with torch.no_grad():
        compiled = torch.compile(own_frame(first), backend=recording("first"), dynamic=None)
        compiled(torch.randn(1, 3, 20, 20))
        compiled(torch.randn(5, 3, 20, 20))
        torch.compile(own_frame(other_rank), backend=recording("other_rank"), dynamic=None)(torch.randn(1, 16))
        torch.compile(own_frame(new), backend=recording("new"), dynamic=None)(torch.randn(2, 4, 12, 12))
    assert symbolic["first"][0] == [] and len(symbolic["first"][1]) == 1  # static, then only the batch symbolic
    assert symbolic["other_rank"] == [[]]
    assert symbolic["new"] == [[]], symbolic["new"]  # static on its first call


def test_after_load_optimized_no_profiled_batch_size_pays_a_compile(tmp_path, choose_candidate):
    """A torch.compile winner on the CPU is warmed up at every profiled batch size when bound: the first request
    of a profiled size compiles nothing (a compile there takes 9 s, after load_optimized)."""
    import navdeploy as nav

    module = nav.Module(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval(), name="warm_compile")
    config = nav.OptimizeConfig(runners=("TorchCompileCPU",), batch_sizes=(1, 2, 4), profile_time_s=0.05,
                                workspace=tmp_path, use_multiprocessing=False, thorough=True)  # profiled at each
    with torch.no_grad():
        nav.optimize(module, [(2, torch.randn(2, 4))], config=config)
    torch._dynamo.reset()  # a fresh process: nothing compiled yet
    choose_candidate(module, tmp_path, "TorchCompileCPU")  # binds as load_optimized does, warm-up included
    frames = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for batch in (1, 2, 4):
            torch.testing.assert_close(module(torch.ones(batch, 4)), module.__wrapped__(torch.ones(batch, 4)))
    assert counters["stats"]["unique_graphs"] == frames, "a profiled batch size compiled on its first request"


class _MidBlock(torch.nn.Module):
    """diffusers' mid blocks loop over ``self.resnets[1:]``: a new ModuleList, registered module by module, on every
    call."""

    def __init__(self):
        super().__init__()
        self.resnets = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = self.resnets[0](x)
        for resnet in self.resnets[1:]:
            x = torch.relu(resnet(x))
        return x


def test_a_forward_that_builds_containers_is_not_recompiled_when_other_modules_register(tmp_path, choose_candidate):
    """The staleness check's registration hooks count registrations on bound modules only and stay out of compiled
    code. When torch.compile traced them inside ``self.resnets[1:]``, the compiled code guarded on navdeploy's
    process-wide counter: every registration anywhere recompiled it on its next call (the SD UNet on CPU: 4
    compiles at its bind instead of 2, one a cache miss, and more during the pipeline), and a module bound after
    the hooks were installed missed the compile caches its worker had filled."""
    import navdeploy as nav

    first = nav.Module(_MidBlock().eval(), name="first_block")
    second = nav.Module(_MidBlock().eval(), name="second_block")
    config = nav.OptimizeConfig(runners=("TorchCompileCPU",), batch_sizes=(2,), profile_time_s=0.05,
                                workspace=tmp_path, use_multiprocessing=False, thorough=True, pipeline_repeats=0)
    x = torch.randn(2, 8)
    with torch.no_grad():
        nav.optimize(lambda v: second(first(v)), [(2, x)], config=config)
    torch._dynamo.reset()
    choose_candidate(first, tmp_path, "TorchCompileCPU")  # installs the registration hooks
    choose_candidate(second, tmp_path, "TorchCompileCPU")  # compiled with the hooks in place
    frames = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for _ in range(3):
            torch.nn.ModuleList([torch.nn.Linear(1, 1)])  # a registration elsewhere, between calls
            _MidBlock()(x)  # an eager forward that builds containers
            torch.testing.assert_close(second(first(x)), second.__wrapped__(first.__wrapped__(x)))
    assert counters["stats"]["unique_graphs"] == frames, "a bound torch.compile runner recompiled"


def test_the_bind_finds_what_the_candidate_compiled_in_the_compile_caches(tmp_path, monkeypatch):
    """A candidate is compiled from ``prepare``'s module; the bind compiles the winner again from the user's module,
    whose parameter and buffer dicts it has swapped for watched ones. torch.compile's cache keys name the kind of
    dict a parameter is read from, so with plain dicts at the candidate the bind found nothing in the cache and
    compiled from scratch (the SD UNet's bind on the H200: 68 s). ``prepare`` watches the dicts first."""
    from navdeploy.candidates.build import prepare
    from navdeploy.inplace.staleness import watch_module_dicts

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    recorder = Recorder("cached", 4, None)
    recorder.record(module, (x,), {})
    graph = recorder.finish()[0]
    runner = RUNNERS["TorchCompileCPU"]

    def compile_and_run() -> dict:
        before = {k: counters[g][k] for g, k in (("inductor", "fxgraph_cache_hit"),
                                                 ("aot_autograd", "autograd_cache_hit"))}
        flat, _ = prepare(module, None, graph, runner, "fp32", "fp32")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out,) = runner.load(LoadContext(None, flat, graph, "cpu", "fp32"))([x])
        torch.testing.assert_close(out, module(x))
        return {k: counters[g][k] - before[k] for g, k in (("inductor", "fxgraph_cache_hit"),
                                                            ("aot_autograd", "autograd_cache_hit"))}

    torch._dynamo.reset()
    compile_and_run()  # the candidate
    torch._dynamo.reset()  # a new process as far as dynamo is concerned; the caches on disk stay
    watch_module_dicts(module)  # what bind does before it loads the runners
    assert compile_and_run() == {"fxgraph_cache_hit": 1, "autograd_cache_hit": 1}


_WORKER_SCRIPT = '''
import sys
import torch
from torch import nn
import navdeploy as nav


class Chain(nn.Module):  # pointwise ops torch.compile fuses into one kernel: it wins by far on any CPU
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x):
        y = self.linear(x)
        for _ in range(12):
            y = torch.sin(y) * 1.01 + torch.cos(y)
        return y


if __name__ == "__main__":
    torch.manual_seed(0)
    module = nav.Module(Chain().eval(), name="chain")
    config = nav.OptimizeConfig(workspace=sys.argv[1], runners=("TorchCPU", "TorchCompileCPU"), batch_sizes=(32,),
                                max_batch_size=32, profile_time_s=0.1, pipeline_repeats=0, use_multiprocessing=True)
    with torch.no_grad():
        status = nav.optimize(module, [(32, torch.randn(32, 64))], config)
    print("selected", status.selected()["chain"])
'''


def test_a_winner_compiled_in_a_worker_is_found_in_the_cache_by_the_bind(tmp_path):
    """The worker process compiles the candidate, the user's process binds the winner: the bind must find that
    compile in the caches. torch's keys pickle objects such as ``torch.contiguous_format`` by reference to the first
    module in ``sys.modules`` that reaches them, which in a spawned worker was the user's script (``__mp_main__``,
    ahead of torch): every key differed and every bind compiled again."""
    import subprocess
    import sys

    script = tmp_path / "optimize_chain.py"
    script.write_text(_WORKER_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ws")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "selected ['TorchCompileCPU']" in done.stdout, done.stdout[-2000:]
    log = (tmp_path / "ws" / "chain" / "navdeploy.log").read_text()
    bound = next(line for line in log.splitlines() if "module chain bound in" in line)
    assert "fxgraph_cache_hit" in bound and "miss" not in bound, bound
