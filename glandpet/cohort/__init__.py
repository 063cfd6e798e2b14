"""TODO docstring of glandpet.cohort."""
