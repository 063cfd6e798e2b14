"""Conversions between the two world-coordinate frames the pipeline meets: RAS and LPS millimetres.

NIfTI affines (nibabel) map voxel indices to **RAS** world coordinates (+x right, +y anterior,
+z superior); DICOM, ITK and ANTs use **LPS** (+x patient left, +y posterior, +z superior). The two
differ only by the sign of x and y, so one matrix, :data:`LPS_TO_RAS`, converts either way.

The helpers compute exactly ``LPS_TO_RAS @ affine`` (a float64 matrix product), the expression the
modules wrote inline before this module existed, so their results are bit-identical to it.
"""

from __future__ import annotations

import numpy as np

#: 4x4 homogeneous matrix flipping the sign of x and y: LPS -> RAS, and, being its own inverse,
#: also RAS -> LPS (``LPS_TO_RAS @ LPS_TO_RAS == I``). For a transform ``T`` between LPS points,
#: ``LPS_TO_RAS @ T @ LPS_TO_RAS`` is the same transform between RAS points (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)  # shared by every importer: an in-place edit would corrupt them all


def ras_to_lps(affine) -> np.ndarray:
    """The 4x4 affine ``affine`` (voxel -> RAS mm, e.g. a NIfTI affine) as voxel -> LPS mm (a new
    float64 array)."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=float)


def transform_lps_to_ras(transform) -> np.ndarray:
    """A 4x4 transform between LPS points (ITK / ANTs) as the same transform between RAS points
    (``LPS_TO_RAS @ transform @ LPS_TO_RAS``; the flip is its own inverse, so this also converts back).
    The flip only changes signs, so the result is exact."""
    return LPS_TO_RAS @ np.asarray(transform, dtype=float) @ LPS_TO_RAS


def lps_to_ras(affine) -> np.ndarray:
    """The 4x4 affine ``affine`` (voxel -> LPS mm, e.g. built from DICOM headers) as voxel -> RAS mm
    (a new float64 array), what a NIfTI file stores."""
    return LPS_TO_RAS @ np.asarray(affine, dtype=float)
