"""Fast training checks without Ray: packed equivalence per attention backend, loss masking and normalisation,
truncation, planning, config refusals, kernel selection, FLOP convention, checkpoint upload records."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from training_helpers import reference_varlen_attn

from metaaligner.config import load_config
from metaaligner.training.attention import VARLEN_BACKENDS, adapt_varlen_attn, prepare_backend, register_torch_varlen
from metaaligner.training.collate import collate_packed, collate_padded
from metaaligner.training.config import DeepSpeedSettings, StageConfig, TrainConfig
from metaaligner.training.deepspeed_config import build_deepspeed_config
from metaaligner.training.objective import TargetTokenLoss
from metaaligner.training.packing import plan_stage
from metaaligner.training.tokenize import tokenize_example
from metaaligner.training.tokens import TokenStore, select_keys

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


def _store(examples: dict[int, tuple[list[int], int]]) -> TokenStore:
    """A worker-side store filled through the same Arrow path the workers use."""
    keys = np.array(sorted(examples), dtype=np.int64)
    table = pa.table({"key": keys, "input_ids": pa.array([examples[k][0] for k in keys], pa.list_(pa.int32())),
                      "prompt_len": pa.array([examples[k][1] for k in keys], pa.int32()),
                      "id": [str(k) for k in keys]})
    store = TokenStore(keys, np.array([len(examples[k][0]) for k in keys]))
    store.add(select_keys(table, keys))
    store.check_complete()
    return store


def _examples() -> dict[int, tuple[list[int], int]]:
    g = torch.Generator().manual_seed(0)
    shapes = {11: (9, 6), 22: (5, 4), 33: (7, 3), 44: (4, 8)}  # key -> (prompt tokens, target tokens)
    return {k: (torch.randint(3, 97, (p + t,), generator=g).tolist(), p) for k, (p, t) in shapes.items()}


def _logits_and_loss(model, batch, varlen: bool):
    inputs = batch.model_inputs(varlen)
    with torch.no_grad():
        hidden = model.get_decoder()(**inputs).last_hidden_state
        loss = TargetTokenLoss(model)(target_index=batch.target_index, target_labels=batch.target_labels, **inputs)
    return model.get_output_embeddings()(hidden)[0], loss


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_varlen", "torch_varlen"])
def test_packed_example_equals_example_alone(attn):
    """Every CPU backend (and torch_varlen's AttentionInterface plumbing, on a CPU reference kernel): an
    example's logits and loss inside a flattened packed micro-batch equal those of the example alone."""
    if attn == "torch_varlen":
        register_torch_varlen(adapt_varlen_attn(reference_varlen_attn))
    if attn != "torch_varlen":
        prepare_backend(attn, use_gpu=False)
    model, store = _tiny_llama(attn), _store(_examples())
    varlen = attn in VARLEN_BACKENDS
    alone = {k: _logits_and_loss(model, collate_packed(store, np.array([k]), 0), varlen) for k in (11, 22, 33)}
    packed = collate_packed(store, np.array([22, 11, 33]), 0)
    assert packed.cu_seq_lens.tolist() == [0, 9, 24, 34] and packed.max_length == 15
    logits, loss = _logits_and_loss(model, packed, varlen)
    torch.testing.assert_close(logits[9:24], alone[11][0], atol=1e-5, rtol=1e-5)  # the example in the middle
    torch.testing.assert_close(loss, sum(alone[k][1] for k in alone), atol=1e-4, rtol=1e-5)  # summed target losses
    assert len(packed.target_index) == 6 + 4 + 3
    # positions that do not restart per example leak attention across examples: the check can fail
    leaky = dict(packed.model_inputs(False), position_ids=torch.arange(34)[None])
    if not varlen:
        with torch.no_grad():
            leaked = model.get_output_embeddings()(model.get_decoder()(**leaky).last_hidden_state)[0]
        assert not torch.allclose(leaked[9:24], alone[11][0], atol=1e-3)
    else:  # the varlen backend gets no mask from transformers: without cu_seq_lens it refuses to run
        with pytest.raises(RuntimeError, match="cu_seq_lens"), torch.no_grad():
            model.get_decoder()(**leaky)


def test_padded_micro_batch_matches_packed_loss():
    """The padded path (rows x longest, attention mask) is scored on exactly the same positions."""
    model, store = _tiny_llama("sdpa"), _store(_examples())
    keys = np.array([44, 22, 11])
    _, packed = _logits_and_loss(model, collate_packed(store, keys, 0), False)
    padded = collate_padded(store, keys, 0)
    assert padded.input_ids.shape == (3, 15) and int(padded.attention_mask.sum()) == 12 + 9 + 15
    _, loss = _logits_and_loss(model, padded, False)
    torch.testing.assert_close(loss, packed, atol=1e-4, rtol=1e-5)


def test_step_loss_is_the_exact_token_mean_whatever_the_split():
    """A step's gradient is that of the mean over its target tokens, however the examples are spread over
    micro-batches (sum per micro-batch, divided by the step's target count, as the loop does)."""
    store = _store(_examples())
    grads = []
    for split in ([[11, 22, 33, 44]], [[44], [11, 22], [], [33]]):
        model = _tiny_llama("sdpa").train()
        objective = TargetTokenLoss(model)
        batches = [collate_packed(store, np.array(keys, dtype=np.int64), 0) for keys in split]
        n_target = sum(len(b.target_index) for b in batches)
        for b in batches:
            (objective(target_index=b.target_index, target_labels=b.target_labels, **b.model_inputs(False))
             / n_target).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("torch_version", ["2.10", "2.11", "2.13"])
def test_torch_varlen_call_adapts_to_the_installed_signature(torch_version):
    """torch 2.10 takes is_causal (no scale, no GQA); 2.11 takes window_size=(-1, 0) and scale; later ones also
    enable_gqa. The adapted kernel gives causal GQA attention with the model's scale in every case."""
    def v210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert key.shape[1] == query.shape[1]  # K/V heads were repeated for it
        return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                     window_size=(-1, 0) if is_causal else (-1, -1))

    def v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1)):
        return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                     window_size=window_size)

    fn = {"2.10": v210, "2.11": v211, "2.13": reference_varlen_attn}[torch_version]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    out = adapt_varlen_attn(fn)(q, k, v, cu, cu, 6, 6, scale=0.2)
    expected = reference_varlen_attn(q, k, v, cu, cu, 6, 6, scale=0.2, window_size=(-1, 0), enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"attn_implementation": "torch_varlen", "use_gpu": True, "packing": False}, "torch_varlen needs packing"),
    ({"attn_implementation": "sdpa_varlen", "packing": False}, "sdpa_varlen needs packing"),
    ({"attn_implementation": "sdpa_varlen", "use_gpu": True}, "sdpa_varlen is the CPU path"),
    ({"attn_implementation": "flash_attention_2"}, "GPUs only"),
    ({"attn_implementation": "torch_varlen"}, "GPUs only"),
    ({"attn_implementation": "flex_attention"}, "GPUs only"),
    ({"kernels": "liger"}, "kernels: liger needs use_gpu"),
    ({"micro_batch_tokens": 100, "max_length": 256}, "would fit no micro-batch"),
    ({"global_batch_examples": 64, "deepspeed": {"grad_accum": 2}}, "derived per step"),
    ({"save_checkpoints": False, "checkpoint_every": 10}, "checkpoint_every needs save_checkpoints"),
    ({"compile": True, "deepspeed": {"zero_stage": 3}}, "compile: true needs deepspeed.zero_stage <= 2"),
])
def test_leaking_or_impossible_combinations_are_refused_at_config_time(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="d", base_model="m", output="o", **settings)
    TrainConfig(data="d", base_model="m", output="o", attn_implementation="torch_varlen", use_gpu=True)  # the GPU path


