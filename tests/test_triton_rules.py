"""One hand-written bad config per rule Triton core applies at load time, and model files that do not match their
config (real ONNX and TorchScript files, a model.py): each problem names the model and the field and has a fix."""

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tritonclient.grpc")

from navdeploy.errors import NavdeployError
from navdeploy.triton import validate_repository
from navdeploy.triton.versions import DEFAULT_RELEASE, resolve_release

MODEL_PY = "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"

BASE = """
name: "m"
backend: "python"
max_batch_size: 8
input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 10 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def _repo(tmp_path: Path, config: str, files: dict[str, bytes | str] = None, name: str = "m") -> Path:
    folder = tmp_path / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config)
    for rel, data in (files if files is not None else {"1/model.py": MODEL_PY}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data) if isinstance(data, bytes) else (folder / rel).write_text(data)
    return tmp_path


def _errors(repo: Path, version: str = None) -> list:
    return [p for p in validate_repository(repo, target="cpu", triton_version=version) if p.severity == "error"]


def _assert_reported(problems: list, field: str, fragment: str) -> None:
    hits = [p for p in problems if field in p.field and fragment in p.message + p.fix]
    assert hits, (field, fragment, [str(p) for p in problems])
    assert all(p.model == "m" and p.fix for p in hits)


def test_base_config_passes(tmp_path):
    assert _errors(_repo(tmp_path, BASE)) == []


NON_BATCHING = BASE.replace("max_batch_size: 8", "max_batch_size: 0")
RULES = [
    # ValidateIOShape
    ("empty_reshape_non_batching", NON_BATCHING.replace("dims: [ 10 ] }", "dims: [ 1 ] reshape: { shape: [ ] } }"),
     "output[0] ('output__0').reshape", "Triton has no scalar tensors"),
    ("reshape_count", BASE.replace("dims: [ 10 ] }", "dims: [ 10 ] reshape: { shape: [ 2, 3 ] } }"),
     "output[0] ('output__0').reshape.shape", "different element counts"),
    ("reshape_wildcards", BASE.replace("dims: [ 3, -1 ] }", "dims: [ 3, -1 ] reshape: { shape: [ -1, 3 ] } }"),
     "input[0] ('input__0').reshape.shape", "do not match between their -1"),
    ("reshape_empty_many", BASE.replace("dims: [ 10 ] }", "dims: [ 10 ] reshape: { shape: [ ] } }"),
     "output[0] ('output__0').reshape.shape", "dims of one element"),
    ("reshape_zero", BASE.replace("dims: [ 10 ] }", "dims: [ 10 ] reshape: { shape: [ 0 ] } }"),
     "reshape.shape", "contains 0"),
    ("no_data_type", BASE.replace("data_type: TYPE_FP32 dims: [ 10 ]", "dims: [ 10 ]"),
     "output[0] ('output__0').data_type", "TYPE_INVALID"),
    ("no_name", BASE.replace('name: "output__0" ', ""), "output[0].name", "no name"),
    # ValidateModelInput / Output
    ("nchw_two_dims", BASE.replace("dims: [ 3, -1 ] }", "format: FORMAT_NCHW dims: [ 3, -1 ] }"),
     "input[0] ('input__0').format", "FORMAT_NCHW needs 3 dims"),
    ("shape_tensor", BASE.replace("dims: [ 3, -1 ] }", "dims: [ 3, -1 ] is_shape_tensor: true }"),
     "input[0] ('input__0').is_shape_tensor", "only on TensorRT"),
    ("non_linear_io", BASE.replace("dims: [ 10 ] }", "dims: [ 10 ] is_non_linear_format_io: true }"),
     "is_non_linear_format_io", "TensorRT"),
    # ValidateBatchIO
    ("batch_input_source", BASE + 'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_INT32'
     ' source_input: [ "nope" ] } ]', "batch_input[0].source_input", "'nope' is not a model input"),
    ("batch_input_type", BASE + 'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_INT64'
     ' source_input: [ "input__0" ] } ]', "batch_input[0].data_type", "TYPE_INT32 or TYPE_FP32"),
    ("batch_output_target", BASE + 'batch_output [ { kind: BATCH_SCATTER_WITH_INPUT_SHAPE target_name: [ "x" ]'
     ' source_input: [ "input__0" ] } ]', "batch_output[0].target_name", "'x' is not a model output"),
    # ValidateModelConfig: dynamic batching
    ("preferred_zero", BASE + "dynamic_batching { preferred_batch_size: [ 0 ] }",
     "dynamic_batching.preferred_batch_size", "outside [1, max_batch_size=8]"),
    ("preferred_non_batching", NON_BATCHING + "dynamic_batching { preferred_batch_size: [ 2 ] }",
     "dynamic_batching.preferred_batch_size", "needs max_batch_size > 0"),
    ("default_priority", BASE + "dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
     "dynamic_batching.default_priority_level", "outside [1, priority_levels=2]"),
    ("default_priority_unset", BASE + "dynamic_batching { priority_levels: 2 }",
     "dynamic_batching.default_priority_level", "default_priority_level 0"),
    ("queue_policy_level", BASE + "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
     "priority_queue_policy { key: 5 value: { } } }", "dynamic_batching.priority_queue_policy[5]", "priority level 5"),
    ("preserve_ordering_levels", BASE + "dynamic_batching { preserve_ordering: true priority_levels: 2 "
     "default_priority_level: 1 }", "dynamic_batching.preserve_ordering", "one priority level"),
    ("preserve_ordering_delay", BASE + "dynamic_batching { preserve_ordering: true default_queue_policy { "
     "timeout_action: DELAY default_timeout_microseconds: 100 } }", "default_queue_policy.timeout_action", "DELAY"),
    # sequence batching
    ("sequence_cache", BASE + "sequence_batching { }\nresponse_cache { enable: true }", "response_cache.enable",
     "sequence batching"),
    ("sequence_control_values", BASE + 'sequence_batching { control_input [ { name: "START" control [ '
     "{ kind: CONTROL_SEQUENCE_START } ] } ] }", "sequence_batching.control_input[0].control", "exactly one of"),
    ("sequence_control_two", BASE + 'sequence_batching { control_input [ { name: "START" control [ '
     "{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1, 2 ] } ] } ] }",
     "control.int32_false_true", "needs 2 entries"),
    ("sequence_corrid_type", BASE + 'sequence_batching { control_input [ { name: "CORRID" control [ '
     "{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ] }", "control.data_type", "TYPE_UINT64"),
    ("sequence_same_tensor", BASE + 'sequence_batching { control_input [ { name: "S" control [ '
     '{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] }, { name: "S" control [ '
     "{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] } ] }", "control_input[1].name", "several controls"),
    ("sequence_oldest", BASE + "sequence_batching { oldest { preferred_batch_size: [ 9 ] } }",
     "sequence_batching.oldest.preferred_batch_size", "outside [1, max_batch_size=8]"),
    ("sequence_direct", BASE + "sequence_batching { direct { minimum_slot_utilization: 1.5 } }",
     "sequence_batching.direct.minimum_slot_utilization", "outside (0, 1]"),
    ("decoupled_cache", BASE + "model_transaction_policy { decoupled: true }\nresponse_cache { enable: true }",
     "response_cache.enable", "decoupled"),
    # ValidateInstanceGroup
    ("profile_not_trt", BASE.replace("kind: KIND_CPU }", 'kind: KIND_CPU profile: [ "0" ] }'),
     "instance_group[0].profile", "only for TensorRT"),
    ("model_kind_gpus", BASE.replace("kind: KIND_CPU }", "kind: KIND_MODEL gpus: [ 0 ] }"),
     "instance_group[0].gpus", "KIND_MODEL"),
    ("cpu_kind_gpus", BASE.replace("kind: KIND_CPU }", "kind: KIND_CPU gpus: [ 0 ] }"),
     "instance_group[0].gpus", "KIND_CPU"),
    ("gpu_on_cpu", BASE.replace("KIND_CPU", "KIND_GPU"), "instance_group[0].kind", "KIND_GPU on a CPU target"),
    # backend / platform / version (auto-complete + pair check)
    ("libtorch_alt", BASE.replace('backend: "python"', 'backend: "pytorch"\nplatform: "libtorch"'),
     "platform", "does not know platform 'libtorch'"),
    ("pair", BASE.replace('backend: "python"', 'backend: "tensorrt"\nplatform: "onnxruntime_onnx"'),
     "platform", "'tensorrt' does not serve platform 'onnxruntime_onnx'"),
    ("ensemble_backend", BASE.replace('backend: "python"', 'platform: "ensemble"\nbackend: "python"'),
     "backend", "an ensemble has no backend"),
    ("latest_zero", BASE + "version_policy { latest { num_versions: 0 } }", "version_policy.latest.num_versions",
     "serves no version"),
    ("specific_missing", BASE + "version_policy { specific { versions: [ 3 ] } }",
     "version_policy.specific.versions", "version 3 has no folder"),
    ("negative_batch", BASE.replace("max_batch_size: 8", "max_batch_size: -1"), "max_batch_size", "-1"),
    # warmup
    ("warmup_batch", BASE + 'model_warmup [ { name: "w" batch_size: 9 inputs { key: "input__0" value: { '
     "data_type: TYPE_FP32 dims: [ 3, 4 ] zero_data: true } } } ]", "model_warmup[0].batch_size", "outside [1, 8]"),
    ("warmup_wildcard", BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "input__0" value: { '
     "data_type: TYPE_FP32 dims: [ 3, -1 ] zero_data: true } } } ]", "model_warmup[0].inputs['input__0'].dims",
     "concrete sizes"),
    ("warmup_no_data", BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "input__0" value: { '
     "data_type: TYPE_FP32 dims: [ 3, 4 ] } } } ]", "model_warmup[0].inputs['input__0']", "no zero_data"),
    ("warmup_type", BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "input__0" value: { '
     "data_type: TYPE_INT32 dims: [ 3, 4 ] zero_data: true } } } ]", "inputs['input__0'].data_type", "TYPE_INT32"),
    ("warmup_file", BASE + 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "input__0" value: { '
     'data_type: TYPE_FP32 dims: [ 3, 4 ] input_data_file: "raw" } } } ]', "input_data_file", "m/warmup/raw"),
    ("warmup_missing_input", BASE + 'model_warmup [ { name: "w" batch_size: 1 } ]', "model_warmup[0].inputs",
     "lacks required inputs"),
    # ensembles
    ("ensemble_instances", BASE.replace('backend: "python"', 'platform: "ensemble"') +
     'ensemble_scheduling { step [ { model_name: "m" } ] }', "instance_group", "an ensemble takes no"),
    ("scheduling_not_ensemble", BASE + 'ensemble_scheduling { step [ { model_name: "m" } ] }',
     "ensemble_scheduling", "whose platform is ''"),
]


@pytest.mark.parametrize("case, config, field, fragment", RULES, ids=[r[0] for r in RULES])
def test_rule(tmp_path, case, config, field, fragment):
    _assert_reported(_errors(_repo(tmp_path, config)), field, fragment)


def test_ensemble_without_scheduling_and_unused_tensors(tmp_path):
    step = BASE.replace('"m"', '"step"', 1)
    _repo(tmp_path, step, name="step")
    ensemble = BASE.replace('backend: "python"', 'platform: "ensemble"').replace(
        "instance_group [ { count: 1 kind: KIND_CPU } ]", "")
    _repo(tmp_path, ensemble, files={})
    _assert_reported(_errors(tmp_path), "ensemble_scheduling", "without ensemble_scheduling")
    extra = 'input [ { name: "EXTRA" data_type: TYPE_FP32 dims: [ 1 ] } ]'
    (tmp_path / "m" / "config.pbtxt").write_text(ensemble + extra +
                                                 'ensemble_scheduling { step [ { model_name: "step" '
                                                 'input_map { key: "input__0" value: "input__0" } '
                                                 'output_map { key: "output__0" value: "output__0" } } ] }')
    _assert_reported(_errors(tmp_path), "input ('EXTRA')", "no step reads")


def test_normalisation_is_not_an_error(tmp_path):
    """What Triton fills in itself: no version policy, no preferred sizes, no instance group, count 0, KIND_AUTO."""
    config = BASE.replace("instance_group [ { count: 1 kind: KIND_CPU } ]",
                          "instance_group [ { count: 0 kind: KIND_AUTO } ]") + "dynamic_batching { }"
    problems = validate_repository(_repo(tmp_path, config), target="cpu")
    assert [p.severity for p in problems] == ["warning"] and "count is 0" in problems[0].message


# ----------------------------------------------------------------------------------- Triton versions and AOTI


AOTI = BASE.replace('backend: "python"', 'backend: "pytorch"\nplatform: "torch_aoti"').replace(
    '"input__0"', '"INPUT__0"').replace('"output__0"', '"OUTPUT__0"')


def test_torch_aoti_depends_on_the_triton_version(tmp_path):
    repo = _repo(tmp_path, AOTI, files={"1/model.pt2": b"pt2"})
    assert _errors(repo, "26.03") == []
    _assert_reported(_errors(repo, "24.10"), "platform", "Triton 24.10 (server 2.51.0) does not know platform")
    assert _errors(repo, "2.51") == _errors(repo, "24.10")  # a server version names the same release
    lower = AOTI.replace('"INPUT__0"', '"input__0"')
    (tmp_path / "m" / "config.pbtxt").write_text(lower)
    _assert_reported(_errors(repo, "26.03"), "input[0] ('input__0').name", 'use name: "INPUT__0"')


def test_unknown_triton_version_is_refused():
    assert resolve_release(None).release == DEFAULT_RELEASE
    with pytest.raises(NavdeployError, match="24.10"):
        resolve_release("23.01")


# ------------------------------------------------------------------------------------ model files vs configs


def _onnx(path: Path, batch_dynamic: bool = True) -> None:
    """A tiny nn.Linear(4, 3) as ONNX, inputs "x" [B, 4] -> "y" [B, 3]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}} if batch_dynamic else None, dynamo=False)


