"""Calling participant services over HTTP."""
