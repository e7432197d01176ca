"""Runnable examples that use the saga orchestrator (see `saga-orchestrator demo`)."""
