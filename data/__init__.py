"""Input pipeline: ORC/Parquet sequence files -> hashed, truncated ``SequenceBatch`` of KeyedJaggedTensors."""
