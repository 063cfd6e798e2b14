"""Atomic writers of the pipeline's files: NIfTI with the reference image's exact geometry, JSON and text."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    from glandpet.tables import atomic_path

    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def write_nifti_like(data: Any, ref: Any, out_path: str | os.PathLike) -> None:
    """Write `data` with the exact affine (qform and sform) of the reference image, atomically."""
    import nibabel as nib

    from glandpet.tables import atomic_path

    img = nib.Nifti1Image(data, ref.affine)
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = atomic_path(str(out_path))
    tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
    try:
        nib.save(img, tmp_nii)
        os.replace(tmp_nii, out_path)
    finally:
        for t in (tmp, tmp_nii):
            if t.exists():
                t.unlink()
