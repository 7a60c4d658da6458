"""The kvstore service."""
