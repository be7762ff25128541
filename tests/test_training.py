"""Real Ray Train + DeepSpeed ZeRO-3 (2 CPU workers, gloo) on a tiny Llama, data/models/checkpoints on S3.

One module-scoped training job of all three stages is shared by the checks below. It is itself the fault of
issue 10 (c): the job is killed (SIGKILL of its driver) right after the contrastive stage's checkpoint at
step 4 and submitted again as a fresh job, which keeps warm-up and equal (same digests) and resumes the
contrastive stage there. A later test re-runs the contrastive stage with a worker failure and an S3
outage during a checkpoint upload, and the last one changes the equal stage, which retrains equal and
contrastive uninterrupted: every run must replay exactly the same samples.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from botocore.config import Config as BotoConfig
from training_helpers import reformulated_rows, write_reformulated

from metaaligner.cli import main
from metaaligner.config import load_config
from metaaligner.training.config import STAGES
from metaaligner.training.tokenize import in_fraction, row_key
from metaaligner.training.trainer import run_training

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train-tiny.yaml"
KILLED_JOB = """
import json, sys
from metaaligner.config import load_config
from metaaligner.training.trainer import run_training
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
run_training(cfg.train, cfg.storage, "all", faults=json.loads(sys.argv[3]))
"""


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def trained(s3_server, storage, ray_cluster, tiny_model_dir, tmp_path_factory):
    bucket = "training-e2e"
    s3_server.create_bucket(bucket)
    data = write_reformulated(tmp_path_factory.mktemp("reformulated"))
    storage.copy_dir(str(data), f"s3://{bucket}/reformulated")
    storage.copy_dir(str(tiny_model_dir), f"s3://{bucket}/models/tiny")
    overrides = {"storage.endpoint_url": s3_server.endpoint_url, "train.data": f"s3://{bucket}/reformulated",
                 "train.base_model": f"s3://{bucket}/models/tiny", "train.output": f"s3://{bucket}/train"}
    # 1. the first job: a separate driver process on the same Ray cluster, held right after a checkpoint, then killed
    tmp = tmp_path_factory.mktemp("killed-job")
    marker, log = tmp / "checkpointed", tmp / "job.log"
    faults = [{"stage": "contrastive", "after_step": 4, "marker": str(marker), "action": "hold"}]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    free_cpus = ray_cluster.available_resources().get("CPU", 0)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(TINY), json.dumps(overrides), json.dumps(faults)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    def registered() -> bool:  # Ray Train's controller recorded the step-4 checkpoint as the latest
        snapshots = storage.list_files(f"s3://{bucket}/train/checkpoints", ("checkpoint_manager_snapshot.json",))
        return any("contrastive-step000004" in storage.read_text(f"s3://{p}")
                   for p in snapshots if "/tiny-contrastive-" in p)

    try:
        _wait_for(marker.exists, 600, "the contrastive checkpoint at step 4", proc)
        _wait_for(registered, 60, "the controller to register the checkpoint", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed = {"marker_step": int(marker.read_text()), "contrastive_committed": storage.exists(f"s3://{bucket}/train/contrastive/_SUCCESS")}
    _wait_for(lambda: ray_cluster.available_resources().get("CPU", 0) >= free_cpus, 120,
              "the killed job's workers to go")
    # 2. the same job submitted again through the CLI: a fresh driver
    args = ["train", "--config", str(TINY), "--endpoint-url", s3_server.endpoint_url,
            "--data", f"s3://{bucket}/reformulated", "--base-model", f"s3://{bucket}/models/tiny",
            "--output", f"s3://{bucket}/train"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    summaries = {s: storage.read_json(f"s3://{bucket}/train/{s}/_summary.json") for s in STAGES}
    samples = {s: _samples(f"s3://{bucket}/train/{s}/logs/samples.jsonl", storage) for s in STAGES}
    return {"bucket": bucket, "summaries": summaries, "samples": samples, "args": args, "killed": killed,
            "printed": printed.getvalue(), "data": data}


def _samples(uri: str, storage) -> dict[int, list]:
    return {r["step"]: r["ids"] for r in map(json.loads, storage.read_text(uri).splitlines())}


def test_three_stages_chain_and_loss_falls(trained):
    s = trained["summaries"]
    for name in STAGES:
        assert s[name]["steps"] >= 4 and s[name]["dropped"] == 0
        assert s[name]["last_loss"] < 0.8 * s[name]["first_loss"], (name, s[name])
        assert 0 < s[name]["mean_mfu"] < 1 and s[name]["mean_tokens_per_s"] > 0
        assert s[name]["mean_mfu_anchor"] > 0 and "6*N" in s[name]["flop_convention"]
    # each stage starts from the previous stage's export: the start loss already sits far below random init
    assert s["equal"]["model_input"].endswith("/warmup/model")
    assert s["contrastive"]["model_input"].endswith("/equal/model")
    losses = {n: (s[n]["first_loss"], s[n]["last_loss"]) for n in STAGES}
    assert s["equal"]["first_loss"] < s["warmup"]["first_loss"] - 1.0, losses
    assert s["contrastive"]["first_loss"] < s["warmup"]["first_loss"] - 0.3, losses
    assert s["warmup"]["last_loss"] > s["equal"]["last_loss"] > s["contrastive"]["last_loss"], losses
    assert s["warmup"]["padding_fraction"] == 0  # padding-free


def test_warmup_samples_the_equal_subset_only(trained):
    """Paper §3.2.2: the warm-up subset is a seeded `warmup.fraction` of equal/ (never contrastive rows)."""
    s, cfg = trained["summaries"]["warmup"], load_config(TINY).train
    equal_ids = [r["id"] for r in reformulated_rows(32, "equal")]
    assert s["rows_read"] == 32 == trained["summaries"]["equal"]["rows_read"]  # the size of equal/
    sampled = [i for i in equal_ids if in_fraction(i, cfg.warmup.fraction, cfg.seed)]
    assert s["examples"] == len(sampled) < 32 and s["status_counts"]["not_sampled"] == 32 - len(sampled)
    trained_keys = {k for ids in trained["samples"]["warmup"].values() for k in ids}
    assert trained_keys == {row_key(i) for i in sampled}


def test_export_is_committed_loads_and_generates(trained, storage, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket = trained["bucket"]
    manifest = storage.read_json(f"s3://{bucket}/train/contrastive/_SUCCESS")
    listed = {f["path"] for f in manifest["files"]}
    assert manifest["job"] == "train-contrastive" and {"model/model.safetensors", "logs/metrics.jsonl"} <= listed
    fs, root = storage.filesystem(f"s3://{bucket}/train/contrastive/_staging")
    staged = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    assert not [i.path for i in staged if i.type == pafs.FileType.File]  # the killed run's staging was cleaned
    folder = tmp_path / "model"
    storage.copy_dir(f"s3://{bucket}/train/contrastive/model", str(folder))
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
    assert storage.list_files(f"{logs}/tensorboard", ("",)), "TensorBoard events missing"
    records = storage.read_text(f"{logs}/metrics.jsonl").splitlines()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_anchor"} <= json.loads(records[0]).keys()


def test_killed_job_resubmitted_resumes_at_the_saved_step(trained):
    """Issue 10 (c): the whole job killed after the checkpoint of contrastive step 4, then submitted again."""
    killed, s = trained["killed"], trained["summaries"]
    assert killed["marker_step"] == 4 and not killed["contrastive_committed"]
    assert trained["printed"].count("already done") == 2  # warm-up and equal kept: same digests
    assert s["contrastive"]["resumed_from_step"] == 4
    samples = trained["samples"]["contrastive"]
    assert sorted(samples) == list(range(1, s["contrastive"]["steps"] + 1))  # every step logged exactly once
    # the sample order equals an uninterrupted run's: checked against the retrained run in the last test


def test_interrupted_run_resumes_and_survives_an_s3_outage_with_the_same_samples(trained, s3_server, storage,
                                                                                 tmp_path):
    """Two faults in one run of the contrastive stage, which must still replay exactly the samples of the shared
    (killed-and-resubmitted) job:
    - a worker fails after the step-4 checkpoint: FailureConfig restarts the workers, which resume at step 4 (also:
      resume after the flattened, worker-filtered data path still replays the same samples);
    - issue 10 (d): S3 stops answering (the server is frozen for 14 s) while rank 0 uploads the step-8 checkpoint:
      the upload is retried, the run goes on, and every kept checkpoint is complete."""
    from metaaligner.training.checkpoints import verify_checkpoint

    bucket, main_run = trained["bucket"], trained["summaries"]["contrastive"]
    cfg = load_config(TINY, {"train.data": f"s3://{bucket}/reformulated", "train.base_model": "unused",
                             "train.output": f"s3://{bucket}/resumed", "train.run_name": "resumed",
                             "train.keep_checkpoints": 10}).train
    storage.copy_dir(f"s3://{bucket}/train/equal/model", f"s3://{bucket}/resumed/equal/model")
    failed, uploading, frozen_s, frozen = tmp_path / "failed-once", tmp_path / "uploading", 14.0, {}
    probe = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                         config=BotoConfig(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}))

    def outage():
        _wait_for(uploading.exists, 600, "rank 0 to reach the step-8 checkpoint upload")
        os.killpg(s3_server.proc.pid, signal.SIGSTOP)
        try:
            try:  # S3 really stopped answering
                probe.head_bucket(Bucket=bucket)
            except Exception as e:  # noqa: BLE001
                frozen["probe"] = type(e).__name__
            Path(str(uploading) + ".go").write_text("")
            time.sleep(frozen_s)
        finally:
            os.killpg(s3_server.proc.pid, signal.SIGCONT)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        summary = run_training(cfg, storage, "contrastive", faults=[
            {"after_step": 4, "marker": str(failed), "action": "raise"},
            {"after_step": 8, "marker": str(uploading), "action": "before_upload"}])["contrastive"]
    finally:
        thread.join(timeout=60)
        os.killpg(s3_server.proc.pid, signal.SIGCONT)
    assert failed.exists() and uploading.exists() and frozen.get("probe"), "a fault did not happen"
    assert summary["resumed_from_step"] == 4 and summary["steps"] == main_run["steps"] > 8
    assert summary["data_digest"] == main_run["data_digest"]
    ours = _samples(f"s3://{bucket}/resumed/contrastive/logs/samples.jsonl", storage)
    assert ours == trained["samples"]["contrastive"] and sorted(ours) == list(range(1, main_run["steps"] + 1))
    assert summary["checkpoint"].startswith(f"{bucket}/resumed/checkpoints/")
    assert summary["last_loss"] == pytest.approx(main_run["last_loss"], rel=1e-3)
    records = storage.list_files(f"s3://{bucket}/resumed/checkpoints", ("upload-complete-rank0.json",))
    step8 = [p for p in records if "contrastive-step000008" in p]
    record = json.loads(storage.read_text(f"s3://{step8[0]}")) if step8 else {}
    assert record.get("seconds", 0) >= frozen_s - 2, record  # the upload went through the outage (S3 client retries)
    fs, _ = storage.filesystem(f"s3://{bucket}/resumed/checkpoints")
    for folder in {p.rsplit("/", 1)[0] for p in records}:
        verify_checkpoint(fs, folder, cfg.num_workers)  # complete, sizes as uploaded


def test_checkpoint_upload_retries_then_fails_loudly_never_looking_complete(s3_server, s3_bucket, storage,
                                                                            tmp_path):
    """A failed upload attempt is retried (here the destination heals after the first failure); an upload that
    runs out of attempts (S3 unreachable) fails loudly, and its folder never passes verification."""
    import logging

    from metaaligner.training.checkpoints import CheckpointUploadError, upload_checkpoint, verify_checkpoint

    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "model_states.pt").write_bytes(os.urandom(1 << 16))
    blocker = tmp_path / "storage"
    blocker.write_text("a file where the checkpoint folder must go")  # attempt 1 fails on it

    class HealOnFirstFailure(logging.Handler):
        def emit(self, record):
            if "failed (attempt 1/3)" in record.getMessage():
                blocker.unlink()

    logger = logging.getLogger("metaaligner.training.checkpoints")
    handler = HealOnFirstFailure()
    logger.addHandler(handler)
    try:
        local = pafs.LocalFileSystem()
        assert upload_checkpoint(str(tmp_path / "shard"), local, str(blocker / "step4"), rank=0, attempts=3,
                                 backoff_s=0.1) == 2
    finally:
        logger.removeHandler(handler)
    verify_checkpoint(local, str(blocker / "step4"), 1)

    unreachable = pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", region="us-east-1",
                                    access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    with pytest.raises(CheckpointUploadError, match="failed after 2 attempts"):
        upload_checkpoint(str(tmp_path / "shard"), unreachable, f"{s3_bucket}/ckpt/step8", rank=0, attempts=2,
                          backoff_s=0.1)
    fs, _ = storage.filesystem(f"s3://{s3_bucket}")
    with pytest.raises(RuntimeError, match="incomplete: rank 0 never finished"):
        verify_checkpoint(fs, f"{s3_bucket}/ckpt/step8", 1)


def test_rerun_of_finished_stages_is_skipped(trained, capsys):
    assert main(trained["args"]) == 0
    assert capsys.readouterr().out.count("already done") == 3


def test_changed_stage_retrains_it_and_every_later_stage(trained, storage, capsys):
    """Issue 10 item 6 (runs last: it replaces the shared run's equal and contrastive outputs)."""
    bucket, before = trained["bucket"], trained["summaries"]
    cfg = load_config(TINY, {"train.data": f"s3://{bucket}/reformulated", "train.base_model": f"s3://{bucket}/models/tiny",
                             "train.output": f"s3://{bucket}/train"}).train
    cfg = cfg.model_copy(update={"equal": cfg.equal.model_copy(update={"max_steps": 3})})
    after = run_training(cfg, storage, "all")
    out = capsys.readouterr().out
    assert "[warmup] already done" in out and "[equal] changed: config" in out and "[contrastive] changed: model" in out
    assert after["warmup"]["run_id"] == before["warmup"]["run_id"]
    assert after["equal"]["steps"] == 3 and after["equal"]["run_id"] != before["equal"]["run_id"]
    assert after["contrastive"]["digest"]["config"] == before["contrastive"]["digest"]["config"]
    assert after["contrastive"]["digest"]["model"] != before["contrastive"]["digest"]["model"]
    # the uninterrupted contrastive run replays exactly the samples of the killed-and-resubmitted job
    assert after["contrastive"]["resumed_from_step"] == 0
    assert _samples(f"s3://{bucket}/train/contrastive/logs/samples.jsonl", storage) == trained["samples"][
        "contrastive"]


def test_length_grouped_example_steps_with_zero2_validation_in_bench_mode(tiny_train, storage, ray_cluster):
    """The padded path (length-grouped rows x longest within the token budget) under ZeRO-2, local storage,
    with `global_batch_examples`: every step holds exactly 4 examples (an epoch's last one fewer), spread over
    a varying number of micro-batches per step. `validation: {first_n: 2}` holds the first two rows of the stage's
    data out: they never train, and their eval loss is logged every 2 steps (issue 17 item 8). Bench mode
    (`save_checkpoints: false`): no checkpoint at all."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metaaligner.training.config import ValidationConfig

    cfg, _ = tiny_train
    cfg = cfg.model_copy(update={"packing": False, "attn_implementation": "sdpa", "log_sample_ids": True,
                                 "checkpoint_every": 0, "save_checkpoints": False,
                                 "global_batch_examples": 4,
                                 "validation": ValidationConfig(first_n=2, eval_every=2),
                                 "deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 2}),
                                 "warmup": cfg.warmup.model_copy(update={"fraction": 1.0, "epochs": 3})})
    s = run_training(cfg, storage, "warmup")["warmup"]
    assert s["rows_read"] == 8 and s["examples"] == 6 and s["status_counts"]["validation"] == 2  # equal/ only
    assert s["steps"] == 3 * 2 and s["examples_per_step"] == {"min": 2, "max": 4}  # 6 = 4 + 2 per epoch
    samples = _samples(str(Path(cfg.output) / "warmup" / "logs" / "samples.jsonl"), storage)
    assert [len(samples[i]) for i in sorted(samples)] == [4, 2] * 3
    trained = {k for ids in samples.values() for k in ids}
    assert trained == {row_key(f"equal-{i}") for i in range(2, 8)}  # the first two rows never train
    v = s["validation"]
    assert v["examples"] == 2 and v["rule"] == {"first_n": 2} and [e["step"] for e in v["evals"]] == [2, 4, 6]
    assert v["last_loss"] < v["first_loss"]
    assert s["last_loss"] < s["first_loss"] and s["padding_fraction"] > 0.01  # padded rows, unlike packing
    logs = Path(cfg.output) / "warmup" / "logs"
    events = EventAccumulator(str(logs / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 6]
    assert (Path(cfg.output) / "warmup" / "model" / "model.safetensors").is_file()
    assert s["checkpoint"] is None and s["kernels"] == "torch"
    written = [p for p in Path(cfg.checkpoint_root).rglob("*") if p.is_file()]
    assert not [p for p in written if "step" in p.parent.name or p.suffix in (".pt", ".safetensors")], written


# ---- bad input: clear errors before any worker starts ----

@pytest.fixture
def tiny_train(tmp_path, tiny_model_dir):
    data = write_reformulated(tmp_path / "data", n_contrastive=8, n_equal=8, files=1)
    cfg = load_config(TINY, {"train.data": str(data), "train.base_model": str(tiny_model_dir),
                             "train.output": str(tmp_path / "out")}).train
    return cfg, data


def test_missing_columns(tiny_train, storage):
    cfg, data = tiny_train
    rows = [{k: v for k, v in r.items() if k != "weak_answer"} for r in reformulated_rows(4, "equal")]
    pq.write_table(pa.Table.from_pylist(rows), data / "equal" / "part-000.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['weak_answer'\]"):
        run_training(cfg, storage)


def test_missing_subset_folder(tiny_train, storage):
    cfg, data = tiny_train
    shutil.rmtree(data / "equal")
    with pytest.raises(FileNotFoundError, match="equal"):
        run_training(cfg, storage)


def test_model_without_safetensors(tiny_train, tmp_path, storage):
    cfg, _ = tiny_train
    model = tmp_path / "model"
    shutil.copytree(cfg.base_model, model)
    (model / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        run_training(cfg.model_copy(update={"base_model": str(model)}), storage)


def test_tokenizer_without_eos(tiny_train, tmp_path, storage):
    cfg, _ = tiny_train
    model = tmp_path / "model"
    shutil.copytree(cfg.base_model, model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="no EOS"):
        run_training(cfg.model_copy(update={"base_model": str(model)}), storage)


def test_unreachable_storage(tiny_train):
    from metaaligner.config import StorageConfig

    cfg, _ = tiny_train
    with pytest.raises(RuntimeError, match="unreachable"):
        run_training(cfg.model_copy(update={"output": "s3://nowhere/out"}),
                     StorageConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"))


def test_empty_after_filtering(tiny_train, storage, ray_cluster):
    cfg, _ = tiny_train
    with pytest.raises(ValueError, match="no training examples left after filtering.*target_too_long"):
        run_training(cfg.model_copy(update={"max_length": 8}), storage, "warmup")


def test_liger_requested_without_the_gpu_extra_is_refused_before_any_worker(tiny_train, storage):
    cfg, _ = tiny_train
    cfg = cfg.model_copy(update={"use_gpu": True, "kernels": "liger"})
    with pytest.raises(RuntimeError, match=r"liger-kernel is not installed; install the \[gpu\] extra"):
        run_training(cfg, storage)
