"""Fast unit tests of navdeploy.capture: flatten/unflatten, spec_key, split_sample, Recorder and Graph."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict, namedtuple
from typing import NamedTuple, Optional

import pytest
import torch

import navdeploy as nav
from navdeploy.capture.graph import Graph
from navdeploy.capture.pytree import flatten, flatten_call, spec_key, split_sample, unflatten
from navdeploy.capture.recorder import Recorder

# Classes must live at module level: unflatten only rebuilds classes it can resolve by module:qualname.
Pair = namedtuple("Pair", ["first", "second"])


class Typed(NamedTuple):
    x: torch.Tensor
    label: str


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor
    mask: Optional[torch.Tensor]
    name: str = "batch"


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: torch.Tensor
    scale: float


class Opaque:
    pass


def assert_same(a, b):
    """Structural equality where tensors compare by identity of values, types included."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


def roundtrip(tree, **kw):
    spec, tensors = flatten(tree)
    json.dumps(spec)  # the spec must be JSON-able
    return spec, tensors, unflatten(spec, tensors, **kw)


# --- flatten / unflatten -------------------------------------------------------------------------------

def test_single_tensor_roundtrip():
    t = torch.randn(2, 3)
    spec, tensors, back = roundtrip(t)
    assert len(tensors) == 1 and tensors[0] is t
    assert back is t


def test_nested_containers_roundtrip_and_leaf_order():
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    tree = (a, [b, {"k": c, "nested": (d, [])}], {}, ())
    spec, tensors, back = roundtrip(tree)
    assert [float(t) for t in tensors] == [0.0, 1.0, 2.0, 3.0]  # depth-first order
    assert_same(back, tree)
    assert isinstance(back[1], list) and isinstance(back[0], torch.Tensor) and isinstance(back[1][1]["nested"], tuple)


def test_ordered_dict_and_key_order_kept():
    tree = OrderedDict([("z", torch.ones(1)), ("a", torch.zeros(1))])
    _, tensors, back = roundtrip(tree)
    assert list(back) == ["z", "a"]
    assert torch.equal(tensors[0], torch.ones(1))


def test_named_tuples_roundtrip():
    tree = Pair(torch.ones(2), Typed(torch.zeros(3), "lbl"))
    spec, tensors, back = roundtrip(tree)
    assert len(tensors) == 2
    assert isinstance(back, Pair) and isinstance(back.second, Typed)
    assert back.second.label == "lbl"
    assert_same(back, tree)
    # Without rebuilding classes, named tuples come back as plain tuples.
    plain = unflatten(spec, tensors, rebuild_classes=False)
    assert type(plain) is tuple and type(plain[1]) is tuple


def test_dataclass_roundtrip():
    tree = {"b": Batch(torch.arange(4), None, name="x"), "f": Frozen(torch.ones(1), 0.5)}
    spec, tensors, back = roundtrip(tree)
    assert len(tensors) == 2
    assert isinstance(back["b"], Batch) and back["b"].mask is None and back["b"].name == "x"
    assert isinstance(back["f"], Frozen) and back["f"].scale == 0.5
    assert_same(back, tree)
    plain = unflatten(spec, tensors, rebuild_classes=False)
    assert plain["b"] == {"ids": tensors[0], "mask": None, "name": "x"}


def test_transformers_model_output_roundtrip():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.randn(1, 4, 8), pooler_output=torch.randn(1, 8),
                                     hidden_states=(torch.randn(1, 4, 8), torch.randn(1, 4, 8)))
    spec, tensors, back = roundtrip(out)
    assert len(tensors) == 4
    assert isinstance(back, BaseModelOutputWithPooling)
    assert torch.equal(back.last_hidden_state, out.last_hidden_state)
    assert torch.equal(back[1], out.pooler_output)  # ModelOutput indexing still works
    assert back.attentions is None
    assert len(back.hidden_states) == 2 and torch.equal(back.hidden_states[1], out.hidden_states[1])
    plain = unflatten(spec, tensors, rebuild_classes=False)
    assert type(plain) is dict and list(plain) == ["last_hidden_state", "pooler_output", "hidden_states"]


