"""The HTTP edge under load and hostile input, on one real Serve app (127.0.0.1, tiny model, engine `hf`) that
allows 4 ongoing + 4 queued requests: the first request after readiness is as fast as later ones (replicas warm up
before they report ready); a burst of 30 gets only 200s and 503s, every 503 with Retry-After in the route's own
error shape (the ingress queues and rejects, never Serve's proxy); lone surrogates and deep nesting are 4xx in the
route's shape; 200 random malformed bodies per route get no 5xx and leave no traceback in the logs."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

Q = {"question": "What is the capital of France?", "answer": "Berlin, probably.", "objectives": ["Honesty"]}
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "Berlin, probably."}]}
RETRY_AFTER = "2"
# a production-sized KV cache for the tiny model (8192 pages of 64 tokens, 512 MiB): what the hf engine allocates
# on its first request unless the replica warmed up first (SmolLM2-135M with 16 running requests takes ~6 GB)
KV_CACHE_BLOCKS = 8192


class _Policy(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible policy for /v1/align."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"model": "weak", "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": f"Weak answer to: {body['messages'][-1]['content'][:200]}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@dataclass
class Edge:
    url: str
    first_s: float  # the first correction, sent as soon as the app reported ready and answered a readiness probe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def edge(ray_cluster, tiny_model_dir):
    from ray import serve

    from metaaligner.serving.app import build
    from metaaligner.serving.config import ServeConfig

    policy = ThreadingHTTPServer(("127.0.0.1", 0), _Policy)
    threading.Thread(target=policy.serve_forever, daemon=True).start()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig.model_validate({
        "corrector": {"model": str(tiny_model_dir), "hf": {"page_size": 64, "kv_cache_blocks": KV_CACHE_BLOCKS},
                      "generation": {"max_new_tokens": 8, "max_new_tokens_limit": 64}},
        "max_batch_size": 4, "max_ongoing_requests": 4, "max_queued_requests": 4,
        "ingress_max_ongoing_requests": 4, "ingress_max_queued_requests": 4, "retry_after_s": int(RETRY_AFTER),
        "num_cpus": 0.5, "auth": "none", "request_timeout_s": 30, "health_check_period_s": 30,
        "policy": {"kind": "openai", "base_url": f"http://127.0.0.1:{policy.server_address[1]}/v1", "model": "weak"}})
    serve.run(build(cfg), name="ma-edge", route_prefix="/edge")
    url = f"http://127.0.0.1:{port}/edge"
    assert httpx.get(url + "/healthz", timeout=60).status_code == 200  # a readiness probe (routes the proxy once)
    t = time.perf_counter()
    r = httpx.post(url + "/v1/correct", json={**Q, "generation": {"max_new_tokens": 4}}, timeout=60)
    first = time.perf_counter() - t
    assert r.status_code == 200, r.text
    yield Edge(url, first)
    serve.delete("ma-edge")
    serve.shutdown()
    policy.shutdown()
    policy.server_close()


def test_first_request_after_ready_is_warm(edge):
    """Warm before ready: the replica did its one-time work (cache allocation, first scheduling, first kernels)
    before Serve routed anything to it, so the first request is within 2x the steady latency of the same request."""
    lat = []
    for _ in range(5):
        t = time.perf_counter()
        assert httpx.post(edge.url + "/v1/correct", json={**Q, "generation": {"max_new_tokens": 4}},
                          timeout=60).status_code == 200
        lat.append(time.perf_counter() - t)
    steady = statistics.median(lat)
    print(f"\nfirst request after ready {edge.first_s * 1000:.0f} ms, steady median {steady * 1000:.0f} ms "
          f"({edge.first_s / steady:.2f}x)")
    assert edge.first_s <= 2 * steady, (edge.first_s, lat)


async def _burst(url: str, path: str, body: dict, n: int = 30) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url + path, json=body) for _ in range(n)))


@pytest.mark.parametrize("path,body", [("/v1/correct", {**Q, "generation": {"max_new_tokens": 64}}),
                                       ("/v1/chat/completions", {**CHAT, "max_tokens": 64})])
def test_burst_of_30_gets_200_or_one_shape_of_503(edge, path, body):
    """4 ongoing + 4 queued allowed, 30 at once: the ingress serves what it admitted and answers the rest at once
    with 503, Retry-After and the route's error shape. Serve's proxy answers none of them (it would send plain
    text without Retry-After)."""
    rs = asyncio.run(_burst(edge.url, path, body))
    codes = [r.status_code for r in rs]
    overloaded = [r for r in rs if r.status_code == 503]
    print(f"\nburst of 30 on {path}: {codes.count(200)} x 200, {len(overloaded)} x 503")
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 8 and overloaded, codes
    for r in overloaded:
        assert r.headers.get("retry-after") == RETRY_AFTER and r.headers["content-type"] == "application/json"
        if path == "/v1/chat/completions":
            assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "overloaded"
        else:
            assert set(r.json()) == {"detail"} and "overloaded" in r.json()["detail"]
    assert httpx.post(edge.url + path, json=body, timeout=60).status_code == 200  # and it recovers


def _post_raw(url: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


def _assert_4xx_shaped(r: httpx.Response, path: str, needle: str) -> None:
    if path == "/v1/chat/completions":
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and needle in r.json()["error"]["message"]
    else:
        assert r.status_code == 422, r.text
        assert needle in json.dumps(r.json()["detail"])


ROUTES = ["/v1/correct", "/v1/correct/batch", "/v1/correct/stream", "/v1/align", "/v1/chat/completions"]
SURROGATE_BODIES = [
    ("/v1/correct", r'{"question": "\udc80", "answer": "a", "objectives": ["Honesty"]}', "surrogate"),
    ("/v1/correct", r'{"question": "q", "answer": "a\ud83d", "objectives": ["Honesty"]}', "surrogate"),
    ("/v1/correct", json.dumps({"question": "q", "answer": "a",  # a JSON string holding an escaped surrogate
                                "objectives": r'[{"name": "\udc80", "description": "d"}]'}), "unicode"),
    ("/v1/correct/batch", r'{"items": [{"question": "q", "answer": "a", "objectives": ["Honesty"], "\udc80": 1}]}',
     "surrogate"),
    ("/v1/correct/stream", r'{"question": "q", "answer": "\udfff", "objectives": ["Honesty"]}', "surrogate"),
    ("/v1/align", r'{"question": "\udc80?", "objectives": ["Honesty"]}', "surrogate"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\udc80"}, '
                             r'{"role": "assistant", "content": "a"}]}', "surrogate"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "q"}], "user": "\udc80"}', "surrogate"),
]


@pytest.mark.parametrize("path,raw,needle", SURROGATE_BODIES)
def test_lone_surrogates_are_4xx_in_the_routes_shape(edge, path, raw, needle):
    r = _post_raw(edge.url, path, raw.encode())
    _assert_4xx_shaped(r, path, needle)


@pytest.mark.parametrize("path", ROUTES)
def test_deep_nesting_is_4xx_in_the_routes_shape(edge, path):
    for depth in (50_000, 40):
        key = "messages" if path == "/v1/chat/completions" else "objectives"
        raw = ('{"%s": ' % key + "[" * depth + "]" * depth + "}").encode()
        _assert_4xx_shaped(_post_raw(edge.url, path, raw), path, "nested deeper")


# -- property-style: random malformed bodies -------------------------------------------------------------------------
VALID = {
    "/v1/correct": {**Q, "generation": {"max_new_tokens": 2}},
    "/v1/correct/batch": {"items": [{**Q, "generation": {"max_new_tokens": 2}}, Q]},
    "/v1/correct/stream": {**Q, "template": "paper", "generation": {"max_new_tokens": 2, "temperature": 0.5}},
    "/v1/align": {"question": "Why is the sky blue?", "objectives": ["Honesty", {"name": "B", "description": "d"}],
                  "generation": {"max_new_tokens": 2}},
    "/v1/chat/completions": {**CHAT, "max_tokens": 2, "temperature": 0, "stream": False,
                             "objectives": ["Honesty"], "stream_options": {"include_usage": True}},
}
WEIRD = [None, True, False, 0, -1, 1, 2**63, -(2**64), 10**30, 1e308, -1e308, 0.5, float("nan"), float("inf"), "",
         " ", "\x00", "\n\t", "\udc80", "\ud83d", "\U0001f600", "\u202e", "a" * 3000, "[", "[1, 2]", '["\\udc80"]',
         "A; ; B", ";", "{}", [], [None], [[[]]], [1, "a", {}], {}, {"": ""}, {"name": 1}, {"name": "x"},
         {"role": "system"}, {"type": "text", "text": 5}, ["Honesty"] * 40, "Honesty", "paper", "better"]
RAW = [b"", b" ", b"null", b"[]", b'"text"', b"42", b"{", b"}", b'{"a":}', b"\xff\xfe\x00", b"\x80abc",
       b'{"question": 1e999}', b'{"question": -0}', b'{"a": 1' + b"0" * 5000 + b"}", b'{"question": "x"' * 3,
       b"\xef\xbb\xbf{}", b'{"question": "\\u00"}', b'{"question": "\\ud800\\udc00"}']


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _mutated(rng: random.Random, valid: dict) -> bytes:
    """One malformed body: a field replaced, removed or added, the JSON text damaged, or raw junk."""
    kind = rng.random()
    if kind < 0.12:
        return rng.choice(RAW)
    body = json.loads(json.dumps(valid))
    if kind < 0.75:
        path = rng.choice([p for p in _paths(body) if p])
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        action = rng.random()
        if action < 0.7:
            parent[path[-1]] = rng.choice(WEIRD)
        elif action < 0.85 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = [parent[path[-1]]] if rng.random() < 0.5 else {"x": parent[path[-1]]}
        if rng.random() < 0.2:
            body[rng.choice(["unknown", "model", "n", "seed", "tools", "stop", "user"])] = rng.choice(WEIRD)
        return json.dumps(body).encode()
    text = json.dumps(body)
    cut = rng.randrange(len(text))
    damage = rng.random()
    if damage < 0.4:
        return text[:cut].encode()
    if damage < 0.8:
        return (text[:cut] + rng.choice(['"', "{", "]", ",", ":", "\\", "\\u", "\x00", "\udc80"]) + text[cut:]).encode(
            "utf-8", "surrogatepass")
    return ("[" * rng.randrange(1, 100) + text).encode()


def _log_sizes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_random_malformed_bodies_never_get_a_5xx(edge):
    """200 random malformed bodies per route (fixed seed, sent one at a time): every answer is a 4xx or a 200 (a
    mutation can leave a valid body), none is a 5xx, and no traceback reaches the Serve or worker logs."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    before = _log_sizes(logs)
    rng = random.Random(21)
    seen: dict[str, dict[int, int]] = {}
    t0 = time.monotonic()
    with httpx.Client(timeout=30) as client:
        for path in ROUTES:
            for _ in range(200):
                raw = _mutated(rng, VALID[path])
                r = client.post(edge.url + path, content=raw, headers={"Content-Type": "application/json"})
                seen.setdefault(path, {}).setdefault(r.status_code, 0)
                seen[path][r.status_code] += 1
                assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    print(f"\nmalformed bodies: {seen} in {time.monotonic() - t0:.1f}s")
    time.sleep(1)  # let the replicas flush their logs
    grown = []
    for p, size in _log_sizes(logs).items():
        if p.name.endswith((".log", ".err", ".out")) and size > before.get(p, 0):
            with open(p, "rb") as f:
                f.seek(before.get(p, 0))
                if b"Traceback" in f.read():
                    grown.append(p.name)
    assert not grown, f"tracebacks logged while serving malformed bodies: {grown}"


def test_admission_gate_order_and_handover():
    """The gate alone: slots go to waiters in arrival order, a waiter that gives up leaves the queue (or passes on
    the slot it was just handed), and past the queue bound entry is refused at once; -1 queues without bound."""
    from metaaligner.serving.admission import AdmissionGate

    async def scenario():
        gate = AdmissionGate(max_ongoing=1, max_queued=2)
        assert gate.try_enter() is True
        first, second = gate.try_enter(), gate.try_enter()
        assert gate.try_enter() is False and gate.rejected == 1
        gate.abandon(first)  # gave up while queued
        gate.leave()  # the running request ends: the slot goes to `second`
        await asyncio.wait_for(second, 1)
        assert gate.ongoing == 1 and not gate.waiting
        third = gate.try_enter()
        gate.leave()  # handed to `third` ...
        gate.abandon(third)  # ... which had just given up: the slot is freed, not lost
        assert gate.ongoing == 0 and gate.try_enter() is True
        unbounded = AdmissionGate(max_ongoing=1, max_queued=-1)
        assert unbounded.try_enter() is True and all(unbounded.try_enter() not in (True, False) for _ in range(100))

    asyncio.run(scenario())
