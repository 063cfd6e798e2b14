"""TODO docstring of glandpet.registration.transforms."""
