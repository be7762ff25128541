"""Local paths and s3:// URIs behind one interface (pyarrow filesystems for Ray, boto3 for checks)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from metaaligner.config import StorageConfig


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def _static_keys() -> dict[str, str]:
    """Static keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else {}.

    Static keys never change, so passing them explicitly loses nothing, and they travel with a pickled
    filesystem to Ray workers. With none, S3FileSystem gets no keys at all: each process that uses it
    (driver or Ray worker) asks the AWS SDK's default chain, which refreshes instance-profile, IRSA
    (web identity), SSO and credential_process credentials for as long as the job runs.
    """
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return {}
    keys = {"access_key": key, "secret_key": secret}
    if os.environ.get("AWS_SESSION_TOKEN"):
        keys["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return keys


def s3_client(storage: StorageConfig):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=storage.endpoint_url,
        region_name=storage.region,
        config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
    )


def filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for Ray Data / pyarrow; S3 settings from the AWS env plus endpoint_url.

    Credentials: static keys from the environment when set, otherwise none are frozen in (see _static_keys).
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    bucket, key = split_s3(uri)
    kwargs: dict = {"region": storage.region, **_static_keys()}
    if storage.endpoint_url:
        endpoint = urlparse(storage.endpoint_url)
        kwargs.update(endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https")
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def check_bucket(uri: str, storage: StorageConfig) -> None:
    """Fail fast with a clear message when the endpoint is unreachable or the bucket is missing."""
    if not is_s3(uri):
        return
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_s3(uri)
    where = storage.endpoint_url or "AWS S3"
    try:
        s3_client(storage).head_bucket(Bucket=bucket)
    except (EndpointConnectionError, ConnectionError) as e:
        raise RuntimeError(f"S3 endpoint {where} is unreachable: {e}") from None
    except NoCredentialsError:
        raise RuntimeError("no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise RuntimeError(f"bucket {bucket!r} does not exist at {where}") from None
        raise RuntimeError(f"cannot access bucket {bucket!r} at {where}: {code or e}") from None


def list_files(uri: str, storage: StorageConfig, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a URI (a file or a folder/prefix, recursive) with one of the suffixes, sorted."""
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
    return sorted(n for n in names if not any(part.startswith(("_", ".")) for part in n[len(path):].split("/")))


def write_text(uri: str, text: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    if not is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def read_text(uri: str, storage: StorageConfig) -> str:
    fs, path = filesystem(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_json(uri: str, obj, storage: StorageConfig) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", storage)


def read_json(uri: str, storage: StorageConfig):
    return json.loads(read_text(uri, storage))


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(uri: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def copy_dir(src: str, dst: str, storage: StorageConfig) -> None:
    """Copy a folder between local paths and s3:// (model folders, checkpoints)."""
    src_fs, src_path = filesystem(src, storage)
    dst_fs, dst_path = filesystem(dst, storage)
    if not is_s3(dst):
        os.makedirs(dst_path, exist_ok=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
