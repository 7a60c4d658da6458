"""The kvstore's same-host fast path: a shared-memory arena and a unix socket."""
