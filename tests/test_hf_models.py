"""Real transformers architectures (built from configs, random weights) through nav.Module."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import navdeploy as nav

transformers = pytest.importorskip("transformers")


def _tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_forward_func_keeps_the_signature_generate_reads(request):
    """HF generate reads forward's signature to decide whether to pass position_ids: with a (*args, **kwargs)
    stand-in it stops passing them, and a left-padded batch generates other tokens than the plain model."""
    plain = _tiny_gpt2()
    wrapped = nav.Module(copy.deepcopy(plain), name=f"gpt2_{request.node.name}"[:50], forward_func="forward")
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # the first row is left-padded
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = plain.generate(**kwargs)
        actual = wrapped.generate(**kwargs)
    assert torch.equal(actual, expected)
    assert inspect.signature(wrapped.forward) == inspect.signature(plain.forward)
    assert wrapped.forward.__name__ == "forward" and wrapped.forward.__doc__ == plain.forward.__doc__


# --- generate(use_cache=True): the decoder is optimized with its KV cache --------------------------------------

def tiny_gpt2_varied() -> torch.nn.Module:
    """A tiny GPT-2 whose greedy tokens vary (the default 0.02 init repeats one token): a wrong cache shows."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
                                     bos_token_id=96, eos_token_id=96, initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    return model


GPT2_PROMPT = (torch.tensor([[5, 6, 7, 8, 9], [0, 0, 17, 28, 39]]), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
GPT2_NEW_TOKENS = 8


def gpt2_generate(model, input_ids, attention_mask, max_new_tokens=GPT2_NEW_TOKENS):
    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, use_cache=True)