def test_auto_attention_is_the_padding_free_cpu_path_and_safe_elsewhere():
    base = dict(data="d", base_model="m", output="o")
    assert TrainConfig(**base).attention == "sdpa_varlen"  # packed on CPU: no dense T x T mask
    assert TrainConfig(**base, packing=False).attention == "sdpa"
    assert TrainConfig(**base, use_gpu=True).attention == "sdpa"  # GPU configs name their varlen kernel


class _FakeLiger(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import hook standing in for an installed liger-kernel (`find_spec` finds it): `import_error` makes importing
    it fail (as a Triton/torch mismatch does); otherwise its transformers integration patches with `patch`."""

    def __init__(self, import_error: Exception | None = None, patch=None):
        self.import_error, self.patch = import_error, patch

    def find_spec(self, name, path, target=None):
        if name in ("liger_kernel", "liger_kernel.transformers"):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if self.import_error is not None:
            raise self.import_error
        if module.__name__ == "liger_kernel.transformers":
            module._apply_liger_kernel_to_instance = self.patch
            module.LigerFusedLinearCrossEntropyLoss = lambda **kw: ("fused-loss", kw)


@pytest.fixture
def fake_liger():
    """install(**kwargs): a fresh fake liger-kernel (replacing an earlier one), removed after the test."""

    def uninstall():
        sys.meta_path[:] = [h for h in sys.meta_path if not isinstance(h, _FakeLiger)]
        for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
            del sys.modules[name]

    def install(**kwargs):
        uninstall()
        sys.meta_path.insert(0, _FakeLiger(**kwargs))

    yield install
    uninstall()


def test_liger_is_refused_clearly_where_it_cannot_run():
    from metaaligner.training.kernels import KernelChoice, liger_import_error, select_kernels

    assert select_kernels("torch", True, cuda=True) == KernelChoice("torch")
    assert select_kernels("auto", False, cuda=True) == KernelChoice("torch", "use_gpu is false")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_kernels("liger", True, cuda=False)
    # this machine: no GPU, liger-kernel not installed -> auto is torch, liger is refused with the install hint
    assert liger_import_error() == "liger-kernel is not installed"
    assert select_kernels("auto", True, cuda=True) == KernelChoice("torch", "liger-kernel is not installed")
    with pytest.raises(RuntimeError, match=r"liger-kernel is not installed; install the \[gpu\] extra"):
        select_kernels("liger", True, cuda=True)


def test_auto_uses_liger_only_when_it_imports(fake_liger):
    """An installed liger-kernel whose import fails (simulated by an import hook) is not picked by `auto`."""
    from metaaligner.training.kernels import KernelChoice, select_kernels

    fake_liger(import_error=ImportError("triton 3.6 is not supported"))
    choice = select_kernels("auto", True, cuda=True)
    assert choice.kernels == "torch"
    assert choice.reason == "liger-kernel does not import (ImportError: triton 3.6 is not supported)"
    with pytest.raises(RuntimeError, match=r"liger requested but liger-kernel does not import .*\[gpu\]"):
        select_kernels("liger", True, cuda=True)
    fake_liger(patch=lambda model, **kw: None)  # one that imports
    assert select_kernels("auto", True, cuda=True) == KernelChoice("liger")


def test_auto_falls_back_to_an_unpatched_model_when_liger_does_not_patch(fake_liger):
    """A patch that fails half-way under `auto`: the torch path, the modeling module's functions as they were."""
    from transformers.models.llama import modeling_llama

    from metaaligner.training.kernels import patch_liger

    def half_patch(model, **kwargs):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: 1 / 0  # a module-level patch, then a failure
        modeling_llama.LIGER_LEFTOVER = True
        raise RuntimeError("unsupported model")

    fake_liger(patch=half_patch)
    rope, ids = modeling_llama.apply_rotary_pos_emb, torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        expected = _tiny_llama("sdpa")(input_ids=ids).logits
    assert patch_liger(_tiny_llama("sdpa"), "auto", 2) == (
        None, "liger-kernel did not patch the model (RuntimeError: unsupported model)")
    assert modeling_llama.apply_rotary_pos_emb is rope and not hasattr(modeling_llama, "LIGER_LEFTOVER")
    with torch.no_grad():
        torch.testing.assert_close(_tiny_llama("sdpa")(input_ids=ids).logits, expected)  # the torch path runs
    with pytest.raises(RuntimeError, match="unsupported model"):
        patch_liger(_tiny_llama("sdpa"), "liger", 2)  # asked for explicitly: an error, the module restored too
    assert modeling_llama.apply_rotary_pos_emb is rope


def test_a_clean_liger_patch_gives_the_fused_loss_except_under_zero3(fake_liger):
    from metaaligner.training.kernels import LIGER_PATCHES, patch_liger

    calls = []
    fake_liger(patch=lambda model, **kw: calls.append(kw))
    fused, failed = patch_liger(_tiny_llama("sdpa"), "auto", 2)
    assert failed is None and fused == ("fused-loss", {"ignore_index": -100, "reduction": "sum"})
    assert patch_liger(_tiny_llama("sdpa"), "auto", 3) == (None, None)  # lm_head is partitioned under ZeRO-3
    assert calls == [LIGER_PATCHES, LIGER_PATCHES]


def test_only_target_tokens_are_scored_whatever_the_prompt(tokenizer):
    target = "Thank you for asking. The quick brown fox."
    expected = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for key, prompt in ((1, "Edit: short prompt | Answer: x | Edit:"),
                        (2, "A much longer and different prompt about dogs | Answer: y | Edit:")):
        ids, plen, _ = tokenize_example(tokenizer, prompt, prompt[-12:], target, 256)
        batch = collate_packed(_store({key: (ids, plen)}), np.array([key]), tokenizer.pad_token_id)
        assert batch.target_labels.tolist() == expected
        assert batch.target_index.tolist() == list(range(plen - 1, len(ids) - 1))  # predicted from the previous token


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


def _rank_tokens(plan, step, by_key):
    return [sum(by_key[k] for mb in plan.rank_micros(step, r) for k in mb.tolist()) for r in range(plan.world)]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("global_batch", [None, 10])
def test_plan_is_deterministic_complete_and_within_budget(packing, global_batch):
    rng = np.random.default_rng(0)
    keys = rng.choice(2**40, size=53, replace=False).astype(np.int64)
    lengths = rng.integers(5, 60, size=53)
    kwargs = dict(packing=packing, budget=128, world=2, grad_accum=1 if global_batch else 2, seed=3, epochs=2,
                  max_steps=None, global_batch_examples=global_batch)
    plan = plan_stage(keys, lengths, **kwargs)
    perm = rng.permutation(53)
    assert plan.digest_payload() == plan_stage(keys[perm], lengths[perm], **kwargs).digest_payload()  # read order
    assert plan.digest_payload() != plan_stage(keys, lengths, **{**kwargs, "seed": 4}).digest_payload()
    by_key = dict(zip(keys.tolist(), lengths.tolist()))
    assert sorted(plan.keys.tolist()) == sorted(keys.tolist() * 2)  # every example once per epoch, nothing dropped
    for step in range(len(plan)):
        n_micro = plan.step_starts[step + 1] - plan.step_starts[step]
        assert n_micro % 2 == 0 and (global_batch or n_micro == 4)
        for r in range(2):
            for mb in plan.rank_micros(step, r):
                cost = sum(by_key[k] for k in mb.tolist()) if packing else len(mb) * max(
                    [by_key[k] for k in mb.tolist()], default=0)
                assert cost <= 128
    if global_batch:  # exactly N examples per step; only an epoch's last step holds fewer (53 = 5 x 10 + 3)
        assert [len(plan.step_keys(s)) for s in range(len(plan))] == [10] * 5 + [3] + [10] * 5 + [3]
        if packing:  # balanced by tokens: the ranks of a step differ by less than the longest example
            assert all(max(t) - min(t) <= 60 for t in (_rank_tokens(plan, s, by_key) for s in range(len(plan))))
    assert len(plan_stage(keys, lengths, **{**kwargs, "max_steps": 3})) == 3


def test_deepspeed_config_from_settings():
    stage = StageConfig(lr=2e-5, warmup_ratio=0.1)
    cfg = build_deepspeed_config(DeepSpeedSettings(zero_stage=3, offload_optimizer=True, offload_params=True,
                                                   micro_batch_size=4, grad_accum=2), stage, 16, 1000)
    assert cfg["train_batch_size"] == 32 and cfg["bf16"]["enabled"] and cfg["managed_gradient_accumulation"] is False
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 100 and cfg["optimizer"]["params"]["lr"] == 2e-5
    plain = build_deepspeed_config(DeepSpeedSettings(zero_stage=0, precision="fp32"), StageConfig(warmup_ratio=0), 2, 10)
    assert plain["zero_optimization"] == {"stage": 0} and not plain["bf16"]["enabled"]
    assert plain["scheduler"]["params"]["warmup_min_ratio"] == 1.0  # no warm-up: full lr from step 1
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        TrainConfig(data="d", base_model="m", output="o", deepspeed={"zero_stage": 2, "offload_params": True})


def test_torch_adamw_runs_fused_where_its_states_are_on_the_gpu():
    stage = StageConfig()
    assert build_deepspeed_config(DeepSpeedSettings(torch_adam=True), stage, 1, 10, True)["optimizer"]["params"][
        "fused"] is True
    for settings, gpu in ((DeepSpeedSettings(torch_adam=True), False), (DeepSpeedSettings(), True),
                          (DeepSpeedSettings(torch_adam=True, offload_optimizer=True), True)):
        assert "fused" not in build_deepspeed_config(settings, stage, 1, 10, gpu)["optimizer"]["params"]


@pytest.mark.parametrize("name, zero, max_length", [("train-tinyllama-1.1b", 2, 2048), ("train-llama2-7b", 2, 4096),
                                                     ("train-llama2-13b-zero3", 3, 4096)])
def test_paper_setup_configs_carry_table_5(name, zero, max_length):
    """Table 5: 2 epochs per stage, lr 1e-5, warm-up ratio 0.05, AdamW default betas, 512 examples per step;
    ZeRO by size (ZeRO-2 up to 7B, ZeRO-3 for 13B); padding-free varlen attention on GPUs."""
    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml").train
    assert cfg.max_length == max_length and cfg.global_batch_examples == 512 and cfg.use_gpu
    assert cfg.deepspeed.zero_stage == zero and cfg.deepspeed.betas == (0.9, 0.999)
    assert cfg.deepspeed.weight_decay == 1e-5  # the authors' FastChat command; the paper is silent
    assert cfg.packing and cfg.attn_implementation == "torch_varlen" and cfg.token_budget >= max_length
    for stage in ("warmup", "equal", "contrastive"):
        s = cfg.stage(stage)
        assert (s.epochs, s.lr, s.warmup_ratio) == (2, 1e-5, 0.05)
    for pipeline in ROOT.glob("jobs/configs/pipeline-*.yaml"):
        load_config(pipeline)  # the pipelines that include these configs still load


def test_tiny_config_loads():
    cfg = load_config(ROOT / "jobs" / "configs" / "train-tiny.yaml").train
    assert cfg.deepspeed.zero_stage == 3 and not cfg.use_gpu and cfg.warmup.fraction < 1
    assert cfg.attn_implementation == "sdpa_varlen"  # the CPU varlen path in every end-to-end test


def test_tokenize_batch_counts_every_row(tokenizer):
    from metaaligner.training.tokenize import in_fraction, tokenize_batch

    table = pa.table({"id": ["a", "b", "c", "d"], "subset": ["equal"] * 4,
                      "prompt": ["Q | Answer: w | Edit:", "Q | Answer: w | Edit:", None, "Q | Answer: w | Edit:"],
                      "weak_answer": ["w", "w", "w", "w"],
                      "target": ["fine", "long " * 200, "x", ""]})
    out = tokenize_batch(table, tokenizer, 64, 1.0, False, 0)
    assert out.column("status").to_pylist() == ["ok", "target_too_long", "empty_field", "empty_field"]
    warm = tokenize_batch(table, tokenizer, 64, 1.0, True, 0)  # warm-up: the target is the weak answer
    ids, plen = warm.column("input_ids")[0].as_py(), warm.column("prompt_len")[0].as_py()
    assert tokenizer.decode(ids[plen:-1]) == "w"
    half = tokenize_batch(table, tokenizer, 64, 0.5, False, 3)  # unsampled rows are counted, not dropped silently
    assert half.num_rows == 4
    assert [s == "not_sampled" for s in half.column("status").to_pylist()] == [
        not in_fraction(i, 0.5, 3) for i in "abcd"]


def test_warmup_fraction_is_a_stable_sample():
    from metaaligner.training.tokenize import in_fraction

    picked = [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=1)]
    assert 850 < len(picked) < 1150
    assert picked == [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=1)]
    assert picked != [i for i in range(4000) if in_fraction(f"row-{i}", 0.25, seed=2)]


