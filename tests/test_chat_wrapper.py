"""`train.chat_wrapper` / `corrector.chat_wrapper` (issue 17 item 7): FastChat's vicuna_v1.1 wrapping, with which
the released checkpoints were trained, reproduced token for token, and the same wrapper when the model is queried."""

from __future__ import annotations

import pyarrow as pa
import pytest

from metaaligner.chat_wrapper import VICUNA_SYSTEM, wrap
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template
from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.training.tokenize import tokenize_batch

UF = load_objective_set("ultrafeedback")


@pytest.fixture(scope="module")
def llama_like_tokenizer():
    """A LLaMA-style tokenizer trained locally: SentencePiece-like "▁" word starts (Metaspace, prepended to the first
    piece), BOS added, </s> as EOS, so a text tokenized alone starts with "▁" as LLaMA's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT:", get_template("ultrafeedback").format_for("better")] * 20
    corpus += ["the quick brown fox jumps over the lazy dog, thank you for asking"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def test_vicuna_wrapping_is_fastchats_training_text_and_loss_mask(llama_like_tokenizer):
    tok = llama_like_tokenizer
    prompt = get_template("ultrafeedback").render("better", UF.render(["Honesty", "Helpfulness"]),
                                                  "Why is the fox quick?", "the fox is lazy")  # ends with "Edit: "
    target = "the quick brown fox jumps over the lazy dog"
    row = pa.table({"id": ["r1"], "prompt": [prompt], "weak_answer": ["the fox is lazy"], "target": [target]})
    out = tokenize_batch(row, tok, 512, 1.0, False, 0, chat_wrapper="vicuna_v1.1").to_pylist()[0]
    # FastChat's preprocess: conv.get_prompt() of vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>"), one tokenization
    conversation = f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT: {target}</s>"
    assert out["input_ids"] == tok(conversation)["input_ids"]
    sep = " ASSISTANT: "
    instruction = conversation.split("</s>")[0].split(sep)[0] + sep
    masked = 1 + len(tok(instruction)["input_ids"]) - 2  # BOS, then FastChat's `instruction_len` ("-2" for LLaMA)
    assert out["prompt_len"] == masked  # the loss starts at the target's first token, as FastChat's labels do
    plain = tokenize_batch(row, tok, 512, 1.0, False, 0).to_pylist()[0]
    assert plain["input_ids"] == tok(prompt)["input_ids"] + tok(target, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]  # none: the paper's raw prompt + target


def test_the_corrector_queries_with_the_wrapper_it_was_trained_with():
    base = {"model": "unused", "template": "ultrafeedback", "objectives": "ultrafeedback"}
    raw = Prompter(CorrectorConfig(**base)).build("Why?", "Because.", ["Honesty"]).prompt
    wrapped = Prompter(CorrectorConfig(**base, chat_wrapper="vicuna_v1.1")).build("Why?", "Because.", ["Honesty"])
    assert raw == get_template("ultrafeedback").render("better", UF.render(["Honesty"]), "Why?", "Because.")
    assert wrapped.prompt == wrap(raw, "vicuna_v1.1") == f"{VICUNA_SYSTEM} USER: {raw} ASSISTANT:"
    with pytest.raises(ValueError, match="unknown chat wrapper"):
        wrap(raw, "chatml")
