"""A trace-driven, discrete-event simulator of a Shoal cluster (docs/simulator.md).

It runs the live services' pure policy code (routing, P/D choice, scaling)
over virtual time, with workers modelled by the `sim` engine's performance
model, so a policy can be judged on a day of traffic in seconds.
"""
