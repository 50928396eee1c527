"""nav.serve keeps PyTriton's restricted endpoints restricted and binds loopback by default."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

import navdeploy as nav
from navdeploy.serving import Tensor


def _double(x: np.ndarray) -> dict:
    return {"y": x * 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    handle = nav.serve(_double, inputs=[Tensor("x", np.float32, (4,))], outputs=[Tensor("y", np.float32, (4,))],
                       name="double", max_batch_size=4, blocking=False, load_optimized=False,
                       workspace=tmp_path_factory.mktemp("ws"))
    try:
        yield handle
    finally:
        handle.stop()


def _status(url: str, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_binds_loopback_and_serves(server):
    assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
    assert _status(f"http://{server.http_url}/v2/health/ready") == 200
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/double/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        out = json.loads(response.read())
    assert out["outputs"][0]["data"] == [2, 4, 6, 8]


@pytest.mark.parametrize("path, post", [("/v2/repository/index", True), ("/v2/models/stats", False),
                                        ("/v2/repository/models/double/unload", True)])
def test_restricted_endpoints_refuse_requests_without_the_token(server, path, post):
    code = _status(f"http://{server.http_url}{path}", b"{}" if post else None)
    assert code in (401, 403), f"{path} answered {code}: it must stay restricted"
    # ... and the model is still there, serving.
    assert _status(f"http://{server.http_url}/v2/models/double/ready") == 200
