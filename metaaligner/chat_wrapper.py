"""Chat wrappers: the conversation template a corrector's prompt is wrapped in, the same in training and serving.

FastChat's `fastchat/train/train.py` (`preprocess`, as of its last change, 2023-11-26), which trained the released
MetaAligner checkpoints, always wraps each example in `get_conversation_template("vicuna")` = `vicuna_v1.1`
(SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>", roles USER / ASSISTANT, the vicuna system message): the
training text is `{system} USER: {prompt} ASSISTANT: {target}</s>`, the loss only on `{target}</s>`. The authors'
inference script then queries those checkpoints with the raw prompt.

- `none`: the prompt as it is: the paper's T(q, y, O, t), then the target.
- `vicuna_v1.1`: `{system} USER: {prompt} ASSISTANT:`, then the target's tokens and EOS. For LLaMA's tokenizer (a
  leading "▁" on a text tokenised alone) these are the tokens FastChat's one tokenisation of the whole text gives,
  and the prompt is what FastChat's own inference sends (`ASSISTANT:` without the space).
"""

from __future__ import annotations

from typing import Literal

ChatWrapper = Literal["none", "vicuna_v1.1"]
CHAT_WRAPPERS: tuple[str, ...] = ("none", "vicuna_v1.1")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


def wrap(prompt: str, wrapper: str) -> str:
    """The text a model with this wrapper is trained on before its target, and queried with."""
    if wrapper == "none":
        return prompt
    if wrapper == "vicuna_v1.1":
        return f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
    raise ValueError(f"unknown chat wrapper {wrapper!r}: use one of {CHAT_WRAPPERS}")
