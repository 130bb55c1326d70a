"""The faust worker: the batch consumer on the input topics, the RocksDB-backed state table and its
changelog, the output sinks, the model holder, and the process entry point (``main``)."""
