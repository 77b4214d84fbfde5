"""Analysis tools over a run's outputs (not benchmarks: those are in bench/)."""
