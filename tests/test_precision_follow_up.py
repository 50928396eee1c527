"""Follow-up precisions: on a CPU that computes bf16, an fp32 module's graph whose best fp32 build is still slow
gets bf16 copies of the runners that verified, by default; the best fp32 candidate stays on record (and on disk)
as the fallback the pipeline check binds when bf16 changes what the pipeline returns."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from stand_ins import FastInBf16, SlowInBf16

import navdeploy as nav
from navdeploy.candidates.build import new_record
from navdeploy.candidates.precision import (
    FOLLOW_UP_MIN_MS,
    FOLLOW_UP_WIDE,
    cpu_computes_bf16,
    eager_copy_predicts,
    follow_up_min_ms,
    follow_up_precisions,
)
from navdeploy.candidates.search import (
    Search,
    copy_clearly_faster,
    follow_up_pairs,
    low_precision_skip_reason,
    own_precision_skip_reason,
)
from navdeploy.candidates.select import own_precision_fallback
from navdeploy.config import MinLatency
from navdeploy.formats.registry import RUNNERS
from navdeploy.optimize.module import PROFILE_ROUNDS
from navdeploy.workspace.manifest import read_manifest, write_manifest
from navdeploy.workspace.records import ProfilePoint


def test_bf16_follows_only_for_fp32_modules_on_a_bf16_cpu_when_no_precisions_are_named():
    expected = ("bf16",) if cpu_computes_bf16() else ()
    assert follow_up_precisions("fp32", "cpu", None) == expected
    assert follow_up_precisions("fp32", "cpu", ("fp32",)) == ()  # named precisions are the whole list
    assert follow_up_precisions("fp32", "cuda", None) == ()  # fp16 is a first-round candidate there
    assert follow_up_precisions("fp16", "cpu", None) == ()
    assert follow_up_precisions("int8", "cpu", None) == ()


def _record(runner: str, status: str = "ok", ms: float = 1.0, precision: str = "fp32"):
    record = replace(new_record(RUNNERS[runner], precision, "fp32"), status=status)
    return replace(record, profile=[ProfilePoint(4, ms, ms, 4e3 / ms, 10)] if status == "ok" else [])


def test_follow_up_copies_the_runners_that_verified_when_the_best_build_is_slow():
    names = ["TorchCPU", "AOTInductorCPU", "OnnxCPU", "TorchScriptCPU", "TorchExportCPU", "TorchCompileCPU"]
    pairs = [(RUNNERS[n], "fp32") for n in names]
    records = {0: _record("TorchCPU"), 1: _record("AOTInductorCPU", "screened"), 2: _record("OnnxCPU"),
               3: _record("TorchScriptCPU", "failed"), 4: _record("TorchExportCPU", "screened"),
               5: _record("TorchCompileCPU", "skipped")}
    extra = follow_up_pairs(pairs, records, ("bf16",), FOLLOW_UP_MIN_MS)
    # ONNX Runtime's CPU provider has no bf16 kernels and ExportedProgram runs eager's: neither follows; a failed
    # candidate has no copy either. torch.compile, not built because AOTInductor verified, follows as its twin
    # (the search builds it only when AOTInductorCPU[bf16] fails).
    assert [(r.name, p) for r, p in extra] == [("TorchCPU", "bf16"), ("AOTInductorCPU", "bf16"),
                                               ("TorchCompileCPU", "bf16")]
    no_twin = {**records, 1: _record("AOTInductorCPU", "failed"), 5: _record("TorchCompileCPU", "failed")}
    assert [r.name for r, _ in follow_up_pairs(pairs, no_twin, ("bf16",), 10.0)] == ["TorchCPU"]
    assert follow_up_pairs(pairs, records, ("bf16",), FOLLOW_UP_MIN_MS * 0.9) == []  # overhead-bound: none
    assert follow_up_pairs(pairs, records, ("bf16",), None) == []  # nothing won
    assert follow_up_pairs(pairs, records, (), 10.0) == []
    assert follow_up_pairs(pairs + extra, records, ("bf16",), 10.0) == []  # tried already
    # A module whose matmuls are wide gets the copies however fast its best build is.
    assert follow_up_pairs(pairs, records, ("bf16",), 0.3, min_ms=0.0) == extra


def test_wide_matmuls_get_the_follow_up_however_fast_the_call():
    from transformers import BertConfig, BertModel

    def bert(hidden: int) -> torch.nn.Module:
        return BertModel(BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=4 * hidden)).eval()

    assert FOLLOW_UP_WIDE == 192
    # 256 wide: frozen bf16 AOTInductor 0.63 of the best fp32 build at 1x12 tokens (0.66 ms); 128 wide: 1.2x slower
    # there (benchmarks/aoti_freezing_check.py, both precisions)
    assert follow_up_min_ms(bert(256)) == 0.0
    assert follow_up_min_ms(bert(128)) == FOLLOW_UP_MIN_MS
    assert follow_up_min_ms(torch.nn.Conv2d(3, 256, 3)) == FOLLOW_UP_MIN_MS  # no matmuls


def test_follow_up_copies_are_not_built_where_eager_gains_nothing_in_that_precision():
    search = Search(thorough=False, screens=True, batch=4)
    eager, compiled = RUNNERS["TorchCPU"], RUNNERS["AOTInductorCPU"]
    own = _record("TorchCPU", ms=5.0)
    slower = replace(_record("TorchCPU", ms=5.8, precision="bf16"), status="screened",
                     screen=ProfilePoint(4, 5.8, 5.8, 4e3 / 5.8, 10))
    reason = low_precision_skip_reason(compiled, own, slower, search)
    assert reason and reason.startswith("not built: TorchCPU[bf16] was 16% slower than TorchCPU (5.800 against 5.000")
    assert "thorough=True" in reason
    faster = replace(slower, screen=ProfilePoint(4, 4.0, 4.0, 1e3, 10))
    assert low_precision_skip_reason(compiled, own, faster, search) is None
    # As fast, or slower within the margin (screens in turns differ by a few %): built.
    barely = replace(slower, screen=ProfilePoint(4, 5.1, 5.1, 1e3, 10))
    assert low_precision_skip_reason(compiled, own, barely, search) is None
    assert low_precision_skip_reason(eager, own, slower, search) is None  # eager's copy is the measure itself
    assert low_precision_skip_reason(compiled, own, None, search) is None  # not measured: built
    assert low_precision_skip_reason(compiled, own, replace(slower, status="failed"), search) is None
    assert low_precision_skip_reason(compiled, own, slower, replace(search, thorough=True)) is None
    assert low_precision_skip_reason(compiled, own, slower, search, predicted=False) is None


def test_the_module_own_builds_are_skipped_where_eager_copy_is_clearly_faster_and_their_copy_verified():
    search = Search(thorough=False, screens=True, batch=4)
    eager, compiled, twin = RUNNERS["TorchCPU"], RUNNERS["AOTInductorCPU"], RUNNERS["TorchCompileCPU"]
    own = _record("TorchCPU", ms=5.0)

    def eager_copy(ms: float):
        return replace(_record("TorchCPU", ms=ms, precision="bf16"), status="screened",
                       screen=ProfilePoint(4, ms, ms, 4e3 / ms, 10))

    faster, copy = eager_copy(4.0), _record("AOTInductorCPU", "screened", precision="bf16")
    assert copy_clearly_faster(own, faster, search)
    reason = own_precision_skip_reason(compiled, copy, own, faster, search)
    assert reason and reason.startswith("not built: TorchCPU[bf16] was 20% faster than TorchCPU (4.000 against 5.000")
    assert "AOTInductorCPU[bf16] verified" in reason and "thorough=True" in reason
    # torch.compile's copy is not built beside AOTInductor's: AOTInductor's copy stands for it too.
    assert own_precision_skip_reason(twin, copy, own, faster, search)
    # Faster within the margin (screens in turns differ by a few %), or slower: built.
    barely = eager_copy(4.5)
    assert not copy_clearly_faster(own, barely, search)
    assert own_precision_skip_reason(compiled, copy, own, barely, search) is None
    assert own_precision_skip_reason(compiled, copy, own, eager_copy(6.0), search) is None
    assert own_precision_skip_reason(compiled, replace(copy, status="failed"), own, faster, search) is None
    assert own_precision_skip_reason(compiled, None, own, faster, search) is None  # no copy: built
    assert own_precision_skip_reason(eager, faster, own, faster, search) is None  # eager is the baseline
    assert own_precision_skip_reason(compiled, copy, own, None, search) is None  # eager's copy not screened
    assert own_precision_skip_reason(compiled, copy, own, faster, replace(search, thorough=True)) is None


def test_eager_copy_does_not_predict_a_frozen_build_of_a_matmul_module():
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    bert = BertModel(BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=512)).eval()
    unet_like = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3), torch.nn.Conv2d(32, 32, 3), torch.nn.Flatten(),
                                    torch.nn.Linear(32, 32))
    vit = ViTModel(ViTConfig(image_size=32, patch_size=16, num_hidden_layers=1, hidden_size=192,
                             num_attention_heads=3, intermediate_size=768))
    aoti, script = RUNNERS["AOTInductorCPU"], RUNNERS["TorchScriptCPU"]
    # BERT 128 wide: eager bf16 3-11% slower than eager fp32, the frozen AOTInductor bf16 build 21% faster than
    # AOTInductor fp32; its bf16 linear layers reorder their weights every call, a frozen build prepacks them once.
    assert not eager_copy_predicts(aoti, bert, "bf16")
    assert not eager_copy_predicts(aoti, vit, "bf16")  # its patch convolution is a small share of its weights
    assert eager_copy_predicts(script, bert, "bf16")  # eager's kernels, unpacked, as eager's copy
    assert eager_copy_predicts(aoti, unet_like, "bf16")  # convolutions: eager's copy predicted them on the SD UNet
    assert eager_copy_predicts(aoti, bert, "fp32")  # a 128-wide fp32 build does not freeze


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_a_graph_whose_eager_gains_nothing_in_bf16_gets_no_compiled_bf16_copies(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).eval()
    model = nav.Module(SlowInBf16(layers), name="follow_up_slow_bf16", batching=False)
    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(lambda x: model(x), items, _config(tmp_path, pipeline_repeats=0))
    records = {c.name: c for c in status.modules["follow_up_slow_bf16"].graphs[0].candidates}
    assert records["TorchCPU[bf16]"].verified, records["TorchCPU[bf16]"]
    copy = records["TorchScriptCPU[bf16]"]
    assert copy.status == "skipped" and copy.error.startswith("not built: TorchCPU[bf16] was "), copy
    assert not copy.times  # never sent to a worker


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
@pytest.mark.parametrize("broken_copy", [False, True], ids=["copy_verifies", "copy_fails"])
def test_a_graph_whose_eager_is_clearly_faster_in_bf16_builds_its_copies_in_place_of_its_own(tmp_path, broken_copy):
    """Eager's bf16 copy, screened in turns with eager, runs clearly faster: TorchScript's fp32 build waits for its
    bf16 copy and is not built once that verifies; where the copy fails verification, it is built after all."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).eval()
    name = f"follow_up_fast_bf16_{int(broken_copy)}"
    model = nav.Module(FastInBf16(layers, broken_bf16_trace=broken_copy), name=name, batching=False)
    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(lambda x: model(x), items, _config(tmp_path, pipeline_repeats=0))
    records = {c.name: c for c in status.modules[name].graphs[0].candidates}
    log = (status.modules[name].folder / "navdeploy.log").read_text()
    assert "screens in turns" in log, log[-3000:]
    own, copy = records["TorchScriptCPU"], records["TorchScriptCPU[bf16]"]
    if broken_copy:
        assert copy.status == "failed" and copy.step == "verify", copy
        assert own.verified, own  # built after all: the copy stands for nothing
        assert own.window.start >= copy.window.end, (own.window, copy.window)  # after the copy, on its chain
    else:
        assert copy.verified, copy
        assert own.status == "skipped" and own.error.startswith("not built: TorchCPU[bf16] was "), own
        assert "TorchScriptCPU[bf16] verified" in own.error and not own.times, own  # never sent to a worker
        # Run again on the same workspace: decided again from the records the manifest keeps, and skipped again.
        with torch.no_grad():
            again = nav.optimize(lambda x: model(x), items, _config(tmp_path, pipeline_repeats=0))
        records = {c.name: c for c in again.modules[name].graphs[0].candidates}
        assert records["TorchScriptCPU"].status == "skipped", records["TorchScriptCPU"]
        assert records["TorchScriptCPU[bf16]"].cached, records["TorchScriptCPU[bf16]"]


