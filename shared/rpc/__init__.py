"""gRPC helpers (server bootstrap, channels, auth, error mapping) and the generated stubs."""
