"""Reformulation on a real two-node Ray cluster on this machine gives the same items and the same duplicate
winners as on one node, with duplicates planted in files that the two nodes read."""

import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cluster_multinode import free_ports, start_node, stop_nodes, wait_for_nodes

from metaaligner.synthetic import make_pair

RUN = """
import json, sys, ray
if sys.argv[1]:
    ray.init(address=sys.argv[1], log_to_driver=False)
else:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
from metaaligner.config import ReformulateConfig, StorageConfig
from metaaligner.data.reformulate.job import run_reformulation
cfg = ReformulateConfig(**json.loads(sys.argv[2]))
print("SUMMARY " + json.dumps(run_reformulation(cfg, StorageConfig(endpoint_url=sys.argv[3], region="us-east-1"))))
"""


@pytest.fixture
def two_nodes(s3_server, tmp_path):
    """Head and worker node, 2 CPUs each, no dashboard; yields the GCS address."""
    log = open(tmp_path / "ray-nodes.log", "w")
    ports = free_ports(8)
    address = f"127.0.0.1:{ports[0]}"
    nodes = [start_node(["--head", f"--port={ports[0]}", "--include-dashboard=false",
                         f"--ray-client-server-port={ports[7]}"], ports, {"node_head": 1}, log)]
    try:
        nodes.append(start_node([f"--address={address}"], free_ports(8), {"node_worker": 1}, log))
        wait_for_nodes(address, 2)
        yield address
    finally:
        stop_nodes(nodes)
        log.close()


def planted_input(bucket, storage, files=6, per_file=250):
    """Synthetic pairs in `files` Parquet files, plus duplicates in other files than their first copy: exact
    copies, same id with other content, an id three times, and a few invalid rows."""
    rng = random.Random(13)
    rows = [make_pair(f"m{i}", rng) for i in range(files * per_file)]
    for r in rows:
        r["preferences"] = json.dumps(r["preferences"])
    parts = [rows[k * per_file:(k + 1) * per_file] for k in range(files)]
    for k in range(files):
        donor = parts[(k + 1) % files]
        parts[k].append(dict(donor[3]))  # an identical copy in the next file
        parts[k].append({**donor[7], "response_2": donor[7]["response_2"] + " (edited)"})  # same id, other content
        parts[k].append({**parts[(k + 3) % files][11], "question": "another question?"})
        parts[k].append({**donor[20], "preferences": '{"Calmness": "sideways"}'})  # invalid copy: not a duplicate
    parts[0].append({**parts[2][7], "response_1": "a third version"})
    fs, root = storage.filesystem(f"s3://{bucket}/in")
    for k, part in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(part), f"{root}/part-{k}.parquet", filesystem=fs)
    return sum(len(p) for p in parts)


def reformulate(address, cfg, storage):
    out = subprocess.run([sys.executable, "-c", RUN, address, json.dumps(cfg), storage.config.endpoint_url],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("SUMMARY "):])


def contents(uri, storage):
    fs, root = storage.filesystem(uri)
    out = {}
    for kind in ("contrastive", "equal", "_quarantine"):
        rows = pq.read_table(f"{root}/{kind}", filesystem=fs).to_pylist()
        out[kind] = sorted(json.dumps(r, sort_keys=True) for r in rows)
    return out


def test_two_nodes_give_the_items_and_duplicate_winners_of_one_node(two_nodes, s3_bucket, storage):
    total = planted_input(s3_bucket, storage)
    base = {"input": f"s3://{s3_bucket}/in", "objectives": "synthetic", "batch_size": 100}
    one = reformulate("", {**base, "output": f"s3://{s3_bucket}/one"}, storage)
    two = reformulate(two_nodes, {**base, "output": f"s3://{s3_bucket}/two", "duplicate_check_local_mb": 0},
                      storage)

    assert two["worker_nodes"] == 2 and one["worker_nodes"] == 1
    assert two["duplicate_check"]["partitions"] >= 2 and one["duplicate_check"]["partitions"] == 0
    for s in (one, two):
        assert s["rows_read"] == total == s["valid_pairs"] + s["quarantined"]
        assert s["duplicates"] == 6 * 3 + 1 and s["quarantined_by_reason"]["bad_preference_symbol"] == 6
        assert s["duplicate_check"]["losers"] == s["duplicates"]
    assert {k: one[k] for k in ("items", "items_by_objective", "quarantined_by_reason")} == \
        {k: two[k] for k in ("items", "items_by_objective", "quarantined_by_reason")}
    assert contents(f"s3://{s3_bucket}/one", storage) == contents(f"s3://{s3_bucket}/two", storage)
