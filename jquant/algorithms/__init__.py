"""jquant.algorithms."""
