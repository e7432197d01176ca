"""The pure core: documents, states, rules and decisions. It does no I/O and imports nothing
from the rest of the application, so every rule is unit-tested on plain values."""
