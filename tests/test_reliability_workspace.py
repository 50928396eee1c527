"""A workspace that was corrupted, hand-edited or tampered with never crashes the user's pipeline: the
module runs eagerly with one warning that says what is wrong, and the next nav.optimize rebuilds what is
broken. Weights changed after optimization (fine-tuning, LoRA) are detected. Nothing in a workspace is
unpickled except tensors. Inputs the runner was not built for run eagerly, with one warning."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.workspace.fingerprint import fingerprint
from navdeploy.workspace.layout import build_dir, remove_replaced_builds
from navdeploy.workspace.manifest import read_manifest
from navdeploy.workspace.samples import load_samples

NAME = "rel_ws"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)  # not in state_dict

    def forward(self, x):
        y = self.linear(x.to(self.table.dtype)).relu() + self.table
        if hasattr(self, "lora_a"):  # a LoRA adapter added after optimization
            y = y + (x @ self.lora_a.T) @ self.lora_b.T
        return y


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(autouse=True)
def _inference():
    """Calls as inference runs them (with grad on, parameters that require grad send a call to eager)."""
    with torch.no_grad():
        yield


def fast(workspace, **kw) -> nav.OptimizeConfig:
    cfg = dict(workspace=workspace, target_formats=(nav.Format.ONNX,), batch_sizes=(1, 2), max_batch_size=2,
               profile_time_s=0.05, use_multiprocessing=False, tolerances={"atol": 1e-4, "rtol": 1e-3},
               pipeline_repeats=0)  # what runs follows the selection: these tests are about the workspace
    cfg.update(kw)
    return nav.OptimizeConfig(**cfg)


@pytest.fixture(scope="module")
def original(tmp_path_factory, choose_candidate):
    """One optimized workspace; the tests below work on copies of it."""
    ws = tmp_path_factory.mktemp("ws")
    module = nav.Module(make_net(), name=NAME, batching=True)
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))],
                          fast(ws, runners=("OnnxCPU",)))
    assert status.modules[NAME].graphs[0].candidate("OnnxCPU").verified
    choose_candidate(module, ws)  # these tests need a winner with an artifact, not eager
    return ws, module


@pytest.fixture
def ws(original, tmp_path):
    """A private copy of the optimized workspace, and the live module (rebound to the copy by each test)."""
    src, module = original
    copy = tmp_path / "ws"
    shutil.copytree(src, copy)
    saved = deepcopy(module.__wrapped__.__dict__)
    yield copy, module
    module.__wrapped__.__dict__.clear()  # undo fine-tuning / adapters a test applied to the shared module
    module.__wrapped__.__dict__.update(saved)


def _load(module, workspace) -> tuple[bool, list[str]]:
    """load_optimized, returning whether our module bound and the warnings that mention it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound = nav.load_optimized(workspace)[NAME]
    return bound, [str(w.message) for w in caught if NAME in str(w.message)]


def _eager_and_correct(module) -> None:
    assert not module.is_optimized
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager: no per-call warnings either
        torch.testing.assert_close(module(x), module.__wrapped__(x))


def _edit(workspace: Path, change) -> None:
    path = workspace / NAME / "manifest.json"
    data = json.loads(path.read_text())
    change(data, next(iter(data["graphs"].values())))
    path.write_text(json.dumps(data))


def _onnx_folder(workspace: Path) -> Path:
    """The folder of the ONNX build the manifest names."""
    ((key, entry),) = read_manifest(workspace / NAME).graphs.items()
    return entry.artifact_folder(workspace / NAME / key, "onnx")


def test_intact_copy_loads(ws):
    workspace, module = ws
    bound, messages = _load(module, workspace)
    assert bound and module.is_optimized and messages == []


def test_a_workspace_of_an_earlier_version_loads_and_is_reused(ws):
    """Earlier versions kept one folder per format (``<graph>/onnx/``), not one per build."""
    workspace, module = ws
    build = _onnx_folder(workspace)
    assert build.name.startswith("onnx.") and build.is_dir()
    build.rename(build.with_name("onnx"))
    bound, messages = _load(module, workspace)
    assert bound and module.is_optimized and messages == []
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))],
                          fast(workspace, runners=("OnnxCPU",)))
    assert status.modules[NAME].graphs[0].candidate("OnnxCPU").cached  # its artifact was found and reused
    assert _onnx_folder(workspace) == build.with_name("onnx") and build.with_name("onnx").is_dir()


