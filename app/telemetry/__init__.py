"""Metrics, per-attempt logs and trace propagation."""