ONNX_OK = """
name: "m"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("onnx")
    _onnx(root / "dynamic.onnx")
    _onnx(root / "fixed.onnx", batch_dynamic=False)
    return {"dynamic": (root / "dynamic.onnx").read_bytes(), "fixed": (root / "fixed.onnx").read_bytes()}


ONNX_CASES = [
    ("name", ONNX_OK.replace('"x"', '"input__0"'), "dynamic", "input[0] ('input__0').name", "not an input of 1/model"),
    ("dtype", ONNX_OK.replace("data_type: TYPE_FP32 dims: [ 4 ]", "data_type: TYPE_FP16 dims: [ 4 ]"), "dynamic",
     "input[0] ('x').data_type", "TYPE_FP16 differs"),
    ("rank", ONNX_OK.replace("dims: [ 4 ]", "dims: [ 4, 1 ]"), "dynamic", "input[0] ('x').dims", "rank 3"),
    ("fixed_dim", ONNX_OK.replace("dims: [ 3 ]", "dims: [ 5 ]"), "dynamic", "output[0] ('y').dims", "but 3 in"),
    ("output_name", ONNX_OK.replace('"y"', '"output__0"'), "dynamic", "output[0] ('output__0').name", "'y'"),
    ("fixed_batch", ONNX_OK, "fixed", "input[0] ('x').dims", "first axis is fixed at 2"),
    ("missing_input", ONNX_OK.replace('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', "input [ ]"),
     "dynamic", "input", "takes inputs ['x']"),
]


def test_matching_onnx_passes(tmp_path, onnx_files):
    assert _errors(_repo(tmp_path, ONNX_OK, {"1/model.onnx": onnx_files["dynamic"]})) == []
    fixed = ONNX_OK.replace("max_batch_size: 8", "max_batch_size: 0").replace("[ 4 ]", "[ 2, 4 ]").replace(
        "[ 3 ]", "[ 2, 3 ]")
    assert _errors(_repo(tmp_path / "f", fixed, {"1/model.onnx": onnx_files["fixed"]})) == []


@pytest.mark.parametrize("case, config, file, field, fragment", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_mismatch(tmp_path, onnx_files, case, config, file, field, fragment):
    _assert_reported(_errors(_repo(tmp_path, config, {"1/model.onnx": onnx_files[file]})), field, fragment)


TORCHSCRIPT = """
name: "m"
backend: "pytorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_torchscript_counts_and_names(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(4, 3).eval(), torch.randn(1, 4)), str(path))
    data = path.read_bytes()
    assert _errors(_repo(tmp_path / "ok", TORCHSCRIPT, {"1/model.pt": data})) == []
    second = '{ name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]'
    two = TORCHSCRIPT.replace("dims: [ 4 ] } ]", "dims: [ 4 ] }, " + second)
    _assert_reported(_errors(_repo(tmp_path / "two", two, {"1/model.pt": data})), "input", "takes 1 tensor argument")
    outs = TORCHSCRIPT.replace('"OUTPUT__0"', '"result"')
    _assert_reported(_errors(_repo(tmp_path / "names", outs, {"1/model.pt": data})), "output[0] ('result').name",
                     "__<index> suffix")


