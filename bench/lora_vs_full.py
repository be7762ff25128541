"""LoRA vs full fine-tuning on a real model (SmolLM2-135M-Instruct, the test fixture): step time and memory, same run.

Each mode runs in its own child process (so peak RSS is its own) through the trainer's engine builder
(`training.loop._build_engine`: the same DeepSpeed config, PEFT attachment and loss as a training stage), one
DeepSpeed process (world 1), a fixed packed micro-batch repeated for every step. Reported per mode: median step
time (the first UNTIMED steps excluded), tokens/s, MFU in the mode's own FLOP convention (metrics.CONVENTION /
LORA_CONVENTION), trainable parameters, the optimizer + gradient state DeepSpeed holds, peak RSS; and the same-run
ratios LoRA / full.

  python bench/lora_vs_full.py                       # CPU, ZeRO-3 and ZeRO-2, fp32, 4 examples x 128 tokens
  python bench/lora_vs_full.py --zero 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-model fixture is test support (tests/real_model.py)
UNTIMED = 2


def _own_peak_kib() -> int:
    """VmHWM: this process's own peak RSS (ru_maxrss would also count the parent's, inherited through vfork + exec)."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1])


def _ds_config(zero: int, lr: float) -> dict:
    from metaaligner.training.config import DeepSpeedSettings, StageConfig
    from metaaligner.training.deepspeed_config import build_deepspeed_config

    ds = DeepSpeedSettings(zero_stage=zero, precision="fp32", torch_adam=True)
    return build_deepspeed_config(ds, StageConfig(lr=lr, warmup_ratio=0.0), 1, 100)


def _batch(tokenizer, examples: int, max_length: int):
    """One packed micro-batch of `examples` reformulated rows (training_helpers), as the trainer collates it."""
    import numpy as np
    import pyarrow as pa
    from training_helpers import reformulated_rows

    from metaaligner.training.collate import collate_packed
    from metaaligner.training.tokenize import tokenize_example
    from metaaligner.training.tokens import TokenStore, select_keys

    rows = reformulated_rows(examples, "contrastive")
    encoded = [tokenize_example(tokenizer, r["prompt"], r["weak_answer"], r["target"], max_length) for r in rows]
    keys = np.arange(examples, dtype=np.int64)
    table = pa.table({"key": keys, "input_ids": pa.array([e[0] for e in encoded], pa.list_(pa.int32())),
                      "prompt_len": pa.array([e[1] for e in encoded], pa.int32()), "id": [str(k) for k in keys]})
    store = TokenStore(keys, np.array([len(e[0]) for e in encoded]))
    store.add(select_keys(table, keys))
    return collate_packed(store, keys, tokenizer.pad_token_id), [len(e[0]) for e in encoded], \
        [len(e[0]) - e[1] for e in encoded]


def child(mode: str, zero: int, steps: int, examples: int, max_length: int, out: str) -> None:
    """One mode in this process: build the engine as a stage does, train `steps` steps on one batch."""
    import numpy as np
    from real_model import smollm2_folder

    from metaaligner.modeling import load_tokenizer
    from metaaligner.training.config import LoraSettings
    from metaaligner.training.loop import _build_engine
    from metaaligner.training.metrics import ModelShape, peak_flops_per_worker, training_flops

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + zero * 7 + len(mode)), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    folder = smollm2_folder()
    lora = LoraSettings(r=16, alpha=32, dropout=0.0) if mode == "lora" else None
    cfg = {"ds_config": _ds_config(zero, 1e-3 if lora else 5e-5), "use_gpu": False, "precision": "fp32",
           "attn_implementation": "sdpa_varlen", "trust_remote_code": False, "activation_checkpointing": False,
           "lora": lora.model_dump() if lora else None}
    from metaaligner.training.attention import prepare_backend

    prepare_backend("sdpa_varlen", use_gpu=False)
    shape = ModelShape.from_config(folder, lora)  # before the engine: ZeRO-3's zero.Init would catch the meta model
    engine, _keep, _ = _build_engine(cfg, folder, "torch")
    batch, lengths, targets = _batch(load_tokenizer(folder), examples, max_length)
    flops = float(training_flops(shape, np.array(lengths), np.array(targets)).sum())
    n_targets = sum(targets)
    times, losses = [], []
    engine.train()
    for step in range(steps):
        t0 = time.perf_counter()
        loss = engine(target_index=batch.target_index, target_labels=batch.target_labels, **batch.model_inputs(True))
        engine.backward(loss / n_targets, scale_wrt_gas=False)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item() / n_targets)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in engine.module.parameters() if p.requires_grad)
    timed = times[UNTIMED:] or times
    median = statistics.median(timed)
    Path(out).write_text(json.dumps({
        "mode": mode, "zero": zero, "steps": steps, "tokens_per_step": int(sum(lengths)),
        "median_step_s": median, "tokens_per_s": sum(lengths) / median,
        "mfu": flops / (median * peak_flops_per_worker(False, None)), "trainable_params": int(trainable),
        "trainable_state_bytes_est": int(trainable) * (4 + 4 + 8),  # fp32 grad + fp32 master + Adam m, v
        "losses": losses, "peak_rss_gb": _own_peak_kib() / 2**20,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zero", type=int, nargs="+", default=[3, 2])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--child", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.zero[0], args.steps, args.examples, args.max_length, args.child[1])
        return
    from real_model import smollm2_folder

    smollm2_folder()  # download/convert once, outside the timed children
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for zero in args.zero:
            for mode in ("full", "lora"):
                out = Path(tmp, f"{mode}-{zero}.json")
                cmd = [sys.executable, __file__, "--zero", str(zero), "--steps", str(args.steps), "--examples",
                       str(args.examples), "--max-length", str(args.max_length), "--child", mode, str(out)]
                subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
                results.append(json.loads(out.read_text()))
                print(json.dumps(results[-1]), flush=True)
    by = {(r["mode"], r["zero"]): r for r in results}
    print(f"\nSmolLM2-135M-Instruct, {args.examples} examples packed (<= {args.max_length} tokens each), fp32, "
          f"torch AdamW, one DeepSpeed process; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| ZeRO | mode | trainable params | median step (s) | tokens/s | MFU (own convention) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['zero']} | {r['mode']} | {r['trainable_params'] / 1e6:.2f} M | {r['median_step_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_rss_gb']:.2f} |")
    for zero in args.zero:
        full, lora = by[("full", zero)], by[("lora", zero)]
        print(f"ZeRO-{zero}: LoRA / full step time {lora['median_step_s'] / full['median_step_s']:.2f}, "
              f"peak RSS {lora['peak_rss_gb'] / full['peak_rss_gb']:.2f}, "
              f"trainable {lora['trainable_params'] / full['trainable_params']:.4f}")


if __name__ == "__main__":
    main()
