"""HF cache objects (DynamicCache, StaticCache, EncoderDecoderCache, sliding-window layers) through capture:
flatten/unflatten round trips through JSON, and the optimized path leaving the caller's cache object in the
state eager leaves it in (same object, same layer objects, new keys/values; StaticCache tensors written in place)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from navdeploy.capture.aliases import LiveCall
from navdeploy.capture.flat_module import FlatModule
from navdeploy.capture.pytree import flatten, flatten_call, unflatten
from navdeploy.capture.recorder import Recorder
from navdeploy.errors import CaptureError
from navdeploy.inplace.handler import OptimizedHandler

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache  # noqa: E402

HEADS, HEAD_DIM, LAYERS = 2, 4, 2


def _gpt2_config():
    return transformers.GPT2Config(n_layer=LAYERS, n_head=HEADS, n_embd=HEADS * HEAD_DIM)


def _mistral_config(sliding_window: int = 4):
    return transformers.MistralConfig(hidden_size=HEADS * HEAD_DIM, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=16,
                                      vocab_size=11, sliding_window=sliding_window)


def _kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HEADS, length, HEAD_DIM, generator=g),
            torch.randn(batch, HEADS, length, HEAD_DIM, generator=g))


def _filled(cache, length: int = 3, seed: int = 0):
    for layer in range(LAYERS):
        cache.update(*_kv(2, length, seed + layer), layer)
    return cache


def assert_same_state(a, b):
    """Two caches (or layers) of the same class with equal state: tensors equal, everything else =="""
    assert type(a) is type(b)
    assert list(vars(a)) == list(vars(b))
    for name, x in vars(a).items():
        y = vars(b)[name]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), name
        elif isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                assert_same_state(u, v)
        elif isinstance(x, (DynamicCache, StaticCache)):
            assert_same_state(x, y)
        else:
            assert x == y, (name, x, y)


def _through_json(tree):
    spec, tensors = flatten(tree)
    # Copies: a StaticCache changes its tensors in place, and the original must not change the rebuilt one.
    back = unflatten(json.loads(json.dumps(spec)), [t.clone() for t in tensors])
    return spec, tensors, back


# --- flatten / unflatten ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: DynamicCache(config=_gpt2_config()),  # layers made up front, not initialised yet
    lambda: DynamicCache(),  # no layers yet: they are made from layer_class_to_replicate
    lambda: _filled(DynamicCache(config=_gpt2_config())),
    lambda: _filled(DynamicCache()),
    lambda: StaticCache(config=_gpt2_config(), max_cache_len=8),
    lambda: _filled(StaticCache(config=_gpt2_config(), max_cache_len=8)),
    lambda: _filled(DynamicCache(config=_mistral_config(sliding_window=4)), length=6),  # past the window
    lambda: _filled(StaticCache(config=_mistral_config(sliding_window=4), max_cache_len=8), length=2),
], ids=["dynamic-empty", "dynamic-lazy", "dynamic", "dynamic-replicated", "static-empty", "static",
        "dynamic-sliding", "static-sliding"])
def test_cache_roundtrips_through_a_json_spec(make):
    cache = make()
    spec, tensors, back = _through_json({"cache": cache})
    back = back["cache"]
    assert spec["c"][0]["cls"] == f"transformers.cache_utils:{type(cache).__name__}"
    assert back is not cache
    assert_same_state(back, cache)
    assert all(t is u for t, u in zip(tensors, flatten(cache)[1]))
    # The rebuilt cache works as one: the next update gives what the original's gives.
    k, v = _kv(2, 1, seed=9)
    expected = cache.update(k, v, 0)
    actual = back.update(k, v, 0)
    assert all(torch.equal(x, y) for x, y in zip(expected, actual))
    assert back.get_seq_length() == cache.get_seq_length()


def test_layer_classes_and_window_sizes_are_in_the_spec():
    cache = _filled(DynamicCache(config=_mistral_config(sliding_window=4)))
    layer = flatten(cache)[0]["c"][0]["c"][0]  # layers[0]
    assert layer["cls"] == "transformers.cache_utils:DynamicSlidingWindowLayer"
    state = dict(zip(layer["k"], layer["c"]))
    assert state["sliding_window"] == {"t": "const", "v": 4}
    replicated = flatten(DynamicCache())[0]
    assert dict(zip(replicated["k"], replicated["c"]))["layer_class_to_replicate"] == {
        "t": "class", "v": "transformers.cache_utils:DynamicLayer"}
    assert isinstance(unflatten(replicated, []).layer_class_to_replicate, type)


def test_encoder_decoder_cache_roundtrip_keeps_int_keys():
    cache = EncoderDecoderCache(_filled(DynamicCache(config=_gpt2_config())),
                                _filled(DynamicCache(config=_gpt2_config()), length=5, seed=3))
    for layer in range(LAYERS):
        cache.is_updated[layer] = True
    _, tensors, back = _through_json((cache,))
    back = back[0]
    assert len(tensors) == 4 * LAYERS
    assert type(back) is EncoderDecoderCache and back.is_updated == {0: True, 1: True}
    assert_same_state(back.self_attention_cache, cache.self_attention_cache)
    assert_same_state(back.cross_attention_cache, cache.cross_attention_cache)
    assert back.get_seq_length() == 3


def test_uncapturable_cache_state_names_its_path():
    cache = _filled(DynamicCache())
    cache.layers[1].handle = object()
    with pytest.raises(CaptureError, match=r"m inputs\['kwargs'\]\['cache'\]\.layers\[1\]\.handle"):
        flatten_call((), {"cache": cache}, "m")


def test_a_cache_is_no_constant_of_the_graph_key():
    a, b = _filled(DynamicCache(), length=3), _filled(DynamicCache(), length=5, seed=4)
    spec_a, _ = flatten_call((), {"cache": a}, "m")
    spec_b, _ = flatten_call((), {"cache": b}, "m")
    assert spec_a == spec_b  # same structure, other lengths: one graph with a dynamic axis


# --- the optimized path: the caller's cache ends where eager leaves it -----------------------------------------

class CachedAttention(nn.Module):
    """Updates the cache it is given and returns it, as HF decoders do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.k = nn.Linear(HEAD_DIM, HEADS * HEAD_DIM)
        self.v = nn.Linear(HEAD_DIM, HEADS * HEAD_DIM)

    def forward(self, x, cache):
        hidden = x
        for layer in range(LAYERS):
            shape = (x.shape[0], x.shape[1], HEADS, HEAD_DIM)
            k = self.k(hidden).view(shape).transpose(1, 2)
            v = self.v(hidden).view(shape).transpose(1, 2)
            keys, values = cache.update(k, v, layer)
            hidden = hidden + torch.softmax(keys.sum(-1), -1).unsqueeze(-1).mul(values).sum((1, 2)).unsqueeze(1)
        return {"hidden": hidden, "cache": cache}


