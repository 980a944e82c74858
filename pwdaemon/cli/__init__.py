"""The `pwdaemon` command line: cache, warm, demo and the service commands."""
