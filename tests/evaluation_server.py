"""A real chat-completions server on 127.0.0.1 for judge tests: it 'judges' with the synthetic rules, so its
verdicts are known, and misbehaves on demand (garbage replies, 429s, 503s, 401s, slow replies)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from metaaligner.evaluation.judges.rules import rule_score

_SECTION = re.compile(r"\[The Start of Answer (\d)\]\n(.*?)\n\[The End of Answer \1\]", re.S)
_OBJECTIVE = re.compile(r"^Objective: ([^:]+):", re.M)
_QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[The Start", re.S)
STYLES = (
    "Verdict: {v}",
    "Let me compare both answers carefully.\nAnswer 1 has some points, Answer 2 has others.\nVerdict: {v}",
    "**Final verdict:** [[{v}]]",
    "{v}",
)
GARBAGE = "I am not sure what you mean; both are answers. Perhaps answer 3?"


class ChatJudgeServer:
    """Counts every request; `judgments` counts 200 replies that carry a verdict."""

    def __init__(self, api_key: str | None = None, delay_s: float = 0.0):
        self.api_key = api_key
        self.delay_s = delay_s
        self.fail_after: int | None = None  # after this many judgments every request gets 503
        self.status_override: int | None = None
        self.lock = threading.Lock()
        self.requests = self.judgments = self.in_flight = self.max_in_flight = 0
        self.seen: dict[str, int] = {}
        self.prompts: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                status, payload, headers = server.answer(self.path, dict(self.headers), body)
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ChatJudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    @staticmethod
    def verdict(prompt: str) -> int:
        objective = _OBJECTIVE.search(prompt).group(1)
        answers = dict(_SECTION.findall(prompt))
        a, b = (rule_score("synthetic", objective, answers[k]) for k in ("1", "2"))
        return 0 if a == b else (1 if a > b else 2)

    def answer(self, path: str, headers: dict, body: dict):
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            return self._answer(path, headers, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _answer(self, path: str, headers: dict, body: dict):
        if path != "/v1/chat/completions":
            return 404, {"error": "not found"}, {}
        if self.api_key and headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "invalid api key"}}, {}
        if self.status_override:
            return self.status_override, {"error": "overloaded"}, {}
        prompt = body["messages"][-1]["content"]
        question = _QUESTION.search(prompt).group(1)
        with self.lock:
            if self.fail_after is not None and self.judgments >= self.fail_after:
                return 503, {"error": "down for maintenance"}, {}
            nth = self.seen[prompt] = self.seen.get(prompt, 0) + 1
        if "BUSY" in question and nth == 1:
            return 429, {"error": "rate limited"}, {"Retry-After": "0"}
        if "MALFORMED" in question and nth == 1:
            return 200, b"this is not json", {}
        if "GARBAGE" in question or ("FLAKY" in question and nth == 1):
            content = GARBAGE
        else:
            v = self.verdict(prompt)
            content = STYLES[sum(map(ord, prompt)) % len(STYLES)].format(v=v)
            with self.lock:
                self.judgments += 1
                self.prompts.append(prompt)
        return 200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}, {}
