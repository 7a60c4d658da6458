"""Agent task graphs: registered tools and retrievers, the graph store, and the runner."""
