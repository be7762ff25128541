"""Data: preference pairs in, correction items out (the pipeline's first stage).

`contract` (schemas, quarantine records, the bad-row limit) and `ids` (content ids) are shared by every stage;
`formats` turn rows met in the wild into canonical pairs; `io` finds and reads inputs and writes Parquet;
`duplicates` decides which copy of a repeated id wins; `reformulate` is the Algorithm-1 job; `scoring` labels raw
HH-RLHF transcripts with reward models. No module here imports from training, serving or evaluation.
"""