def test_flop_convention_matches_counted_matmuls(tmp_path):
    """N counts every matmul parameter incl. lm_head and excl. input embeddings: checked against torch's FLOP
    counter on an eager forward (which counts full, not causal, attention), for one example of length s."""
    from torch.utils.flop_counter import FlopCounterMode

    from metaaligner.training.metrics import ModelShape, anchor_flops, training_flops

    model = _tiny_llama("eager")
    model.save_pretrained(tmp_path)
    shape = ModelShape.from_config(tmp_path)
    embed = model.get_input_embeddings().weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.n_total == sum(p.numel() for p in model.parameters())
    assert shape.n_matmul == shape.n_total - embed - norms
    s = 24
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(3, 97, (1, s)))
    full_attention_fwd = 2 * 2 * shape.layers * shape.hidden * s * s  # QK^T and AV, every (q, k) pair
    causal_fwd = counter.get_total_flops() - full_attention_fwd / 2
    assert training_flops(shape, [s], [s])[0] == pytest.approx(3 * causal_fwd)
    skipped = training_flops(shape, [s], [s]) - training_flops(shape, [s], [s - 10])
    assert skipped[0] == pytest.approx(6 * shape.lm_head * 10)  # no lm_head where no loss is computed
    # the anchor's convention: full attention over the padded row length (the example's own length when packed)
    assert anchor_flops(shape, [s])[0] == (6 * shape.n_total + 12 * shape.layers * shape.hidden * s) * s
    assert anchor_flops(shape, [s], [64])[0] == (6 * shape.n_total + 12 * shape.layers * shape.hidden * 64) * s


