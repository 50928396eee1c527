"""validate-repo on hand-written repositories: Triton's protobuf parse plus the rules Triton's core applies."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("tritonclient.grpc")

from navdeploy.cli import app
from navdeploy.triton import validate_repository

GOOD = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "input__0" data_type: TYPE_FP32 dims: [ 3, -1 ] }} ]
output [ {{ name: "output__0" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ preferred_batch_size: [ 2, 4 ] }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


MODEL_PY = """
class TritonPythonModel:
    def execute(self, requests):
        return []
"""


def _model(repo: Path, name: str, config: str, version: bool = True, folder: str = None) -> Path:
    path = repo / (folder or name)
    path.mkdir(parents=True)
    (path / "config.pbtxt").write_text(config)
    if version:
        (path / "1").mkdir()
        (path / "1" / "model.py").write_text(MODEL_PY)
    return path


def _validate(repo: Path, *args: str):
    result = CliRunner().invoke(app, ["validate-repo", str(repo), "--target", "cpu", *args])
    return result.exit_code, result.output


def test_hand_written_good_repository_passes(tmp_path):
    _model(tmp_path, "good", GOOD.format(name="good"))
    code, out = _validate(tmp_path)
    assert code == 0, out
    assert "ok" in out and "good" in out


@pytest.mark.parametrize("case, config, expected", [
    ("wrong_enum", GOOD.replace("KIND_CPU", "KIND_CPUU"), ["config.pbtxt", "KIND_CPUU"]),
    ("wrong_type", GOOD.replace("data_type: TYPE_FP32 dims: [ 10 ]", "data_type: TYPE_FLOAT32 dims: [ 10 ]"),
     ["TYPE_FLOAT32"]),
    ("unknown_field", GOOD.replace("max_batch_size: 8", "max_batch_size: 8\nmax_batch: 3"), ["max_batch"]),
    ("dims_zero", GOOD.replace("dims: [ 3, -1 ]", "dims: [ 3, 0 ]"), ["input[0]", "dims", "contains 0", "-1"]),
    ("dims_empty", GOOD.replace("dims: [ 10 ]", "dims: [ ]"), ["output[0]", "dims is empty"]),
    ("preferred_gt_max", GOOD.replace("[ 2, 4 ]", "[ 2, 16 ]"), ["preferred_batch_size", "16", "max_batch_size=8"]),
    ("batching_without_max", GOOD.replace("max_batch_size: 8", "max_batch_size: 0"),
     ["dynamic_batching", "max_batch_size > 0"]),
    ("gpu_on_cpu", GOOD.replace("KIND_CPU", "KIND_GPU"), ["instance_group[0].kind", "KIND_GPU", "KIND_CPU"]),
    # python ignores any platform (Triton checks the pair only for the backends it knows): this pair it refuses
    ("bad_pair", GOOD.replace('backend: "python"', 'backend: "onnxruntime"\nplatform: "pytorch_libtorch"'),
     ["platform", "'onnxruntime' does not serve platform 'pytorch_libtorch'", 'platform "onnxruntime_onnx"']),
])
def test_broken_config_is_rejected(tmp_path, case, config, expected):
    _model(tmp_path, case, config.format(name=case))
    code, out = _validate(tmp_path)
    assert code == 1, out
    assert "error" in out and case in out
    for fragment in expected:
        assert fragment in out, (fragment, out)
    assert "Fix:" in out


def test_missing_version_folder_is_rejected(tmp_path):
    _model(tmp_path, "noversion", GOOD.format(name="noversion"), version=False)
    code, out = _validate(tmp_path)
    assert code == 1
    assert "version folder" in out and "noversion/1/" in out


def test_missing_model_file_is_rejected(tmp_path):
    path = _model(tmp_path, "nofile", GOOD.format(name="nofile"))
    (path / "1" / "model.py").unlink()
    code, out = _validate(tmp_path)
    assert code == 1
    assert "model.py does not exist" in out


def test_name_mismatch_is_rejected(tmp_path):
    _model(tmp_path, "other_name", GOOD.format(name="other_name"), folder="folder_name")
    code, out = _validate(tmp_path)
    assert code == 1
    assert "'other_name' differs from the folder name 'folder_name'" in out
    assert 'name: "folder_name"' in out


def test_every_problem_is_reported_and_gpu_target_allows_kind_gpu(tmp_path):
    bad = GOOD.replace("KIND_CPU", "KIND_GPU").replace("dims: [ 3, -1 ]", "dims: [ 0 ]")
    _model(tmp_path, "two", bad.format(name="two"))
    problems = validate_repository(tmp_path, target="cpu")
    assert {p.field for p in problems} >= {"input[0] ('input__0').dims", "instance_group[0].kind"}
    fields = {p.field for p in validate_repository(tmp_path, target="gpu")}
    assert "instance_group[0].kind" not in fields and "input[0] ('input__0').dims" in fields


def test_ensemble_rules(tmp_path):
    _model(tmp_path, "step", GOOD.format(name="step"))
    ensemble = """
name: "pipe"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 10 ] } ]
ensemble_scheduling { step [ { model_name: "step" model_version: -1
  input_map { key: "input__0" value: "IN" } output_map { key: "output__0" value: "OUT" } } ] }
"""
    _model(tmp_path, "pipe", ensemble, version=False)
    (tmp_path / "pipe" / "1").mkdir()
    assert validate_repository(tmp_path, target="cpu") == []
    (tmp_path / "pipe" / "config.pbtxt").write_text(ensemble.replace('model_name: "step"', 'model_name: "missing"')
                                                   .replace('value: "OUT"', 'value: "ELSEWHERE"'))
    code, out = _validate(tmp_path)
    assert code == 1
    assert "'missing' is not in the repository" in out and "no step produces" in out


def test_not_a_repository(tmp_path):
    code, out = _validate(tmp_path / "absent")
    assert code == 1 and "does not exist" in out
    code, out = _validate(tmp_path)
    assert code == 1 and "holds no model folders" in out


def test_backend_is_inferred_from_the_version_folder_like_triton(tmp_path):
    """No backend and no platform: Triton's auto-complete takes the backend from the first version folder's file."""
    _model(tmp_path, "inferred", GOOD.format(name="inferred").replace('backend: "python"', ""))
    problems = validate_repository(tmp_path, target="cpu")
    assert [p.severity for p in problems] == ["warning"] and "infers backend 'python'" in problems[0].message
    (tmp_path / "inferred" / "1" / "model.py").unlink()
    code, out = _validate(tmp_path)
    assert code == 1 and "neither backend nor platform" in out and "Fix:" in out


def test_cli_triton_version(tmp_path):
    aoti = GOOD.replace('backend: "python"', 'backend: "pytorch"\nplatform: "torch_aoti"').replace(
        "input__0", "INPUT__0").replace("output__0", "OUTPUT__0")
    path = _model(tmp_path, "aoti", aoti.format(name="aoti"))
    (path / "1" / "model.pt2").write_bytes(b"pt2")
    code, out = _validate(tmp_path, "--triton-version", "26.03")
    assert code == 0, out
    code, out = _validate(tmp_path, "--triton-version", "24.10")
    assert code == 1 and "does not know platform 'torch_aoti'" in out and "Fix:" in out
    code, out = _validate(tmp_path, "--triton-version", "1.0")
    assert code == 2 and "unknown Triton version" in out
