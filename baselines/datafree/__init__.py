"""Data-free baselines: each synthesises the images it distils on (generator or pixel optimisation)."""
