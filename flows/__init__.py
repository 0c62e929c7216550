"""Prefect orchestration of gpu_ops: tasks wrap one gpu_ops call each; the flow composes them."""

import os

# Safe defaults for offline machines and slow first starts of the ephemeral server; the user's
# own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gpu_ops")
