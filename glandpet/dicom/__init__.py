"""DICOM in and out, the first stage: the tree's series catalogued, classified and selected (:mod:`.catalog`),
read with exact geometry (:mod:`.series`, :mod:`.ct_dcm2niix`), converted to NIfTI + sidecar without
identifiers (:mod:`.convert`), the tracer recognised (:mod:`.tracers`), RTSTRUCT contours read
(:mod:`.rtstruct`), and results exported back as DICOM SEG + SR (:mod:`.export`).
"""
