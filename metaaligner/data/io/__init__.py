"""Reading and writing: input discovery (local, s3://, HF datasets), sources read as Arrow batches or raw lines,
row-level input for `correct` and `evaluate`, and the Parquet part writer.

Enters: a URI and the storage settings. Leaves: the files to read, batches with their (source, row) positions, or
a Ray dataset; and Parquet parts written with large row groups.
"""
