"""LoRA adapters on one base model in the engines (no Ray): a batch that mixes adapters gives the same greedy
outputs as one adapter at a time, and each equals PEFT's own model; bad adapters are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.serving.engines import create_engine
from metaaligner.serving.engines.contract import EngineError, GenerationParams
from metaaligner.serving.engines.lora import AdapterError, AdapterSet

NEW_TOKENS = 10


def _make_adapter(base_dir, folder, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")):
    """A PEFT LoRA folder with random A and B (a freshly initialised adapter has B = 0 and changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in (1, 2)]


def _config(model, engine: str) -> CorrectorConfig:
    return CorrectorConfig(model=str(model), engine=engine, hf={"page_size": 64},
                           generation={"max_new_tokens": NEW_TOKENS, "max_new_tokens_limit": 64})


def _prompt_ids(engine, n: int) -> list[list[int]]:
    p = Prompter(CorrectorConfig(model="unused"))
    return [engine.encode(p.build(f"Question {i}: why {'x' * i}?", f"Answer {i}. " * (1 + i % 3),
                                  ["Honesty"]).prompt, NEW_TOKENS) for i in range(n)]


def _peft_reference(base_dir, adapter: str | None, ids: list[int], encoder) -> str:
    """Greedy generation by PEFT's own PeftModel (or the plain base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    tok = encoder.tokenizer
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return encoder.generation(out[0, len(ids):].tolist(), len(ids)).text


@pytest.mark.parametrize("engine_name", ["hf", "hf_static"])
def test_mixed_adapter_batch_equals_one_adapter_at_a_time_and_peft(engine_name, tiny_model_dir, adapters):
    engine = create_engine(_config(tiny_model_dir, engine_name), adapters=adapters, max_batch_size=8,
                           batch_wait_timeout_s=0.01)
    try:
        ids = _prompt_ids(engine, 6)
        choice = [None, adapters[0], adapters[1], adapters[0], None, adapters[1]]
        mixed = engine.generate_batch(ids, [GenerationParams(NEW_TOKENS, 0.0, 1.0, a) for a in choice])
        for adapter in (None, *adapters):
            rows = [i for i, a in enumerate(choice) if a == adapter]
            alone = engine.generate_batch([ids[i] for i in rows],
                                          [GenerationParams(NEW_TOKENS, 0.0, 1.0, adapter)] * len(rows))
            assert [g.text for g in alone] == [mixed[i].text for i in rows], adapter
        # the adapters change the output, and each matches PEFT's own model on the same prompt
        by_adapter = {a: engine.generate_batch([ids[1]], [GenerationParams(NEW_TOKENS, 0.0, 1.0, a)])[0].text
                      for a in (None, *adapters)}
        assert len(set(by_adapter.values())) == 3, by_adapter
        for adapter, text in by_adapter.items():
            assert text == _peft_reference(tiny_model_dir, adapter, ids[1], engine.encoder), adapter
        with pytest.raises(EngineError, match="not loaded"):
            engine.generate_batch([ids[0]], [GenerationParams(NEW_TOKENS, 0.0, 1.0, "/elsewhere/adapter")])
    finally:
        engine.close()


def test_adapter_for_another_model_or_with_unsupported_options_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    wrong_rank = _make_adapter(tiny_model_dir, tmp_path / "ok", seed=3)
    cfg_path = tmp_path / "ok" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 8}))  # the tensors are rank 4
    with pytest.raises(AdapterError, match="do not fit"):
        AdapterSet(model, {"a": tmp_path / "ok"})
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        AdapterSet(model, {"a": wrong_rank})


def test_prefix_cache_is_never_shared_across_adapters(tiny_model_dir, adapters):
    """A prompt's cached KV pages were computed with one adapter: the same prompt under another adapter must not
    reuse them (with prefix caching on, as by default), so each adapter's answer equals PEFT's own."""
    config = CorrectorConfig(model=str(tiny_model_dir), engine="hf", hf={"page_size": 16, "prefix_caching": True},
                             generation={"max_new_tokens": NEW_TOKENS, "max_new_tokens_limit": 64})
    engine = create_engine(config, adapters=adapters, max_batch_size=8, batch_wait_timeout_s=0.01)
    try:
        ids = _prompt_ids(engine, 3)[2]
        assert len(ids) > 3 * 16  # several complete pages to share
        for adapter in (adapters[0], adapters[1], None):  # the same prompt, one adapter after the other
            text = engine.generate_batch([ids], [GenerationParams(NEW_TOKENS, 0.0, 1.0, adapter)])[0].text
            assert text == _peft_reference(tiny_model_dir, adapter, ids, engine.encoder), adapter
    finally:
        engine.close()
