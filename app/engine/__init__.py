"""Use cases: claim → call → record; compensation; recovery."""
