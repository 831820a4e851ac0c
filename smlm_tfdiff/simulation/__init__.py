"""Simulation: configuration, the physical forward model, the simulators and dataset files."""
