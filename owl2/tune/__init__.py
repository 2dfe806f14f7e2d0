"""Ray Tune sweeps over owl2 experiments."""
