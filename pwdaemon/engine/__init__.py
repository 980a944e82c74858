"""The background engine: one anyio loop per attached model plans, queues, runs and publishes compile jobs."""