@pytest.mark.parametrize("value", ["", "hello", "x" * 100_000, 0, -7, 3.25, float("inf"), True, False, None])
def test_constants_roundtrip(value):
    spec, tensors, back = roundtrip(("pre", value))
    assert tensors == []
    assert type(back[1]) is type(value) and back[1] == value


def test_strings_do_not_recurse():
    words = ["a", "bb", "", "the quick brown fox " * 500] * 50
    tree = {"words": words, "t": torch.ones(1), "long": "y" * 1_000_000}
    spec, tensors, back = roundtrip(tree)
    assert len(tensors) == 1
    assert back["words"] == words and back["long"] == tree["long"]
    # a string is one constant, not a sequence of one-character strings
    assert spec["c"][0]["c"][0] == {"t": "const", "v": "a"}


def test_unsupported_object_error_names_path_and_suggests_input_mapping():
    tree = {"args": [torch.ones(1), {"cfg": [1, Opaque()]}], "kwargs": {}}
    with pytest.raises(nav.CaptureError) as info:
        flatten(tree, path="mymod inputs")
    msg = str(info.value)
    assert "mymod inputs['args'][1]['cfg'][1]" in msg
    assert "Opaque" in msg
    assert "input_mapping" in msg


def test_unsupported_named_field_path():
    with pytest.raises(nav.CaptureError, match=r"root\.second"):
        flatten(Pair(torch.ones(1), object()), path="root")
    with pytest.raises(nav.CaptureError, match=r"root\.mask"):
        flatten(Batch(torch.ones(1), object()), path="root")


def test_non_string_dict_key_rejected():
    with pytest.raises(nav.CaptureError, match=r"inputs.*dict key 3"):
        flatten({3: torch.ones(1)})


# --- spec_key ------------------------------------------------------------------------------------------

def key_of(tree):
    return spec_key(*flatten(tree))


def test_spec_key_same_structure_different_shapes():
    a = key_of({"args": [torch.ones(1, 3), "mode"], "kwargs": {"m": torch.ones(1, 5)}})
    b = key_of({"args": [torch.ones(7, 9), "mode"], "kwargs": {"m": torch.ones(7, 2)}})
    assert a == b


def test_spec_key_differs_for_constants_dtypes_ranks():
    base = key_of([torch.ones(2, 3), "a", 1])
    assert key_of([torch.ones(2, 3), "b", 1]) != base  # different string
    assert key_of([torch.ones(2, 3), "a", 2]) != base  # different int
    assert key_of([torch.ones(2, 3), "a", True]) != base  # bool is not int
    assert key_of([torch.ones(2, 3), "a", 1.0]) != base  # float is not int
    assert key_of([torch.ones(2, 3, dtype=torch.float16), "a", 1]) != base  # dtype
    assert key_of([torch.ones(2, 3, 1), "a", 1]) != base  # rank
    assert key_of((torch.ones(2, 3), "a", 1)) != base  # tuple vs list
    assert key_of([torch.ones(2, 3), "a", 1]) == base  # deterministic


# --- split_sample --------------------------------------------------------------------------------------

def test_split_sample_rules():
    x, y = torch.ones(1), torch.zeros(1)
    assert split_sample((x, y)) == ((x, y), {})
    assert split_sample([x, y]) == ((x, y), {})
    args, kwargs = split_sample((x, {"mask": y}))
    assert args == (x,) and kwargs == {"mask": y}
    assert split_sample([{"mask": y}]) == ((), {"mask": y})
    d = {"input_ids": x}
    args, kwargs = split_sample(d)
    assert args == () and kwargs == d and kwargs is not d
    assert split_sample(x) == ((x,), {})
    assert split_sample("text") == (("text",), {})
    assert split_sample(()) == ((), {})
    # a dict that is not last is positional
    args, kwargs = split_sample(({"a": x}, y))
    assert kwargs == {} and len(args) == 2


# --- Recorder ------------------------------------------------------------------------------------------

