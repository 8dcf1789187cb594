"""jquant.models."""
