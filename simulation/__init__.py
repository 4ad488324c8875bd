"""Local multi-client simulation: partitions, Flower's Simulation Engine, profiles."""