def test_only_the_builds_a_manifest_no_longer_names_are_removed(tmp_path):
    in_use, old = "a" * 64, "b" * 64
    names = [build_dir("onnx", in_use), build_dir("onnx", old), "onnx", build_dir("torchscript", old),
             "onnx.notes", "mine"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "samples.pt").write_bytes(b"")
    removed = remove_replaced_builds(tmp_path, {"onnx": in_use})
    assert sorted(p.name for p in removed) == sorted([build_dir("onnx", old), "onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([build_dir("onnx", in_use), build_dir(
        "torchscript", old), "onnx.notes", "mine", "samples.pt"])
    remove_replaced_builds(tmp_path, {"torchscript": None})  # a format the manifest no longer has: every build
    assert not (tmp_path / build_dir("torchscript", old)).exists()


RAW = {
    "not-json": b"{ this is not json",
    "truncated": None,  # first half of the real file
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "a-list": b"[]",
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "a-pickle": pickle.dumps({"version": 1}),
}


@pytest.mark.parametrize("kind", list(RAW))
def test_unreadable_manifest_warns_and_runs_eagerly(ws, kind):
    workspace, module = ws
    path = workspace / NAME / "manifest.json"
    path.write_bytes(RAW[kind] if RAW[kind] is not None else path.read_bytes()[: path.stat().st_size // 2])
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1, messages
    assert "not a valid navdeploy manifest" in messages[0] or "cannot read" in messages[0]
    assert "Re-run nav.optimize" in messages[0]
    _eager_and_correct(module)


EDITS = {
    "graphs-a-list": lambda m, g: m.update(graphs=[]),
    "graph-a-string": lambda m, g: m["graphs"].update({k: "oops" for k in m["graphs"]}),
    "candidates-a-dict": lambda m, g: g.update(candidates={}),
    "candidate-without-runner": lambda m, g: g["candidates"][0].pop("runner"),
    "selected-an-int": lambda m, g: g.update(selected=5),
    "graph-spec-missing-inputs": lambda m, g: g["graph"].pop("inputs"),
    "tensor-spec-a-string": lambda m, g: g["graph"].update(inputs=["x"]),
    "max-batch-size-a-string": lambda m, g: m.update(max_batch_size="8"),
    "fingerprint-missing": lambda m, g: m.pop("fingerprint"),
    "format-without-checksum": lambda m, g: g["formats"]["onnx"].pop("checksum"),
    "profile-not-a-list": lambda m, g: g["candidates"][0].update(profile="fast"),
    "other-version": lambda m, g: m.update(version=99),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_hand_edited_manifest_with_wrong_types_warns_and_runs_eagerly(ws, edit):
    workspace, module = ws
    _edit(workspace, EDITS[edit])
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1, messages
    assert "not a valid navdeploy manifest" in messages[0]
    _eager_and_correct(module)


@pytest.mark.parametrize("edit, needle", [
    (lambda m, g: m.update(fingerprint="0" * 64), "changed"),
    (lambda m, g: g.update(selected="NoSuchRunnerCPU"), "NoSuchRunnerCPU"),
    (lambda m, g: g["formats"]["onnx"].update(checksum="0" * 64), "checksum"),
    (lambda m, g: m.update(module="someone_else"), "belongs to module 'someone_else'"),
], ids=["fingerprint", "unknown-runner", "checksum", "other-module"])
def test_hand_edited_manifest_values_warn_and_run_eagerly(ws, edit, needle):
    workspace, module = ws
    _edit(workspace, edit)
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1 and needle in messages[0], messages
    _eager_and_correct(module)


@pytest.mark.parametrize("tamper", ["flip-bytes", "truncate", "delete-file", "delete-folder", "extra-file"])
def test_modified_artifact_is_never_loaded(ws, tamper):
    workspace, module = ws
    artifact = _onnx_folder(workspace) / "model.onnx"
    if tamper == "flip-bytes":
        data = bytearray(artifact.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        artifact.write_bytes(bytes(data))
    elif tamper == "truncate":
        artifact.write_bytes(artifact.read_bytes()[:100])
    elif tamper == "delete-file":
        artifact.unlink()
    elif tamper == "delete-folder":
        shutil.rmtree(artifact.parent)
    else:
        (artifact.parent / "planted.bin").write_bytes(b"planted")
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1, messages
    assert "missing or was modified" in messages[0] and "Re-run nav.optimize" in messages[0]
    _eager_and_correct(module)


def test_next_optimize_rebuilds_a_corrupted_workspace(ws):
    workspace, module = ws
    (_onnx_folder(workspace) / "model.onnx").write_bytes(b"garbage")
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))],
                          fast(workspace, runners=("OnnxCPU",)))
    graph = status.modules[NAME].graphs[0]
    onnx = graph.candidate("OnnxCPU")
    assert onnx.verified and not onnx.cached  # rebuilt, not trusted
    # Bound to what this run selected (which of eager and ONNX wins a Linear(4, 4) is timing noise).
    assert module.is_optimized == (graph.selected == "OnnxCPU")
    (workspace / NAME / "manifest.json").write_text("{ broken")
    with pytest.warns(RuntimeWarning, match="ignoring an unusable manifest"):
        status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))],
                              fast(workspace, runners=("OnnxCPU",)))
    graph = status.modules[NAME].graphs[0]
    assert graph.candidate("OnnxCPU").verified and graph.selected in ("OnnxCPU", "TorchCPU")
    assert module.is_optimized == (graph.selected == "OnnxCPU")
    assert read_manifest(workspace / NAME).graphs[graph.key].selected == graph.selected


