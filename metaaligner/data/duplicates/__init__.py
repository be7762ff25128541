"""The duplicate-id check, partitioned and deterministic: no single actor, no arrival order.

Modules: `rule` (the winner rule on Arrow tables), `candidate_ids` (the ids each raw row can give), `passes` (the
find pass, the per-partition combine on Ray and `Positions`). The resolve step replays rows through the
reformulator, so it lives with the job: `metaaligner.data.reformulate.resolve`.

Rule: among the valid pairs that share an id, the winner is the one with the smallest digest of its content
(then the smallest (source, row, candidate) position, which only orders identical copies -- interchangeable
by construction). The winner is the same whatever the split into files, blocks, tasks or nodes, and under
retries.

Three steps, each memory-bounded per node; the driver holds object references, not rows (only the early find
reads up to `local_limit_bytes` of ids itself):
1. **Find** (before the main pass), per work unit (data.io.units): every row's candidate pair ids as
   (key, source, row) rows, key = a 64-bit hash of the id (data.ids.columns.hash64). Canonical input reads
   only the `id` column, hh_rlhf_scores its texts and ids column-wise (the "hh-" content digests hashed in
   batches); other formats run their adapter. The rows whose key occurs more than once are kept: by one task
   when all key rows fit in `local_limit_bytes` (Parquet input of up to 64 files: read by the driver while Ray
   starts), else per hash partition of the key with Ray Data's `groupby(part).map_groups(...)` (one call sees
   a whole partition: that is the operator's contract; a group per id would be one Python call per id). A
   64-bit collision only defers a few more rows: the resolve step compares the ids themselves.
2. **Main pass**: the rows to defer are `passes.Positions`, Arrow tables sorted by (source, row) in the object
   store; each task takes its unit's slice by binary search. Deferred rows are written aside (one scratch file
   per unit); everything else is final.
3. **Resolve**: the deferred rows' valid pairs become (key, id, digest, position) rows (column-wise where the
   column checks pass), combined the same way; each partition names its losers, again kept as Positions. The
   deferred rows are then replayed per unit in batches: rows without a losing pair take the column path,
   losing rows are quarantined as `duplicate_id` exactly as the per-row path does it.

Cost per id in step 1: 8 (key) + 4 (source) + 8 (row) = 20 bytes in the object store (spilled to disk under
pressure), plus the partition's sort while it is grouped. Per deferred row: 12 bytes of Positions, its raw row
in a scratch file, and in step 3 its key row (id + 16-byte digest + 32 bytes); per losing pair 16 bytes of
Positions.
"""
