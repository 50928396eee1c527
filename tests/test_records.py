"""Typed workspace records: JSON round trips (old manifests still load), the selected candidate found by its
candidate name in ``navdeploy status`` and the console table, and each format's Triton mapping."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from navdeploy.capture.graph import Graph, TensorSpec
from navdeploy.cli import app
from navdeploy.formats.base import Format
from navdeploy.formats.registry import FORMATS, RUNNERS
from navdeploy.optimize.status import GraphStatus, ModuleStatus, OptimizeStatus
from navdeploy.report.console import status_tables
from navdeploy.workspace.manifest import load_manifest, write_manifest
from navdeploy.workspace.records import CandidateRecord, FormatState, GraphEntry, Manifest, ProfilePoint


def _graph() -> Graph:
    spec = TensorSpec("float32", "cuda", [1, 8], [1, 8], [1, 8])
    return Graph("g0", {"t": "tensor"}, {"t": "tensor"}, [spec], [spec], batching=True, calls=1)


def _fp16_winner_entry() -> GraphEntry:
    """TensorRT in fp32 and fp16, the fp16 one (a candidate name that is not a runner name) the winner."""
    eager = CandidateRecord("TorchCUDA", "TorchCUDA", "torch", "fp32", "cuda", status="ok",
                            profile=[ProfilePoint(1, 2.5, 2.7, 400.0, 10, True)])
    fp32 = CandidateRecord("TensorRT", "TensorRT", "trt", "fp32", "cuda", status="ok",
                           profile=[ProfilePoint(1, 1.25, 1.3, 800.0, 10, True)])
    fp16 = CandidateRecord("TensorRT[fp16]", "TensorRT", "trt", "fp16", "cuda", status="ok",
                           profile=[ProfilePoint(1, 0.625, 0.7, 1600.0, 10, True)])
    formats = {"trt": FormatState("ok", "abc", 1.0), "trt-fp16": FormatState("ok", "def", 1.0)}
    return GraphEntry(_graph(), "key", formats, [eager, fp32, fp16], selected="TensorRT[fp16]",
                      updated="2024-01-01T00:00:00")


def _manifest(entry: GraphEntry) -> Manifest:
    return Manifest("records_mod", "fp", "cuda", navdeploy="0", torch="0", class_name="x.Y", batch_sizes=[1],
                    tolerances={"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2)}, graphs={"g0": entry},
                    updated="2024-01-01T00:00:00")


def test_records_round_trip_through_the_manifest_on_disk(tmp_path):
    manifest = _manifest(_fp16_winner_entry())
    write_manifest(tmp_path, manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    # The manifest format's JSON keys, in the order navdeploy writes them.
    assert list(data) == ["version", "navdeploy", "torch", "module", "class", "fingerprint", "device", "precision",
                          "forward_func", "max_batch_size", "batch_sizes", "tolerances", "graphs", "updated"]
    entry = data["graphs"]["g0"]
    assert list(entry) == ["graph", "cache_key", "formats", "candidates", "selected", "updated"]
    assert entry["formats"]["trt"] == {"status": "ok", "checksum": "abc", "export_s": 1.0}
    record = entry["candidates"][2]
    assert record["profile"] == [{"batch_size": 1, "p50_ms": 0.625, "p90_ms": 0.7, "throughput": 1600.0,
                                  "iterations": 10, "stable": True}]
    assert "pid" not in record and "window" not in record and "cached" not in record  # unset: not written
    loaded, problem = load_manifest(tmp_path)
    assert problem is None and loaded == manifest
    assert loaded.graphs["g0"].selected_candidate().name == "TensorRT[fp16]"


def test_a_fallback_and_a_fall_back_round_trip_and_a_bad_fallback_is_refused(tmp_path):
    entry = _fp16_winner_entry()
    entry.fallback = "TensorRT"
    manifest = _manifest(entry)
    manifest.fell_back = "the pipeline's outputs differ"
    write_manifest(tmp_path, manifest)
    loaded, problem = load_manifest(tmp_path)
    assert problem is None and loaded == manifest and loaded.graphs["g0"].fallback_candidate().precision == "fp32"
    for bad in ("TensorRT[fp16]", "OnnxCPU"):  # the selected one itself, or none of the candidates
        data = json.loads((tmp_path / "manifest.json").read_text())
        data["graphs"]["g0"]["fallback"] = bad
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        loaded, problem = load_manifest(tmp_path)
        assert loaded is None and "'fallback' names" in problem


def test_old_records_without_name_or_precision_still_load():
    old = {"runner": "OnnxCPU", "format": "onnx", "status": "failed", "error": "export: boom", "cached": True,
           "profile": [{"batch_size": 2, "p50_ms": 1.0, "throughput": 2000.0}]}
    record = CandidateRecord.from_json(old)
    assert record.name == "OnnxCPU" and record.precision is None and record.cached
    assert record.precision_in("fp16") == "fp16" and record.artifact_dir("fp16") == "onnx"
    assert record.profile[0].p90_ms == 1.0 and record.profile[0].iterations == 0
    assert "precision" not in record.to_json()  # not invented on the way back


def test_status_command_shows_an_fp16_winner(tmp_path):
    """The selected candidate is found by its candidate name: ``TensorRT[fp16]`` is not the runner's name."""
    write_manifest(tmp_path / "records_mod", _manifest(_fp16_winner_entry()))
    result = CliRunner().invoke(app, ["status", "-w", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if "records_mod" in line]
    assert "TensorRT[fp16]" in row and "0.625" in row and "2.500" in row, row  # the winner's p50 and eager's
    assert "1.250" not in row  # not the fp32 TensorRT record's
    assert "3/3" in row


def test_status_command_says_a_module_fell_back_to_its_own_precision(tmp_path):
    entry = _fp16_winner_entry()
    entry.selected = "TensorRT"  # as the pipeline check leaves it: the fp32 fallback selected
    manifest = _manifest(entry)
    manifest.fell_back = "with it optimized the pipeline's outputs differ from eager"
    write_manifest(tmp_path / "records_mod", manifest)
    result = CliRunner().invoke(app, ["status", "-w", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if "records_mod" in line and "TensorRT" in line]
    assert "1.250" in row  # the fp32 build's p50
    assert "records_mod runs its best fp32 candidates" in " ".join(result.output.split())


def test_console_table_stars_an_fp16_winner():
    entry = _fp16_winner_entry()
    graph = GraphStatus("g0", entry.selected, entry.candidates, batching=True)
    assert graph.selected_candidate().precision == "fp16"
    assert graph.candidate("TensorRT[fp16]").precision == "fp16" and graph.candidate("TensorRT").precision == "fp32"
    status = OptimizeStatus({"records_mod": ModuleStatus("records_mod", Path("."), "cuda", [graph], True, 1.0)})
    console = Console(record=True, width=200)
    for table in status_tables(status):
        console.print(table)
    lines = console.export_text().splitlines()
    starred = [line for line in lines if "★" in line]
    assert len(starred) == 1 and "TensorRT[fp16]" in starred[0] and "0.625" in starred[0], lines


def test_every_format_file_holds_its_triton_mapping():
    """What emit.py reads instead of matching format and runner names."""
    native = {f.value: (spec.triton.backend, spec.triton.platform) for f, spec in FORMATS.items()
              if spec.triton.backend is not None}
    assert native == {"onnx": ("onnxruntime", "onnxruntime_onnx"), "torchscript": ("pytorch", "pytorch_libtorch"),
                      "torch-aoti": ("pytorch", "torch_aoti"), "trt": ("tensorrt", "tensorrt_plan")}
    loadable = sorted((spec.triton.python_preference, f.value) for f, spec in FORMATS.items()
                      if spec.triton.python_preference is not None)
    assert [f for _, f in loadable] == ["torch-exportedprogram", "torchscript", "onnx", "torch-aoti"]
    assert FORMATS[Format.ONNX].triton.io_names == "onnx-file"
    assert FORMATS[Format.TORCHSCRIPT].triton.io_names == "INPUT__N"
    assert [f for f, spec in FORMATS.items() if spec.triton.copy_artifact_only] == [Format.TENSORRT]
    accelerated = {r.name: r.triton.accelerator for r in RUNNERS.values() if r.triton.accelerator}
    assert accelerated == {"OnnxCUDA": "cuda", "OnnxTensorRT": "tensorrt"}
    assert [r.name for r in RUNNERS.values() if r.triton.cuda_graphs] == ["TorchCompileCUDAGraphs"]
