"""Bulk labeling: list inputs (sources), read and decode them (reading), run the model (predictor, in Ray Data
actors planned by plan), commit Parquet exactly once (output); job ties them together."""
