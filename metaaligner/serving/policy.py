"""Weak-answer sources for /v1/align: an OpenAI-compatible chat-completions server, or a local HF model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from metaaligner.serving.config import PolicyConfig


class PolicyError(RuntimeError):
    """The policy model could not answer (answered as 502 by the API)."""


@dataclass
class PolicyAnswer:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int


def chat_messages(question: str, system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]


class OpenAIPolicy:
    """POST {base_url}/chat/completions with httpx; the API key (if any) comes from the env var named in the config."""

    def __init__(self, config: PolicyConfig):
        import httpx

        self.config = config
        headers = {}
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers, timeout=config.timeout_s)

    async def answer(self, question: str) -> PolicyAnswer:
        import httpx

        body = {"model": self.config.model, "messages": chat_messages(question, self.config.system_prompt),
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature}
        try:
            r = await self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise PolicyError(f"policy at {self.config.base_url} unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise PolicyError(f"policy at {self.config.base_url} answered {r.status_code}: {r.text[:200]}")
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolicyError(f"policy at {self.config.base_url} sent no choices[0].message.content") from None
        if not isinstance(text, str) or not text.strip():
            raise PolicyError("policy returned an empty answer")
        return PolicyAnswer(text, str(data.get("model") or self.config.model), int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0))


def chat_prompt(tokenizer, question: str, system_prompt: str | None) -> str:
    """The tokenizer's chat template when it has one, else the plain question (base models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(question, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    return f"{system_prompt}\n\n{question}" if system_prompt else question