def record_calls(calls, fn=lambda x: x * 2, sample_count=8, batching=None):
    rec = Recorder("rec", sample_count, batching)
    for args, kwargs in calls:
        out = rec.record(fn, args, kwargs)
        assert torch.equal(out, fn(*args, **kwargs))  # the eager result is returned
    return rec, rec.finish()


def test_recorder_min_max_and_dynamic_axes():
    rec, graphs = record_calls([((torch.ones(1, 4, 8),), {}), ((torch.ones(3, 2, 8),), {}),
                                ((torch.ones(2, 6, 8),), {})])
    assert len(graphs) == 1
    g = graphs[0]
    assert g.calls == 3
    spec = g.inputs[0]
    assert spec.min_shape == [1, 2, 8] and spec.max_shape == [3, 6, 8]
    assert spec.dynamic_axes == [0, 1]
    assert spec.opt_shape == [3, 2, 8]  # the kept sample of the batch size that carried most samples
    assert g.outputs[0].max_shape == [3, 6, 8]
    assert g.batching is True
    assert g.dynamic_axes(max_batch_size=16) == [{0: (1, 16), 1: (2, 6)}]
    assert g.dynamic_axes(max_batch_size=2) == [{0: (1, 3), 1: (2, 6)}]


def test_recorder_0d_input_does_not_stop_batching_but_gets_no_batch_axis():
    fn = lambda x, s: x * s
    _, graphs = record_calls([((torch.ones(2, 3), torch.tensor(2.0)), {})], fn=fn)
    assert graphs[0].batching is True
    assert graphs[0].dynamic_axes(8) == [{0: (1, 8)}, {}]
    assert graphs[0].accepts([torch.ones(5, 3), torch.tensor(1.0)], 8) is None


def test_recorder_batching_false_when_only_0d_tensors():
    fn = lambda s: s * 2
    _, graphs = record_calls([((torch.tensor(2.0),), {})], fn=fn)
    assert graphs[0].batching is False


def test_recorder_batching_false_when_axis0_inconsistent():
    fn = lambda x: x.sum(0)
    _, graphs = record_calls([((torch.ones(2, 3),), {})], fn=fn)
    assert graphs[0].batching is False
    assert graphs[0].dynamic_axes(8) == [{}]


def test_recorder_batching_forced_false():
    _, graphs = record_calls([((torch.ones(2, 3),), {}), ((torch.ones(4, 3),), {})], batching=False)
    assert graphs[0].batching is False
    assert graphs[0].dynamic_axes(8) == [{0: (2, 4)}]


def test_recorder_sample_count_bound_prefers_shape_variety():
    shapes = [(1, 3), (1, 3), (1, 3), (2, 3), (3, 3), (4, 3), (5, 3)]
    _, graphs = record_calls([((torch.ones(*s),), {}) for s in shapes], sample_count=3)
    kept = [tuple(s.inputs[0].shape) for s in graphs[0].samples]
    assert len(kept) == 3
    assert len(set(kept)) == 3  # duplicates were replaced by new shapes
    assert kept[0] == (1, 3)
    assert graphs[0].calls == len(shapes)


def test_recorder_samples_spread_over_a_growing_sequence():
    """A decoder without a cache is called at every length of a generate: the kept samples span the lengths seen,
    so the typical sample (where candidates are compared) sits mid-run, not at the first calls."""
    _, graphs = record_calls([((torch.ones(2, length),), {}) for length in range(6, 27)], sample_count=8)
    lengths = [s.inputs[0].shape[1] for s in graphs[0].samples]
    assert len(lengths) == 8 and min(lengths) == 6 and max(lengths) == 26
    assert max(b - a for a, b in zip(sorted(lengths), sorted(lengths)[1:])) <= 4  # no hole in the range
    assert 14 <= graphs[0].typical_sample.inputs[0].shape[1] <= 18


def test_recorder_samples_are_copies():
    x = torch.ones(2, 2)
    _, graphs = record_calls([((x,), {})])
    x.add_(5)
    s = graphs[0].samples[0]
    assert torch.equal(s.inputs[0], torch.ones(2, 2))
    assert torch.equal(s.outputs[0], torch.full((2, 2), 2.0))