class CallCounter:
    """Counts the calls of a submodule: an optimized runner (a TorchScript artifact) runs none of them. It shadows
    the submodule's forward (a forward hook would make navdeploy run the module eagerly, to run the hook)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        forward = module.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        module.forward = counted


def _eager_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "navdeploy" in str(w.message)]


@pytest.fixture(scope="module")
def gpt2_kv(tmp_path_factory):
    """GPT-2 optimized with its DynamicCache through generate, TorchScript selected on both graphs."""
    from navdeploy.inplace.binding import bind
    from navdeploy.workspace.manifest import read_manifest, write_manifest

    workspace = tmp_path_factory.mktemp("gpt2_kv")
    model = nav.Module(tiny_gpt2_varied(), name="gpt2_kv_cache", forward_func="forward")
    shorter = (GPT2_PROMPT[0][:, 1:], GPT2_PROMPT[1][:, 1:])
    # thorough: every candidate profiled in full (a screen of a few calls under load can leave TorchScript
    # unprofiled, and its first calls are slow while its profiling executor specialises)
    config = nav.OptimizeConfig(workspace=workspace, runners=["TorchScriptCPU"], batch_sizes=(2,),
                                profile_time_s=0.05, pipeline_repeats=0, use_multiprocessing=False, thorough=True)
    status = nav.optimize(lambda ids, mask: gpt2_generate(model, ids, mask), [(2, GPT2_PROMPT), (2, shorter)], config)
    # Which of eager and TorchScript wins a model this small is timing noise: choose TorchScript, as a user may.
    folder = workspace / model.name
    manifest = read_manifest(folder)
    for entry in manifest.graphs.values():
        entry.selected = "TorchScriptCPU"
    manifest.reverted = None
    write_manifest(folder, manifest)
    assert bind(model, folder) and model.is_optimized
    return model, status, workspace


@pytest.mark.slow
def test_generate_with_kv_cache_runs_the_optimized_decoder_and_gives_eager_tokens(gpt2_kv):
    model, status, _ = gpt2_kv
    graphs = status.modules[model.name].graphs
    assert len(graphs) == 2  # prefill (an empty cache) and decode (a filled one, its length a dynamic axis)
    assert all({c.runner: c.status for c in g.candidates}["TorchScriptCPU"] == "ok" for g in graphs)
    expected = gpt2_generate(tiny_gpt2_varied(), *GPT2_PROMPT)
    assert len(set(expected[:, 5:].flatten().tolist())) > 3  # tokens that vary: a stale cache would show
    counter = CallCounter(model.__wrapped__.transformer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = gpt2_generate(model, *GPT2_PROMPT)
    assert not _eager_warnings(caught)
    assert counter.calls == 0  # every call (prefill and each decode step) ran the TorchScript artifact
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_the_pipeline_check_compares_the_tokens_generate_returns(gpt2_kv):
    from navdeploy.optimize.never_slower import check_outputs
    from navdeploy.optimize.status import PipelineTiming

    model, _, workspace = gpt2_kv
    timing = PipelineTiming(0.0, 0.0, None, 1)
    check = check_outputs(lambda ids, mask: gpt2_generate(model, ids, mask), [(2, GPT2_PROMPT)], [model],
                          {model.name: workspace / model.name}, {}, timing)
    assert check.checked and check.ok and check.leaves == 1, check  # the tokens, one int64 tensor, exactly eager's
    assert not timing.reverted and model.is_optimized


@pytest.mark.slow
def test_optimized_decoder_updates_the_cache_object_it_is_given(gpt2_kv):
    """Eager appends the new keys/values to the cache it is given and returns that object; so does the optimized
    module (the caller's object is never left stale)."""
    model, _, _ = gpt2_kv
    plain = tiny_gpt2_varied()
    ids, mask = GPT2_PROMPT
    counter = CallCounter(model.__wrapped__.transformer)
    caches = {"eager": transformers.DynamicCache(config=plain.config),
              "optimized": transformers.DynamicCache(config=plain.config)}
    layers = list(caches["optimized"].layers)
    step_ids, position_ids = ids, (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        for step in range(3):
            kwargs = dict(input_ids=step_ids, position_ids=position_ids, attention_mask=mask, logits_to_keep=1,
                          use_cache=True, return_dict=True)
            expected = plain(cache=caches["eager"], **kwargs)
            actual = model(cache=caches["optimized"], **kwargs)
            assert actual.cache is caches["optimized"] and caches["optimized"].layers == layers
            assert caches["optimized"].get_seq_length() == caches["eager"].get_seq_length() == 5 + step
            for mine, theirs in zip(caches["optimized"].layers, caches["eager"].layers):
                torch.testing.assert_close(mine.keys, theirs.keys)
                torch.testing.assert_close(mine.values, theirs.values)
            torch.testing.assert_close(actual.logits, expected.logits)
            step_ids = expected.logits[:, -1:].argmax(-1)
            position_ids = position_ids[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert counter.calls == 0


@pytest.mark.slow
def test_fresh_process_loads_the_kv_cache_decoder_and_gives_eager_tokens(gpt2_kv):
    """The manifest's specs (cache classes and layers included) reload in a process that never optimized."""
    _, _, workspace = gpt2_kv
    script = textwrap.dedent(f"""
        import sys, warnings, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import navdeploy as nav
        from test_hf_models import GPT2_PROMPT, CallCounter, gpt2_generate, tiny_gpt2_varied
        model = nav.Module(tiny_gpt2_varied(), name="gpt2_kv_cache", forward_func="forward")
        loaded = nav.load_optimized({str(workspace)!r})
        counter = CallCounter(model.__wrapped__.transformer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = gpt2_generate(model, *GPT2_PROMPT)
        fallbacks = [str(w.message) for w in caught if "navdeploy" in str(w.message)]
        same = torch.equal(tokens, gpt2_generate(tiny_gpt2_varied(), *GPT2_PROMPT))
        print("LOADED", loaded["gpt2_kv_cache"], model.is_optimized, counter.calls, same, fallbacks)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED True True 0 True []" in out.stdout, out.stdout[-3000:]


def tiny_whisper() -> torch.nn.Module:
    """A tiny Whisper (random weights, scaled up so its greedy tokens vary)."""
    config = transformers.WhisperConfig(
        vocab_size=99, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None, init_std=0.5)
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def whisper_generate(model, features):
    with torch.inference_mode():
        return model.generate(input_features=features, max_new_tokens=8, do_sample=False)


@pytest.mark.slow
def test_encoder_decoder_generate_with_encoder_decoder_cache(tmp_path, choose_candidate):
    """Whisper's decoder is called with an EncoderDecoderCache (self-attention cache growing each step, the
    cross-attention cache filled once, its is_updated flags a constant of the graph)."""
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    expected = whisper_generate(tiny_whisper(), features)
    assert len(set(expected.flatten().tolist())) > 3
    model = nav.Module(tiny_whisper(), name="whisper_kv_cache", forward_func="forward")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=["TorchScriptCPU"], batch_sizes=(2,),
                                profile_time_s=0.05, pipeline_repeats=0, use_multiprocessing=False)
    status = nav.optimize(lambda f: whisper_generate(model, f), [(2, features)], config)
    assert len(status.modules[model.name].graphs) == 2  # the first call fills the cross-attention cache
    choose_candidate(model, tmp_path, runner="TorchScriptCPU")
    counter = CallCounter(model.__wrapped__.model.decoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = whisper_generate(model, features)
    assert not _eager_warnings(caught)
    assert counter.calls == 0
    assert torch.equal(actual, expected)


@pytest.mark.slow
def test_generate_with_a_static_cache(tmp_path, choose_candidate):
    """cache_implementation="static": the layers allocate their full length on the first call and are written in
    place after; the optimized decoder writes into the caller's tensors too."""
    def generate(model, ids, mask):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=GPT2_NEW_TOKENS, do_sample=False,
                                  cache_implementation="static")

    expected = generate(tiny_gpt2_varied(), *GPT2_PROMPT)
    model = nav.Module(tiny_gpt2_varied(), name="gpt2_static_cache", forward_func="forward")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=["TorchScriptCPU"], batch_sizes=(2,),
                                profile_time_s=0.05, pipeline_repeats=0, use_multiprocessing=False)
    status = nav.optimize(lambda ids, mask: generate(model, ids, mask), [(2, GPT2_PROMPT)], config)
    assert len(status.modules[model.name].graphs) == 2
    choose_candidate(model, tmp_path, runner="TorchScriptCPU")
    counter = CallCounter(model.__wrapped__.transformer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = generate(model, *GPT2_PROMPT)
    assert not _eager_warnings(caught)
    assert counter.calls == 0
    assert torch.equal(actual, expected)


def tiny_t5() -> torch.nn.Module:
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, initializer_factor=10.0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def t5_generate(model, input_ids, attention_mask):
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["AOTInductorCPU", "TorchCompileCPU"])
def test_compiled_decoder_runs_a_live_generate_under_inference_mode_without_compiling(tmp_path, choose_candidate,
                                                                                     runner):
    """A T5 generate under torch.inference_mode, as users call it. Its attention stores K/V as views
    (`.view(b, s, h, d).transpose(1, 2)`): after one token, shape (2, 4, 1, 8) with strides (32, 8, 32, 1), which
    torch calls contiguous, while the captured samples (clones) had the usual strides. AOTInductor's input check
    refused every live decode step (each ran eagerly, with a warning); torch.compile recompiled for them, and for
    the inference mode and inference tensors of the live calls, which its bind warm-up had not used (the first
    generate after the bind: 8-16 s). Now the runners pass such tensors with the usual strides, and the bind warms
    up with every kind of call the capture saw and every captured shape: the first live generate compiles
    nothing, runs no decoder step eagerly and gives eager's tokens."""
    from torch._dynamo.utils import counters

    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    attention_mask = torch.ones_like(input_ids)
    expected = t5_generate(tiny_t5(), input_ids, attention_mask)
    assert len(set(expected.flatten().tolist())) > 3
    model = nav.Module(tiny_t5(), name=f"t5_{runner}", forward_func="forward")
    # fp32 only: the bf16 copies (this T5 sits at the 1 ms a call that adds them) would double the compiles.
    config = nav.OptimizeConfig(workspace=tmp_path, runners=[runner], batch_sizes=(2,), precisions=("fp32",),
                                profile_time_s=0.05, pipeline_repeats=0, use_multiprocessing=False)
    nav.optimize(lambda ids, mask: t5_generate(model, ids, mask), [(2, (input_ids, attention_mask))], config)
    choose_candidate(model, tmp_path, runner=runner)  # binds again: its warm-up is what is tested
    # torch.compile guards on the module's attributes: a shadowed forward would itself recompile, so for it the
    # compile count (none, and no eager warning) shows that the compiled code ran.
    counter = CallCounter(model.__wrapped__.decoder) if runner == "AOTInductorCPU" else None
    compiles = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = t5_generate(model, input_ids, attention_mask)
    assert not _eager_warnings(caught)
    assert counter is None or counter.calls == 0
    assert counters["stats"]["unique_graphs"] == compiles
    assert torch.equal(actual, expected)


def test_canonical_strides_restrides_only_size_1_axes_without_copying():
    from navdeploy.formats.base import canonical_strides

    view = torch.randn(2, 1, 4, 8).transpose(1, 2)  # (2, 4, 1, 8), strides (32, 8, 32, 1)
    same = canonical_strides(view)
    assert same.stride() == (32, 8, 8, 1) and same.data_ptr() == view.data_ptr() and torch.equal(same, view)
    plain, transposed = torch.randn(2, 3, 4), torch.randn(3, 2).t()
    assert canonical_strides(plain) is plain and canonical_strides(transposed) is transposed  # left as they are
