"""The correction API on a real Ray Serve app (127.0.0.1, tiny model): contract, batching, 4xx, 503, auth, align,
replica failure and autoscaling."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

TOKEN = "test-token-123"
HF = {"Authorization": f"Bearer {TOKEN}"}
Q = {"question": "What is the capital of France?", "answer": "Berlin, probably.", "objectives": ["Honesty"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _OpenAIHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat-completions server (the policy for /v1/align)."""

    calls: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        question = body["messages"][-1]["content"]
        out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": f"Weak answer to: {question}"}}],
                          "usage": {"prompt_tokens": 7, "completion_tokens": 5}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def policy_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _config(model: str, **serve_kw):
    from metaaligner.serving.config import ServeConfig

    base = {
        "corrector": {"model": model, "objectives": "ultrafeedback",
                      "generation": {"max_new_tokens": 8, "max_new_tokens_limit": 64}},
        "max_batch_size": 8, "batch_wait_timeout_s": 0.1, "max_ongoing_requests": 8, "max_queued_requests": 16,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "metrics_interval_s": 1, "look_back_period_s": 2},
        "num_cpus": 0.5, "health_check_period_s": 1, "limits": {"max_question_chars": 2000, "max_objectives": 4,
                                                                "max_batch_items": 8, "max_body_bytes": 20000},
    }
    base.update(serve_kw)
    return ServeConfig.model_validate(base)


