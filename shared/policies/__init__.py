"""Pure decision policies (routing, scaling, placement): no I/O."""
