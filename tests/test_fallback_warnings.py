"""What an optimized module says when a call runs eagerly: which argument and axis is out of range, how a new
structure differs from the captured calls, and one warning per kind of reason, not one per module."""

from __future__ import annotations

import warnings

import torch

import navdeploy as nav

CONFIG = nav.OptimizeConfig(runners=("TorchScriptCPU",), use_multiprocessing=False, batch_sizes=(1, 2),
                            max_batch_size=2, profile_time_s=0.05)


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None, scale=1.0):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h).mean(1) * scale


def _messages(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "navdeploy" in str(w.message)]


def test_fallback_warnings_name_the_argument_and_come_once_per_kind(isolated_env, choose_candidate):
    with isolated_env("fallback_warnings") as ws:
        torch.manual_seed(0)
        module = nav.Module(Masked().eval(), name="fallback_warnings")
        ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5)
        with torch.no_grad():
            nav.optimize(module, [(2, (ids, {"attention_mask": mask}))], config=CONFIG)
        choose_candidate(module, ws, "TorchScriptCPU")
        eager = module.__wrapped__

        def call(i, **kwargs):
            out = module(i, **kwargs)
            torch.testing.assert_close(out, eager(i, **kwargs))

        with torch.no_grad():
            assert _messages(lambda: call(ids, attention_mask=mask)) == []
            long_ids, long_mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
            (first,) = _messages(lambda: call(long_ids, attention_mask=long_mask))
            assert "input 'args[0]': size 7 of axis 1 is outside the captured range [5, 5]" in first
            # another length of the same axis: the same kind, already said
            assert _messages(lambda: call(ids[:, :3], attention_mask=mask[:, :3])) == []
            # the batch limit is another kind: its own warning, naming max_batch_size as the fix
            (batch,) = _messages(lambda: call(ids.repeat(2, 1), attention_mask=mask.repeat(2, 1)))
            assert "batch size 4" in batch and "max_batch_size=2" in batch
            assert "OptimizeConfig(max_batch_size=...)" in batch
            # a keyword left out (what HF does with an all-ones attention_mask): said which
            (structure,) = _messages(lambda: call(ids))
            assert "new input structure" in structure
            assert "keyword attention_mask is not passed here (the captured calls pass it)" in structure
            (constant,) = _messages(lambda: call(ids, attention_mask=mask, scale=2.0))
            assert "keyword scale is new here" in constant
            assert _messages(lambda: call(ids)) == []  # that structure was said already
            (dtype,) = _messages(lambda: call(ids, attention_mask=mask.half()))
            assert "attention_mask: a float16 tensor of rank 2 here, a float32 tensor of rank 2" in dtype


class Parts(torch.nn.Module):
    """Adds a list of tensors; remembers the list its forward was given."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = None

    def forward(self, parts):
        self.seen = parts
        return self.lin(sum(parts))


def test_a_graph_eager_won_runs_the_modules_own_forward_quietly(isolated_env):
    from navdeploy.inplace.binding import bind
    from navdeploy.workspace.manifest import read_manifest, write_manifest

    with isolated_env("eager_graph") as ws:
        torch.manual_seed(0)
        module = nav.Module(Parts().eval(), name="eager_graph")
        one, two = [torch.randn(2, 4)], [torch.randn(2, 4), torch.randn(2, 4)]
        config = nav.OptimizeConfig(runners=("TorchCPU", "TorchScriptCPU"), use_multiprocessing=False,
                                    batch_sizes=(2,), max_batch_size=2, profile_time_s=0.05)
        with torch.no_grad():
            nav.optimize(module, [(2, (one,)), (2, (two,))], config=config)
        # By hand (which wins a Linear is timing noise): the one-tensor structure eager, the other TorchScript.
        folder = ws / "eager_graph"
        manifest = read_manifest(folder)
        assert len(manifest.graphs) == 2
        for entry in manifest.graphs.values():
            entry.selected = "TorchCPU" if len(entry.graph.inputs) == 1 else "TorchScriptCPU"
        manifest.reverted = None
        write_manifest(folder, manifest)
        assert bind(module, folder) and module.is_optimized
        inner = module.__wrapped__
        with torch.no_grad():
            fresh = [torch.randn(2, 4)]
            assert _messages(lambda: module(fresh)) == []
            assert inner.seen is fresh  # the module's own forward, given the caller's list
            torch.testing.assert_close(module(fresh), inner.lin(fresh[0]))
            inner.seen = None
            pair = [torch.randn(2, 4), torch.randn(2, 4)]
            assert _messages(lambda: module(pair)) == []
            assert inner.seen is None  # the TorchScript runner: no Python forward ran
            torch.testing.assert_close(module(pair), inner.lin(pair[0] + pair[1]))
        # Eager won the one graph with a winner (the other's candidates all failed): a plain pass-through, bound.
        for entry in manifest.graphs.values():
            entry.selected = "TorchCPU" if len(entry.graph.inputs) == 1 else None
        write_manifest(folder, manifest)
        assert bind(module, folder) and not module.is_optimized
        with torch.no_grad():
            torch.testing.assert_close(module(pair), inner.lin(pair[0] + pair[1]))
