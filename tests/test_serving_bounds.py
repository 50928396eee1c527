"""Request bounds of nav.serve: a request declaring more than the served bounds is refused before tritonserver
allocates it, over HTTP (JSON and binary) and gRPC, and the server keeps answering valid requests. The server is a
real PyTriton one on 127.0.0.1 free ports, always stopped."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

import navdeploy as nav
from navdeploy.errors import ConfigError
from navdeploy.serving import Tensor
from navdeploy.serving.bounds import RequestBounds

pytest.importorskip("pytriton")

ROWS = 16  # max_shape of x's -1 axis
MAX_BATCH = 4
MAX_BYTES = 1 << 20
INPUTS = [Tensor("x", np.float32, (-1, 3), max_shape=(ROWS, 3)), Tensor("tag", bytes, (1,), optional=True)]
OUTPUTS = [Tensor("total", np.float32, (1,)), Tensor("tag_len", np.int64, (1,))]


def _pipeline(x, tag=None):
    total = x.reshape(x.shape[0], -1).sum(axis=1, keepdims=True).astype(np.float32)
    lengths = [[len(t)] for t in tag] if tag is not None else [[-1]] * x.shape[0]
    return {"total": total, "tag_len": np.array(lengths, np.int64)}


# --- the bounds themselves ------------------------------------------------------------------------------------
def test_tensor_max_shape_is_checked():
    assert Tensor("a", np.float32, (-1, 3), max_shape=(8, 3)).max_shape == (8, 3)
    for bad in [(8,), (8, 4), (0, 3)]:
        with pytest.raises(ConfigError, match="max_shape"):
            Tensor("a", np.float32, (-1, 3), max_shape=bad)


def test_bounds_name_what_is_over():
    bounds = RequestBounds.of(INPUTS, MAX_BATCH, MAX_BYTES)
    assert bounds.shape_problem("x", [2, 16, 3]) is None
    assert "batches of at most 4" in bounds.shape_problem("x", [5, 1, 3])
    assert "over its bound of 16" in bounds.shape_problem("x", [1, 17, 3])
    assert "exactly 3" in bounds.shape_problem("x", [1, 1, 4])
    assert "size < 1" in bounds.shape_problem("x", [1, 0, 3])
    assert "has 2 axes" in bounds.shape_problem("x", [1, 3])
    # without max_shape only the byte limit bounds the -1 axis
    open_bounds = RequestBounds.of([Tensor("x", np.float32, (-1, 3))], MAX_BATCH, MAX_BYTES)
    assert open_bounds.shape_problem("x", [1, 10**6, 3]) is None
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 10**6, 3],
                          "parameters": {"binary_data_size": 12}}]}
    assert "at most 1048576" in open_bounds.request_problem(header, 12)


# --- a real server, fuzzed ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    handle = nav.serve(_pipeline, inputs=INPUTS, outputs=OUTPUTS, name="bounded", max_batch_size=MAX_BATCH,
                       blocking=False, load_optimized=False, workspace=tmp_path_factory.mktemp("ws"),
                       max_request_bytes=MAX_BYTES, exit_timeout_secs=2)
    try:
        yield handle
    finally:
        handle.stop()


def _http(server, body: bytes, header_length: int | None = None, **extra: str) -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream", **extra}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/bounded/infer", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status, length = response.read(), response.status, response.headers.get(
                "Inference-Header-Content-Length")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    return status, json.loads(raw[:int(length)] if length else raw)


def _entry(name, datatype, shape, data=None, binary=None):
    entry = {"name": name, "datatype": datatype, "shape": shape}
    if binary is not None:
        entry["parameters"] = {"binary_data_size": len(binary)}
    else:
        entry["data"] = data
    return entry


def _send_http(server, entries: list[dict], binaries: list[bytes]) -> tuple[int, dict]:
    head = json.dumps({"inputs": entries}).encode()
    if binaries:
        return _http(server, head + b"".join(binaries), len(head))
    return _http(server, head)


def _grpc_stub(server):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _send_grpc(stub, inputs: list[tuple[str, str, list[int], bytes]]):
    """``(status, outputs)``: status "ok" or the error's code name; outputs name -> raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="bounded")
    for name, datatype, shape, raw in inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(shape)
        request.raw_input_contents.append(raw)
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as err:
        return err.code().name, {}
    return "ok", {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents)}


