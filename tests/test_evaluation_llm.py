"""LLM judge end to end against a real chat-completions server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import itertools
import socket

import pytest
from evaluation_server import ChatJudgeServer

from metaaligner.evaluation.config import JudgeConfig
from metaaligner.evaluation.judges import Comparison, JudgeUnavailable, build_judge, rule_score
from metaaligner.objectives import load_objective_set

SYNTH = load_objective_set("synthetic")
ANSWERS = ["Sure. Use a timer. Hope this helps.", "sure! It is really easy.", "Use a timer. Hope this helps!",
           "Basically, use a timer. Hope this helps."]


def _cfg(url: str, **kw) -> JudgeConfig:
    base = dict(kind="llm", url=url, model="judge-test", api_key_env=None, backoff_s=0.01, max_backoff_s=0.05,
                max_retries=2, timeout_s=5, concurrency=4)
    return JudgeConfig(**{**base, **kw})


@pytest.fixture
def server():
    with ChatJudgeServer() as s:
        yield s


def _expected(objective: str, a: str, b: str) -> int:
    sa, sb = rule_score("synthetic", objective, a), rule_score("synthetic", objective, b)
    return 0 if sa == sb else (1 if sa > sb else 2)


def test_verdicts_from_chatty_replies_match_the_known_answers(server):
    judge = build_judge(_cfg(server.url))
    comparisons = [Comparison("How?", a, b, SYNTH[o])
                   for o in SYNTH.names for a, b in itertools.permutations(ANSWERS, 2)]
    verdicts = dict(judge.judge_many(comparisons))
    judge.close()
    assert len(verdicts) == len(comparisons) == server.requests == 48
    for i, c in enumerate(comparisons):
        assert verdicts[i].choice == _expected(c.objective.name, c.answer_a, c.answer_b), c
        assert verdicts[i].attempts == 1
    prompt = server.prompts[0]  # the prompt names the objective with its description and both answers
    assert any(f"{o.name}: {o.description}" in p for p in server.prompts for o in SYNTH.objectives)
    assert "[The Start of Answer 1]" in prompt and "Verdict: 0" in prompt
    assert server.max_in_flight <= 4


def test_429_and_malformed_bodies_are_retried(server):
    judge = build_judge(_cfg(server.url))
    v = judge.judge("BUSY question", ANSWERS[0], ANSWERS[1], SYNTH["Politeness"])
    assert v.choice == 1 and server.requests == 2  # one 429 (Retry-After: 0), then the verdict
    v = judge.judge("MALFORMED question", ANSWERS[1], ANSWERS[0], SYNTH["Calmness"])
    assert v.choice == 2 and v.attempts == 2 and server.requests == 4


def test_garbage_replies_are_reasked_then_invalid_never_a_tie(server):
    judge = build_judge(_cfg(server.url, invalid_retries=2))
    v = judge.judge("FLAKY question", ANSWERS[0], ANSWERS[0], SYNTH["Calmness"])
    assert (v.choice, v.attempts, v.invalid) == (0, 2, False)
    before = server.requests
    v = judge.judge("GARBAGE question", ANSWERS[0], ANSWERS[0], SYNTH["Calmness"])
    assert v.invalid and v.choice is None and v.attempts == 3 and "answer 3" in v.raw
    assert server.requests - before == 3


def test_server_errors_and_unreachable_endpoint_fail_clearly_after_retries(server):
    server.status_override = 503
    judge = build_judge(_cfg(server.url, max_retries=3))
    with pytest.raises(JudgeUnavailable, match=r"unreachable after 4 attempts: HTTP 503"):
        judge.judge("q", ANSWERS[0], ANSWERS[1], SYNTH["Calmness"])
    assert server.requests == 4
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = build_judge(_cfg(f"http://127.0.0.1:{port}/v1", max_retries=1))
    with pytest.raises(JudgeUnavailable, match="unreachable after 2 attempts: ConnectError"):
        judge.judge("q", ANSWERS[0], ANSWERS[1], SYNTH["Calmness"])


def test_api_key_from_env_and_auth_errors_are_not_retried(monkeypatch):
    with ChatJudgeServer(api_key="sekret") as server:
        with pytest.raises(ValueError, match="JUDGE_TEST_KEY"):
            build_judge(_cfg(server.url, api_key_env="JUDGE_TEST_KEY"))
        monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
        with pytest.raises(JudgeUnavailable, match="HTTP 401.*JUDGE_TEST_KEY"):
            build_judge(_cfg(server.url, api_key_env="JUDGE_TEST_KEY")).judge("q", "a", "b", SYNTH["Calmness"])
        assert server.requests == 1
        monkeypatch.setenv("JUDGE_TEST_KEY", "sekret")
        v = build_judge(_cfg(server.url, api_key_env="JUDGE_TEST_KEY")).judge("q", "a!", "b", SYNTH["Calmness"])
        assert v.choice == 2


def test_concurrency_limit_is_respected_and_used():
    with ChatJudgeServer(delay_s=0.05) as server:
        judge = build_judge(_cfg(server.url, concurrency=3))
        comparisons = [Comparison(f"q{i}", ANSWERS[0], ANSWERS[1], SYNTH["Calmness"]) for i in range(12)]
        assert sorted(i for i, _ in judge.judge_many(comparisons)) == list(range(12))
        assert server.max_in_flight == 3


def test_first_failure_stops_the_batch_and_keeps_finished_verdicts(server):
    server.fail_after = 5
    judge = build_judge(_cfg(server.url, concurrency=1, max_retries=1))
    comparisons = [Comparison(f"q{i}", ANSWERS[0], ANSWERS[1], SYNTH["Calmness"]) for i in range(10)]
    got = []
    with pytest.raises(JudgeUnavailable):
        for item in judge.judge_many(comparisons):
            got.append(item)
    assert len(got) == 5 and server.judgments == 5
