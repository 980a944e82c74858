"""The call path: range tables, dispatchers, dynamo tracing, CUDA graphs. Never imports the engine."""
