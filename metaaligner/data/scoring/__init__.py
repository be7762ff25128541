"""`metaaligner score`: per-objective reward-model labels for raw HH-RLHF transcripts.

`reward_models` loads and runs sequence-classification models, `zscore` normalises rewards exactly from value
histograms, `job` runs the two Ray Data passes. Enters: raw `chosen`/`rejected` rows. Leaves: `hh_rlhf_scores`
Parquet that `reformulate --format hh_rlhf_scores` reads as it is.
"""
