"""The pipeline check's output comparison: what the user's callable returns, eager against optimized. A module
whose runner passes its own check but changes what the pipeline returns (a token, a label) goes back to eager."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import navdeploy as nav
from navdeploy.inplace.binding import bind
from navdeploy.optimize.never_slower import check_outputs, check_pipeline
from navdeploy.optimize.outputs import Leaves, Tolerance, _walk, compare_leaves
from navdeploy.optimize.status import PipelineTiming
from navdeploy.report.console import pipeline_lines
from navdeploy.workspace.manifest import read_manifest, write_manifest


def _leaves(value) -> Leaves:
    out = Leaves()
    _walk(value, "out", out)
    return out


def test_integer_outputs_compare_exactly_and_floats_within_tolerance():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert compare_leaves(_leaves(tokens), _leaves(tokens.clone()), Tolerance()).ok
    changed = tokens.clone()
    changed[1, 2] = 7
    check = compare_leaves(_leaves(tokens), _leaves(changed), Tolerance())
    assert check.checked and not check.ok and "1 of 6 int64 values differ" in check.reason
    x = torch.randn(3, 4)
    assert compare_leaves(_leaves({"a": x, "n": 2.0}), _leaves({"a": x + 1e-6, "n": 2.0}), Tolerance()).ok
    check = compare_leaves(_leaves({"a": x}), _leaves({"a": x + 1e-2}), Tolerance())
    assert not check.ok and "out['a']" in check.reason and check.max_abs_err == pytest.approx(1e-2, rel=1e-3)
    check = compare_leaves(_leaves((x, "label")), _leaves((x, "other")), Tolerance())
    assert not check.ok and "out[1]" in check.reason
    check = compare_leaves(_leaves([x]), _leaves([x, x]), Tolerance())
    assert not check.ok and "structure" in check.reason
    check = compare_leaves(_leaves({"a": x, "b": x}), _leaves({"b": x, "a": x}), Tolerance())
    assert not check.ok and "the same leaves in another order" in check.reason


def test_images_may_differ_by_a_rounding_step():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert compare_leaves(_leaves([image]), _leaves([image + 1]), Tolerance()).ok
    check = compare_leaves(_leaves([image]), _leaves([image + 3]), Tolerance())
    assert not check.ok and "48 of 48 uint8 values differ by more than 1 (up to 3)" in check.reason
    assert compare_leaves(_leaves([image]), _leaves([image + 3]), Tolerance(5e-2, 5e-2, low=True)).ok
    from PIL import Image

    pil = Image.fromarray(image)
    assert compare_leaves(_leaves([pil]), _leaves([Image.fromarray(image + 1)]), Tolerance()).ok
    assert not compare_leaves(_leaves([pil]), _leaves([Image.fromarray(image + 9)]), Tolerance()).ok


def test_model_outputs_are_walked_by_field_and_other_objects_counted():
    from transformers.modeling_outputs import SequenceClassifierOutput

    logits = torch.randn(2, 3)
    out = _leaves(SequenceClassifierOutput(logits=logits))
    assert [p for p, _ in out.items] == ["out['logits']"]
    other = _leaves([logits, object()])
    assert other.skipped == 1
    check = compare_leaves(_leaves([object()]), _leaves([object()]), Tolerance())
    assert not check.checked and "nothing to compare" in check.note


def _two_modules(tmp_path, tag: str):
    """A pipeline that turns floats into integers: ``enc`` bound to its bf16 copy (within bf16 tolerance on its
    own, yet it changes the integers), ``head`` to TorchScript in fp32 (it does not)."""
    torch.manual_seed(0)
    enc = nav.Module(torch.nn.Linear(8, 8).eval(), name=f"enc_{tag}")
    head = nav.Module(torch.nn.Linear(8, 8).eval(), name=f"head_{tag}")
    config = nav.OptimizeConfig(runners=("TorchCPU", "TorchScriptCPU"), precisions=("fp32", "bf16"),
                                batch_sizes=(4,), max_batch_size=4, profile_time_s=0.02, workspace=tmp_path,
                                use_multiprocessing=False, pipeline_repeats=0, thorough=True)

    def pipeline(x):
        return (head(enc(x)) * 1000).round().long()

    items = [(4, torch.randn(4, 8)), (4, torch.randn(4, 8))]
    with torch.no_grad():
        status = nav.optimize(pipeline, items, config)
    for module, chosen in ((enc, "TorchCPU[bf16]"), (head, "TorchScriptCPU")):
        folder = tmp_path / module.name
        manifest = read_manifest(folder)
        for entry in manifest.graphs.values():
            assert {c.name: c for c in entry.candidates}[chosen].verified
            entry.selected = chosen
        manifest.reverted = None
        write_manifest(folder, manifest)
        assert bind(module, folder) and module.is_optimized
    folders = {m.name: tmp_path / m.name for m in (enc, head)}
    tolerances = {enc.name: Tolerance(5e-2, 5e-2, True), head.name: Tolerance()}
    return enc, head, pipeline, items, folders, tolerances, status


def test_a_module_that_changes_the_pipelines_integers_goes_back_to_eager_alone(tmp_path):
    enc, head, pipeline, items, folders, tolerances, _ = _two_modules(tmp_path, "alone")
    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(pipeline, items, [enc, head], folders, tolerances, timing)
    assert check.checked and not check.ok and "int64 values differ from eager" in check.reason
    assert list(timing.reverted) == [enc.name] and "outputs differ from eager" in timing.reverted[enc.name]
    assert not enc.is_optimized and head.is_optimized  # the fp32 TorchScript head keeps its runner
    assert read_manifest(folders[enc.name]).reverted == timing.reverted[enc.name]
    assert read_manifest(folders[head.name]).reverted is None
    assert bind(enc, folders[enc.name]) and not enc.is_optimized  # a fresh process keeps it eager too
    x = items[0][1]
    with torch.no_grad():
        torch.testing.assert_close(pipeline(x), (head.__wrapped__(enc.__wrapped__(x)) * 1000).round().long(),
                                   rtol=0, atol=0)
    # Checked again, the pipeline as it stands now returns eager's integers.
    again = check_outputs(pipeline, items, [enc, head], folders, tolerances, PipelineTiming(0.0, 0.0, None, 1))
    assert again.checked and again.ok and again.leaves == 2


def test_a_low_precision_winner_that_changes_the_integers_falls_back_to_its_own_precision(tmp_path):
    enc, head, pipeline, items, folders, tolerances, _ = _two_modules(tmp_path, "fallback")
    manifest = read_manifest(folders[enc.name])
    for entry in manifest.graphs.values():  # as the search leaves a bf16 winner: its best fp32 candidate named
        entry.fallback = "TorchScriptCPU"
    write_manifest(folders[enc.name], manifest)
    assert bind(enc, folders[enc.name])
    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(pipeline, items, [enc, head], folders, tolerances, timing)
    assert not check.ok and not timing.reverted and list(timing.fell_back) == [enc.name]
    assert enc.is_optimized and head.is_optimized
    assert tolerances[enc.name] == Tolerance()  # its outputs are checked at fp32's tolerance from now on
    manifest = read_manifest(folders[enc.name])
    assert manifest.fell_back == timing.fell_back[enc.name] and manifest.reverted is None
    assert {e.selected for e in manifest.graphs.values()} == {"TorchScriptCPU"}
    assert not any(e.fallback for e in manifest.graphs.values())
    assert bind(enc, folders[enc.name]) and enc.is_optimized  # a fresh process binds the fp32 build too
    x = items[0][1]
    with torch.no_grad():
        torch.testing.assert_close(pipeline(x), (head.__wrapped__(enc.__wrapped__(x)) * 1000).round().long(),
                                   rtol=0, atol=0)
    again = check_outputs(pipeline, items, [enc, head], folders, tolerances, PipelineTiming(0.0, 0.0, None, 1))
    assert again.ok
    assert any(f"{enc.name} runs its best candidates in its own precision" in line for line in pipeline_lines(timing))
    assert PipelineTiming.from_json(timing.to_json()) == timing


def test_the_full_check_reports_the_outputs_and_stops_when_every_module_went_back(tmp_path):
    enc, head, pipeline, items, folders, tolerances, _ = _two_modules(tmp_path, "full")
    head.nav_state.bind(None)  # only the bf16 module optimized
    timing = check_pipeline(pipeline, items, [enc, head], folders, repeats=3, capture_s=0.0, items_timed=1,
                            tolerances=tolerances)
    assert timing.error is None and list(timing.reverted) == [enc.name]
    assert timing.faster is False and timing.optimized_s is None and not timing.optimized_runs  # nothing timed
    lines = pipeline_lines(timing)
    assert lines[0] == "pipeline end to end: not timed, every module runs eagerly"
    assert any(line.startswith("  outputs differed from eager's:") for line in lines)
    assert any(f"{enc.name} went back to eager" in line for line in lines)
    assert PipelineTiming.from_json(timing.to_json()) == timing
    from navdeploy.optimize.status import OptimizeStatus
    from navdeploy.report.html import render_report

    page = render_report(OptimizeStatus(pipeline=timing), tmp_path / "report.html").read_text()
    assert "Not timed: every module runs eagerly (the output check put 1 back to eager" in page
    assert "Outputs differed from eager" in page and "speed-up of the whole callable" not in page


def test_a_sampling_pipeline_is_compared_from_the_same_seed(tmp_path):
    enc, head, _, items, folders, _, _ = _two_modules(tmp_path, "sampling")
    enc.nav_state.bind(None)  # only the fp32 TorchScript head optimized

    def sample(x):
        probs = head(enc(x)).softmax(-1)
        return torch.multinomial(probs, 4, replacement=True)  # the global generator: different on every call

    before = torch.random.get_rng_state()
    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(sample, items, [enc, head], folders, {}, timing)
    assert check.checked and check.ok and check.leaves == 2 and not timing.reverted
    assert torch.equal(torch.random.get_rng_state(), before)  # the user's generator is left as it was


def test_outputs_that_differ_from_eager_to_eager_are_not_compared(tmp_path):
    enc, head, _, items, folders, tolerances, _ = _two_modules(tmp_path, "noisy")

    calls = itertools.count()

    def noisy(x):  # state kept between calls: no two passes return the same
        return (head(enc(x)) * 1000).round().long() + next(calls)

    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(noisy, items, [enc, head], folders, tolerances, timing)
    assert not check.checked and "differ from one eager pass to the next" in check.note
    assert not timing.reverted and enc.is_optimized and head.is_optimized


def test_numbers_strings_and_object_arrays():
    assert compare_leaves(_leaves([1.0, 2j, "a"]), _leaves([1.0 + 1e-9, 2j + 1e-9, "a"]), Tolerance()).ok
    assert not compare_leaves(_leaves([1.0]), _leaves([1.1]), Tolerance()).ok
    assert not compare_leaves(_leaves([3]), _leaves([4]), Tolerance()).ok  # a Python int (a label's .item())
    labels = np.array(["cat", "dog"])
    assert not compare_leaves(_leaves(labels), _leaves(np.array(["cat", "cow"])), Tolerance()).ok
    objects = np.array([object(), object()], dtype=object)
    out = _leaves(objects)
    assert out.skipped == 1 and not out.items  # compared by identity they would always differ: left out


def test_a_generator_in_the_samples_is_rewound_for_every_pass_and_numpy_is_seeded(tmp_path):
    enc, head, _, items, folders, _, _ = _two_modules(tmp_path, "generator")
    enc.nav_state.bind(None)  # only the fp32 TorchScript head optimized

    def denoise(x, generator):  # a diffusers-style call: noise from the caller's generator, and numpy's
        noise = torch.randn(x.shape, generator=generator) + float(np.random.rand())
        return head(enc(x + noise))

    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    samples = [(b, (x, {"generator": generator})) for b, x in items]
    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(denoise, samples, [enc, head], folders, {}, timing)
    assert check.checked and check.ok and check.leaves == 2, check
    assert torch.equal(generator.get_state(), state)  # left where the caller had it


def test_maps_complex_values_numpy_scalars_infinities_and_byte_order():
    mask = torch.zeros(200, 100, dtype=torch.bool)
    one_flip, many_flips = mask.clone(), mask.clone()
    one_flip[0, 0] = True
    many_flips[:, :1] = True  # 200 of 20,000 values
    assert compare_leaves(_leaves(mask), _leaves(one_flip), Tolerance()).ok  # a near-tie in a large map
    check = compare_leaves(_leaves(mask), _leaves(many_flips), Tolerance())
    assert not check.ok and "200 of 20000 bool values" in check.reason
    tokens = torch.zeros(2, 8, dtype=torch.long)
    assert not compare_leaves(_leaves(tokens), _leaves(tokens + torch.eye(2, 8, dtype=torch.long)), Tolerance()).ok
    z = torch.randn(4, dtype=torch.complex64)
    assert not compare_leaves(_leaves(z), _leaves(z + 1j), Tolerance()).ok  # only the imaginary part differs
    assert compare_leaves(_leaves([np.float32(0.5), np.int64(3)]), _leaves([np.float32(0.5), np.int64(3)]),
                          Tolerance()).ok
    assert not compare_leaves(_leaves([np.int64(3)]), _leaves([np.int64(4)]), Tolerance()).ok
    assert _leaves([np.int64(3)]).items == [("out[0]", 3)]
    assert compare_leaves(_leaves([float("inf")]), _leaves([float("inf")]), Tolerance()).ok
    big_endian = np.arange(6, dtype=">i4")
    assert compare_leaves(_leaves(big_endian), _leaves(np.arange(6, dtype="<i4")), Tolerance()).ok
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    # TF32 modules carry a 1e-2 tolerance without being low precision: 6 steps of 255
    assert compare_leaves(_leaves(image), _leaves(image + 5), Tolerance(1e-2, 1e-2)).ok
