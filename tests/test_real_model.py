"""On a real pretrained model (SmolLM2-135M-Instruct: real tokenizer with a chat template and special tokens, tied
embeddings, GQA 9/3, 30 layers; tests/real_model.py downloads and converts it once per machine):

- full fine-tuning, ZeRO-3, 2 workers, 2 optimizer steps on one repeated batch: the loss is finite and falls, the
  export reloads, and the embeddings stay tied;
- LoRA, the same, under ZeRO-2 and ZeRO-3: checkpoints hold the adapter and its optimizer state only, the PEFT
  folder and the merged model reload (the three-stage chain and resume: tests/test_training_lora.py, tiny model);
- a packed micro-batch gives each example the logits it has alone;
- two correctors on one base (the base, and the base + the LoRA adapter trained above) in one `hf` engine, chosen
  by `model` with the official OpenAI client, each answering what PEFT's own model answers;
- `correct` with the real tokenizer, including prompts over the limit (`on_too_long`).

If the fixture cannot be downloaded, these tests fail with that reason (they never skip). Kept lean: 4 examples
of <= 128 tokens, one Ray Train run per mode, fp32 on CPU; all three runs are in the default run (on 2 cores:
LoRA ZeRO-2 ~35 s, LoRA ZeRO-3 ~45 s, full fine-tuning ZeRO-3 ~75 s).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from real_model import smollm2_folder
from training_helpers import write_reformulated

STEPS = 2


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_folder()  # RealModelUnavailable (an error, not a skip) says why it could not be fetched


@pytest.fixture(scope="module")
def reformulated(tmp_path_factory) -> Path:
    return write_reformulated(tmp_path_factory.mktemp("real-data"), n_contrastive=4, n_equal=4, files=1)


def _train_config(data: Path, model: Path, out: Path, zero: int, lora: bool, **extra):
    from metaaligner.training.config import TrainConfig

    lr = 1e-3 if lora else 5e-5
    stage = {"epochs": STEPS, "lr": lr, "warmup_ratio": 0.0}  # 4 examples = one step: the batch repeats
    return TrainConfig.model_validate({
        "data": str(data), "base_model": str(model), "output": str(out), "run_name": out.name, "max_length": 128,
        "num_workers": 2, "log_every": 1, "export_dtype": "fp32",
        "deepspeed": {"zero_stage": zero, "precision": "fp32", "micro_batch_size": 2, "torch_adam": True},
        "warmup": {**stage, "fraction": 1.0}, "equal": {**stage, "enabled": False}, "contrastive": {"enabled": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "merge": True} if lora else None, **extra})


def _metrics(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / stage / "logs" / "metrics.jsonl").read_text().splitlines()]


def _assert_two_steps_learn(summary: dict, records: list[dict]) -> None:
    assert summary["steps"] == STEPS and summary["examples"] == 4 and summary["examples_per_step"]["min"] == 4
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[1] < 0.9 * losses[0], losses  # the same batch again: the first update already lowered its loss


def _assert_tied_export(folder: Path, base: Path) -> None:
    """The export reloads as a plain HF model whose lm_head is its (trained or merged) input embedding."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # one tensor for both ends, as in the base checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9


def _checkpoint_bytes(summary: dict) -> int:
    return sum(p.stat().st_size for p in Path(summary["checkpoint"]).rglob("*") if p.is_file())


def test_full_finetuning_zero3_two_workers(ray_cluster, smollm2, reformulated, tmp_path):
    from safetensors.torch import load_file

    from metaaligner.training.trainer import run_training

    out = tmp_path / "full-z3"
    summary = run_training(_train_config(reformulated, smollm2, out, zero=3, lora=False), None, "warmup")["warmup"]
    _assert_two_steps_learn(summary, _metrics(out, "warmup"))
    assert summary["adapter"] is None and summary["flop_convention"].startswith("6*N")
    _assert_tied_export(out / "warmup" / "model", smollm2)
    trained, base = load_file(str(out / "warmup" / "model" / "model.safetensors")), load_file(
        str(smollm2 / "model.safetensors"))
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # it trained
    assert _checkpoint_bytes(summary) > 12 * 134e6  # fp32 master weights + Adam m, v of every parameter


@pytest.fixture(scope="module")
def lora_zero2(ray_cluster, smollm2, reformulated, tmp_path_factory):
    """LoRA under ZeRO-2 on the default target modules (attention and MLP projections), merged export on."""
    from metaaligner.training.trainer import run_training

    out = tmp_path_factory.mktemp("lora") / "lora-z2"
    summary = run_training(_train_config(reformulated, smollm2, out, zero=2, lora=True), None, "warmup")["warmup"]
    return {"out": out, "summary": summary}


