"""Local paths and s3:// URIs behind one object: a job builds one `Storage` from its settings and passes it on.

The `Storage` makes its S3 filesystem (pyarrow, for Ray Data and Parquet) and its S3 client (boto3, for checks,
multipart uploads and copies) once, on first use, and every helper of the job reuses them. It travels to Ray
tasks by pickling: the settings and the filesystem go along, the client is rebuilt once per process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import Field

from metaaligner.section import Section


class StorageConfig(Section):
    """Object storage: credentials come from the standard AWS environment/config files."""

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333; None for AWS",
    )
    region: str = Field(default_factory=lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    output_lease_timeout_s: float = Field(
        120.0, ge=1.0, description="a run holds its output folder by a lease renewed every 1/6 of this; another run "
                                   "takes a lease over after this long without a renewal (a dead driver's)")


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


class Storage:
    """One job's storage: local paths and s3:// URIs, with the S3 filesystem and client made once."""

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None
        self._client = None

    @classmethod
    def of(cls, storage: "Storage | StorageConfig | None") -> "Storage":
        """The job's Storage: itself, or a new one built from settings (public entry points take either)."""
        return storage if isinstance(storage, Storage) else cls(storage)

    def __getstate__(self) -> dict:
        return {"config": self.config, "_s3": self._s3, "_client": None}  # a boto3 client does not pickle

    @property
    def client(self):
        """The boto3 S3 client (thread-safe; shared by every helper of this process)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.config.endpoint_url, region_name=self.config.region,
                config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}))
        return self._client

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) for Ray Data / pyarrow; S3 settings from the AWS env plus endpoint_url.

        Credentials: static keys from the environment when set, otherwise none are frozen in (see _static_keys).
        """
        if not is_s3(uri):
            return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        bucket, key = split_s3(uri)
        if self._s3 is None:
            kwargs: dict = {"region": self.config.region, **_static_keys()}
            if self.config.endpoint_url:
                endpoint = urlparse(self.config.endpoint_url)
                kwargs.update(endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https")
            self._s3 = pafs.S3FileSystem(**kwargs)
        return self._s3, f"{bucket}/{key}".rstrip("/")

    def check_bucket(self, uri: str) -> None:
        """Fail fast with a clear message when the endpoint is unreachable or the bucket is missing."""
        if not is_s3(uri):
            return
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        bucket, _ = split_s3(uri)
        where = self.config.endpoint_url or "AWS S3"
        try:
            self.client.head_bucket(Bucket=bucket)
        except (EndpointConnectionError, ConnectionError) as e:
            raise RuntimeError(f"S3 endpoint {where} is unreachable: {e}") from None
        except NoCredentialsError:
            raise RuntimeError("no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise RuntimeError(f"bucket {bucket!r} does not exist at {where}") from None
            raise RuntimeError(f"cannot access bucket {bucket!r} at {where}: {code or e}") from None

    def list_files(self, uri: str, suffixes: tuple[str, ...]) -> list[str]:
        """Files under a URI (a file or a folder/prefix, recursive) with one of the suffixes, sorted."""
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {uri}")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        names = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
        return sorted(n for n in names if not any(part.startswith(("_", ".")) for part in n[len(path):].split("/")))

    def write_text(self, uri: str, text: str) -> None:
        fs, path = self.filesystem(uri)
        if not is_s3(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_json(self, uri: str, obj) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, uri: str):
        return json.loads(self.read_text(uri))

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def delete_dir(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir_contents(path, missing_dir_ok=True)

    def copy_dir(self, src: str, dst: str) -> None:
        """Copy a folder between local paths and s3:// (model folders, checkpoints)."""
        src_fs, src_path = self.filesystem(src)
        dst_fs, dst_path = self.filesystem(dst)
        if not is_s3(dst):
            os.makedirs(dst_path, exist_ok=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