class Payload:
    """What an attacker would plant: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_samples_holding_a_pickled_object_are_refused(ws, tmp_path):
    workspace, module = ws
    (graph_dir,) = [p for p in (workspace / NAME).iterdir() if p.is_dir()]
    marker = tmp_path / "code-ran"
    torch.save({"inputs": [[Payload(marker)]], "outputs": [[torch.ones(1)]]}, graph_dir / "samples.pt")
    with pytest.raises(nav.WorkspaceError, match="refuses to unpickle"):
        load_samples(graph_dir)
    assert not marker.exists()
    bound, messages = _load(module, workspace)  # through load_optimized: refused, eager, one warning
    assert bound is False and len(messages) == 1 and "refuses to unpickle" in messages[0]
    assert not marker.exists()
    _eager_and_correct(module)


def test_samples_that_are_not_navdeploy_samples(ws):
    workspace, module = ws
    (graph_dir,) = [p for p in (workspace / NAME).iterdir() if p.is_dir()]
    torch.save({"something": torch.ones(1)}, graph_dir / "samples.pt")
    with pytest.raises(nav.WorkspaceError, match="not a navdeploy samples file"):
        load_samples(graph_dir)
    (graph_dir / "samples.pt").write_bytes(b"\x00" * 10)
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1
    _eager_and_correct(module)


def test_manifests_are_plain_json(original):
    workspace, _ = original
    for path in workspace.rglob("*.json"):
        json.loads(path.read_text())
    suffixes = {p.suffix for p in (workspace / NAME).rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".log", ".pt", ".onnx", ".data", ".owner", ""}


# --- weights changed after optimization -------------------------------------------------------------

def test_fine_tuned_weights_are_detected(ws):
    workspace, module = ws
    with torch.no_grad():
        module.__wrapped__.linear.weight.mul_(1.01)
    bound, messages = _load(module, workspace)
    assert bound is False and "changed" in messages[0] and "Re-run nav.optimize" in messages[0]
    _eager_and_correct(module)


@pytest.mark.parametrize("how", ["parameters", "zero-init", "wrapped-layer", "non-persistent-buffer"])
def test_lora_style_changes_are_detected(ws, how):
    workspace, module = ws
    inner = module.__wrapped__
    if how in ("parameters", "zero-init"):
        inner.lora_a = nn.Parameter(torch.randn(2, 4) * 0.1)  # registered parameters: new state_dict keys
        inner.lora_b = nn.Parameter(torch.zeros(4, 2) if how == "zero-init" else torch.randn(4, 2) * 0.1)
    elif how == "wrapped-layer":  # peft style: the layer is replaced by a wrapper holding the base layer
        class LoraLinear(nn.Module):
            def __init__(self, base):
                super().__init__()
                self.base_layer = base
                self.lora_down = nn.Linear(4, 2, bias=False)
                self.lora_up = nn.Linear(2, 4, bias=False)
                nn.init.zeros_(self.lora_up.weight)  # output unchanged at first, still a different module

            def forward(self, x):
                return self.base_layer(x) + self.lora_up(self.lora_down(x))
        inner.linear = LoraLinear(inner.linear)
    else:
        inner.table.add_(1.0)  # not in state_dict, still part of what the module computes
    assert fingerprint(inner) != json.loads((workspace / NAME / "manifest.json").read_text())["fingerprint"]
    bound, messages = _load(module, workspace)
    assert bound is False and len(messages) == 1 and "LoRA" in messages[0], messages
    _eager_and_correct(module)  # the adapter's contribution is in the result: eager runs the changed module


def test_a_changed_weight_of_a_dynamically_quantized_module_changes_its_fingerprint():
    """Quantized layers keep weights as a tuple of tensors (packed params); one changed value in the middle of a
    large weight must count, not vanish in a summarised repr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is deprecated, still used
        torch.manual_seed(0)
        model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 64)), {nn.Linear},
                                                       dtype=torch.qint8)
        before = fingerprint(model)
        weight, bias = model[0]._weight_bias()
        changed = weight.dequantize()
        changed[32, 32] += 10 * weight.q_scale()
        model[0].set_weight_bias(torch.quantize_per_tensor(changed, weight.q_scale(), weight.q_zero_point(),
                                                           torch.qint8), bias)
    assert fingerprint(model) != before
    assert fingerprint(model) == fingerprint(model)  # and stable


