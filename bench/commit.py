"""Benchmark: the cost of committing an output on S3, by a server-side copy per file vs by completing uploads.

    python bench/commit.py --files 64 --mib 300      # the shape of a 1M-pair reformulation output
    python bench/commit.py --files 320 --mib 3000    # 10M pairs

Writes the same `--files` files (`--mib` MiB in all, incompressible bytes) twice into a local SeaweedFS server
through `metaaligner.outputs.StagedOutput`, and times each commit (`commit_s` of its `_summary.json`):
(before) files staged under `_staging/<run>/` and moved at commit by a server-side copy + delete each (S3 has no
rename): what every file cost before issue 18, and what a file without the run id in its name still costs;
(after) part files named by the run id, uploaded to their final keys as multipart uploads left pending and
completed at commit with one request each (the S3A "magic" committer's way). Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from metaaligner.outputs import StagedOutput  # noqa: E402
from metaaligner.s3server import LocalS3Server  # noqa: E402
from metaaligner.storage import Storage, StorageConfig  # noqa: E402


def write_and_commit(storage: Storage, uri: str, files: int, size: int, pending: bool) -> dict:
    out = StagedOutput(uri, "bench-commit", storage)
    body = random.Random(files).randbytes(size)

    def write(k: int) -> None:
        name = f"part-{out.run_id}-{k:05d}.parquet" if pending else f"part-{k:05d}.parquet"
        with out.open("contrastive", name) as f:
            f.write(body)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(files)))
    written = time.perf_counter() - started
    out.commit({})
    summary = storage.read_json(f"{uri}/_summary.json")
    return {"write_s": round(written, 2), "commit_s": summary["commit_s"],
            "uploads_completed": summary["uploads_completed"], "files": summary["committed_files"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--mib", type=float, default=300.0, help="MiB in all")
    args = ap.parse_args()
    size = int(args.mib * 2**20 / args.files)
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        server = LocalS3Server(directory=os.path.join(tmp, "s3")).start()
        try:
            server.create_bucket("bench")
            os.environ.update(server.env)
            storage = Storage(StorageConfig(endpoint_url=server.endpoint_url))
            before = write_and_commit(storage, "s3://bench/before", args.files, size, pending=False)
            after = write_and_commit(storage, "s3://bench/after", args.files, size, pending=True)
        finally:
            server.stop()
    print(f"{args.files} files, {args.mib:.0f} MiB: before (copy + delete per file) {before}")
    print(f"{args.files} files, {args.mib:.0f} MiB: after (complete pending uploads) {after}")
    print(f"commit before / after: {before['commit_s'] / max(after['commit_s'], 1e-3):.1f}x")


if __name__ == "__main__":
    main()
