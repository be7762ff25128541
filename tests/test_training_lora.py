"""LoRA training on the tiny model, Ray Train + DeepSpeed ZeRO-2: the stages chain one adapter (the contrastive
stage starts exactly at base + the equal stage's adapter), a failure after a checkpoint resumes from it,
checkpoints hold the adapter only, and an unchanged rerun is skipped. Unit checks without Ray: the merged export
equals PEFT's merge, the FLOP convention for frozen weights, and a changed LoRA setting across stages is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import reformulated_rows, write_reformulated

from metaaligner.config import load_config
from metaaligner.training.config import LoraSettings

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train-tiny.yaml"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def chained(ray_cluster, tiny_model_dir, tmp_path_factory):
    from metaaligner.training.trainer import run_training

    root = tmp_path_factory.mktemp("lora-chain")
    data = write_reformulated(root / "data", n_contrastive=8, n_equal=8, files=1)
    cfg = load_config(TINY, {"train.data": str(data), "train.base_model": str(tiny_model_dir),
                             "train.output": str(root / "out"), "train.checkpoint_every": 1}).train
    cfg = cfg.model_copy(update={
        "lora": LoraSettings(**LORA), "deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 2}),
        "warmup": cfg.warmup.model_copy(update={"enabled": False}),
        "equal": cfg.equal.model_copy(update={"lr": 1e-2, "max_steps": 3}),
        "contrastive": cfg.contrastive.model_copy(update={"lr": 1e-2, "max_steps": 3, "warmup_ratio": 0.0})})
    marker = root / "failed-once"
    faults = [{"stage": "contrastive", "after_step": 1, "marker": str(marker), "action": "raise"}]
    summaries = run_training(cfg, None, "all", faults=faults)
    return {"cfg": cfg, "summaries": summaries, "failed": marker.exists(), "data": data, "out": root / "out"}


def _samples(out: Path, stage: str) -> dict[int, list]:
    lines = (out / stage / "logs" / "samples.jsonl").read_text().splitlines()
    return {r["step"]: r["ids"] for r in map(json.loads, lines)}


def _offline_loss(base: Path, adapter: Path | None, rows: list[dict], max_length: int) -> float:
    """The per-target-token loss of base (+ adapter, as PEFT loads it) on `rows`, computed as training does."""
    import pyarrow as pa
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from metaaligner.modeling import load_tokenizer
    from metaaligner.training.collate import collate_packed
    from metaaligner.training.objective import TargetTokenLoss
    from metaaligner.training.tokenize import tokenize_example
    from metaaligner.training.tokens import TokenStore, select_keys

    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="sdpa").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    encoded = [tokenize_example(tok, r["prompt"], r["weak_answer"], r["target"], max_length) for r in rows]
    keys = np.arange(len(rows), dtype=np.int64)
    table = pa.table({"key": keys, "input_ids": pa.array([e[0] for e in encoded], pa.list_(pa.int32())),
                      "prompt_len": pa.array([e[1] for e in encoded], pa.int32()), "id": [str(k) for k in keys]})
    store = TokenStore(keys, np.array([len(e[0]) for e in encoded]))
    store.add(select_keys(table, keys))
    batch = collate_packed(store, keys, tok.pad_token_id)
    with torch.no_grad():
        loss = TargetTokenLoss(model)(target_index=batch.target_index, target_labels=batch.target_labels,
                                      **batch.model_inputs(False))
    return float(loss) / len(batch.target_labels)


@pytest.mark.slow  # ~80 s; the default run's Ray Train + DeepSpeed LoRA tests: test_real_model.py (ZeRO-2, ZeRO-3)
def test_stages_chain_one_adapter_and_resume(chained, tiny_model_dir):
    from metaaligner.training.tokenize import row_key

    s, out = chained["summaries"], chained["out"]
    equal, contrastive = s["equal"], s["contrastive"]
    assert equal["adapter_input"] is None and contrastive["adapter_input"] == equal["adapter"]
    assert contrastive["model_input"] == equal["model_input"] == str(tiny_model_dir)  # the base, never a merge
    assert "adapter" in contrastive["digest"] and equal["export"] is None  # merge: false (default)
    # the contrastive stage's first loss is exactly that of base + the equal stage's exported adapter
    rows = {row_key(r["id"]): r for r in reformulated_rows(8, "contrastive")}
    first = [rows[k] for k in _samples(out, "contrastive")[1]]
    continued = _offline_loss(tiny_model_dir, out / "equal" / "adapter", first, chained["cfg"].max_length)
    fresh = _offline_loss(tiny_model_dir, None, first, chained["cfg"].max_length)
    assert contrastive["first_loss"] == pytest.approx(continued, rel=1e-4)
    assert abs(continued - fresh) > 1e-3  # ... and not that of a new adapter (= the base model)
    # the injected failure after step 1's checkpoint: the stage resumed there and finished
    assert chained["failed"] and contrastive["resumed_from_step"] == 1 and contrastive["steps"] == 3
    assert contrastive["last_loss"] < contrastive["first_loss"] and equal["last_loss"] < equal["first_loss"]
    for states in Path(contrastive["checkpoint"]).rglob("*model_states.pt"):
        module = torch.load(states, weights_only=False)["module"]
        assert module and all(".lora_" in k for k in module)


@pytest.mark.slow  # needs the chained run above
def test_unchanged_rerun_is_skipped_and_changed_lora_retrains(chained, capsys):
    from metaaligner.training.digest import stage_digest
    from metaaligner.training.lora import stage_adapter_input
    from metaaligner.training.trainer import data_files, run_training, stage_input
    from metaaligner.storage import Storage

    again = run_training(chained["cfg"], None, "all")
    assert capsys.readouterr().out.count("already done") == 2  # equal and contrastive, nothing retrained
    assert {name: again[name]["digest"] for name in again} == {
        name: chained["summaries"][name]["digest"] for name in ("equal", "contrastive")}  # the committed stages
    cfg = chained["cfg"].model_copy(update={"lora": LoraSettings(**{**LORA, "r": 8})})
    storage = Storage.of(None)
    digest = stage_digest(cfg, "equal", data_files(cfg, storage, "equal"), stage_input(cfg, "equal"), storage,
                          stage_adapter_input(cfg, "equal"))
    assert digest["config"] != chained["summaries"]["equal"]["digest"]["config"]  # r is part of the settings


def test_continuing_with_other_lora_settings_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from metaaligner.training.lora import attach

    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    saved.save_pretrained(str(tmp_path / "adapter"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ValueError, match="keep the LoRA settings across stages"):
        attach(model, LoraSettings(r=8, alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter")
    with pytest.raises(ValueError, match="matched no layer"):
        attach(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraSettings(target_modules=["nope_proj"]),
               None)


def test_merged_state_equals_peft_merge(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from metaaligner.training.lora import merged_state, scalings

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                          LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = {n: p.detach().clone() for n, p in peft.named_parameters()}
    ours = merged_state(state, scalings(peft), torch.float32)
    reference = peft.merge_and_unload().state_dict()
    assert set(ours) == {k for k in reference if k != "lm_head.weight" or "lm_head.weight" in ours}
    for k, v in ours.items():
        torch.testing.assert_close(v, reference[k], atol=1e-6, rtol=1e-6)


def test_lora_flops_count_no_weight_gradient_for_frozen_weights(tmp_path):
    """Against torch's FLOP counter on a real forward + backward of a LoRA model (eager attention, every position
    a target): 4 FLOPs per frozen weight and token, 6 per adapter weight; the only matmuls not done are the input
    gradients of layer 0's q/k/v projections and their lora_A (their input, the normed embedding, needs no
    gradient; the MLP's input already depends on the adapted attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaaligner.training.lora import attach
    from metaaligner.training.metrics import ModelShape, training_flops

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))
    model.save_pretrained(tmp_path)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    shape = ModelShape.from_config(tmp_path, lora)
    peft = attach(model, lora, None)
    assert shape.n_adapter == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    s = 24
    with FlopCounterMode(display=False) as counter:
        peft(input_ids=torch.randint(3, 97, (1, s)), labels=torch.randint(3, 97, (1, s))).loss.backward()
    h, kv, r = 32, 2 * 8, 4
    skipped = 2 * (h * h + 2 * h * kv + 3 * h * r) * s  # layer 0: q, k, v (base + lora_A) input gradients
    full_attention = 3 * 2 * 2 * shape.layers * h * s * s  # the counter sees every (q, k) pair; we count causal
    expected = training_flops(shape, [s], [s])[0] + full_attention / 2 - skipped
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)
