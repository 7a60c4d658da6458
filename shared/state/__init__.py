"""Cluster state in Redis: the key schema and the stores built on it."""
