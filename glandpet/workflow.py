"""Glue between the Snakemake rules and the glandpet modules.

The Snakefile imports the parse-time helpers (subject list, atlas list, sessions found by the
index); each `scripts/*.py` wrapper calls exactly one step function here, which wires file paths
to the pure functions of the concern's module. Nothing here computes image values itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

from .glands import SESSIONS
from .tables import config_hash

log = logging.getLogger("glandpet")


# --------------------------------------------------------------------------- parse time
def subject_ids(config: Mapping[str, Any], sheet: str) -> list[str]:
    """Subject ids of the run: the demo's S001..S00N, or the validated subject sheet's ids."""
    if config["subjects"] == "":
        return [f"S{i:03d}" for i in range(1, int(config["demo"]["subjects"]) + 1)]
    from .subjects import read_subject_sheet

    return list(read_subject_sheet(sheet, config.get("dicom_root") or None)["subject_id"])


def atlas_list(config: Mapping[str, Any], phantom_atlas_dir: str) -> list[dict[str, str]]:
    """The configured atlases, or the phantom's atlas set."""
    if config.get("atlases"):
        return [dict(a) for a in config["atlases"]]
    n = int(config["demo"].get("atlases", 3))
    return [
        {
            "name": f"atlas{i:02d}",
            "ct": f"{phantom_atlas_dir}/atlas{i:02d}/ct.nii.gz",
            "labels": f"{phantom_atlas_dir}/atlas{i:02d}/labels.nii.gz",
            "label_table": f"{phantom_atlas_dir}/atlas{i:02d}/labels.tsv",
        }
        for i in range(1, n + 1)
    ]


def config_digest(config: Mapping[str, Any]) -> str:
    return config_hash(config)


def reference_session(sessions: Mapping[str, str] | list[str]) -> str:
    """The session atlases are registered to: PSMA when present, else the only session."""
    names = list(sessions)
    if not names:
        raise ValueError("subject has no session")
    return "psma" if "psma" in names else sorted(names)[0]


@functools.lru_cache(maxsize=8)
def _selected(series_path: str, mtime: float) -> dict[str, dict[str, str]]:
    import pandas as pd

    df = pd.read_parquet(series_path, columns=["subject_id", "session", "role", "selected", "tracer_slug"])
    df = df[df["selected"].fillna(False).astype(bool) & (df["role"] == "pet_ac") & df["session"].isin(SESSIONS)]
    out: dict[str, dict[str, str]] = {}
    for sub, ses, trc in zip(df["subject_id"], df["session"], df["tracer_slug"]):
        out.setdefault(sub, {})[ses] = trc
    return out


def selected_sessions(series_path: str, subject: str) -> dict[str, str]:
    """{session: tracer slug} of the PET series the index selected for a subject."""
    return dict(_selected(str(series_path), os.path.getmtime(series_path)).get(subject, {}))


# --------------------------------------------------------------------------- run time
@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send the step's logging, stdout and stderr to its Snakemake log file; log tracebacks."""
    if path is None:
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield log
        except Exception:
            traceback.print_exc(file=fh)
            raise
        finally:
            root.removeHandler(handler)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    from .tables import atomic_path

    tmp = atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def set_threads(threads: int) -> None:
    """Limit ITK/BLAS threads to what Snakemake granted the job."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(max(1, int(threads)))


# --------------------------------------------------------------------------- steps
def demo_phantom(outdir: str, subjects: int, seed: int, atlases: int, threads: int = 1) -> None:
    """Generate the demo cohort (or, with subjects=0, only the phantom's atlas set)."""
    from .phantom.cohort import generate_cohort

    generate_cohort(outdir, int(subjects), int(seed), n_atlases=int(atlases), jobs=int(threads), progress=False)


def index_dicom(sheet: str, dicom_root: str, overrides: list[Mapping[str, str]], output: Any, threads: int = 1) -> None:
    """Index the tree, select series per subject and session; write the per-subject selections."""
    from .series_index import index_tree, summary_text, write_index
    from .subjects import read_subject_sheet

    subjects = read_subject_sheet(sheet, dicom_root)
    chosen = {(o["subject_id"], o["session"]): o["series_key"] for o in overrides or []}
    result = index_tree(dicom_root, subjects, jobs=int(threads), overrides=chosen)
    write_index(result, output.series, output.files, output.skipped)
    log.info("index of %s:\n%s", Path(dicom_root).name, summary_text(result))


def _selected_files(series_path: str, files_path: str, dicom_root: str, subject: str, session: str, modality: str) -> list[str]:
    import pandas as pd

    from .errors import UserError

    series = pd.read_parquet(series_path)
    rows = series[(series["subject_id"] == subject) & series["selected"].fillna(False).astype(bool)]
    pet = rows[(rows["role"] == "pet_ac") & (rows["session"] == session)]
    if len(pet) != 1:
        raise UserError(f"sub-{subject} ses-{session}: expected one selected PET series, found {len(pet)}")
    key = pet.iloc[0]["series_key"] if modality == "pet" else pet.iloc[0]["paired_ct_key"]
    if key is None or (isinstance(key, float)):
        raise UserError(f"sub-{subject} ses-{session}: the PET series has no CT (no series shares its frame of reference or study)")
    files = pd.read_parquet(files_path, filters=[("series_key", "==", key)])
    if files.empty:
        raise UserError(f"sub-{subject} ses-{session}: no files listed for series {key}")
    return [str(Path(dicom_root) / p) for p in files.iloc[0]["paths"]]


def convert_session(series_path: str, files_path: str, dicom_root: str, subject: str, session: str,
                    modality: str, output: Any) -> None:
    """Convert the selected CT or PET series of one session to NIfTI (PET in Bq/mL + sidecar)."""
    from .convert import convert_series

    files = _selected_files(series_path, files_path, dicom_root, subject, session, modality)
    out = output.ct if modality == "ct" else output.image
    sidecar = convert_series(files, out, suv="none")
    log.info("sub-%s ses-%s %s: %d files -> %s (%s)", subject, session, modality, len(files), out, sidecar.get("Units"))


def suv_image(pet_path: str, sidecar_path: str, suv_type: str, out_path: str) -> None:
    """PET in Bq/mL -> SUV of `suv_type`, with the factors the converter derived from the header."""
    import nibabel as nib
    import numpy as np

    from .errors import SUVError
    from .suv import SUV_CHOICES

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


def write_nifti_like(data: Any, ref: Any, out_path: str | os.PathLike) -> None:
    """Write `data` with the exact affine (qform and sform) of the reference image, atomically."""
    import nibabel as nib

    from .tables import atomic_path

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
