"""What tests and benchmarks share: real Flower processes on loopback and generated data."""