def _steps(prompt: int = 4, decode: int = 3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, prompt, HEAD_DIM, generator=g)] + [torch.randn(2, 1, HEAD_DIM, generator=g)
                                                              for _ in range(decode)]


def _optimized(module, make_cache):
    """Capture a prefill and decode steps, then route calls as an optimized module does, with the eager run of
    each graph's flat module as its runner (what every exporter traces)."""
    recorder = Recorder("attn", sample_count=4, batching=None)
    cache = make_cache()
    with torch.no_grad():
        for x in _steps(decode=4):
            recorder.record(module.forward, (x,), {"cache": cache})
    graphs = {}
    for graph in recorder.finish():
        flat = FlatModule(module, graph.input_spec, output_spec=graph.output_spec)
        graphs[graph.key] = (graph, lambda inputs, flat=flat: list(flat(*inputs)))
    return OptimizedHandler("attn", graphs, max_batch_size=8, output_mapping=None), graphs


@pytest.mark.parametrize("make_cache", [
    lambda: DynamicCache(config=_gpt2_config()),
    lambda: DynamicCache(),
    lambda: StaticCache(config=_gpt2_config(), max_cache_len=12),
], ids=["dynamic", "dynamic-replicated", "static"])
def test_optimized_call_updates_the_callers_cache_as_eager_does(make_cache, recwarn):
    module = CachedAttention().eval()
    handler, graphs = _optimized(module, make_cache)
    assert len(graphs) == 2  # prefill (empty cache) and decode
    eager_cache, cache = make_cache(), make_cache()
    layers_list = cache.layers
    layer_objects = list(cache.layers)
    with torch.no_grad():
        for step, x in enumerate(_steps()):
            expected = module(x, cache=eager_cache)
            before = [(layer.keys, layer.values) for layer in cache.layers]
            actual = handler(module.forward, (x,), {"cache": cache})
            assert actual["cache"] is cache  # eager returns the object it was given
            assert cache.layers is layers_list
            assert cache.layers[:len(layer_objects)] == layer_objects  # same layer objects, updated
            layer_objects = list(cache.layers)
            torch.testing.assert_close(actual["hidden"], expected["hidden"])
            assert_same_state(cache, eager_cache)  # not stale: the new keys and values are in the caller's object
            assert cache.get_seq_length() == eager_cache.get_seq_length()
            if isinstance(cache, StaticCache) and step:
                # Written in place, as eager does: the tensors a StaticCache holds keep their identity.
                assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, before))
    assert not [str(w.message) for w in recwarn if "runs eagerly" in str(w.message)]