def _strings(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _valid(rng, protocol, server, stub, tag_size: int = 0):
    """Send one valid request; check its answer."""
    batch, rows = int(rng.integers(1, MAX_BATCH + 1)), int(rng.integers(1, ROWS + 1))
    x = rng.standard_normal((batch, rows, 3)).astype(np.float32)
    tags = [bytes(rng.integers(97, 123, tag_size, dtype=np.uint8)) for _ in range(batch)] if tag_size else None
    expected = x.reshape(batch, -1).sum(axis=1)
    if protocol == "grpc":
        inputs = [("x", "FP32", [batch, rows, 3], x.tobytes())]
        if tags:
            inputs.append(("tag", "BYTES", [batch, 1], _strings(tags)))
        status, out = _send_grpc(stub, inputs)
        assert status == "ok", status
        total = np.frombuffer(out["total"], np.float32)
        tag_len = np.frombuffer(out["tag_len"], np.int64)
    else:
        if protocol == "json":
            entries = [_entry("x", "FP32", [batch, rows, 3], x.reshape(-1).tolist())]
            if tags:
                entries.append(_entry("tag", "BYTES", [batch, 1], [t.decode() for t in tags]))
            status, body = _send_http(server, entries, [])
        else:
            entries, binaries = [_entry("x", "FP32", [batch, rows, 3], binary=x.tobytes())], [x.tobytes()]
            if tags:
                entries.append(_entry("tag", "BYTES", [batch, 1], binary=_strings(tags)))
                binaries.append(_strings(tags))
            status, body = _send_http(server, entries, binaries)
        assert status == 200, body
        out = {o["name"]: o["data"] for o in body["outputs"]}
        total, tag_len = np.array(out["total"], np.float32), np.array(out["tag_len"])
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-4)
    assert tag_len.tolist() == ([tag_size] * batch if tags else [-1] * batch)


HUGE = [2**31, 2**32 + 1, 2**40, 2**62, 10**7]


def _invalid_case(rng) -> tuple[str, list[int], str, object]:
    """(label, shape of x, datatype of x, extra): one request over the bounds or malformed."""
    kind = rng.choice(["huge", "huge_batch", "negative", "zero", "rank", "batch", "rows", "dtype", "width"])
    shape = [int(rng.integers(1, MAX_BATCH + 1)), int(rng.integers(1, ROWS + 1)), 3]
    datatype = "FP32"
    if kind == "huge":
        shape[int(rng.integers(1, 3))] = int(rng.choice(HUGE))
    elif kind == "huge_batch":
        shape[0] = int(rng.choice(HUGE))
    elif kind == "negative":
        shape[int(rng.integers(0, 3))] = -int(rng.integers(1, 2**40))
    elif kind == "zero":
        shape[int(rng.integers(0, 3))] = 0
    elif kind == "rank":
        shape = shape[:int(rng.integers(0, 3))] + ([] if rng.random() < 0.5 else [1, 1, 1])
    elif kind == "batch":
        shape[0] = int(rng.integers(MAX_BATCH + 1, 64))
    elif kind == "rows":
        shape[1] = int(rng.integers(ROWS + 1, 200))
    elif kind == "dtype":
        datatype = str(rng.choice(["INT32", "FP64", "INT8", "BOOL", "FP16", "BF16", "NOPE"]))
    elif kind == "width":
        shape[2] = int(rng.choice([1, 2, 4, 1000]))
    return str(kind), shape, datatype, None


