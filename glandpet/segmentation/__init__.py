"""TODO docstring of glandpet.segmentation.multi_atlas."""
