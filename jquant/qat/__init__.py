"""jquant.qat."""
