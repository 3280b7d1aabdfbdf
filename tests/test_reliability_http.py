"""The HTTP API under hostile input, and what the lab exposes.

Hand-written requests a fuzzer rarely builds (numbers past int64, NaN and Infinity literals, a lone UTF-16
surrogate, bodies that are not JSON objects, a flood of garbage in parallel): always a 4xx with a message,
never a 5xx, and the server answers a good request afterwards. Schema-driven fuzzing (schemathesis) lives
in tests/test_http_fuzz.py, the common 400 cases in tests/test_server.py; not repeated here.

Security: `lab serve` and `lab dashboard` listen on 127.0.0.1 unless --host says otherwise (checked on the
real sockets), no route takes a path, and nothing in the lab unpickles untrusted bytes (source scan).
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
JSON = {"content-type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HOSTILE = [
    ("max-tokens-past-int64", {"json": {"prompt": "hi", "max_tokens": 10**30}}, "max_tokens"),
    ("max-tokens-2^63", {"json": {"prompt": "hi", "max_tokens": 2**63}}, "max_tokens"),
    ("max-tokens-text", {"json": {"prompt": "hi", "max_tokens": "abc"}}, "max_tokens"),
    ("max-tokens-fraction", {"json": {"prompt": "hi", "max_tokens": 2.5}}, "max_tokens"),
    ("temperature-text", {"json": {"prompt": "hi", "temperature": "hot"}}, "temperature"),
    ("temperature-nan", {"content": b'{"prompt": "hi", "temperature": NaN}'}, "temperature"),
    ("temperature-inf", {"content": b'{"prompt": "hi", "temperature": Infinity}'}, "temperature"),
    ("ignore-eos-text", {"json": {"prompt": "hi", "ignore_eos": "maybe"}}, "ignore_eos"),
    ("model-number", {"json": {"prompt": "hi", "model": 5}}, "model"),
    ("prompt-number", {"json": {"prompt": 5}}, "prompt"),
    ("prompt-negative-id", {"json": {"prompt": [-1, 2]}}, "vocabulary"),
    ("prompt-empty-nested", {"json": {"prompt": [[]]}}, "empty"),
    ("prompt-empty-string-list", {"json": {"prompt": [""]}}, "empty"),
    ("prompt-past-context", {"json": {"prompt": "x" * 5000, "max_tokens": 2}}, "context"),
    ("prompt-lone-surrogate", {"content": b'{"prompt": "\\ud800", "max_tokens": 2}'}, "prompt"),
    ("body-array", {"json": []}, ""),
    ("body-string", {"json": "x"}, ""),
    ("body-null", {"content": b"null"}, ""),
    ("body-empty", {"content": b""}, ""),
    ("body-invalid-utf8", {"content": b"\xff\xfe\x00"}, ""),
    ("body-truncated", {"content": b'{"prompt": "hi", "max_'}, ""),
    ("body-deep-nesting", {"content": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"}, ""),
    (
        "body-form",
        {"content": b"prompt=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        "",
    ),
]


def _post(url: str, kw: dict) -> httpx.Response:
    kw = dict(kw)
    if "content" in kw:
        kw.setdefault("headers", JSON)
    return httpx.post(url + "/v1/completions", timeout=30, **kw)


@pytest.mark.parametrize("kw,needle", [(k, n) for _, k, n in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_4xx_with_a_message(server_url, kw, needle) -> None:
    r = _post(server_url, kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert needle in err["message"], err["message"]


def test_a_flood_of_garbage_in_parallel_then_a_good_request_is_served(server_url) -> None:
    bodies = [kw for _, kw, _ in HOSTILE] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda kw: _post(server_url, kw).status_code, bodies))
    assert all(400 <= c < 500 for c in codes), codes
    health = httpx.get(server_url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["running"] == 0 and health.json()["waiting"] == 0
    r = httpx.post(server_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server_url) -> None:
    body = {"prompt": "hello", "max_tokens": 16, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server_url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 20
    while httpx.get(server_url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the abandoned request still holds a slot"
        time.sleep(0.05)


# --- security -----------------------------------------------------------------------------------


def test_no_route_takes_a_path_or_a_file(server_url) -> None:
    schema = httpx.get(server_url + "/openapi.json").json()
    for path, ops in schema["paths"].items():
        assert "{" not in path, f"{path} takes a path parameter"
        for op in ops.values():
            assert not op.get("parameters"), f"{path} takes query/path parameters: {op['parameters']}"
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert not [p for p in props if re.search(r"path|file|dir|url", p)], props
    for probe in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../etc/passwd"):
        r = httpx.get(server_url + probe)
        assert r.status_code == 404 and "root:" not in r.text


def _listening(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    addrs = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        addrs |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return addrs


def _wait_listening(proc: subprocess.Popen, port: int, timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return _listening(proc.pid)
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port}")


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("MODEL_PATH", None)
    return e


@pytest.mark.parametrize(
    "argv,timeout_s",
    [
        (["serve", "--preset", "tiny", "--device", "cpu", "--max-seq-len", "64"], 90),
        (["dashboard", "--reports", str(ROOT / "tests" / "fixtures" / "reports")], 90),
    ],
    ids=["serve", "dashboard"],
)
def test_servers_listen_on_loopback_only_by_default(argv, timeout_s) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab", *argv, "--port", str(port)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        addrs = _wait_listening(proc, port, timeout_s)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert addrs == {"127.0.0.1"}, f"listening on {addrs}"


def test_exposing_a_server_takes_an_explicit_flag() -> None:
    from lab.cli import build_parser

    parser = build_parser()
    for cmd in ("serve", "dashboard", "notebooks"):
        args = parser.parse_args([cmd] if cmd != "serve" else [cmd])
        host = getattr(args, "host", None) or getattr(args, "ip", None)
        assert host == "127.0.0.1", (cmd, host)
    assert parser.parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"


# --- nothing unpickles untrusted data ------------------------------------------------------------

SCANNED = ["lab", "dashboard", "benchmarks"]
FORBIDDEN_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cPickle.load",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "pd.read_pickle",
    "torch.distributed.broadcast_object_list",
    "dist.broadcast_object_list",
    "dist.all_gather_object",
    "dist.recv_object_list",
    "dist.scatter_object_list",
    "dist.gather_object",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls() -> list[tuple[str, int, str, ast.Call]]:
    out = []
    for d in SCANNED:
        for path in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    out.append((str(path.relative_to(ROOT)), node.lineno, _dotted(node.func), node))
    return out


def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    calls = _calls()
    loads = [(f, n, c) for f, n, name, c in calls if name in ("torch.load",)]
    assert loads, "the scan found no torch.load at all: is it looking in the right place?"
    for f, n, c in loads:
        kw = {k.arg: k.value for k in c.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
            f"{f}:{n}: torch.load without weights_only=True"
        )
    bad = [f"{f}:{n}: {name}" for f, n, name, _ in calls if name in FORBIDDEN_CALLS]
    assert not bad, bad
    for f, n, name, c in calls:  # yaml.load only with a safe loader; numpy never with pickles allowed
        kw = {k.arg: k.value for k in c.keywords}
        if name == "yaml.load":
            loader = kw.get("Loader") or (c.args[1] if len(c.args) > 1 else None)
            assert loader is not None and "Safe" in _dotted(loader), f"{f}:{n}: yaml.load without SafeLoader"
        if name in ("np.load", "numpy.load"):
            v = kw.get("allow_pickle")
            assert v is None or (isinstance(v, ast.Constant) and v.value is False), f"{f}:{n}: allow_pickle"
