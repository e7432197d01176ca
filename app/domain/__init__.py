"""Pure domain: definitions, states, templates and the planner. No I/O here."""