def test_recorder_distinct_graphs_for_distinct_constants():
    fn = lambda x, mode="a": x + (1 if mode == "a" else 2)
    rec, graphs = record_calls([((torch.ones(1, 2),), {"mode": "a"}), ((torch.ones(1, 2),), {"mode": "b"}),
                                ((torch.ones(3, 2),), {"mode": "a"})], fn=fn)
    assert len(graphs) == 2
    calls = sorted(g.calls for g in graphs)
    assert calls == [1, 2]
    modes = {g.input_spec["c"][1]["c"][0]["v"] for g in graphs}
    assert modes == {"a", "b"}
    for g in graphs:  # the graph round-trips through JSON
        again = Graph.from_json(json.loads(json.dumps(g.to_json())))
        assert again.key == g.key and again.inputs == g.inputs and again.batching == g.batching


class AddOne(torch.nn.Module):
    def forward(self, t):
        return t + 1


def test_recorder_counts_calls_per_batch_size_and_takes_opt_shapes_from_the_most_common():
    """A retrieval flow embeds 1 query and 8 documents per request: both sizes are counted, so the winner is
    chosen over that mix; screening and the opt shapes use the size that carried most samples."""
    calls = [((torch.ones(1, 5),), {}), ((torch.ones(8, 7),), {}), ((torch.ones(8, 6),), {})]
    _, (graph,) = record_calls(calls)
    assert graph.batching and graph.batch_counts == {1: 1, 8: 2} and graph.typical_batch == 8
    assert graph.inputs[0].opt_shape == [8, 7] and graph.batch_weights == {1: 1, 8: 2}
    again = type(graph).from_json(graph.to_json())  # as the manifest keeps it
    assert again.batch_counts == {1: 1, 8: 2} and again.typical_batch == 8
    _, (mix,) = record_calls([((torch.ones(1, 5),), {})] * 5 + [((torch.ones(2, 5),), {})])
    assert mix.typical_batch == 1 and mix.batch_weights == {1: 5, 2: 1}  # 5 samples at batch 1, 2 at batch 2
    _, (single,) = record_calls([((torch.ones(2, 5),), {}), ((torch.ones(2, 6),), {})])
    assert single.typical_batch == 2 and single.batch_weights is None  # one size: compared at that size
    _, (unbatched,) = record_calls(calls, batching=False)
    assert unbatched.typical_batch is None and unbatched.batch_weights is None


def test_candidates_are_timed_on_the_median_sized_sample_of_the_typical_batch():
    """Screens and profiles grow ``typical_sample`` to each batch size: a classifier captured on a short batch of 2
    and a long batch of 4 is timed on the long one, a generate loop on its middle length rather than its prompt (on
    the short sample ONNX Runtime beat AOTInductor for a small BERT, and lost on the pipeline's long one)."""
    _, (mix,) = record_calls([((torch.ones(2, 12),), {}), ((torch.ones(4, 32),), {})])
    assert mix.typical_sample is mix.samples[1] and mix.inputs[0].opt_shape == [4, 32]
    _, (loop,) = record_calls([((torch.ones(2, n),), {}) for n in range(10, 17)])
    assert tuple(loop.typical_sample.inputs[0].shape) == (2, 13) and loop.inputs[0].opt_shape == [2, 13]
    _, (unbatched,) = record_calls([((torch.ones(n, 3),), {}) for n in (1, 5, 3)], batching=False)
    assert tuple(unbatched.typical_sample.inputs[0].shape) == (3, 3)


def test_input_mapping_is_applied_before_recording():
    proxy = nav.Module(AddOne(), name="capture_input_mapping",
                       input_mapping=lambda args, kwargs: ((torch.tensor(args[0]),), {}))
    rec = Recorder("capture_input_mapping", 2, None)
    proxy.nav_state.handler = rec.record  # what nav.optimize installs while the callable runs
    out = proxy([1.0, 2.0])  # a list the module could not take; the mapping makes it a tensor
    assert torch.equal(out, torch.tensor([2.0, 3.0]))
    assert len(rec.finish()[0].inputs) == 1


