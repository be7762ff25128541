"""Evaluation: per-objective win rates against golden answers with pluggable judges (issue 5)."""