def _assert_adapter_run(out: Path, summary: dict, base: Path) -> None:
    """Two steps learn; the checkpoint holds the adapter and its optimizer state only; the PEFT folder and the
    merged model reload, and the merged model is what PEFT computes from base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _assert_two_steps_learn(summary, _metrics(out, "warmup"))
    assert summary["flop_convention"].startswith("LoRA: 4*N") and 0 < summary["mean_mfu"] < summary["mean_mfu_anchor"]
    adapter = out / "warmup" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    # no base weight in the checkpoint (nor the tied embedding DeepSpeed's own exclusion misses): tens of MB
    # instead of the 1.6 GB of full fine-tuning
    for states in Path(summary["checkpoint"]).rglob("*model_states.pt"):  # ZeRO-3: one per rank
        module = torch.load(states, weights_only=False)["module"]
        assert module and all(".lora_A." in k or ".lora_B." in k for k in module), (states.name, list(module)[:3])
    assert _checkpoint_bytes(summary) < 80e6
    _assert_tied_export(out / "warmup" / "model", base)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
        merged = AutoModelForCausalLM.from_pretrained(str(out / "warmup" / "model"))
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=2e-3, rtol=1e-3)


def test_lora_zero2_two_workers(lora_zero2, smollm2):
    _assert_adapter_run(lora_zero2["out"], lora_zero2["summary"], smollm2)


def test_lora_zero3_two_workers(ray_cluster, smollm2, reformulated, tmp_path):
    """q_proj and v_proj only (LoRA's original choice): fewer modules keep ZeRO-3's per-module hooks cheap on CPU."""
    from metaaligner.training.trainer import run_training

    out = tmp_path / "lora-z3"
    cfg = _train_config(reformulated, smollm2, out, zero=3, lora=True)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": ["q_proj", "v_proj"]})})
    summary = run_training(cfg, None, "warmup")["warmup"]
    _assert_adapter_run(out, summary, smollm2)


def _packed_equivalence(model, tokenizer, attn: str):
    from metaaligner.training.collate import collate_packed
    from metaaligner.training.objective import TargetTokenLoss
    from metaaligner.training.tokens import TokenStore, select_keys
    import pyarrow as pa

    texts = ["What is the capital of France? Paris.", "Name a primary colour. Red is one.",
             "How many legs does a spider have? Eight legs, always."]
    encoded = {k: tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for k, t in zip((11, 22, 33), texts)}
    keys = np.array(sorted(encoded), dtype=np.int64)
    table = pa.table({"key": keys, "input_ids": pa.array([encoded[k] for k in keys], pa.list_(pa.int32())),
                      "prompt_len": pa.array([4] * len(keys), pa.int32()), "id": [str(k) for k in keys]})
    store = TokenStore(keys, np.array([len(encoded[k]) for k in keys]))
    store.add(select_keys(table, keys))
    varlen = attn == "sdpa_varlen"

    def run(batch_keys):
        batch = collate_packed(store, np.array(batch_keys), tokenizer.pad_token_id)
        inputs = batch.model_inputs(varlen)
        with torch.no_grad():
            hidden = model.get_decoder()(**inputs).last_hidden_state
            loss = TargetTokenLoss(model)(target_index=batch.target_index, target_labels=batch.target_labels,
                                          **inputs)
        return model.get_output_embeddings()(hidden)[0], loss

    alone = {k: run([k]) for k in (11, 22, 33)}
    logits, loss = run([22, 11, 33])
    n22, n11 = len(encoded[22]), len(encoded[11])
    torch.testing.assert_close(logits[n22:n22 + n11], alone[11][0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(loss, sum(v[1] for v in alone.values()), atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_packed_example_equals_example_alone_with_gqa(smollm2, attn):
    from transformers import AutoModelForCausalLM

    from metaaligner.modeling import load_tokenizer
    from metaaligner.training.attention import prepare_backend

    prepare_backend(attn, use_gpu=False)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32, attn_implementation=attn).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    _packed_equivalence(model, load_tokenizer(smollm2), attn)


def _reference(base: Path, adapter: Path | None, prompt: str, new_tokens: int) -> str:
    """Greedy text from the base model, or from PEFT's PeftModel with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from metaaligner.modeling import load_tokenizer

    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_two_correctors_on_one_base_chosen_by_model(ray_cluster, smollm2, lora_zero2):
    import socket

    from openai import NotFoundError, OpenAI
    from ray import serve

    from metaaligner.prompts import get_template
    from metaaligner.objectives import load_objective_set, render_objectives
    from metaaligner.serving.app import build
    from metaaligner.serving.config import ServeConfig

    adapter = lora_zero2["out"] / "warmup" / "adapter"
    new_tokens = 12
    cfg = ServeConfig.model_validate({
        "corrector": {"model": str(smollm2), "objectives": "ultrafeedback", "max_input_tokens": 256,
                      "hf": {"page_size": 64, "max_running_requests": 4},
                      "generation": {"max_new_tokens": new_tokens, "max_new_tokens_limit": 64}},
        "correctors": [{"name": "smol-base"}, {"name": "smol-tuned", "adapter": str(adapter), "template": "paper"}],
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "metrics_interval_s": 1, "look_back_period_s": 2},
        "num_cpus": 0.5, "auth": "none", "request_timeout_s": 120})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg), name="ma-real", route_prefix="/real")
        deployments = serve.status().applications["ma-real"].deployments
        assert sorted(deployments) == ["Corrector", "Ingress"]  # one model deployment: one copy of the base
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/real/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol-base", "smol-tuned"]
        question, answer = "What is the capital of France?", "I think it is Berlin, or maybe Paris."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        replies: dict[str, str] = {}

        def ask(name: str) -> None:  # concurrently: the two correctors share the engine's steps
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=new_tokens, temperature=0,
                                               extra_body={"objectives": ["Honesty"]})
            assert r.model == name
            replies[name] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("smol-base", "smol-tuned")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        prompt = get_template("paper").render("better", render_objectives(
            [load_objective_set("ultrafeedback")["Honesty"]]), question, answer)
        assert replies["smol-base"] == _reference(smollm2, None, prompt, new_tokens), replies
        assert replies["smol-tuned"] == _reference(smollm2, adapter, prompt, new_tokens), replies
        with pytest.raises(NotFoundError, match="smol-base"):
            client.chat.completions.create(model="gpt-4", messages=messages)
        stats = client.with_options().get("/stats", cast_to=object, options={"params": {"corrector": "smol-tuned"}})
        assert stats["requests_finished"] >= 2
    finally:
        serve.delete("ma-real")
        serve.shutdown()


