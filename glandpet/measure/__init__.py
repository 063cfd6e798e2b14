"""TODO docstring of glandpet.measure.gland_stats."""
