"""Watching a running payload: resource samples, limits, live debugging, status."""