@pytest.mark.parametrize("source, fragment", [
    ("def broken(:\n", "does not compile"),
    ("class Other:\n    pass\n", "no class TritonPythonModel"),
    ("class TritonPythonModel:\n    def initialize(self, args):\n        pass\n", "no execute method"),
])
def test_python_model_is_checked(tmp_path, source, fragment):
    _assert_reported(_errors(_repo(tmp_path, BASE, {"1/model.py": source})), "default_model_filename", fragment)


# -------------------------------------------------------------------------- what the emitter writes for them


def _workspace(ws: Path, module: str, fmt: str, runner: str, batching: bool, out_shape: list[int]) -> Path:
    """A hand-made workspace of one graph: input [B?, 4] float32 -> output ``out_shape``, one selected runner."""
    from navdeploy.capture.graph import Graph, TensorSpec

    shape_in = [2, 4] if batching else [4]
    graph = Graph("k0", {}, {}, [TensorSpec("float32", "cpu", shape_in, [8, 4] if batching else shape_in, shape_in)],
                  [TensorSpec("float32", "cpu", out_shape, out_shape, out_shape)], batching)
    folder = ws / module / "k0" / fmt
    folder.mkdir(parents=True)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(_Sum().eval(), torch.randn(*shape_in)), str(folder / "model.pt"))
    else:
        (folder / "model.pt2").write_bytes(b"an AOTInductor package")
    candidate = {"name": runner, "runner": runner, "format": fmt, "precision": "fp32", "status": "ok",
                 "profile": [{"batch_size": 4 if batching else None, "p50_ms": 0.1, "p90_ms": 0.1, "throughput": 1e4,
                              "iterations": 10, "stable": True}]}
    manifest = {"version": 1, "fingerprint": "hand-made", "module": module, "precision": "fp32", "device": "cpu",
                "max_batch_size": 8 if batching else 1,
                "graphs": {"k0": {"graph": graph.to_json(), "selected": runner, "candidates": [candidate]}}}
    (ws / module / "manifest.json").write_text(__import__("json").dumps(manifest))
    return ws


