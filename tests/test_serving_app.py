"""The correction API on a real Ray Serve app (127.0.0.1, tiny model, engine `hf`): contract, batching, 4xx, 503,
auth, align, the OpenAI-compatible route (official client), stream cancellation, no head-of-line blocking, error
bodies without internals, a replica killed under load (fault 9(e)) and autoscaling."""

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
INTERNAL_URL = "http://10.11.12.13:9999/internal"
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
        if "FAIL" in question:  # an upstream failure whose body holds internals that must not reach our clients
            out = json.dumps({"error": f"Traceback ... at {INTERNAL_URL}"}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        answer = "x" * 30000 if "LONG" in question else f"Weak answer to: {question}"
        out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": answer}}],
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
        "corrector": {"model": model, "objectives": "ultrafeedback", "hf": {"page_size": 64},
                      "generation": {"max_new_tokens": 8, "max_new_tokens_limit": 900}},
        "max_batch_size": 8, "batch_wait_timeout_s": 0.1, "max_ongoing_requests": 12, "max_queued_requests": 16,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "metrics_interval_s": 1, "look_back_period_s": 2},
        "num_cpus": 0.5, "health_check_period_s": 1, "request_timeout_s": 30, "auth": "none",
        "limits": {"max_question_chars": 2000, "max_objectives": 4, "max_batch_items": 8, "max_body_bytes": 20000},
    }
    base.update(serve_kw)
    return ServeConfig.model_validate(base)


