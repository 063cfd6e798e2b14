"""The SUV image of a PET session: Bq/mL voxels times the SUV factor its sidecar recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glandpet.writers import write_nifti_like

log = logging.getLogger("glandpet")


def suv_image(pet_path: str, sidecar_path: str, suv_type: str, out_path: str) -> None:
    """PET in Bq/mL -> SUV of `suv_type`, with the factors the converter derived from the header."""
    import nibabel as nib
    import numpy as np

    from glandpet.errors import SUVError
    from glandpet.suv.factors import SUV_CHOICES

    sidecar = json.loads(Path(sidecar_path).read_text())
    factors = sidecar.get("SUVFactors") or {}
    key = SUV_CHOICES[suv_type]
    factor, applied = factors.get(key), sidecar.get("AppliedFactor", 1.0)
    if factor is None or (isinstance(factor, list) and any(f is None for f in factor)):
        raise SUVError(f"{Path(pet_path).name}: the header cannot support SUV type '{suv_type}' ({key} is null)")
    img = nib.load(pet_path)
    bqml = np.asarray(img.dataobj, dtype=np.float32)
    per_slice = np.broadcast_to(np.asarray(factor, dtype=np.float64) / np.asarray(applied, dtype=np.float64), (bqml.shape[2],))
    suv = (bqml * per_slice[None, None, :].astype(np.float32)).astype(np.float32)
    write_nifti_like(suv, img, out_path)
    log.info("%s: SUV%s factor %s (per Bq/mL)", Path(out_path).name, suv_type, per_slice[0])
