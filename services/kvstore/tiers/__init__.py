"""Storage tiers of the kvstore: memory (bounded bytes) and disk (a folder)."""
