"""Real Ray Train + DeepSpeed ZeRO-3 (2 CPU workers, gloo) on a tiny Llama, data/models/checkpoints on S3.

One module-scoped `metaaligner train` run of all three stages is shared by the checks below; the
resume test re-runs the contrastive stage with an injected worker failure and compares.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from training_helpers import reformulated_rows, write_reformulated

from metaaligner import storage as st
from metaaligner.cli import main
from metaaligner.config import load_config
from metaaligner.training.config import STAGES
from metaaligner.training.trainer import run_training

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train-tiny.yaml"


@pytest.fixture(scope="module")
def trained(s3_server, storage_config, ray_cluster, tiny_model_dir, tmp_path_factory):
    bucket = "training-e2e"
    s3_server.create_bucket(bucket)
    data = write_reformulated(tmp_path_factory.mktemp("reformulated"))
    st.copy_dir(str(data), f"s3://{bucket}/reformulated", storage_config)
    st.copy_dir(str(tiny_model_dir), f"s3://{bucket}/models/tiny", storage_config)
    args = ["train", "--config", str(TINY), "--endpoint-url", s3_server.endpoint_url,
            "--data", f"s3://{bucket}/reformulated", "--base-model", f"s3://{bucket}/models/tiny",
            "--output", f"s3://{bucket}/train"]
    assert main(args) == 0
    summaries = {s: st.read_json(f"s3://{bucket}/train/{s}/_summary.json", storage_config) for s in STAGES}
    return {"bucket": bucket, "summaries": summaries, "args": args}


def _samples(uri: str, storage) -> dict[int, list]:
    return {r["step"]: r["ids"] for r in map(json.loads, st.read_text(uri, storage).splitlines())}


def test_three_stages_chain_and_loss_falls(trained):
    s = trained["summaries"]
    for name in STAGES:
        assert s[name]["steps"] >= 4 and s[name]["dropped"] == 0
        assert s[name]["last_loss"] < 0.8 * s[name]["first_loss"], (name, s[name])
        assert 0 < s[name]["mean_mfu"] < 1 and s[name]["mean_tokens_per_s"] > 0
    # each stage starts from the previous stage's export: the start loss already sits far below random init
    assert s["equal"]["model_input"].endswith("/warmup/model")
    assert s["contrastive"]["model_input"].endswith("/equal/model")
    losses = {n: (s[n]["first_loss"], s[n]["last_loss"]) for n in STAGES}
    assert s["equal"]["first_loss"] < s["warmup"]["first_loss"] - 1.0, losses
    assert s["contrastive"]["first_loss"] < s["warmup"]["first_loss"] - 0.3, losses
    assert s["warmup"]["last_loss"] > s["equal"]["last_loss"] > s["contrastive"]["last_loss"], losses
    assert s["warmup"]["examples"] < s["equal"]["examples"] + s["contrastive"]["examples"]  # a fraction only
    assert s["warmup"]["padding_fraction"] < 0.2  # packed


def test_export_loads_and_generates(trained, storage_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket = trained["bucket"]
    folder = tmp_path / "model"
    st.copy_dir(f"s3://{bucket}/train/contrastive/model", str(folder), storage_config)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert str(model.dtype) == "torch.bfloat16"
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = reformulated_rows(1, "contrastive")[0]["prompt"]
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert tok.eos_token_id in out[0, inputs["input_ids"].shape[1]:].tolist()  # learned to end its answer
    logs = f"s3://{bucket}/train/contrastive/logs"
    assert st.list_files(f"{logs}/tensorboard", storage_config, ("",)), "TensorBoard events missing"
    records = st.read_text(f"{logs}/metrics.jsonl", storage_config).splitlines()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= json.loads(records[0]).keys()


def test_interrupted_run_resumes_without_repeating_or_skipping(trained, storage_config, tmp_path):
    bucket, main_run = trained["bucket"], trained["summaries"]["contrastive"]
    cfg = load_config(TINY, {"train.data": f"s3://{bucket}/reformulated", "train.base_model": "unused",
                             "train.output": f"s3://{bucket}/resumed", "train.run_name": "resumed"}).train
    st.copy_dir(f"s3://{bucket}/train/equal/model", f"s3://{bucket}/resumed/equal/model", storage_config)
    marker = tmp_path / "failed-once"
    summary = run_training(cfg, storage_config, "contrastive",
                           fail_once={"after_step": cfg.checkpoint_every, "marker": str(marker)})["contrastive"]
    assert marker.exists(), "the injected failure did not happen"
    assert summary["steps"] == main_run["steps"] > cfg.checkpoint_every
    assert summary["data_digest"] == main_run["data_digest"]
    ours = _samples(f"s3://{bucket}/resumed/contrastive/logs/samples.jsonl", storage_config)
    theirs = _samples(f"s3://{bucket}/train/contrastive/logs/samples.jsonl", storage_config)
    assert ours == theirs and sorted(ours) == list(range(1, main_run["steps"] + 1))
    assert summary["checkpoint"].startswith(f"{bucket}/resumed/checkpoints/")
    assert summary["last_loss"] == pytest.approx(main_run["last_loss"], rel=1e-3)


def test_rerun_of_finished_stages_is_skipped(trained, capsys):
    assert main(trained["args"]) == 0
    assert capsys.readouterr().out.count("already done") == 3


def test_length_grouped_batches_with_zero2(tiny_train, storage_config, ray_cluster):
    """The unpacked path (one example per row, padded, length-grouped) under ZeRO-2, local storage."""
    cfg, _ = tiny_train
    cfg = cfg.model_copy(update={"packing": False, "log_sample_ids": False, "checkpoint_every": 0,
                                 "deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 2}),
                                 "warmup": cfg.warmup.model_copy(update={"fraction": 1.0, "epochs": 3})})
    s = run_training(cfg, storage_config, "warmup")["warmup"]
    # 3 epochs x 16 examples / (2 examples per micro-batch x 2 workers)
    assert s["examples"] == 16 and s["steps"] == 3 * 16 // (2 * 2) and s["last_loss"] < s["first_loss"]
    assert s["padding_fraction"] > 0.01  # padded rows, unlike packing
    assert (Path(cfg.output) / "warmup" / "model" / "model.safetensors").is_file()


# ---- bad input: clear errors before any worker starts ----

@pytest.fixture
def tiny_train(tmp_path, tiny_model_dir):
    data = write_reformulated(tmp_path / "data", n_contrastive=8, n_equal=8, files=1)
    cfg = load_config(TINY, {"train.data": str(data), "train.base_model": str(tiny_model_dir),
                             "train.output": str(tmp_path / "out")}).train
    return cfg, data


def test_missing_columns(tiny_train, storage_config):
    cfg, data = tiny_train
    rows = [{k: v for k, v in r.items() if k != "weak_answer"} for r in reformulated_rows(4, "equal")]
    pq.write_table(pa.Table.from_pylist(rows), data / "equal" / "part-000.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['weak_answer'\]"):
        run_training(cfg, storage_config)


def test_missing_subset_folder(tiny_train, storage_config):
    cfg, data = tiny_train
    shutil.rmtree(data / "equal")
    with pytest.raises(FileNotFoundError, match="equal"):
        run_training(cfg, storage_config)


def test_model_without_safetensors(tiny_train, tmp_path, storage_config):
    cfg, _ = tiny_train
    model = tmp_path / "model"
    shutil.copytree(cfg.base_model, model)
    (model / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        run_training(cfg.model_copy(update={"base_model": str(model)}), storage_config)


def test_tokenizer_without_eos(tiny_train, tmp_path, storage_config):
    cfg, _ = tiny_train
    model = tmp_path / "model"
    shutil.copytree(cfg.base_model, model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="no EOS"):
        run_training(cfg.model_copy(update={"base_model": str(model)}), storage_config)


def test_unreachable_storage(tiny_train):
    from metaaligner.config import StorageConfig

    cfg, _ = tiny_train
    with pytest.raises(RuntimeError, match="unreachable"):
        run_training(cfg.model_copy(update={"output": "s3://nowhere/out"}),
                     StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))


def test_empty_after_filtering(tiny_train, storage_config, ray_cluster):
    cfg, _ = tiny_train
    with pytest.raises(ValueError, match="no training examples left after filtering.*target_too_long"):
        run_training(cfg.model_copy(update={"max_length": 8}), storage_config, "warmup")