def test_fingerprints_of_quantized_lstms_and_odd_extra_state_are_by_value():
    """A dynamic-quantized LSTM keeps its weights in TorchScript objects (their repr shows an address): two equal
    modules must match and different weights must not. A self-referencing extra state must not crash."""
    def lstm(seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.LSTM(8, 8)), {nn.LSTM}, dtype=torch.qint8)

    assert fingerprint(lstm(0)) == fingerprint(lstm(0)) != fingerprint(lstm(1))

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.state = [1]
            self.state.append(self.state)

        def get_extra_state(self):
            return {"loop": self.state}

        def set_extra_state(self, state):
            pass

    assert fingerprint(Loop()) != fingerprint(nn.Linear(2, 2))


# --- run-time inputs outside what was captured -----------------------------------------------------------

@pytest.fixture
def bound(ws):
    workspace, module = ws
    assert _load(module, workspace)[0] and module.is_optimized
    return module


def _calls(module, calls):
    """Run calls, return (outputs, expected, warnings about our module)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [module(*a, **k) for a, k in calls]
    expected = [module.__wrapped__(*a, **k) for a, k in calls]
    return outs, expected, [str(w.message) for w in caught if NAME in str(w.message)]


@pytest.mark.parametrize("kind, calls, needle", [
    ("batch-above-max", [((torch.randn(3, 4),), {}), ((torch.randn(5, 4),), {})], "outside the optimized range"),
    ("feature-size", [((torch.randn(1, 1, 4),), {}), ((torch.randn(2, 1, 4),), {})], "new input structure"),
    ("dtype", [((torch.randn(2, 4, dtype=torch.float64),), {})] * 2, "new input structure"),
    ("keyword", [((), {"x": torch.randn(2, 4)})] * 2, "new input structure"),
])
def test_inputs_outside_what_was_captured_run_eagerly_with_one_warning(bound, kind, calls, needle):
    outs, expected, messages = _calls(bound, calls)
    for out, ref in zip(outs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref)
    assert len(messages) == 1 and needle in messages[0] and "runs eagerly" in messages[0], messages
    # Inputs inside the range still go to the optimized runner, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(2, 4)
        torch.testing.assert_close(bound(x), bound.__wrapped__(x), atol=1e-4, rtol=1e-3)


def test_uncapturable_input_at_run_time_gets_what_eager_gives(bound):
    """A value the capture cannot flatten goes to eager as is: here eager itself rejects it, so does the call."""
    array = torch.randn(2, 4).numpy()
    with pytest.raises(Exception) as eager:
        bound.__wrapped__(array)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(type(eager.value), match=str(eager.value)):
                bound(array)
    messages = [str(w.message) for w in caught if NAME in str(w.message)]
    assert len(messages) == 1 and "uncapturable input" in messages[0]


def test_runner_error_at_run_time_runs_eagerly_with_one_warning(bound):
    handler = bound.nav_state.handler
    (key, (graph, _)), = handler.graphs.items()

    def broken(_inputs):
        raise RuntimeError("onnxruntime: device lost")

    handler.graphs[key] = (graph, broken)
    outs, expected, messages = _calls(bound, [((torch.randn(2, 4),), {})] * 3)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref)
    assert len(messages) == 1 and "device lost" in messages[0]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="other-device inputs need a CUDA device; this machine is CPU only")
def test_input_on_another_device_runs_eagerly(bound):
    bound.__wrapped__.cuda()
    try:
        outs, expected, messages = _calls(bound, [((torch.randn(2, 4, device="cuda"),), {})] * 2)
        torch.testing.assert_close(outs[0], expected[0])
        assert len(messages) == 1
    finally:
        bound.__wrapped__.cpu()