def test_the_fallback_is_the_best_candidate_in_the_modules_own_precision():
    eager, aoti, onnx = _record("TorchCPU", ms=5.0), _record("AOTInductorCPU", ms=4.0), _record("OnnxCPU", ms=4.5)
    bf16 = _record("TorchScriptCPU", ms=2.0, precision="bf16")
    candidates = [eager, aoti, onnx, bf16]
    assert own_precision_fallback(candidates, bf16, "fp32", MinLatency(), 4, "TorchCPU") is aoti
    assert own_precision_fallback(candidates, aoti, "fp32", MinLatency(), 4, "TorchCPU") is None  # fp32 won
    assert own_precision_fallback([eager, bf16], bf16, "fp32", MinLatency(), 4, "TorchCPU") is eager


def _compute_bound(name: str) -> tuple[torch.nn.Module, nav.Module]:
    """Four 1024-wide layers, called at 64 rows: ~4 ms a call in fp32 on 2 cores, well past FOLLOW_UP_MIN_MS;
    (the plain layers, the wrapped module)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).eval()
    return layers, nav.Module(layers, name=name, batching=False)


def _config(workspace, **overrides) -> nav.OptimizeConfig:
    return nav.OptimizeConfig(runners=("TorchCPU", "TorchScriptCPU"), profile_time_s=0.2, workspace=workspace,
                              **overrides)


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_a_compute_bound_module_gets_bf16_copies_by_default_and_keeps_its_fp32_fallback(tmp_path):
    _, model = _compute_bound("follow_up_mlp")
    config = _config(tmp_path, keep_artifacts=False, pipeline_repeats=3)
    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(lambda x: model(x), items, config)
    module = status.modules["follow_up_mlp"]
    (graph,) = module.graphs
    names = {c.name for c in graph.candidates}
    assert {"TorchCPU[bf16]", "TorchScriptCPU[bf16]"} <= names, names
    assert "bf16" in module.tolerances  # the copies were checked at bf16's tolerance
    manifest = read_manifest(tmp_path / "follow_up_mlp")
    (entry,) = manifest.graphs.values()
    winner = entry.selected_candidate()
    assert winner is not None and winner.precision == "bf16", [(c.name, c.shown_p50_ms()) for c in graph.candidates]
    fallback = entry.fallback_candidate()
    assert fallback is not None and fallback.precision == "fp32"
    # The two figures compared were taken in turns: a burst during one profile cannot decide between them.
    log = (tmp_path / "follow_up_mlp" / "navdeploy.log").read_text()
    assert re.search(rf"{re.escape(winner.name)}: full profile ok, {PROFILE_ROUNDS} rounds in turns with [^\n]*"
                     rf"{re.escape(fallback.name)}(?:, |$)", log, re.M), log[-3000:]
    if fallback.runner == "TorchScriptCPU":  # its build stays on disk although pruning removes the others'
        assert entry.formats[fallback.artifact_dir("fp32")].status == "ok"
    # The pipeline returns floats within bf16's tolerance of eager's: the bf16 winner stays in use.
    assert status.pipeline is not None and status.pipeline.outputs.ok and not status.pipeline.fell_back
    assert status.in_use()["follow_up_mlp"] == [winner.name]


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_a_bf16_winner_that_changes_the_pipelines_integers_gives_way_to_its_fp32_fallback(tmp_path):
    layers, model = _compute_bound("follow_up_ints")
    config = _config(tmp_path, pipeline_repeats=3)

    def pipeline(x):
        return (model(x) * 100).round().long()  # bf16's rounding moves many of these integers

    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(pipeline, items, config)
    timing = status.pipeline
    assert timing is not None and list(timing.fell_back) == ["follow_up_ints"], timing
    assert "int64 values differ from eager" in timing.fell_back["follow_up_ints"]
    manifest = read_manifest(tmp_path / "follow_up_ints")
    (entry,) = manifest.graphs.values()
    assert entry.selected_candidate().precision == "fp32" and entry.fallback is None
    assert manifest.fell_back == timing.fell_back["follow_up_ints"]
    (graph,) = status.modules["follow_up_ints"].graphs
    assert graph.selected == entry.selected  # the status names what runs now
    if entry.selected == "TorchCPU":  # eager is its best fp32 candidate: nothing is left to time against eager
        assert timing.optimized_s is None and not status.modules["follow_up_ints"].optimized
        assert status.in_use() == {"follow_up_ints": ["eager"]}
    elif "follow_up_ints" in timing.reverted:  # its fp32 build, timed, was no faster than eager: eager it is
        assert "not faster than eager" in timing.reverted["follow_up_ints"]
        assert status.in_use() == {"follow_up_ints": ["eager"]}
    else:
        assert status.in_use() == {"follow_up_ints": [entry.selected]}
    x = items[1][1]
    with torch.no_grad():
        assert torch.equal(pipeline(x), (layers(x) * 100).round().long())


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_a_bf16_winner_is_served_by_tritonserver_with_fp32_io_and_validates_natively(tmp_path):
    pytest.importorskip("pytriton")
    import tritonclient.http as httpclient

    from navdeploy.triton import TritonServer, export_model_repository, validate_repository
    from navdeploy.triton.validate import parse_config

    layers, model = _compute_bound("follow_up_served")
    config = _config(tmp_path / "ws", pipeline_repeats=0)
    x = torch.randn(64, 1024)
    with torch.no_grad():
        status = nav.optimize(lambda t: model(t), [(1, x), (1, torch.randn(64, 1024))], config)
    assert status.selected()["follow_up_served"][0].endswith("[bf16]")
    # Eager bf16 and TorchScript bf16 run the same kernels here: which one wins is noise. The test serves the
    # TorchScript build, chosen as a user may choose it by hand.
    folder = tmp_path / "ws" / "follow_up_served"
    manifest = read_manifest(folder)
    for entry in manifest.graphs.values():
        assert {c.name: c for c in entry.candidates}["TorchScriptCPU[bf16]"].verified
        entry.selected = "TorchScriptCPU[bf16]"
    write_manifest(folder, manifest)
    # The native repository: TorchScript in bf16 takes and returns bf16 (Triton's pytorch backend casts nothing).
    native = export_model_repository(tmp_path / "native", workspace=tmp_path / "ws")
    validate_repository(native)
    cfg = parse_config((native / "follow_up_served" / "config.pbtxt").read_text())
    assert cfg.backend == "pytorch" and {i.data_type for i in cfg.input} == {cfg.input[0].data_type}
    assert "BF16" in str(cfg.input[0]) + str(cfg.output[0])
    # The Python-backend repository keeps the module's fp32 I/O: model.py casts around the bf16 build.
    repo = export_model_repository(tmp_path / "python", backend="python", workspace=tmp_path / "ws")
    server = TritonServer(repo, startup_timeout_s=120)
    try:
        server.start()
        client = httpclient.InferenceServerClient(server.http_url)
        request = httpclient.InferInput("input__0", list(x.shape), "FP32")
        request.set_data_from_numpy(x.numpy())
        served = client.infer("follow_up_served", [request]).as_numpy("output__0")
    finally:
        server.stop()
    with torch.no_grad():
        eager = layers(x).numpy()
    assert served.dtype == np.float32 and served.shape == eager.shape
    np.testing.assert_allclose(served, eager, atol=5e-2, rtol=5e-2)  # bf16's tolerance, as it was verified
    assert np.abs(served - eager).max() > 1e-5  # the bf16 build served it, not an fp32 one


def test_a_low_precision_winner_must_beat_its_own_precision_by_a_margin():
    from navdeploy.candidates.select import PRECISION_MARGIN, prefer_own_precision

    fp32 = _record("TorchScriptCPU", ms=2.333)
    tie = _record("TorchScriptCPU", ms=2.330, precision="bf16")
    clear = _record("TorchScriptCPU", ms=2.333 / (1 + 2 * PRECISION_MARGIN), precision="bf16")

    def latency(record):
        return record.profile[0].p50_ms

    assert prefer_own_precision(tie, fp32, latency) == (fp32, None)  # a tie keeps the module's own precision
    assert prefer_own_precision(clear, fp32, latency) == (clear, fp32)
    assert prefer_own_precision(fp32, None, latency) == (fp32, None)
    assert prefer_own_precision(None, None, latency) == (None, None)


def test_adding_a_precision_reuses_the_candidates_both_runs_try(tmp_path):
    """Switching precisions (("fp32",) to ("fp32", "bf16"), or the default's follow-ups) keeps the graph's cached
    fp32 candidates; a change of tolerance still builds everything again."""
    torch.manual_seed(0)
    model = nav.Module(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval(), name="precisions_cache")
    base = dict(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU"), batch_sizes=(1, 2), max_batch_size=2,
                profile_time_s=0.05, pipeline_repeats=0)
    items = [(2, torch.randn(2, 16))]

    def candidates(**config) -> dict:
        with torch.no_grad():
            status = nav.optimize(lambda x: model(x), items, nav.OptimizeConfig(**base, **config))
        return {c.name: c for c in status.modules["precisions_cache"].graphs[0].candidates}

    first = candidates(precisions=("fp32",))
    assert set(first) == {"TorchCPU", "TorchScriptCPU"}
    more = candidates(precisions=("fp32", "bf16"))
    for name in ("TorchCPU", "TorchScriptCPU"):
        # Reused, not built again. A cached leader may still be profiled again, in turns with the new leaders
        # (status keeps "ok", cached turns False), so the build's own figures are what tell.
        assert more[name].verified and more[name].artifact_checksum == first[name].artifact_checksum
        assert more[name].times.get("export_s") == first[name].times.get("export_s"), (name, more[name].times)
    assert first["TorchScriptCPU"].times.get("export_s")  # so the line above compares a real export
    assert "TorchScriptCPU[bf16]" in more and not more["TorchScriptCPU[bf16]"].cached
    stricter = candidates(precisions=("fp32",), tolerances={"atol": 1e-6, "rtol": 1e-6})
    assert not any(c.cached for c in stricter.values())
    assert stricter["TorchScriptCPU"].times.get("export_s") != first["TorchScriptCPU"].times.get("export_s")  # rebuilt
