"""Fast training checks without Ray: packing equivalence, loss masking, truncation policy, planning, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metaaligner.config import load_config
from metaaligner.training.config import DeepSpeedSettings, StageConfig, TrainConfig
from metaaligner.training.deepspeed_config import build_deepspeed_config
from metaaligner.training.loop import token_losses
from metaaligner.training.packing import IGNORE, collate, plan_stage
from metaaligner.training.tokenize import tokenize_example

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from metaaligner.modeling import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _example(n_prompt: int, n_target: int, seed: int) -> tuple[list[int], int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n_prompt + n_target,), generator=g).tolist(), n_prompt


def _losses(model, rows, pad_id=0):
    batch = collate(rows, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return token_losses(logits, batch["labels"]), batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_example_loss_equals_loss_alone(attn):
    model = _tiny_llama(attn)
    a, b, c, d = _example(9, 6, 1), _example(5, 4, 2), _example(7, 3, 3), _example(4, 8, 4)
    alone, _ = _losses(model, [[a]])
    # a sits in the middle of a packed row; a second row (other examples) and a padding tail share the batch
    packed, batch = _losses(model, [[b, a, c], [d, c]])
    start = len(b[0])
    got = packed[0, start:start + len(a[0]) - 1]
    assert (batch["labels"][0, start:start + len(a[0])] != IGNORE).sum() == 6
    torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)
    assert got[a[1] - 1:].sum() > 0  # the scored target positions are real losses
    # the same row without restarting position ids leaks attention across examples: the test can fail
    leaky = model(input_ids=batch["input_ids"][:1], use_cache=False).logits
    assert not torch.allclose(token_losses(leaky, batch["labels"][:1])[0, start:start + len(a[0]) - 1], alone[0], atol=1e-4)


def test_only_target_tokens_are_scored_whatever_the_prompt(tokenizer):
    target = "Thank you for asking. The quick brown fox."
    ids_1, plen_1, _ = tokenize_example(tokenizer, "Edit: short prompt | Answer: x | Edit:", "x", target, 256)
    ids_2, plen_2, _ = tokenize_example(tokenizer, "A much longer and different prompt about dogs | Answer: y | Edit:",
                                        "y", target, 256)
    labels_1 = collate([[(ids_1, plen_1)]], tokenizer.pad_token_id)["labels"][0]
    labels_2 = collate([[(ids_2, plen_2)]], tokenizer.pad_token_id)["labels"][0]
    scored_1, scored_2 = labels_1[labels_1 != IGNORE], labels_2[labels_2 != IGNORE]
    expected = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert scored_1.tolist() == scored_2.tolist() == expected
    assert (labels_1[:plen_1] == IGNORE).all() and (labels_2[:plen_2] == IGNORE).all()
    # changing prompt token ids (content) leaves the scored positions and the loss mask unchanged
    batch = collate([[(ids_1, plen_1)]], 0)
    shuffled = [7] * plen_1 + ids_1[plen_1:]
    assert torch.equal(collate([[(shuffled, plen_1)]], 0)["labels"], batch["labels"])


def test_truncation_cuts_the_weak_answer_never_objectives_or_target(tokenizer):
    objectives, target = "Harmlessness: safe; Helpfulness: useful", "The quick brown fox jumps."
    weak = "lazy dog " * 60
    prompt = f"Edit considering {objectives} | Question: Where? | Answer: {weak} | Edit:"
    ids, plen, status = tokenize_example(tokenizer, prompt, weak, target, 96)
    assert status == "truncated" and len(ids) <= 96
    text = tokenizer.decode(ids[:plen])
    assert objectives in text and text.endswith(" | Edit:") and "Question: Where?" in text
    assert tokenizer.decode(ids[plen:-1]) == target and ids[-1] == tokenizer.eos_token_id
    assert tokenize_example(tokenizer, prompt, weak, target * 20, 64)[2] == "target_too_long"
    long_question = prompt.replace("Where?", "Where? " * 80)
    assert tokenize_example(tokenizer, long_question, weak, target, 96)[2] == "prompt_too_long"
    assert tokenize_example(tokenizer, "Short | Answer: ok | Edit:", "ok", target, 96)[2] == "ok"


@pytest.mark.parametrize("packing", [True, False])
def test_plan_is_deterministic_complete_and_order_free(packing):
    rng = np.random.default_rng(0)
    keys = rng.choice(2**40, size=53, replace=False).astype(np.int64)
    lengths = rng.integers(5, 60, size=53)
    kwargs = dict(packing=packing, max_length=128, micro_batch_size=2, slots_per_step=4, seed=3, epochs=2, max_steps=None)
    plan = plan_stage(keys, lengths, **kwargs)
    perm = rng.permutation(53)
    assert plan == plan_stage(keys[perm], lengths[perm], **kwargs)  # independent of read order
    assert plan != plan_stage(keys, lengths, **{**kwargs, "seed": 4})
    assert all(len(step) == 4 for step in plan)
    by_key = dict(zip(keys.tolist(), lengths.tolist()))
    seen = [k for step in plan for micro in step for row in micro for k in row]
    assert sorted(seen) == sorted(keys.tolist() * 2)  # every example once per epoch, nothing dropped
    for step in plan:
        for micro in step:
            assert len(micro) <= 2 and all(sum(by_key[k] for k in row) <= 128 for row in micro)
            if not packing:
                assert all(len(row) == 1 for row in micro)
    assert len(plan_stage(keys, lengths, **{**kwargs, "max_steps": 3})) == 3


def test_deepspeed_config_from_settings():
    stage = StageConfig(lr=2e-5, warmup_ratio=0.1)
    cfg = build_deepspeed_config(DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True,
                                                   micro_batch_size=4, grad_accum=2), stage, 16, 1000)
    assert cfg["train_batch_size"] == 128 and cfg["bf16"]["enabled"]
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 100 and cfg["optimizer"]["params"]["lr"] == 2e-5
    plain = build_deepspeed_config(DeepSpeedSettings(zero_stage=0, precision="fp32"), StageConfig(warmup_ratio=0), 2, 10)
    assert plain["zero_optimization"] == {"stage": 0} and not plain["bf16"]["enabled"]
    assert plain["scheduler"]["params"]["warmup_min_ratio"] == 1.0  # no warm-up: full lr from step 1
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        TrainConfig(data="d", base_model="m", output="o", deepspeed={"zero_stage": 2, "offload_params": True})


@pytest.mark.parametrize("name", ["train-tiny", "train-tinyllama-1.1b", "train-llama2-7b", "train-llama2-13b-zero3"])
def test_shipped_train_configs_load(name):
    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml").train
    assert cfg is not None and cfg.deepspeed.zero_stage == 3
    if name.endswith("13b-zero3"):
        assert cfg.num_workers == 16 and cfg.use_gpu and cfg.deepspeed.activation_checkpointing


def test_tokenize_batch_counts_every_row(tokenizer):
    import pyarrow as pa

    from metaaligner.training.tokenize import tokenize_batch

    table = pa.table({"id": ["a", "b", "c", "d"], "subset": ["equal"] * 4,
                      "prompt": ["Q | Answer: w | Edit:", "Q | Answer: w | Edit:", None, "Q | Answer: w | Edit:"],
                      "weak_answer": ["w", "w", "w", "w"],
                      "target": ["fine", "long " * 200, "x", ""]})
    out = tokenize_batch(table, tokenizer, 64, 1.0, False, 0)
    assert out.column("status").to_pylist() == ["ok", "target_too_long", "empty_field", "empty_field"]
    warm = tokenize_batch(table, tokenizer, 64, 1.0, True, 0)  # warm-up: the target is the weak answer
    ids, plen = warm.column("input_ids")[0].as_py(), warm.column("prompt_len")[0].as_py()
    assert tokenizer.decode(ids[plen:-1]) == "w"


def test_warmup_fraction_is_a_stable_sample():
    from metaaligner.training.tokenize import in_fraction

    picked = [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=1)]
    assert 850 < len(picked) < 1150
    assert picked == [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=1)]
    assert picked != [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=2)]
