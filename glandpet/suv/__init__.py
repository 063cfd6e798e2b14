"""TODO docstring of glandpet.suv.factors."""
