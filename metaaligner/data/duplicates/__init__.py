"""The duplicate-id check, partitioned and deterministic: no single actor, no arrival order.

Modules: `rule` (the winner rule on Arrow tables), `candidate_ids` (the ids each raw row can give), `passes` (the
find pass and the per-id shuffle on Ray). The resolve step replays rows through the reformulator, so it lives
with the job: `metaaligner.data.reformulate.resolve`.

Rule: among the valid pairs that share an id, the winner is the one with the smallest digest of its content
(then the smallest (source, row, candidate) position, which only orders identical copies -- interchangeable
by construction). The winner is the same whatever the split into files, blocks, tasks or nodes, and under
retries.

Three steps, each memory-bounded per node:
1. **Find** (before the main pass): every row's candidate pair ids (canonical columnar input reads only the
   `id` column; other formats run their adapter) as (id, source, row) rows, hash-partitioned by id with Ray
   Data's shuffle (`repartition(keys=["id"])`, one block per partition in Ray 2.60's shuffle); each
   partition keeps the rows whose id occurs more than once. Small inputs skip the shuffle: when all id rows
   fit in `local_limit_bytes` they are checked in the driver (the broadcast-versus-shuffle choice of SQL
   engines). The result is the small set of rows to defer, per source.
2. **Main pass**: deferred rows are left out and written aside (scratch files); everything else is final.
3. **Resolve**: the deferred rows' valid pairs become (id, digest, position) keys, partitioned by id the
   same way; each partition names its losers; the deferred rows then go through the per-row path with
   those owners, so a loser is quarantined as `duplicate_id` exactly as the per-row path does it.

Cost per id in step 1: the id's UTF-8 bytes + 4 (string offset) + 4 (source) + 8 (row) bytes in the object
store (spilled to disk under pressure), plus the partition's Arrow hash table while it is grouped; only the
rows of duplicated ids come back to the driver. Step 3 costs the same per deferred row, plus its raw row in
a scratch file.
"""
