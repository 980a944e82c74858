"""Plain metric snapshots and their Prometheus exposition (read at scrape time, never per call)."""
