"""Pure resilience rules (retry schedule, outcome classification); clocks are injected."""