def test_correct_with_the_real_tokenizer_and_prompts_over_the_limit(ray_cluster, smollm2, tmp_path):
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    rows = [{"id": "short", "question": "What is 2 + 2?", "answer": "It is 5.", "objectives": ["Honesty"]},
            {"id": "long-answer", "question": "Tell me about cats.", "answer": "Cats are animals. " * 120},
            {"id": "long-question", "question": "Why? " * 300, "answer": "Because."}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CorrectConfig(model=str(smollm2), input=str(src), output=str(tmp_path / "out"), objectives="ultrafeedback",
                        default_objectives=["Helpfulness"], max_input_tokens=192, on_too_long="truncate",
                        hf={"page_size": 64, "max_running_requests": 4},
                        generation={"max_new_tokens": 8, "max_new_tokens_limit": 16}, batch_size=4,
                        max_bad_fraction=0.5)
    summary = run_correction(cfg)
    assert summary["rows"] == 3 and summary["too_long"] == 2 and summary["errors"] == 1, summary
    import pyarrow.parquet as pq

    got = {r["id"]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert got["short"]["error"] is None and not got["short"]["too_long"] and got["short"]["completion_tokens"] >= 1
    cut = got["long-answer"]
    assert cut["too_long"] and cut["error"] is None and cut["prompt_tokens"] <= 192 and cut["correction"]
    assert got["long-question"]["too_long"] and "InputTooLong" in got["long-question"]["error"]
    assert os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_hf_engine_on_cpu_keeps_its_kv_cache_to_a_share_of_memory(smollm2):
    """SmolLM2 has an 8k context: with the default 64 running requests and no prompt limit, pages for every request's
    whole context would be ~24 GB (transformers then refuses to start: 'Memory footprint ... is more than available
    memory'). On CPU the default cache is capped at CPU_KV_MEMORY_SHARE of the available memory; requests beyond
    its pages wait for them, and the engine answers."""
    import psutil

    from metaaligner.serving.config import CorrectorConfig
    from metaaligner.serving.engines import create_engine
    from metaaligner.serving.engines.contract import GenerationParams
    from metaaligner.serving.engines.hf import CPU_KV_MEMORY_SHARE
    from metaaligner.serving.engines.hf_model import TextGenerator

    config = CorrectorConfig(model=str(smollm2), engine="hf")
    assert config.hf.max_running_requests == 64 and config.max_input_tokens is None and config.hf.kv_cache_blocks is None
    engine = create_engine(config, generator=TextGenerator(config))
    try:
        text = engine.generator.model.config
        page_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * config.hf.page_size * 4
        assert engine.cache_pages * page_bytes <= CPU_KV_MEMORY_SHARE * psutil.virtual_memory().total
        ids = engine.generator.tokenizer("The capital of France is")["input_ids"]
        (out,) = engine.generate_batch([ids], [GenerationParams(4, 0.0, 1.0)])
        assert out.text.strip()
    finally:
        engine.close()
