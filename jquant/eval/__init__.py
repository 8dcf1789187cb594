"""jquant.eval."""
