"""LLM judge on any OpenAI-compatible chat-completions endpoint (httpx, retries with backoff, bounded concurrency).

HTTP answers: 200 is parsed; 429, 408, 409, 425 and 5xx (and timeouts, connection errors) are retried with backoff,
and still failing they stop the run (the resume cache keeps what was judged). 401, 403 and 404 stop the run at once
(wrong key, no access, wrong URL or model). Any other 4xx — 400, 413 and 422 above all (context length, content
filter) — rejects that one comparison: it becomes `invalid` (`Verdict.rejected`), is never cached, and the run
goes on.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Iterable, Iterator

import httpx

from metaaligner.evaluation.config import JudgeConfig
from metaaligner.evaluation.judges.base import TIE, Comparison, Judge, JudgeUnavailable, Verdict
from metaaligner.evaluation.judges.prompts import build_messages
from metaaligner.objectives import Objective

STOP_STATUSES = frozenset({401, 403, 404})
RETRY_STATUSES = frozenset({408, 409, 425, 429})

REPLY_EXCERPT = 300
_VALUE = r"(1|2|0|tie|answer\s*1|answer\s*2|response\s*1|response\s*2)"
_MARKED = re.compile(r"(?:final\s+verdict|verdict|final\s+answer|decision)\s*(?:is)?\s*[:=\-]?\s*[*\"'`\[(]*\s*"
                     + _VALUE + r"(?![\w.]*\d)", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[\s*(1|2|0|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^[\s*\"'`\[(]*(?:answer|response|verdict)?\s*[:=]?\s*(1|2|0|tie)[\s*\"'`\])]*[.!]?\s*$",
                   re.IGNORECASE)
_FIRST_LINE = re.compile(r"^[*\"'`\[(]*([012])[*\"'`\])]*[ \t]*\n")
_PREFERENCE = re.compile(r"\b(?:answer|response)\s*(1|2)\s+(?:is|was)\s+(?:clearly\s+|slightly\s+|much\s+)?"
                         r"(?:better|superior|preferred|stronger)\b", re.IGNORECASE)
_TIE_PHRASE = re.compile(r"\b(?:it'?s\s+a\s+tie|(?:both|the two)\s+(?:answers\s+)?(?:are\s+)?equally\s+good)\b",
                         re.IGNORECASE)


def _value(token: str) -> int:
    token = token.lower()
    if token == "tie":
        return TIE
    return int(token[-1])


def parse_verdict(reply: str | None) -> int | None:
    """1, 2 or 0 (tie) from a possibly chatty reply; None when it cannot be read unambiguously.

    Precedence: the last explicit 'Verdict: X' (or 'Final answer: X'), then the last '[[X]]', then a reply
    that is only the verdict (the paper's prompts ask for just the digit), then a first line that is only the
    digit (a digit followed by an explanation), then phrases like 'Answer 2 is better' / 'it's a tie' when they
    agree.
    """
    if not reply or not reply.strip():
        return None
    text = reply.strip()
    for pattern in (_MARKED, _BRACKETED):
        found = pattern.findall(text)
        if found:
            return _value(found[-1])
    bare = _BARE.match(text) or _FIRST_LINE.match(text)
    if bare:
        return _value(bare.group(1))
    values = {int(v) for v in _PREFERENCE.findall(text)}
    if _TIE_PHRASE.search(text):
        values.add(TIE)
    return values.pop() if len(values) == 1 else None


class ComparisonRejected(Exception):
    """The judge refused one request (e.g. 400 context length, 413, 422 content filter)."""


def chat_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class LLMJudge(Judge):
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.url = chat_url(cfg.url)
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"judge API key: set the environment variable {cfg.api_key_env} where the judge "
                                 "runs (on a Ray cluster: in the workers too, e.g. from a secret) or set "
                                 "judge.api_key_env: null for an endpoint without auth")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(
            headers=headers, timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
        )
        self._stop = threading.Event()

    def _delay(self, retry: int, retry_after: str | None) -> float:
        delay = self.cfg.backoff_s * (2 ** retry) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.cfg.max_backoff_s)

    def complete(self, messages: list[dict]) -> str | None:
        """One reply's text (None for a malformed 200 body), retrying 429/5xx/timeouts/connection errors;
        `ComparisonRejected` when the judge refuses this request (see the module docstring)."""
        payload = {"model": self.cfg.model, "messages": messages, **self.cfg.sampling_fields()}
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if self._stop.is_set():
                raise JudgeUnavailable("judging stopped after another request failed")
            retry_after = None
            try:
                resp = self.client.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        content = resp.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        return None
                    return content if isinstance(content, str) else None
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code in STOP_STATUSES:
                    hint = (f" (check judge.api_key_env={self.cfg.api_key_env})" if resp.status_code != 404
                            else f" (check judge.url and judge.model={self.cfg.model!r})")
                    raise JudgeUnavailable(f"judge at {self.url} refused the request: {last}{hint}")
                if resp.status_code < 500 and resp.status_code not in RETRY_STATUSES:
                    raise ComparisonRejected(last)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.cfg.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise JudgeUnavailable(f"judge at {self.url} unreachable after {self.cfg.max_retries + 1} attempts: {last}")

    def judge(self, question: str, answer_a: str, answer_b: str, objective: Objective) -> Verdict:
        messages = build_messages(self.cfg.prompt, question, answer_a, answer_b, objective)
        reply = None
        for attempt in range(1, self.cfg.invalid_retries + 2):
            try:
                reply = self.complete(messages)
            except ComparisonRejected as e:
                return Verdict(None, attempts=attempt, raw=str(e)[:REPLY_EXCERPT], rejected=True)
            choice = parse_verdict(reply)
            if choice is not None:
                return Verdict(choice, attempts=attempt)
        return Verdict(None, attempts=self.cfg.invalid_retries + 1, raw=(reply or "")[:REPLY_EXCERPT])

    def judge_many(self, comparisons: Iterable[Comparison]) -> Iterator[tuple[int, Verdict]]:
        """At most `concurrency` requests in flight; yields as each finishes; the first failure stops the rest."""
        items = list(comparisons)
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="llm-judge")
        try:
            pending = {pool.submit(self.judge, c.question, c.answer_a, c.answer_b, c.objective): i
                       for i, c in enumerate(items)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    yield i, fut.result()
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.client.close()
