"""What imgjobs reads and writes, with no torch or Ray at import (tests/test_architecture.py): image keys and the
reader of any key (keys), archive members within limits (archives), the labels Parquet and its provenance
(labels_file), the checkpoint file (checkpoint), its model entry and the trained model it holds (model_spec). Read
workers and the driver's checks use them without paying for torch."""
