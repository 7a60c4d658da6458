"""Actuators: how the controller changes the number of workers of a pool."""
