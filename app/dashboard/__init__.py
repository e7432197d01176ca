"""The operator dashboard: Jinja2 pages over the same stores the API uses."""
