"""TODO docstring of glandpet.dicom."""