def test_fuzzed_requests_are_refused_and_the_server_keeps_answering(server):
    rng = np.random.default_rng(18)
    channel, stub = _grpc_stub(server)
    protocols = ["json", "binary", "grpc"]
    try:
        for protocol in protocols:  # every protocol answers before the fuzzing starts
            _valid(rng, protocol, server, stub)
        for i in range(90):
            protocol = protocols[i % 3]
            label, shape, datatype, _ = _invalid_case(rng)
            small = np.ones(int(rng.integers(0, 16)), np.float32).tobytes()  # a small body, whatever the shape says
            if protocol == "grpc":
                status, _ = _send_grpc(stub, [("x", datatype, shape, small)])
                assert status != "ok", (label, shape, datatype)
            else:
                if protocol == "json":
                    entries, binaries = [_entry("x", datatype, shape, [1.0] * (len(small) // 4))], []
                else:
                    entries, binaries = [_entry("x", datatype, shape, binary=small)], [small]
                status, body = _send_http(server, entries, binaries)
                assert 400 <= status < 500, (label, shape, datatype, status, body)
                assert body.get("error"), body
            if i % 3 == 2:
                _valid(rng, protocols[int(rng.integers(0, 3))], server, stub)
        assert server.running
    finally:
        channel.close()


def test_malformed_and_oversized_requests(server):
    rng = np.random.default_rng(7)
    channel, stub = _grpc_stub(server)
    x = _entry("x", "FP32", [1, 2, 3], [1.0] * 6)
    try:
        cases = {
            "not JSON": (b"{nope", None),
            "not an object": (b"[1, 2]", None),
            "header length over the body": (json.dumps({"inputs": [x]}).encode(), 10**6),
            "missing x": (json.dumps({"inputs": [_entry("tag", "BYTES", [1, 1], ["a"])]}).encode(), None),
            "unknown input": (json.dumps({"inputs": [x, _entry("other", "FP32", [1], [1.0])]}).encode(), None),
            "x twice": (json.dumps({"inputs": [x, x]}).encode(), None),
            "data shorter than the shape": (json.dumps({"inputs": [_entry("x", "FP32", [1, 16, 3], [1.0])]}).encode(),
                                            None),
            "shape of floats": (json.dumps({"inputs": [_entry("x", "FP32", [1.0, 2.0, 3.0], [1.0] * 6)]}).encode(),
                                None),
            "binary size over the body": (json.dumps({"inputs": [_entry("x", "FP32", [1, 2, 3], binary=b"\0" * 24)]})
                                          .encode() + b"\0" * 4, "header"),
            "string over max_request_bytes": (json.dumps({"inputs": [x, _entry("tag", "BYTES", [1, 1],
                                                                            ["a" * (MAX_BYTES + 1)])]}).encode(),
                                              None),
        }
        for label, (body, header_length) in cases.items():
            if header_length == "header":
                header_length = body.index(b"\0")
            status, answer = _http(server, body, header_length)
            assert 400 <= status < 500, (label, status, answer)
            _valid(rng, "json", server, stub)
        # compressed bodies are checked as they decompress: a huge declared shape, and a small gzip that inflates
        # past max_request_bytes
        huge = json.dumps({"inputs": [_entry("x", "FP32", [1, 2**40, 3], [1.0] * 3)]}).encode()
        for label, body in (("gzip, huge shape", gzip.compress(huge)),
                            ("gzip bomb", gzip.compress(b" " * (MAX_BYTES * 4) + huge))):
            status, answer = _http(server, body, **{"Content-Encoding": "gzip"})
            assert 400 <= status < 500, (label, status, answer)
            _valid(rng, "json", server, stub)
        # over-long strings within the limit are served, by every protocol
        for protocol in ("json", "binary", "grpc"):
            _valid(rng, protocol, server, stub, tag_size=MAX_BYTES // 16)
        # gRPC: missing input, wrong dtype, rows over the bound with truthful data (Triton sizes gRPC inputs from
        # the bytes received; the bound is checked before the pipeline runs)
        rows = np.ones((1, ROWS + 1, 3), np.float32)
        for inputs in ([("tag", "BYTES", [1, 1], _strings([b"a"]))],
                       [("x", "INT32", [1, 2, 3], np.ones(6, np.int32).tobytes())],
                       [("x", "FP32", list(rows.shape), rows.tobytes())]):
            status, _ = _send_grpc(stub, inputs)
            assert status != "ok", inputs[0][:3]
            _valid(rng, "grpc", server, stub)
        assert server.running
    finally:
        channel.close()
