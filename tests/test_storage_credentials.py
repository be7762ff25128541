"""S3 credentials: static keys from the environment are used as given; otherwise nothing is frozen into the
pyarrow filesystem, so the AWS SDK's default chain (instance profile, IRSA, SSO, credential_process) can
refresh credentials during long runs, in the driver and in every Ray worker that unpickles the filesystem."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

from metaaligner.storage import Storage, StorageConfig


def _reduced_keys(fs) -> dict:
    """The credentials a pickled copy of the filesystem carries (what Ray ships to its workers); '' -> None."""
    args = fs.__reduce__()[1][0]
    return {k: args[k] or None for k in ("access_key", "secret_key", "session_token")}


def test_no_static_keys_means_nothing_frozen_and_the_sdk_chain_still_reaches_s3(s3_server, s3_bucket, tmp_path):
    # A refreshable source the old code froze: an AWS profile whose credentials come from a process
    # (as with SSO or IRSA, boto3 resolves it, and so does the AWS SDK inside pyarrow).
    creds_script = tmp_path / "creds.py"
    creds_script.write_text("import json\nprint(json.dumps({'Version': 1, 'AccessKeyId': %r, 'SecretAccessKey': %r}))\n"
                            % (s3_server.access_key, s3_server.secret_key))
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {creds_script}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"),
               AWS_EC2_METADATA_DISABLED="true")
    code = textwrap.dedent(f"""
        import json, pickle
        from metaaligner import storage as st
        from metaaligner.storage import Storage, StorageConfig
        fs, path = Storage(StorageConfig(endpoint_url={s3_server.endpoint_url!r})).filesystem("s3://{s3_bucket}/run/a.txt")
        args = fs.__reduce__()[1][0]
        with fs.open_output_stream(path) as f:
            f.write(b"written through the SDK chain")
        copy = pickle.loads(pickle.dumps(fs))          # what a Ray worker gets
        with copy.open_input_stream(path) as f:
            body = f.read().decode()
        print(json.dumps({{"access_key": args["access_key"], "secret_key": args["secret_key"],
                          "secret_in_pickle": {s3_server.secret_key!r}.encode() in pickle.dumps(fs), "body": body}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"access_key": None, "secret_key": None, "secret_in_pickle": False,
                      "body": "written through the SDK chain"}


def test_static_keys_from_the_environment_are_passed_and_work(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))  # s3_server exported its keys
    fs, path = storage.filesystem(f"s3://{s3_bucket}/static/a.txt")
    assert _reduced_keys(fs) == {"access_key": s3_server.access_key, "secret_key": s3_server.secret_key,
                                 "session_token": None}
    storage.write_text(f"s3://{s3_bucket}/static/a.txt", "static keys")
    copy = pickle.loads(pickle.dumps(fs))
    with copy.open_input_stream(path) as f:
        assert f.read() == b"static keys"


def test_a_session_token_travels_with_static_keys_and_half_a_key_pair_is_ignored(monkeypatch):
    config = StorageConfig(endpoint_url="http://127.0.0.1:9")  # never contacted
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    fs, _ = Storage(config).filesystem("s3://bucket/key")  # a job's storage reads the keys when it is built
    assert _reduced_keys(fs) == {"access_key": "AKIDEXAMPLE", "secret_key": "secret", "session_token": "token"}
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fs, _ = Storage(config).filesystem("s3://bucket/key")
    assert _reduced_keys(fs) == {"access_key": None, "secret_key": None, "session_token": None}
