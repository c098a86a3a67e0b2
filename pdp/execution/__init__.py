"""What the PDP and the executor share about execution: signed tickets and circuit breakers."""
