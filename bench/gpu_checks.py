"""Kernel checks that only a GPU can run: packed equivalence of every attention backend and liger's loss equality.

Packed equivalence: an example's logits and loss inside a flattened packed micro-batch equal those of the example
alone, and equal the sdpa (block-diagonal mask) reference. Liger: the target-token loss and its gradients with
`kernels: liger` (RMSNorm/RoPE/SwiGLU + fused linear cross-entropy) equal the torch path. `--cpu` runs the CPU
backends only (the dry run of bench/gpu_all.sh); a backend or liger that cannot run here is reported as skipped.
`--out` is rewritten after every check (a run killed at its limit keeps the checks done), key figures under "key".

  python bench/gpu_checks.py --gpu --out checks.json
"""

from __future__ import annotations

import argparse
import json
import traceback

import numpy as np
import pyarrow as pa
import torch

from metaaligner.training.attention import VARLEN_BACKENDS, prepare_backend
from metaaligner.training.collate import collate_packed
from metaaligner.training.kernels import patch_liger, select_kernels
from metaaligner.training.objective import TargetTokenLoss
from metaaligner.training.tokens import TokenStore, select_keys

VOCAB = 1000


def _model(attn: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _store() -> TokenStore:
    g = np.random.default_rng(0)
    shapes = {1: (40, 25), 2: (17, 9), 3: (120, 60), 4: (8, 30)}
    keys = np.array(sorted(shapes), dtype=np.int64)
    ids = [g.integers(3, VOCAB, sum(shapes[k])).astype(np.int32) for k in keys]
    table = pa.table({"key": keys, "input_ids": pa.array(ids, pa.list_(pa.int32())),
                      "prompt_len": pa.array([shapes[k][0] for k in keys], pa.int32())})
    store = TokenStore(keys, np.array([len(i) for i in ids]))
    store.add(select_keys(table, keys))
    return store


def _run(model, batch, device, varlen: bool):
    batch = batch.to(device)
    inputs = batch.model_inputs(varlen)
    with torch.no_grad():
        hidden = model.get_decoder()(**inputs).last_hidden_state
        loss = TargetTokenLoss(model)(target_index=batch.target_index, target_labels=batch.target_labels, **inputs)
        logits = model.get_output_embeddings()(hidden)[0].float()
    return logits, float(loss)


def check_backend(attn: str, device, dtype, reference: dict) -> dict:
    prepare_backend(attn, device.type == "cuda")
    model, store, varlen = _model(attn, device, dtype), _store(), attn in VARLEN_BACKENDS
    alone = {k: _run(model, collate_packed(store, np.array([k]), 0), device, varlen) for k in (1, 2, 3)}
    logits, loss = _run(model, collate_packed(store, np.array([2, 1, 3]), 0), device, varlen)
    middle = logits[26:91]  # example 1 sits after example 2 (26 tokens)
    result = {"backend": attn, "max_abs_logits_packed_vs_alone": float((middle - alone[1][0]).abs().max()),
              "loss_rel_diff_packed_vs_alone": abs(loss - sum(v[1] for v in alone.values())) / loss}
    if reference:
        result["max_abs_logits_vs_sdpa"] = float((logits - reference["logits"]).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    result["ok"] = (result["max_abs_logits_packed_vs_alone"] < tol and result["loss_rel_diff_packed_vs_alone"] < tol
                    and result.get("max_abs_logits_vs_sdpa", 0) < tol)
    if attn == "sdpa":
        reference.update(logits=logits)
    return result


def check_liger(device, dtype, zero_stage: int = 2) -> dict:
    choice = select_kernels("auto", device.type == "cuda")
    if choice.kernels != "liger":
        return {"liger": f"skipped: {choice.reason}", "ok": True}
    store = _store()
    batch = collate_packed(store, np.array([2, 1, 3, 4]), 0).to(device)
    results = {}
    for name in ("torch", "liger"):
        model = _model("sdpa", device, dtype).train()
        fused = patch_liger(model, "liger", zero_stage)[0] if name == "liger" else None
        objective = TargetTokenLoss(model, fused)
        loss = objective(target_index=batch.target_index, target_labels=batch.target_labels, **batch.model_inputs(False))
        loss.backward()
        results[name] = (float(loss), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                 if p.grad is not None]))
        del model, objective
    (lt, gt), (ll, gl) = results["torch"], results["liger"]
    out = {"loss_torch": lt, "loss_liger": ll, "loss_rel_diff": abs(lt - ll) / lt,
           "grad_rel_diff": float((gt - gl).norm() / gt.norm()), "zero_stage": zero_stage}
    out["ok"] = out["loss_rel_diff"] < 1e-2 and out["grad_rel_diff"] < 5e-2
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda") if args.gpu else torch.device("cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    # cheapest first; flex_attention (a compile per shape) after liger (Triton JIT)
    backends = ["sdpa", "eager"] + (["torch_varlen", "flash_attention_2"] if args.gpu else ["sdpa_varlen"])
    late = ["flex_attention"] if args.gpu else []
    reference: dict = {}
    report = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "backends": [], "liger": None, "partial": True}

    def write() -> None:
        report["key"] = {b["backend"]: b.get("ok") for b in report["backends"]}
        if report["liger"] is not None:
            report["key"]["liger"] = report["liger"].get("ok") if "loss_rel_diff" in report["liger"] else (
                report["liger"].get("liger") or report["liger"].get("error", "")[:120])
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)

    def run_backends(names: list[str]) -> None:
        for attn in names:
            try:
                report["backends"].append(check_backend(attn, device, dtype, reference))
            except Exception as e:  # noqa: BLE001 — reported per backend, the script goes on
                report["backends"].append({"backend": attn, "ok": None, "skipped": f"{type(e).__name__}: {e}",
                                           "trace": traceback.format_exc(limit=3)})
            write()

    run_backends(backends)
    try:
        report["liger"] = check_liger(device, dtype)
    except Exception as e:  # noqa: BLE001
        report["liger"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)}
    write()
    run_backends(late)
    report["partial"] = False
    write()
    print(json.dumps(report, indent=2, default=str))
    failed = [b["backend"] for b in report["backends"] if b.get("ok") is False] + (
        ["liger"] if report["liger"].get("ok") is False else [])
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
