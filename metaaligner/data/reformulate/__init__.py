"""The reformulation job (dynamic objectives reformulation, Algorithm 1) on Ray Data.

`algorithm` + `oracle` are the per-row reference (the paper's Algorithm 1, one pair at a time); `column_checks` +
`column_algorithm` + `batch` are the column-wise fast path, which must give the same items; `sink` writes a task's
parts, `resolve` settles duplicate ids, `holdout` is the held-out split, `job` runs it all and commits.
Enters: input sources (data.io). Leaves: `contrastive/`, `equal/`, `test/`, `_quarantine/` and `_summary.json`.
"""
