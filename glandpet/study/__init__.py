"""TODO docstring of glandpet.study.draft."""
