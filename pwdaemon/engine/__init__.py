"""The background engine: one anyio loop per model plans, runs and publishes compile jobs."""
