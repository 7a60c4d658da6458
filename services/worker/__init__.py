"""The worker service: one inference engine behind the Worker gRPC API."""