def test_anchor_convention_gives_the_environment_anchor(tmp_path):
    """shared/ENVIRONMENT.md: TinyLlama-1.1B at seq 2048, 38.6k tok/s on an H100 (989 TFLOP/s) is 30.1 % MFU,
    i.e. 6*N_total + 12*L*h*s = 7.71e9 FLOP per token (6*N_total alone would give 25.8 %)."""
    from transformers import LlamaConfig

    from metaaligner.training.metrics import ModelShape, anchor_flops

    LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4).save_pretrained(tmp_path)
    shape = ModelShape.from_config(tmp_path)
    per_token = anchor_flops(shape, [2048])[0] / 2048
    assert per_token == pytest.approx(7.71e9, rel=1e-3)
    assert round(38.6e3 * per_token / 989e12, 3) == 0.301


def test_step_stats_count_the_anchor_at_the_padded_row_length():
    """Padded micro-batches: every row counts 12*L*h*s at its micro-batch's longest s; packed: its own length."""
    from metaaligner.training.metrics import ModelShape, anchor_flops
    from metaaligner.training.packing import step_stats

    shape = ModelShape(n_matmul=1000, n_total=1200, layers=2, hidden=8, lm_head=100)
    keys, lengths = np.arange(4), np.array([10, 30, 12, 28])
    for packing in (True, False):
        plan = plan_stage(keys, lengths, epochs=1, max_steps=None, packing=packing, budget=64, world=1)
        stats = step_stats(plan, keys, lengths, lengths // 2, shape, packing)
        widths = {int(k): (lengths[k] if packing else max(lengths[plan.micro(m)]))
                  for m in range(len(plan.micro_starts) - 1) for k in plan.micro(m)}
        expected = sum(anchor_flops(shape, [lengths[k]], [widths[k]])[0] for k in keys)
        assert stats.flops_anchor.sum() == pytest.approx(expected)
    assert widths != {k: lengths[k] for k in keys}  # the padded plan did pad


def test_gpu_peaks():
    from metaaligner.training.metrics import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989 and gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    with pytest.raises(ValueError, match="peak_tflops"):
        gpu_peak_tflops("Some GPU")


def test_validation_rows_by_first_n_and_fraction_and_a_lockstep_eval_plan(tmp_path):
    """train.validation (issue 17 item 8): the first N rows of the stage's files in order, or a seeded share by id;
    the eval plan gives every rank the same number of micro-batches (ZeRO-3 runs forward passes in lockstep)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from metaaligner.storage import Storage
    from metaaligner.training.config import ValidationConfig
    from metaaligner.training.validation import Selection, selection, validation_plan

    for k, ids in enumerate((["a", "b"], ["c", "d", "e"])):
        pq.write_table(pa.table({"id": ids}), tmp_path / f"part-{k}.parquet")
    fs = Storage().filesystem(str(tmp_path))[0]
    files = [str(tmp_path / f"part-{k}.parquet") for k in range(2)]
    assert selection(ValidationConfig(first_n=3), files, fs).ids == {"a", "b", "c"}
    share = selection(ValidationConfig(fraction=0.3, seed=1), files, fs)
    picked = [i for i in range(2000) if share.selects(f"row-{i}")]
    assert 500 < len(picked) < 700 and picked == [i for i in range(2000) if Selection(0.3, 1, None).selects(f"row-{i}")]
    assert selection(None, files, fs) is None
    with pytest.raises(ValueError, match="exactly one"):
        ValidationConfig(fraction=0.1, first_n=3)
    index = {"val_keys": np.arange(7, dtype=np.int64), "val_lengths": np.array([5, 9, 3, 8, 2, 7, 4])}
    for packing in (True, False):
        plan = validation_plan(index, packing, budget=16, world=2)
        assert len(plan) == 1 and sorted(plan.keys.tolist()) == list(range(7))
        assert len(plan.rank_micros(0, 0)) == len(plan.rank_micros(0, 1))
    assert validation_plan({"val_keys": np.zeros(0, np.int64), "val_lengths": np.zeros(0)}, True, 16, 2) is None
