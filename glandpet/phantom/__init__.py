"""Digital head-and-neck PET/CT phantom: anatomy, tracer uptake, DICOM as scanners write it, ground truth."""
