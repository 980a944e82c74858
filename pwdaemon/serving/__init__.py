"""The call path: range tables, dispatchers, dynamo tracing, CUDA graphs (never the engine)."""
