"""TODO docstring of glandpet.workflow.steps."""
