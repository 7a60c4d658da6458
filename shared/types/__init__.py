"""Plain typed records shared by services, policies and the simulator (no I/O)."""