class _Sum(nn.Module):
    def forward(self, x):
        return x.sum()


def test_unbatched_scalar_output_is_dims_1_without_reshape(tmp_path):
    from navdeploy.triton import export_model_repository
    from navdeploy.triton.validate import parse_config

    ws = _workspace(tmp_path / "ws", "total", "torchscript", "TorchScriptCPU", batching=False, out_shape=[])
    for version in ("24.10", None):
        repo = export_model_repository(tmp_path / f"repo{version}", workspace=ws, triton_version=version)
        cfg = parse_config((repo / "total" / "config.pbtxt").read_text())
        # no scalar tensors in Triton: the native backends compare ranks, so a Python-backend model reshapes
        assert cfg.backend == "python" and cfg.max_batch_size == 0
        assert list(cfg.output[0].dims) == [1] and not cfg.output[0].HasField("reshape")
        assert "SCALAR_OUTPUTS = [True]" in (repo / "total" / "1" / "model.py").read_text()
        assert _errors(repo, version) == []


def test_aoti_model_per_triton_version(tmp_path):
    from navdeploy.triton import export_model_repository
    from navdeploy.triton.validate import parse_config

    ws = _workspace(tmp_path / "ws", "lin", "torch-aoti", "TorchAOTICPU", batching=True, out_shape=[2])
    new = parse_config((export_model_repository(tmp_path / "new", workspace=ws, triton_version="26.03")
                        / "lin" / "config.pbtxt").read_text())
    assert (new.backend, new.platform, new.input[0].name, new.output[0].name) == \
        ("pytorch", "torch_aoti", "INPUT__0", "OUTPUT__0")
    old_repo = export_model_repository(tmp_path / "old", workspace=ws, triton_version="24.10")
    old = parse_config((old_repo / "lin" / "config.pbtxt").read_text())
    assert (old.backend, old.platform, old.input[0].name) == ("python", "", "input__0")
    assert sorted(p.name for p in (old_repo / "lin" / "1").iterdir()) == ["model.pt2", "model.py"]


