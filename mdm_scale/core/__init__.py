"""The ground floor: primitives every other package may use (keyed noise, the clean micro-batch)."""
