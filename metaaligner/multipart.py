"""S3 multipart uploads: a write stream into one object, completed on close or left pending for a later commit.

A multipart upload is invisible to readers until it is completed: no listing, GET or HEAD shows it, so a part
file never appears half-written. `S3Upload.finish()` uploads the last part and returns a *pending record*
(bucket, key, upload id, part ETags, size) instead of completing; the job's driver completes it at commit with
one small request per file, the way Hadoop's S3A "magic" committer does, so committing costs the same however
large the files are. Uploads nobody completes (a failed or killed run) are aborted by `abort_uploads`, and a
bucket lifecycle rule `AbortIncompleteMultipartUpload` removes those of a driver that died for good
(docs/reliability.md).
"""

from __future__ import annotations

import io
import logging
from typing import Callable, Iterable

log = logging.getLogger(__name__)

PART_SIZE = 16 << 20  # S3 multipart part size (>= 5 MiB, the S3 minimum for every part but the last)


class S3Upload(io.RawIOBase):
    """A write-only stream into one S3 object via a multipart upload: `complete()` publishes it, `finish()` leaves
    it pending (see the module docstring), `abort()` drops it."""

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key = client, bucket, key
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.parts: list[dict] = []
        self.buffer = bytearray()
        self.position = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        self.buffer += data
        self.position += len(data)
        while len(self.buffer) >= PART_SIZE:
            self._flush_part(bytes(self.buffer[:PART_SIZE]))
            del self.buffer[:PART_SIZE]
        return len(data)

    def _flush_part(self, body: bytes) -> None:
        number = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
                                       Body=body)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})

    def finish(self) -> dict:
        """Upload what is buffered and return the pending record; the object stays invisible until completed."""
        if self.buffer or not self.parts:
            self._flush_part(bytes(self.buffer))
            self.buffer.clear()
        return {"bucket": self.bucket, "key": self.key, "upload_id": self.upload_id, "parts": self.parts,
                "size": self.position}

    def complete(self) -> None:
        complete(self.client, self.finish())

    def abort(self) -> None:
        abort(self.client, self.bucket, self.key, self.upload_id)


def complete(client, record: dict) -> None:
    """Publish a pending upload at its key: one request, no copy of the data."""
    client.complete_multipart_upload(Bucket=record["bucket"], Key=record["key"], UploadId=record["upload_id"],
                                     MultipartUpload={"Parts": record["parts"]})


def abort(client, bucket: str, key: str, upload_id: str) -> bool:
    """Drop an upload and its parts; False (logged, not raised) when the server cannot be asked."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        return True
    except Exception as e:  # noqa: BLE001 — cleanup after a failure: report it, never hide the first error
        if "NoSuchUpload" in str(e):
            return True
        log.warning("could not abort the multipart upload of s3://%s/%s: %s", bucket, key, e)
        return False


def uploads(client, bucket: str, prefix: str) -> Iterable[dict]:
    """The multipart uploads in progress under a key prefix (any client's), as S3 lists them."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Uploads", [])


def abort_uploads(client, bucket: str, prefix: str, doomed: Callable[[str], bool],
                  keep: frozenset[str] = frozenset()) -> int:
    """Abort the uploads under `prefix` whose key `doomed(key)` says belong to no live run (upload ids in `keep`
    excepted); returns how many were aborted."""
    aborted = 0
    for upload in uploads(client, bucket, prefix):
        if upload["UploadId"] not in keep and doomed(upload["Key"]):
            aborted += abort(client, bucket, upload["Key"], upload["UploadId"])
    return aborted
