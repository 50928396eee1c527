"""Checks of a model's files against its config.pbtxt, offline: what the backend compares when it loads them.

- ONNX (onnxruntime): input/output names, data types, ranks and fixed dims against the model file's graph (read
  with ``onnx.load(load_external_data=False)``), and a dynamic first axis when ``max_batch_size > 0``.
- TorchScript (pytorch_libtorch): the number of ``forward()`` arguments and returned tensors (``torch.jit.load`` on
  the CPU) against the config's inputs and outputs, and the ``<name>__<index>`` naming the backend maps by.
- AOTInductor (torch_aoti): the ``INPUT__<i>`` / ``OUTPUT__<i>`` names the backend's AOTI path expects. Input and
  output counts are not read: a ``.pt2`` package tells them only when loaded with its compiled library.
- Python backend: ``model.py`` compiles and defines ``TritonPythonModel`` with an ``execute`` method (it is not
  imported: ``triton_python_backend_utils`` exists only inside Triton).

A check whose reader is not installed (``onnx``, ``torch``) is skipped with a warning saying so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

from navdeploy.triton.problems import Problem
from navdeploy.triton.rules import ModelContext

# ONNX TensorProto element type -> Triton data type
ONNX_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
              7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
              13: "TYPE_UINT64", 16: "TYPE_BF16"}
INDEXED = re.compile(r"^.+__(\d+)$")


def _model_files(ctx: ModelContext) -> list[Path]:
    """The model file of every version folder that has one (a missing one is check_versions' problem)."""
    name = ctx.resolved.model_file
    if not name:
        return []
    return [p for p in (ctx.folder / v / name for v in ctx.versions) if p.is_file()]


def _config_shape(ctx: ModelContext, t) -> list[int]:
    """The shape the backend hands the model: reshape (else dims), after a -1 batch axis when batching."""
    shape = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
    return ([-1] if ctx.cfg.max_batch_size > 0 else []) + shape


def _onnx_shape(value) -> Optional[list[int]]:
    """An ONNX value's shape with -1 for symbolic axes; None when the file records no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]


def _onnx_tensor_problems(ctx: ModelContext, where: str, t, value, file: str) -> Iterator[Problem]:
    expected = ONNX_TYPES.get(value.type.tensor_type.elem_type)
    got = ctx.type_name(t.data_type)
    if expected and got != expected:
        yield ctx.problem(f"{where}.data_type", f"{got} differs from {file}'s {expected}.",
                          f"use data_type: {expected}.")
    shape = _onnx_shape(value)
    if shape is None:
        return
    config = _config_shape(ctx, t)
    batching = ctx.cfg.max_batch_size > 0
    if batching and (not shape or shape[0] != -1):
        first = f"its first axis is fixed at {shape[0]}" if shape else "it is a scalar"
        yield ctx.problem(f"{where}.dims", f"max_batch_size is {ctx.cfg.max_batch_size} but in {file} {first}, so "
                          "Triton cannot add a batch axis.", "set max_batch_size: 0 and give the full shape in dims, "
                          "or re-export the model with a dynamic first axis (dynamic_axes / dynamic_shapes).")
        return
    if len(shape) != len(config):
        model_dims = shape[1:] if batching else shape
        fix = ("a 0-d tensor cannot be served by onnxruntime on a non-batching model (Triton has no scalar tensors): "
               "export it as a Python-backend model (navdeploy export-repo --backend python)." if not shape else
               f"use dims: [ {', '.join(map(str, model_dims))} ]" + (" (without the batch axis)." if batching else "."))
        yield ctx.problem(f"{where}.dims", f"the config gives rank {len(config)} ({config}), {file} has rank "
                          f"{len(shape)} ({shape}).", fix)
        return
    for axis, (c, m) in enumerate(zip(config, shape)):
        if m != -1 and c != m:
            yield ctx.problem(f"{where}.dims", f"axis {axis} is {c} in the config (shape {config}) but {m} in {file}.",
                              f"use {m} for that axis.")
            return


def check_onnx(ctx: ModelContext) -> Iterator[Problem]:
    """The config's inputs and outputs are the ONNX graph's: names, types, ranks, fixed dims, batch axis."""
    if ctx.resolved.backend != "onnxruntime":
        return
    files = _model_files(ctx)
    if not files:
        return
    try:
        import onnx
    except ImportError:
        yield ctx.problem("input", "the onnx package is not installed: the config is not compared with the ONNX file.",
                          "pip install onnx to check it.", "warning")
        return
    for path in files:
        file = f"{path.parent.name}/{path.name}"
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the problem reported
            yield ctx.problem("default_model_filename", f"{file} is not a readable ONNX model: {exc}.",
                              "re-export the model.")
            continue
        initializers = {i.name for i in graph.initializer}
        model_inputs = {v.name: v for v in graph.input if v.name not in initializers}
        model_outputs = {v.name: v for v in graph.output}
        for section, tensors, values in (("input", ctx.cfg.input, model_inputs), ("output", ctx.cfg.output,
                                                                                 model_outputs)):
            for i, t in enumerate(tensors):
                where = f"{section}[{i}] ({t.name!r})"
                if t.name not in values:
                    yield ctx.problem(f"{where}.name", f"{t.name!r} is not an {section} of {file} (it has "
                                      f"{sorted(values)}).", f"use the ONNX file's own names: {sorted(values)}.")
                    continue
                yield from _onnx_tensor_problems(ctx, where, t, values[t.name], file)
        missing = sorted(set(model_inputs) - {t.name for t in ctx.cfg.input})
        if missing:
            yield ctx.problem("input", f"{file} takes inputs {missing} the config does not list.",
                              f"add an input entry for each of {missing}.")


def _torchscript_arity(path: Path) -> tuple[int, int, Optional[int]]:
    """(required arguments, all arguments, returned tensors or None when not a tensor/tuple) of forward()."""
    import torch

    schema = torch.jit.load(str(path), map_location="cpu").forward.schema
    args = schema.arguments[1:]  # without self
    required = sum(1 for a in args if not a.has_default_value())
    returns = None
    if len(schema.returns) == 1:
        kind = schema.returns[0].type.kind()
        returns = 1 if kind == "TensorType" else len(schema.returns[0].type.elements()) if kind == "TupleType" else None
    return required, len(args), returns


def _indexed_name_problems(ctx: ModelContext, section: str, tensors, count: Optional[int],
                           strict: str) -> Iterator[Problem]:
    """``<name>__<index>`` names with indices below ``count``; ``strict``: the exact prefix required, or ''."""
    for i, t in enumerate(tensors):
        where = f"{section}[{i}] ({t.name!r}).name"
        match = INDEXED.match(t.name)
        if strict and t.name != f"{strict}__{i}":
            yield ctx.problem(where, f"the pytorch backend's {ctx.resolved.platform} models take tensors named "
                              f"{strict}__<index>, got {t.name!r}.", f'use name: "{strict}__{i}".')
        elif not strict and match is None and section == "output":
            yield ctx.problem(where, f"the pytorch backend maps outputs by a __<index> suffix; {t.name!r} has none.",
                              f'use name: "OUTPUT__{i}".')
        elif match is not None and count is not None and int(match.group(1)) >= count:
            yield ctx.problem(where, f"index {match.group(1)} of {t.name!r} is beyond the {count} {section}(s) of "
                              "forward().", f"use indices 0..{count - 1}.")


def check_pytorch(ctx: ModelContext) -> Iterator[Problem]:
    """TorchScript: forward() arity and return count vs the config; AOTInductor: INPUT__i / OUTPUT__i names."""
    res = ctx.resolved
    if res.backend != "pytorch":
        return
    if res.platform == "torch_aoti":
        yield from _indexed_name_problems(ctx, "input", ctx.cfg.input, None, "INPUT")
        yield from _indexed_name_problems(ctx, "output", ctx.cfg.output, None, "OUTPUT")
        return
    files = _model_files(ctx)
    if not files:
        return
    try:
        required, total, returns = _torchscript_arity(files[-1])
    except ImportError:
        yield ctx.problem("input", "torch is not installed: the config is not compared with the TorchScript file.",
                          "pip install torch to check it.", "warning")
        return
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the problem reported
        yield ctx.problem("default_model_filename", f"{files[-1].parent.name}/{files[-1].name} is not a loadable "
                          f"TorchScript module: {exc}.", "re-export it with torch.jit.trace/script and torch.jit.save.")
        return
    file = f"{files[-1].parent.name}/{files[-1].name}"
    n_in = len(ctx.cfg.input)
    if not required <= n_in <= total:
        wanted = str(required) if required == total else f"{required} to {total}"
        yield ctx.problem("input", f"{file}'s forward() takes {wanted} tensor argument(s), the config lists {n_in}.",
                          f"list {wanted} inputs named INPUT__0 ... in forward()'s order.")
    if returns is not None and len(ctx.cfg.output) > returns:
        yield ctx.problem("output", f"{file}'s forward() returns {returns} tensor(s), the config lists "
                          f"{len(ctx.cfg.output)}.", f"list at most {returns} outputs, OUTPUT__0 ...")
    yield from _indexed_name_problems(ctx, "input", ctx.cfg.input, total, "")
    yield from _indexed_name_problems(ctx, "output", ctx.cfg.output, returns, "")


def _python_model_problem(ctx: ModelContext, path: Path) -> Optional[Problem]:
    file = f"{path.parent.name}/{path.name}"
    try:
        tree = ast.parse(path.read_text(), str(path))
        compile(tree, str(path), "exec")
    except (SyntaxError, ValueError) as exc:
        return ctx.problem("default_model_filename", f"{file} does not compile: {exc}.", "fix the syntax error.")
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if "TritonPythonModel" not in classes:
        return ctx.problem("default_model_filename", f"{file} defines no class TritonPythonModel.",
                           "define class TritonPythonModel with initialize(self, args) and execute(self, requests).")
    methods = {n.name for n in classes["TritonPythonModel"].body if isinstance(n, (ast.FunctionDef,
                                                                                   ast.AsyncFunctionDef))}
    if "execute" not in methods:
        return ctx.problem("default_model_filename", f"{file}: TritonPythonModel has no execute method.",
                           "add def execute(self, requests) returning one InferenceResponse per request.")
    return None


def check_python_model(ctx: ModelContext) -> Iterator[Problem]:
    """model.py compiles and defines TritonPythonModel.execute (checked with ast: it is not imported)."""
    if ctx.resolved.backend != "python":
        return
    for path in _model_files(ctx):
        if path.suffix == ".py":
            problem = _python_model_problem(ctx, path)
            if problem is not None:
                yield problem


ARTIFACT_RULES = (check_onnx, check_pytorch, check_python_model)