@pytest.fixture(scope="module")
def api_url(serve_port, tiny_model_dir, policy_server, monkeypatch_module):
    from ray import serve

    from metaaligner.serving.app import build

    monkeypatch_module.setenv("MA_TEST_API_TOKEN", TOKEN)
    cfg = _config(str(tiny_model_dir), auth="token", auth_token_env="MA_TEST_API_TOKEN",
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


def test_correct_contract(api_url, tiny_model_dir):
    r = _post(api_url, "/v1/correct", {**Q, "objectives": ["Honesty", {"name": "Brevity", "description": "be short"}],
                                       "generation": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"correction", "objectives", "template", "model", "corrector", "finish_reason", "usage",
                         "latency_ms"}
    assert body["objectives"] == ["Honesty", "Brevity"] and body["template"] == "paper"
    assert body["model"] == "metaaligner" and str(tiny_model_dir) not in r.text  # a name, never the model's path
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
    health = httpx.get(api_url + "/healthz")  # no auth for health, and no model path in it
    assert health.json() == {"status": "ok"} and "tiny" not in health.text


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
    rs = asyncio.run(_burst(api_url, 10, {**Q, "generation": {"max_new_tokens": 16}}))  # within 12 ongoing + 16 queued
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    after = httpx.get(api_url + "/v1/stats", headers=HF).json()
    assert after["replica"] == before["replica"] and after["engine"] == "hf"
    assert after["requests_finished"] - before["requests_finished"] >= 10  # (+ one-token health checks)
    assert after["max_occupancy"] > 1  # requests decoded together in one step
    assert after["generated_tokens"] - before["generated_tokens"] >= sum(
        r.json()["usage"]["completion_tokens"] for r in rs)


@pytest.mark.parametrize("body,status,needle", [
    ({"answer": "a", "objectives": ["Honesty"]}, 422, "question"),                       # missing field
    ({**Q, "question": 42}, 422, "string"),                                             # wrong type
    ({**Q, "objectives": []}, 422, "objectives"),                                       # empty objective list
    ({**Q, "objectives": ["Honesty", "Sarcasm"]}, 422, "Instruction following"),         # unknown -> lists valid names
    ({**Q, "objectives": [{"name": "X"}]}, 422, "description"),                          # free text needs description
    ({**Q, "question": "q" * 2001}, 413, "limit is 2000"),                               # over the configured size
    ({**Q, "objectives": ["Honesty", "Truthfulness", "Helpfulness", "Instruction following", "a"]}, 413, "limit is 4"),
    ({**Q, "generation": {"max_new_tokens": 901}}, 422, "900"),                            # over max_new_tokens_limit
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


def test_fault_9g_wrong_or_missing_token_is_401(api_url):
    """Fault 9(g), the running half: no token and a wrong token both get 401 on every route but /healthz."""
    assert _post(api_url, "/v1/correct", Q, headers={}).status_code == 401
    assert _post(api_url, "/v1/correct", Q, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(api_url, "/v1/correct", Q, headers={"Authorization": TOKEN}).status_code == 401  # no "Bearer"
    assert httpx.get(api_url + "/v1/objectives").status_code == 401
    assert httpx.get(api_url + "/v1/stats").status_code == 401
    r = _post(api_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
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


def test_policy_faults_are_502_without_internals(api_url):
    """The policy's failures are 502 (its fault, not the client's), and no upstream URL or text leaks."""
    failed = _post(api_url, "/v1/align", {"question": "FAIL please", "objectives": ["Honesty"]})
    assert failed.status_code == 502 and "HTTP 500" in failed.json()["detail"]
    assert "10.11.12.13" not in failed.text and "Traceback" not in failed.text and "127.0.0.1" not in failed.text
    too_long = _post(api_url, "/v1/align", {"question": "LONG please", "objectives": ["Honesty"]})
    assert too_long.status_code == 502 and "30000 characters" in too_long.text  # over max_answer_chars: not a 413
    chat = _post(api_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "LONG please"}]})
    assert chat.status_code == 502 and chat.json()["error"]["type"] == "upstream_error", chat.text


def test_overload_is_503_not_hang(api_url):
    t0 = time.monotonic()
    rs = asyncio.run(_burst(api_url, 64, {**Q, "generation": {"max_new_tokens": 64}}))  # > 8 ongoing + 16 queued
    codes = [r.status_code for r in rs]
    assert time.monotonic() - t0 < 90
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 8
    assert any(r.headers.get("retry-after") for r in rs if r.status_code == 503)
    assert _post(api_url, "/v1/correct", Q).status_code == 200  # recovers


def _sse_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def test_openai_client_non_stream_and_stream(api_url):
    """The official openai client against the app: the corrected answer comes back in OpenAI's schema."""
    import openai

    client = openai.OpenAI(base_url=api_url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    convo = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Berlin, probably."}]
    objectives = {"objectives": ["Honesty", {"name": "Brevity", "description": "short"}]}
    r = client.chat.completions.create(model="metaaligner", messages=convo, max_tokens=6, temperature=0,
                                       extra_body=objectives)
    assert r.object == "chat.completion" and r.model == "metaaligner" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert not (r.model_extra or {}).get("policy_usage")  # the answer was given: no policy call
    # the same correction as /v1/correct with the question rendered from the chat (system first, paper template)
    same = _post(api_url, "/v1/correct", {"question": "Be kind.\n\nWhat is the capital of France?",
                                          "answer": "Berlin, probably.", "generation": {"max_new_tokens": 6},
                                          "objectives": ["Honesty", {"name": "Brevity", "description": "short"}]}).json()
    assert r.choices[0].message.content == same["correction"]

    stream = client.chat.completions.create(model="metaaligner", messages=convo, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_body=objectives)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == r.choices[0].message.content  # greedy: the streamed correction is the same
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # no final assistant message: the configured policy answers first, then the corrector corrects it
    _OpenAIHandler.calls.clear()
    aligned = client.chat.completions.create(model="metaaligner", messages=convo[:2], max_tokens=4)
    assert aligned.model_extra["policy_usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert _OpenAIHandler.calls[0]["body"]["messages"] == convo[:2]
    assert aligned.usage.prompt_tokens > 20  # the corrector's prompt, which holds the policy's answer

    bad = openai.OpenAI(base_url=api_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="metaaligner", messages=convo)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model="metaaligner", messages=convo, n=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="metaaligner", messages=convo, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="metaaligner", messages=convo, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="unknown objectives"):
        client.chat.completions.create(model="metaaligner", messages=convo, extra_body={"objectives": ["Nope"]})
    assert [m.id for m in client.models.list()] == ["metaaligner"]


def test_openai_client_defaults_models_and_context_length(api_url):
    """What OpenAI clients and SDKs send by default is accepted and ignored (store, user, metadata,
    parallel_tool_calls, service_tier, seed at temperature 0) and stream_options.include_usage is honoured; seed with
    sampling and unknown fields are refused; a prompt over the context is OpenAI's 400 `context_length_exceeded`;
    /v1/models/{id} and a wrong method answer in OpenAI's shape."""
    import openai

    client = openai.OpenAI(base_url=api_url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    convo = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Berlin, probably."}]
    common = {"model": "metaaligner", "messages": convo, "max_tokens": 6, "temperature": 0,
              "extra_body": {"objectives": ["Honesty"]}}
    defaults = {"store": False, "user": "user-42", "metadata": {"team": "qa"}, "parallel_tool_calls": False,
                "service_tier": "auto", "seed": 7}
    plain = client.chat.completions.create(**common)
    dressed = client.chat.completions.create(**common, **defaults)
    assert dressed.choices[0].message.content == plain.choices[0].message.content
    chunks = list(client.chat.completions.create(**common, **defaults, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).strip() == plain.choices[0].message.content
    assert all(c.usage is None for c in client.chat.completions.create(**common, stream=True))  # not asked: none

    with pytest.raises(openai.BadRequestError) as e:  # a seed would change a sampled result: not silently ignored
        client.chat.completions.create(**{**common, "temperature": 0.7}, seed=7)
    assert e.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**common, "extra_body": {"frobnicate": 1}})
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**common, "messages": [convo[0], {"role": "assistant",
                                                                            "content": "word " * 1900}]})
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["param"] == "messages" and "tokens" in e.value.body["message"]

    model = client.models.retrieve("metaaligner")
    assert model.id == "metaaligner" and model.object == "model" and model.owned_by == "metaaligner"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    wrong = httpx.get(api_url + "/v1/chat/completions", headers=HF)
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_stream_disconnect_frees_its_slot(api_url):
    """A client that goes away mid-stream cancels its generation: the replica's slot frees long before 900 tokens."""
    before = httpx.get(api_url + "/v1/stats", headers=HF).json()
    with httpx.stream("POST", api_url + "/v1/correct/stream", json={**Q, "generation": {"max_new_tokens": 900}},
                      headers=HF, timeout=60) as s:
        assert s.status_code == 200
        pieces = 0
        for line in s.iter_lines():
            pieces += line.startswith("data: ")
            if pieces >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline, stats = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        stats = httpx.get(api_url + "/v1/stats", headers=HF).json()
        if stats["requests_cancelled"] > before["requests_cancelled"] and stats["requests_open"] == 0:
            break
        time.sleep(0.2)
    assert stats["requests_cancelled"] == before["requests_cancelled"] + 1, stats
    assert stats["requests_open"] == 0 and stats["requests_running"] <= 1  # (a one-token health check may run)
    assert stats["generated_tokens"] - before["generated_tokens"] < 900


async def _head_of_line(url: str, long_tokens: int, shorts: int) -> tuple[list[float], list[float], list[str]]:
    """Two long streams; once both produce tokens, `shorts` short requests. Returns (short latencies, stream
    durations, stream finish reasons)."""
    durations, finish, started = [], [], [asyncio.Event(), asyncio.Event()]

    async def long_stream(c: httpx.AsyncClient, i: int):
        t0 = time.monotonic()
        async with c.stream("POST", url + "/v1/correct/stream", headers=HF, json={
                **Q, "question": f"Long question {i}?", "generation": {"max_new_tokens": long_tokens}}) as s:
            assert s.status_code == 200
            async for line in s.aiter_lines():
                if line.startswith("data: ") and '"delta"' in line:
                    started[i].set()
                if line.startswith("data: ") and '"correction"' in line:
                    finish.append(json.loads(line[6:])["finish_reason"])
        durations.append(time.monotonic() - t0)

    async def short(c: httpx.AsyncClient) -> float:
        t0 = time.monotonic()
        r = await c.post(url + "/v1/correct", json={**Q, "generation": {"max_new_tokens": 8}}, headers=HF)
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as c:
        streams = [asyncio.create_task(long_stream(c, i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        latencies = await asyncio.gather(*(short(c) for _ in range(shorts)))
        await asyncio.wait_for(asyncio.gather(*streams), 120)
    return list(latencies), durations, finish


def test_no_head_of_line_blocking(api_url):
    """Short requests sent while two long streams run are not held behind them (engine hf: one scheduler, no
    lock). A ratio with a wide margin, never an absolute time: short p50 <= 25 % of the streams' duration."""
    latencies, durations, finish = asyncio.run(_head_of_line(api_url, long_tokens=768, shorts=8))
    assert finish == ["length", "length"]  # the streams ran their full length while the shorts came and went
    p50 = sorted(latencies)[len(latencies) // 2]
    ratio = p50 / (sum(durations) / len(durations))
    print(f"\nhead-of-line: short p50 {p50:.3f}s, long streams {durations[0]:.2f}s/{durations[1]:.2f}s, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.25, (latencies, durations)
    assert max(latencies) < min(durations)


def test_stream_timeout_is_an_error_event_without_internals(timeout_app_url):
    """Past serve.request_timeout_s a started stream ends with an in-band error (503, no exception text) and
    its generation is cancelled."""
    with httpx.stream("POST", timeout_app_url + "/v1/correct/stream", json={**Q, "generation": {"max_new_tokens": 900}},
                      timeout=60) as s:
        assert s.status_code == 200
        text = "".join(s.iter_text())
    events = _sse_events(text)
    assert events[-1].startswith("event: error") and not any(e.startswith("event: done") for e in events)
    err = json.loads(events[-1].split("data: ", 1)[1])
    assert err == {"detail": "the request timed out (serve.request_timeout_s); retry later", "status": 503}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(timeout_app_url + "/v1/stats").json()["requests_open"]:
        time.sleep(0.2)
    assert httpx.get(timeout_app_url + "/v1/stats").json()["requests_open"] == 0
    # no policy configured and no answer in the chat: a 400 that says so, in OpenAI's shape
    r = httpx.post(timeout_app_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no policy is configured" in r.json()["error"]["message"]


@pytest.fixture
def timeout_app_url(serve_port, tiny_model_dir):
    """A second, open (auth: none) app with a 1 s request timeout and no policy (deleted after its test)."""
    from ray import serve

    from metaaligner.serving.app import build

    serve.run(build(_config(str(tiny_model_dir), request_timeout_s=1)), name="ma-timeout", route_prefix="/timeout")
    yield f"http://127.0.0.1:{serve_port}/timeout"
    serve.delete("ma-timeout")


def test_fault_9e_replica_killed_under_load(api_url):
    """Fault 9(e): kill the corrector replica while 6 clients keep sending. Every request gets 200 or 503 (with
    Retry-After), none a 500, none hangs past the request timeout, and service comes back on a new replica."""
    import ray

    before = httpx.get(api_url + "/v1/stats", headers=HF).json()
    results: list[tuple] = []  # (status, seconds, started after the kill)
    state = {"kill_t": None}

    async def client(c: httpx.AsyncClient, stop_at: float):
        while time.monotonic() < stop_at and not state.get("recovered"):
            t = time.monotonic()
            try:
                r = await c.post(api_url + "/v1/correct", json={**Q, "generation": {"max_new_tokens": 16}}, headers=HF)
                status, retry = r.status_code, r.headers.get("retry-after")
                assert status in (200, 503), r.text
                assert status == 200 or retry, "503 without Retry-After"
            except httpx.HTTPError as e:
                status = f"transport error {type(e).__name__}"
            after = state["kill_t"] is not None and t > state["kill_t"]
            results.append((status, time.monotonic() - t, after))
            if after and sum(1 for s, _, a in results if a and s == 200) >= 10:
                state["recovered"] = time.monotonic()
            if status == 503:
                await asyncio.sleep(0.2)

    async def killer():
        await asyncio.sleep(3)  # load established
        state["kill_t"] = time.monotonic()
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=8)) as c:
            await asyncio.gather(killer(), *(client(c, time.monotonic() + 90) for _ in range(6)))

    asyncio.run(run())
    codes = [s for s, _, _ in results]
    assert set(codes) <= {200, 503}, codes  # no 500, no transport error: nothing lost
    assert state.get("recovered"), f"no recovery within 90 s: {codes[-20:]}"
    assert max(d for _, d, _ in results) < 30 + 5  # request_timeout_s 30: nothing hangs past it
    after = httpx.get(api_url + "/v1/stats", headers=HF).json()
    assert after["replica"] != before["replica"]
    print(f"\nfault 9(e): {len(codes)} requests under load of 6 clients, {codes.count(200)} x 200, {codes.count(503)} x 503, "
          f"0 other; back to 200 {state['recovered'] - state['kill_t']:.1f}s after the kill; "
          f"max latency {max(d for _, d, _ in results):.2f}s")


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
                  warmup=False,  # replica warm-up is tested in test_serving_edge.py; here it only slows upscaling
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
        assert body["policy_model"] == "policy" and body["model"] == "metaaligner"  # names, never paths
        assert str(tiny_model_dir) not in r.text and body["usage"]["policy"]["completion_tokens"] >= 1
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