def test_recorder_keeps_tensorless_output_and_uncapturable_input_eager_and_says_why():
    rec = Recorder("noout", 2, None)
    assert rec.record(lambda x: "text", (torch.ones(1),), {}) == "text"  # the eager output, handed back
    assert not rec.graphs and "returned no tensors" in rec.uncapturable
    bad = Recorder("bad", 2, None)
    opaque = Opaque()
    assert bad.record(lambda x: x, (opaque,), {}) is opaque
    assert not bad.graphs and re.search(r"bad inputs.*input_mapping", bad.uncapturable)


# --- Graph.accepts ------------------------------------------------------------------------------------

def make_graph(batching=None):
    _, graphs = record_calls([((torch.ones(2, 4),), {}), ((torch.ones(4, 6),), {})], batching=batching)
    return graphs[0]


def test_accepts_in_range():
    g = make_graph()
    assert g.batching
    assert g.accepts([torch.ones(3, 5)], max_batch_size=8) is None
    assert g.accepts([torch.ones(1, 4)], max_batch_size=8) is None  # batch below captured min is fine


def test_accepts_dtype_reason():
    refusal = make_graph().accepts([torch.ones(2, 4, dtype=torch.float64)], 8)
    assert refusal is not None and "dtype" in refusal.reason and "float32" in refusal.reason
    assert refusal.reason.startswith("input 'args[0]'") and refusal.about == "input 'args[0]' dtype"


def test_accepts_shape_out_of_range_reason():
    g = make_graph()
    refusal = g.accepts([torch.ones(2, 7)], 8)
    assert refusal is not None and "axis 1" in refusal.reason and "[4, 6]" in refusal.reason
    assert g.accepts([torch.ones(2, 3)], 8).about == refusal.about == "input 'args[0]' axis 1"  # one kind, two sizes


def test_accepts_batch_within_max_batch_size():
    g = make_graph()
    assert g.accepts([torch.ones(8, 4)], max_batch_size=8) is None
    refusal = g.accepts([torch.ones(9, 4)], max_batch_size=8)
    assert refusal is not None and refusal.batch and "batch size 9" in refusal.reason and "above 8" in refusal.reason
    assert "max_batch_size=8" in refusal.reason
    # max_batch_size smaller than what was captured: the captured max still counts
    assert g.accepts([torch.ones(4, 4)], max_batch_size=2) is None


def test_accepts_without_batching_uses_captured_range():
    g = make_graph(batching=False)
    assert g.accepts([torch.ones(3, 4)], 8) is None
    assert "axis 0" in g.accepts([torch.ones(1, 4)], 8).reason
    assert "axis 0" in g.accepts([torch.ones(5, 4)], 8).reason


def test_accepts_count_and_rank_mismatch():
    g = make_graph()
    assert "expected 1 tensors, got 2" in g.accepts([torch.ones(2, 4), torch.ones(2, 4)], 8).reason
    assert "rank" in g.accepts([torch.ones(4)], 8).reason
    assert "rank" in g.accepts([torch.ones(2, 4, 1)], 8).reason


def test_spec_key_ignores_kwargs_order():
    x, m = torch.ones(1, 2), torch.ones(1, 2)
    a = spec_key(*flatten_call((), {"x": x, "mask": m}, "m"))
    b = spec_key(*flatten_call((), {"mask": m, "x": x}, "m"))
    assert a == b


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_call_that_writes_into_its_input_is_not_captured(mode):
    """ReLU(inplace=True) on the input changes the caller's tensor; a runner (ONNX, AOTInductor) would leave it as
    it was, so such calls stay eager and say why. With an inference tensor (no version counter) too."""
    module = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2)).eval()
    rec = Recorder("writes_input", 2, None)
    with mode():
        x = torch.randn(3, 4)
        out = rec.record(module, (x,), {})
        assert (x >= 0).all()  # eager's effect on the caller's tensor is kept
        torch.testing.assert_close(out, module[1](x))
    assert rec.uncapturable is not None and "input tensor #0 in place" in rec.uncapturable
    assert not rec.graphs
