"""Weak-answer sources for /v1/align: an OpenAI-compatible chat-completions server, or a local HF model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from metaaligner.serving.config import PolicyConfig


class PolicyError(RuntimeError):
    """The policy model could not answer (a 502). str() is safe to show a client; `detail` (URLs, upstream text)
    goes to the logs only."""

    def __init__(self, public: str, detail: str = ""):
        super().__init__(public)
        self.detail = detail or public


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
        return await self.answer_messages(chat_messages(question, self.config.system_prompt))

    async def answer_messages(self, messages: list[dict]) -> PolicyAnswer:
        """The policy's reply to a chat; the configured system prompt goes first unless the chat has its own."""
        import httpx

        if self.config.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        body = {"model": self.config.model, "messages": messages,
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature}
        where = f"policy at {self.config.base_url}"
        try:
            r = await self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise PolicyError(f"the policy model is unreachable ({type(e).__name__})",
                              f"{where} unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise PolicyError(f"the policy model answered HTTP {r.status_code}",
                              f"{where} answered {r.status_code}: {r.text[:500]}")
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolicyError("the policy model sent no answer text",
                              f"{where} sent no choices[0].message.content: {r.text[:500]}") from None
        if not isinstance(text, str) or not text.strip():
            raise PolicyError("the policy model returned an empty answer")
        return PolicyAnswer(text, str(data.get("model") or self.config.model), int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0))


def chat_prompt(tokenizer, question: str | list[dict], system_prompt: str | None) -> str:
    """A question or a chat as the policy's prompt: the tokenizer's chat template when it has one, else plain text
    (base models). The configured system prompt goes first unless the chat has its own."""
    messages = chat_messages(question, None) if isinstance(question, str) else list(question)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(messages) <= 2 and all(m["role"] in ("system", "user") for m in messages):
        return "\n\n".join(m["content"] for m in messages)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