@pytest.fixture(scope="module")
def api_url(serve_port, tiny_model_dir, policy_server, monkeypatch_module):
    from ray import serve

    from metaaligner.serving.app import build

    monkeypatch_module.setenv("MA_TEST_API_TOKEN", TOKEN)
    cfg = _config(str(tiny_model_dir), auth_token_env="MA_TEST_API_TOKEN",
                  policy={"kind": "openai", "base_url": policy_server, "model": "weak-policy"})
    serve.run(build(cfg), name="ma-test", route_prefix="/ma")
    yield f"http://127.0.0.1:{serve_port}/ma"
    serve.delete("ma-test")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _post(url, path, body, headers=HF, timeout=60):
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def test_correct_contract(api_url):
    r = _post(api_url, "/v1/correct", {**Q, "objectives": ["Honesty", {"name": "Brevity", "description": "be short"}],
                                       "generation": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"correction", "objectives", "template", "model", "finish_reason", "usage", "latency_ms"}
    assert body["objectives"] == ["Honesty", "Brevity"] and body["template"] == "paper"
    assert isinstance(body["correction"], str) and "Question:" not in body["correction"]  # only the new text
    assert 1 <= body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] > 20
    assert body["latency_ms"] > 0
    # greedy default: deterministic; a released-checkpoint template gives a longer prompt
    again = _post(api_url, "/v1/correct", {**Q, "objectives": ["Honesty", {"name": "Brevity", "description": "be short"}],
                                           "generation": {"max_new_tokens": 5}}).json()
    assert again["correction"] == body["correction"]
    hh = _post(api_url, "/v1/correct", {**Q, "template": "ultrafeedback"}).json()
    assert hh["template"] == "ultrafeedback" and hh["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]

    objs = httpx.get(api_url + "/v1/objectives", headers=HF).json()
    assert objs["set"] == "ultrafeedback" and "Honesty" in [o["name"] for o in objs["objectives"]]
    assert "hh_rlhf" in objs["templates"]
    assert httpx.get(api_url + "/healthz").json()["status"] == "ok"  # no auth for health


def test_batch_endpoint_and_stream(api_url):
    items = [{**Q, "question": f"Question number {i}?"} for i in range(5)]
    r = _post(api_url, "/v1/correct/batch", {"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5 and all(x["usage"]["completion_tokens"] >= 1 for x in results)

    with httpx.stream("POST", api_url + "/v1/correct/stream", json={**Q, "generation": {"max_new_tokens": 6}},
                      headers=HF, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    events = [e for e in text.split("\n\n") if e.strip()]
    deltas = [json.loads(e[len("data: "):])["delta"] for e in events if e.startswith("data: ")]
    done = [e for e in events if e.startswith("event: done")]
    assert len(done) == 1 and len(deltas) >= 1
    final = json.loads(done[0].split("data: ", 1)[1])
    assert final["usage"]["completion_tokens"] == 6 or final["finish_reason"] == "stop"
    assert "".join(deltas).strip() == final["correction"]
    # an oversized prompt is refused before the stream starts
    s = _post(api_url, "/v1/correct/stream", {**Q, "answer": "word " * 1900, "generation": {"max_new_tokens": 64}})
    assert s.status_code in (413, 422), s.text


async def _burst(url: str, n: int, body: dict, headers=HF) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url + "/v1/correct", json=body, headers=headers) for _ in range(n)))


def test_requests_are_batched(api_url):
    before = httpx.get(api_url + "/v1/stats", headers=HF).json()
    rs = asyncio.run(_burst(api_url, 10, {**Q, "generation": {"max_new_tokens": 16}}))  # within 8 ongoing + 16 queued
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    after = httpx.get(api_url + "/v1/stats", headers=HF).json()
    assert after["replica"] == before["replica"]
    assert after["items"] - before["items"] == 10
    assert after["max_batch_size"] > 1 and after["batches"] - before["batches"] < 10


@pytest.mark.parametrize("body,status,needle", [
    ({"answer": "a", "objectives": ["Honesty"]}, 422, "question"),                       # missing field
    ({**Q, "question": 42}, 422, "string"),                                             # wrong type
    ({**Q, "objectives": []}, 422, "objectives"),                                       # empty objective list
    ({**Q, "objectives": ["Honesty", "Sarcasm"]}, 422, "Instruction following"),         # unknown -> lists valid names
    ({**Q, "objectives": [{"name": "X"}]}, 422, "description"),                          # free text needs description
    ({**Q, "question": "q" * 2001}, 413, "limit is 2000"),                               # over the configured size
    ({**Q, "objectives": ["Honesty", "Truthfulness", "Helpfulness", "Instruction following", "a"]}, 413, "limit is 4"),
    ({**Q, "generation": {"max_new_tokens": 65}}, 422, "64"),                            # over max_new_tokens_limit
    ({**Q, "generation": {"temperature": -1}}, 422, "temperature"),
    ({**Q, "generation": {"top_p": 0}}, 422, "top_p"),
    ({**Q, "generation": {"beams": 4}}, 422, "beams"),                                   # unknown parameter
    ({**Q, "template": "chatml"}, 422, "template"),
    ({**Q, "answer": "word " * 1900, "generation": {"max_new_tokens": 64}}, 413, "tokens; the limit is"),  # context
])
def test_bad_input_is_4xx(api_url, body, status, needle):
    r = _post(api_url, "/v1/correct", body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_malformed_and_oversized_bodies(api_url):
    r = httpx.post(api_url + "/v1/correct", content=b"{not json", headers={**HF, "Content-Type": "application/json"})
    assert r.status_code == 422
    chunked = httpx.post(api_url + "/v1/correct", content=iter([json.dumps(Q).encode()]),
                         headers={**HF, "Content-Type": "application/json"})  # no Content-Length: size unknown
    assert chunked.status_code == 411
    r = _post(api_url, "/v1/correct", {**Q, "answer": "x" * 30000})
    assert r.status_code == 413 and "limit is 20000" in r.text
    r = _post(api_url, "/v1/correct/batch", {"items": [Q] * 9})
    assert r.status_code == 413 and "limit is 8" in r.text
    r = _post(api_url, "/v1/correct/batch", {"items": [Q, {**Q, "objectives": ["Nope"]}]})
    assert r.status_code == 422 and "items[1]" in r.text


def test_auth(api_url):
    assert _post(api_url, "/v1/correct", Q, headers={}).status_code == 401
    assert _post(api_url, "/v1/correct", Q, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(api_url + "/v1/objectives").status_code == 401
    assert _post(api_url, "/v1/correct", Q).status_code == 200


def test_align_with_openai_compatible_policy(api_url):
    _OpenAIHandler.calls.clear()
    r = _post(api_url, "/v1/align", {"question": "How do I bake bread?",
                                     "objectives": ["Helpfulness", {"name": "Safety", "description": "be safe"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy_answer"] == "Weak answer to: How do I bake bread?" and body["policy_model"] == "weak-policy"
    assert body["objectives"] == ["Helpfulness", "Safety"] and body["usage"]["policy"] == {"prompt_tokens": 7,
                                                                                            "completion_tokens": 5}
    assert body["usage"]["corrector"]["completion_tokens"] >= 1
    assert len(_OpenAIHandler.calls) == 1 and _OpenAIHandler.calls[0]["path"] == "/v1/chat/completions"
    bad = _post(api_url, "/v1/align", {"question": "q", "objectives": ["Nope"]})
    assert bad.status_code == 422 and len(_OpenAIHandler.calls) == 1  # rejected before asking the policy


def test_overload_is_503_not_hang(api_url):
    t0 = time.monotonic()
    rs = asyncio.run(_burst(api_url, 64, {**Q, "generation": {"max_new_tokens": 64}}))  # > 8 ongoing + 16 queued
    codes = [r.status_code for r in rs]
    assert time.monotonic() - t0 < 90
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 8
    assert any(r.headers.get("retry-after") for r in rs if r.status_code == 503)
    assert _post(api_url, "/v1/correct", Q).status_code == 200  # recovers


def test_dead_replica_is_replaced(api_url):
    import ray

    before = httpx.get(api_url + "/v1/stats", headers=HF).json()
    ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
    deadline, ok_after = time.monotonic() + 90, 0
    while time.monotonic() < deadline and ok_after < 3:
        r = _post(api_url, "/v1/correct", Q)
        assert r.status_code in (200, 503), r.text
        ok_after = ok_after + 1 if r.status_code == 200 else 0
        time.sleep(0.2)
    assert ok_after == 3
    assert httpx.get(api_url + "/v1/stats", headers=HF).json()["replica"] != before["replica"]


def _running(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["Corrector"].replica_states.get("RUNNING", 0)


async def _sustained_load(url: str, clients: int, until, max_s: float) -> int:
    """`clients` concurrent request loops until `until()` is true or max_s passes; returns requests served."""
    done, stop, deadline = 0, asyncio.Event(), time.monotonic() + max_s

    async def client(c: httpx.AsyncClient):
        nonlocal done
        while not stop.is_set() and time.monotonic() < deadline:
            r = await c.post(url + "/v1/correct", json={**Q, "generation": {"max_new_tokens": 32}})
            assert r.status_code == 200, r.text
            done += 1

    async def watch():
        while time.monotonic() < deadline and not await asyncio.to_thread(until):
            await asyncio.sleep(1)
        stop.set()

    async with httpx.AsyncClient(timeout=60) as c:
        await asyncio.gather(watch(), *(client(c) for _ in range(clients)))
    return done


def test_autoscaling_and_local_policy(serve_port, tiny_model_dir):
    """1 -> 2 corrector replicas under sustained load and back to 1 after it stops; /v1/align with a local policy."""
    from ray import serve

    from metaaligner.serving.app import build

    cfg = _config(str(tiny_model_dir), max_batch_size=4, max_queued_requests=-1,
                  autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                               "upscale_delay_s": 3, "downscale_delay_s": 10,
                               "metrics_interval_s": 1, "look_back_period_s": 2},
                  policy={"kind": "local", "model": str(tiny_model_dir), "max_tokens": 12, "num_cpus": 0.25})
    serve.run(build(cfg), name="ma-scale", route_prefix="/scale")
    url = f"http://127.0.0.1:{serve_port}/scale"
    try:
        r = httpx.post(url + "/v1/align", json={"question": "Why is the sky blue?", "objectives": ["Honesty"]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["policy_model"] == str(tiny_model_dir) and body["usage"]["policy"]["completion_tokens"] >= 1
        assert body["usage"]["corrector"]["prompt_tokens"] > body["usage"]["policy"]["prompt_tokens"]

        assert _running("ma-scale") == 1
        t0 = time.monotonic()
        served = asyncio.run(_sustained_load(url, 12, lambda: _running("ma-scale") >= 2, max_s=60))
        assert _running("ma-scale") == 2, f"no upscale after {time.monotonic() - t0:.0f}s ({served} requests)"
        t1 = time.monotonic()
        while _running("ma-scale") > 1 and time.monotonic() - t1 < 60:
            time.sleep(1)
        assert _running("ma-scale") == 1, "no downscale within 60s after the load stopped"
    finally:
        serve.delete("ma-scale")