def test_bundled_triton_serves_an_unbatched_scalar_output(tmp_path):
    """Server 2.51 (nvidia-pytriton) loads the dims [1] form and model.py sends the 0-d sum as shape [1]."""
    pytest.importorskip("pytriton")
    import numpy as np
    import tritonclient.http as httpclient

    from navdeploy.triton import TritonServer, export_model_repository

    ws = _workspace(tmp_path / "ws", "total", "torchscript", "TorchScriptCPU", batching=False, out_shape=[])
    repo = export_model_repository(tmp_path / "repo", workspace=ws, triton_version="24.10")
    server = TritonServer(repo, startup_timeout_s=120)
    server.start()
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        x = np.arange(4, dtype=np.float32)
        inp = httpclient.InferInput("input__0", [4], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer("total", [inp]).as_numpy("output__0")
        client.close()
    finally:
        server.stop()
    assert out.shape == (1,) and float(out[0]) == pytest.approx(float(x.sum()))


class _Denoise(nn.Module):
    """A diffusion UNet's call shape: latents [B, 4] and one 0-d timestep for the whole batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        return self.lin(x) * t


def test_a_batched_graph_with_a_0d_input_is_served_per_request(tmp_path):
    """A 0-d timestep has no batch axis: Triton cannot join requests that each carry their own, and the ONNX
    model takes a scalar. The model is a Python-backend one without Triton batching, the batch axis -1 in dims;
    the bundled server answers requests of two batch sizes as eager does."""
    pytest.importorskip("pytriton")
    import numpy as np
    import tritonclient.http as httpclient

    import navdeploy as nav
    from navdeploy.triton import TritonServer, export_model_repository
    from navdeploy.triton.validate import parse_config

    torch.manual_seed(0)
    eager = _Denoise().eval()
    module = nav.Module(_Denoise().eval(), name="denoise")
    module.load_state_dict(eager.state_dict())
    data = [(b, (torch.randn(b, 4), torch.tensor(float(b) / 2))) for b in (2, 3)]
    status = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path / "ws", runners=("OnnxCPU",),
                                                           pipeline_repeats=0, keep_artifacts=True))
    onnx = [c for c in status.modules["denoise"].graphs[0].candidates if c.name == "OnnxCPU"]
    assert onnx and onnx[0].verified  # the artifact served (eager may win the in-process search, or screen it out)
    repo = export_model_repository(tmp_path / "repo", workspace=tmp_path / "ws")
    cfg = parse_config((repo / "denoise" / "config.pbtxt").read_text())
    assert (cfg.backend, cfg.max_batch_size) == ("python", 0)
    assert list(cfg.input[0].dims) == [-1, 4] and list(cfg.input[1].dims) == [1]
    assert _errors(repo) == []
    server = TritonServer(repo, startup_timeout_s=120)
    server.start()
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        for batch, t in ((1, 0.5), (3, 2.0)):
            x = np.random.randn(batch, 4).astype(np.float32)
            inputs = [httpclient.InferInput("input__0", [batch, 4], "FP32"),
                      httpclient.InferInput("input__1", [1], "FP32")]
            inputs[0].set_data_from_numpy(x)
            inputs[1].set_data_from_numpy(np.array([t], dtype=np.float32))
            got = client.infer("denoise", inputs).as_numpy("output__0")
            with torch.no_grad():
                want = eager(torch.from_numpy(x), torch.tensor(t)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        client.close()
    finally:
        server.stop()
