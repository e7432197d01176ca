"""Thin FastAPI routes, their schemas, and RFC 9457 problem details."""