def test_flat_module_never_writes_into_its_inputs():
    """Exporters trace the flat module: it copies the tensors eager changes in place (a StaticCache's), so
    artifacts are pure functions and verifying or profiling on a sample does not change the sample."""
    module = CachedAttention().eval()
    _, graphs = _optimized(module, lambda: StaticCache(config=_gpt2_config(), max_cache_len=12))
    for graph, run in graphs.values():
        inputs = graph.samples[0].inputs
        kept = [t.clone() for t in inputs]
        with torch.no_grad():
            first, second = run(inputs), run(inputs)
        assert all(torch.equal(a, b) for a, b in zip(inputs, kept))
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert all(torch.equal(a, b) for a, b in zip(first, graph.samples[0].outputs))


def test_unflatten_without_the_call_builds_a_new_cache():
    """check_output_mapping and the output_mapping path build what eager returns without the live call."""
    module = CachedAttention().eval()
    handler, graphs = _optimized(module, DynamicCache)
    graph, run = next(g for g in graphs.values() if len(g[0].inputs) > 1)
    with torch.no_grad():
        outputs = run(graph.samples[0].inputs)
    rebuilt = unflatten(graph.output_spec, outputs)
    assert type(rebuilt["cache"]) is DynamicCache and rebuilt["cache"].get_seq_length() > 0
    live = DynamicCache()
    spec, tensors = flatten_call((graph.samples[0].inputs[0],), {"cache": live}, "m")
    assert unflatten(graph.output_spec, outputs, call=LiveCall(spec, (None,), {"cache": live}, tensors))["cache"] \
        is live


def test_cache_counting_tokens_in_a_python_int_stays_eager_and_says_why():
    """A sliding-window layer counts tokens in a Python int: every step would be a graph of its own."""
    module = CachedAttention().eval()
    recorder = Recorder("attn", sample_count=4, batching=None)
    cache = DynamicCache(config=_mistral_config(sliding_window=3))
    with torch.no_grad():
        for x in _steps():
            recorder.record(module.forward, (x,), {"cache": cache})
    assert not recorder.graphs
    assert "cumulative_length" in recorder.uncapturable and "Python int" in recorder.uncapturable


def test_cache_tensors_a_runner_returns_strided_are_made_contiguous_as_eager_makes_them():
    """AOTInductor returned a prefill's keys in another layout than eager's torch.cat: passed back in on the next
    call, they failed its input stride check (and would make torch.compile recompile)."""
    module = CachedAttention().eval()
    _, graphs = _optimized(module, DynamicCache)
    strided = {}
    for key, (graph, run) in graphs.items():
        def other_layout(inputs, run=run):  # what a runner may return: the same values, 4-d ones strided
            return [t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t for t in run(inputs)]
        strided[key] = (graph, other_layout)
    handler = OptimizedHandler("attn", strided, max_batch_size=8, output_mapping=None)
    eager_cache, cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        for x in _steps():
            module(x, cache=eager_cache)
            handler(module.forward, (x,), {"cache": cache})
            assert all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in cache.layers)
            assert_same_state(cache, eager_cache)


def test_traced_flat_module_returns_the_tensors_eager_returned():
    """A StaticCache layer keeps its batch size and head sizes as ints read from shapes; torch.jit.trace hands
    them out as tensors. The flat module's outputs follow eager's output spec, so the trace has eager's outputs."""
    module = CachedAttention().eval()
    _, graphs = _optimized(module, lambda: StaticCache(config=_gpt2_config(), max_cache_len=12))
    prefill = min((graph for graph, _ in graphs.values()), key=lambda graph: len(graph.inputs))  # no keys yet
    flat = FlatModule(module, prefill.input_spec, output_spec=prefill.output_spec)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(flat, tuple(prefill.samples[0].inputs), check_trace=False, strict=False)
        outputs = traced(*prefill.samples[0].inputs)
    assert [t.shape for t in outputs] == [t.shape for t in prefill.samples[0].outputs]
    assert all(torch.equal(a, b) for a, b in zip(outputs, prefill.samples[0].outputs))
