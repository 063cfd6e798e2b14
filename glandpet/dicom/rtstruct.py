"""DICOM RTSTRUCT contours -> a gland label map on the CT grid (the `glandpet atlas add` core).

Geometry
--------
RTSTRUCT contours are CLOSED_PLANAR polygons in the DICOM patient frame (LPS, mm). Each
polygon is mapped through the inverse of the CT's voxel -> LPS affine (exact, from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing; :func:`ct_grid`) to continuous
voxel coordinates (i, j, k). Its plane must be one CT slice: every point's k within
:data:`SLICE_TOL_MM` of the same integer slice index (a contour between slices or tilted
against them is refused, not interpolated).

Fill rule (:func:`fill_polygons`): a voxel belongs to an ROI when its **centre** lies inside the
ROI's polygons on that slice by the **even-odd rule**: polygons of one ROI on one slice combine
by XOR, so a polygon inside another is a hole, and two disjoint polygons are two islands. A
centre exactly on an edge follows the half-open convention of scan-line rasterisers (inside on
the edges with the smaller coordinate, outside on those with the larger one), so that two ROIs
sharing an edge never both claim a voxel. Affine maps preserve inside/outside, so filling in
voxel coordinates equals filling in world millimetres.

Validation (:class:`glandpet.errors.UserError`, naming the ROI and the slice as z in mm and CT
slice index): open contours (OPEN_PLANAR, OPEN_NONPLANAR, POINT) or closed ones with fewer
than 3 distinct points; self-intersecting (or self-touching) polygons; contours outside the CT
volume (beyond the outer voxel faces, :data:`EDGE_TOL_VOX` of slack); contour planes not on
a CT slice; an ROI whose frame of reference is not the CT's (refused: the coordinates would
mean nothing on this CT). Only the ROIs that map to a gland are validated and rasterised (an
RTSTRUCT is full of structures we do not use: a broken "PTV" must not stop an atlas).

Policy for an RTSTRUCT that references another image series than the given CT (its
RTReferencedSeriesSequence or its contours' ReferencedSOPInstanceUIDs point elsewhere) while
the frame of reference is the same: **warn, do not refuse**. Contour coordinates are patient
coordinates in the shared frame, so they are valid on any series of that frame (e.g. a
re-export or another reconstruction of the planning CT); every geometric check above still
applies on the CT given.

ROI names -> (gland, side): :class:`RoiNameMap` (the default table
``glandpet/data/roi_names.tsv``, overridden by a user map TSV ``roi_name, gland, side``; gland
``ignore`` drops an ROI). Unmapped ROIs are listed, not an error, unless no ROI maps; two ROIs
mapping to one gland and side are refused (say which with the map). Voxels claimed by two gland
ROIs go to the smaller ROI (warning with the count). A "left" ROI lying on the patient's right of
its "right" partner (smaller LPS x) gives a warning: the side is always the patient's side.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from glandpet.errors import UserError
from glandpet.geometry import lps_to_ras
from glandpet.glands import GLANDS, SIDES, Label, label_value, volume_warnings

#: a contour plane may lie this far (mm, along the slice normal) from a CT slice centre
SLICE_TOL_MM = 0.1
#: a contour point may lie this far (voxels) outside the outer voxel faces of the CT
EDGE_TOL_VOX = 1e-3

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_OPEN_TYPES = {"OPEN_PLANAR", "OPEN_NONPLANAR", "POINT"}
IGNORE = "ignore"


# ------------------------------------------------------------------------------------ CT grid
@dataclass
class CTGrid:
    """The CT volume's geometry as `glandpet.dicom.convert` writes it: voxel (i, j, k) -> LPS mm."""

    affine_lps: np.ndarray
    shape: tuple[int, int, int]
    frame_of_reference_uid: str
    series_uid: str
    study_uid: str
    sop_uids: list[str]  # per slice k
    label: str

    @property
    def slice_spacing_mm(self) -> float:
        return float(np.linalg.norm(self.affine_lps[:3, 2]))

    def slice_z(self, k: int) -> float:
        """LPS z (mm) of slice k's first voxel (the slice position on an axial CT)."""
        return float((self.affine_lps @ np.array([0.0, 0.0, float(k), 1.0]))[2])


def ct_grid(ct_series_dir) -> CTGrid:
    """Read the CT series headers (no pixels) and return its grid, UIDs and per-slice SOP UIDs."""
    from glandpet.dicom.series import load_series

    s = load_series(ct_series_dir, read_pixels=False)
    if s.modality != "CT":
        raise UserError(f"{s.label}: --ct must be a CT series (Modality is {s.modality or 'missing'})")
    ds0 = s.datasets[0]
    for_uid = str(ds0.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise UserError(f"{s.label}: the CT has no FrameOfReferenceUID (0020,0052): cannot check that the "
                        f"RTSTRUCT belongs to it")
    shape = (int(ds0.Columns), int(ds0.Rows), len(s.datasets))
    return CTGrid(affine_lps=s.affine_lps, shape=shape, frame_of_reference_uid=for_uid,
                  series_uid=str(ds0.get("SeriesInstanceUID", "")), study_uid=str(ds0.get("StudyInstanceUID", "")),
                  sop_uids=[str(d.get("SOPInstanceUID", "")) for d in s.datasets], label=s.label)


# ------------------------------------------------------------------------------------ RTSTRUCT
@dataclass
class Contour:
    points: np.ndarray  # (n, 3) LPS mm
    geometric_type: str
    referenced_sop_uids: list[str]
    number: int  # 1-based position in the ROI's ContourSequence (for messages)


@dataclass
class ROI:
    number: int
    name: str
    frame_of_reference_uid: str
    contours: list[Contour] = field(default_factory=list)


@dataclass
class StructureSet:
    path: Path
    rois: list[ROI]
    frame_of_reference_uids: list[str]
    referenced_series_uids: list[str]
    label: str


def read_rtstruct(path) -> StructureSet:
    """Read an RTSTRUCT file: its ROIs (number, name, frame of reference) and their contours."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such RTSTRUCT file")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise UserError(f"{path}: not a readable DICOM file ({exc})") from None
    label = f"{path.name}"
    if str(ds.get("Modality", "")) != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        raise UserError(f"{path}: not an RTSTRUCT (Modality {ds.get('Modality', 'missing')})")
    ssroi = ds.get("StructureSetROISequence") or []
    if not ssroi:
        raise UserError(f"{path}: the RTSTRUCT has no StructureSetROISequence (3006,0020): no ROIs")
    rois: dict[int, ROI] = {}
    for it in ssroi:
        num = int(it.get("ROINumber", -1))
        rois[num] = ROI(number=num, name=str(it.get("ROIName", "") or f"ROI #{num}").strip(),
                        frame_of_reference_uid=str(it.get("ReferencedFrameOfReferenceUID", "") or ""))
    for rc in ds.get("ROIContourSequence") or []:
        num = int(rc.get("ReferencedROINumber", -1))
        roi = rois.get(num)
        if roi is None:
            raise UserError(f"{path}: ROIContourSequence refers to ROI number {num}, which the "
                            f"StructureSetROISequence does not define")
        for n, c in enumerate(rc.get("ContourSequence") or [], start=1):
            data = _contour_data(c)
            gtype = str(c.get("ContourGeometricType", "") or "").upper()
            if len(data) % 3:
                raise UserError(f"{path}: ROI '{roi.name}' contour {n}: ContourData holds {len(data)} numbers, "
                                f"not x/y/z triplets")
            npts = c.get("NumberOfContourPoints")
            if npts not in (None, "") and int(npts) * 3 != len(data):
                raise UserError(f"{path}: ROI '{roi.name}' contour {n}: NumberOfContourPoints is {int(npts)} but "
                                f"ContourData holds {len(data) // 3} points")
            refs = [str(r.get("ReferencedSOPInstanceUID", "")) for r in (c.get("ContourImageSequence") or [])]
            roi.contours.append(Contour(np.asarray(data, float).reshape(-1, 3), gtype, refs, n))
    fors, series = [], []
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        fors.append(str(fr.get("FrameOfReferenceUID", "")))
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                series.append(str(se.get("SeriesInstanceUID", "")))
    return StructureSet(path=path, rois=sorted(rois.values(), key=lambda r: r.number), frame_of_reference_uids=fors,
                        referenced_series_uids=series, label=label)


def _contour_data(item) -> np.ndarray:
    """ContourData as floats; parsed from the raw DS bytes when pydicom has not converted them yet
    (an export's body contours hold 10^5-10^6 numbers: pydicom's per-value DS objects are slow)."""
    from pydicom.dataelem import RawDataElement

    elem = item.get_item(0x30060050)
    if elem is None or elem.value in (None, b"", ""):
        return np.zeros(0)
    if isinstance(elem, RawDataElement):
        text = bytes(elem.value).decode("ascii", "replace").replace("\x00", " ").strip()
        try:
            return np.array([float(v) for v in text.split("\\")], dtype=float)
        except ValueError:
            pass  # malformed: let pydicom say what is wrong
    v = item.ContourData
    return np.array([float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") else [v])], float)


def check_references(rs: StructureSet, grid: CTGrid, rois: list[ROI] | None = None) -> list[str]:
    """Refuse a frame-of-reference mismatch (per ROI, else the structure set's own); return
    warnings when the RTSTRUCT references another series than this CT (see module docstring)."""
    rois = rs.rois if rois is None else rois
    for roi in rois:
        f = roi.frame_of_reference_uid or (rs.frame_of_reference_uids[0] if len(rs.frame_of_reference_uids) == 1 else "")
        if not f:
            raise UserError(f"{rs.path}: ROI '{roi.name}' has no ReferencedFrameOfReferenceUID: cannot check that "
                            f"it belongs to the CT {grid.label}")
        if f != grid.frame_of_reference_uid:
            raise UserError(f"{rs.path}: ROI '{roi.name}' is in frame of reference ...{f[-12:]}, the CT {grid.label} "
                            f"in ...{grid.frame_of_reference_uid[-12:]}: the RTSTRUCT was not drawn on this CT "
                            f"(frame-of-reference mismatch)")
    warnings = []
    if rs.referenced_series_uids and grid.series_uid not in rs.referenced_series_uids:
        warnings.append(f"{rs.path.name} references another image series than {grid.label} (same frame of "
                        f"reference: the contours are used in patient coordinates on this CT)")
    known = set(grid.sop_uids)
    foreign = sum(1 for roi in rois for c in roi.contours for u in c.referenced_sop_uids if u and u not in known)
    if foreign:
        warnings.append(f"{rs.path.name}: {foreign} contour(s) reference images that are not slices of {grid.label} "
                        f"(same frame of reference: used in patient coordinates)")
    return warnings


# ------------------------------------------------------------------------------------ geometry
def _segments_intersect(p: np.ndarray, q: np.ndarray, r: np.ndarray, s: np.ndarray, eps: float) -> np.ndarray:
    """Vectorised test whether segments p-q and r-s intersect or touch (arrays (..., 2))."""

    def orient(a, b, c):
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])

    def on_seg(a, b, c):  # c within the bounding box of a-b (used when collinear)
        return ((np.minimum(a[..., 0], b[..., 0]) - eps <= c[..., 0]) & (c[..., 0] <= np.maximum(a[..., 0], b[..., 0]) + eps)
                & (np.minimum(a[..., 1], b[..., 1]) - eps <= c[..., 1]) & (c[..., 1] <= np.maximum(a[..., 1], b[..., 1]) + eps))

    o1, o2, o3, o4 = orient(p, q, r), orient(p, q, s), orient(r, s, p), orient(r, s, q)
    z1, z2, z3, z4 = (np.abs(o) <= eps for o in (o1, o2, o3, o4))
    proper = (np.sign(o1) * np.sign(o2) < 0) & (np.sign(o3) * np.sign(o4) < 0) & ~(z1 | z2 | z3 | z4)
    touch = (z1 & on_seg(p, q, r)) | (z2 & on_seg(p, q, s)) | (z3 & on_seg(r, s, p)) | (z4 & on_seg(r, s, q))
    return proper | touch


def self_intersection(poly: np.ndarray, eps: float = 1e-9) -> tuple[int, int] | None:
    """First pair of non-adjacent edges (indices) of a closed polygon (n, 2) that intersect or
    touch, or None. Edge a joins vertex a and a+1 (mod n)."""
    n = len(poly)
    if n < 4:
        return None
    p, q = poly, np.roll(poly, -1, axis=0)
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    idx = np.arange(n)
    chunk = max(1, 2_000_000 // n)
    for a0 in range(0, n, chunk):
        a = idx[a0:a0 + chunk, None]
        b = idx[None, :]
        cand = (b > a + 1) & ~((a == 0) & (b == n - 1))
        # bounding boxes overlap
        cand &= ((lo[a0:a0 + chunk, None, 0] <= hi[None, :, 0] + eps) & (lo[None, :, 0] <= hi[a0:a0 + chunk, None, 0] + eps)
                 & (lo[a0:a0 + chunk, None, 1] <= hi[None, :, 1] + eps) & (lo[None, :, 1] <= hi[a0:a0 + chunk, None, 1] + eps))
        ai, bi = np.nonzero(cand)
        if not len(ai):
            continue
        ai = ai + a0
        hit = _segments_intersect(p[ai], q[ai], p[bi], q[bi], eps)
        if hit.any():
            k = int(np.argmax(hit))
            return int(ai[k]), int(bi[k])
    return None


def fill_polygons(polygons: list[np.ndarray], nx: int, ny: int) -> np.ndarray:
    """Boolean (nx, ny) mask of the pixel centres (i, j integer) inside ``polygons`` ((m, 2)
    arrays in continuous pixel coordinates, implicitly closed) by the even-odd rule; half-open
    on edges (see the module docstring). Exact scan-line fill, vectorised."""
    mask = np.zeros((nx, ny), dtype=bool)
    if not polygons:
        return mask
    e0 = np.concatenate([np.asarray(p, float) for p in polygons])
    e1 = np.concatenate([np.roll(np.asarray(p, float), -1, axis=0) for p in polygons])
    x0, y0, x1, y1 = e0[:, 0], e0[:, 1], e1[:, 0], e1[:, 1]
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    jlo = np.maximum(np.ceil(ylo), 0).astype(np.int64)  # rows j with ylo <= j < yhi
    jhi = np.minimum(np.ceil(yhi) - 1, ny - 1).astype(np.int64)
    cnt = np.maximum(jhi - jlo + 1, 0)
    keep = cnt > 0
    if not keep.any():
        return mask
    x0, y0, x1, y1, jlo, cnt = x0[keep], y0[keep], x1[keep], y1[keep], jlo[keep], cnt[keep]
    edge = np.repeat(np.arange(len(cnt)), cnt)
    start = np.repeat(np.cumsum(cnt) - cnt, cnt)
    rows = jlo[edge] + (np.arange(int(cnt.sum())) - start)
    t = (rows - y0[edge]) / (y1[edge] - y0[edge])
    xs = x0[edge] + t * (x1[edge] - x0[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # each closed polygon crosses each row an even number of times (half-open in y)
    ra, rb = rows[0::2], rows[1::2]
    assert len(ra) == len(rb) and np.array_equal(ra, rb), "odd crossing count: polygon not closed"
    ia = np.clip(np.ceil(xs[0::2]), 0, nx).astype(np.int64)  # xa <= i < xb
    ib = np.clip(np.ceil(xs[1::2]), 0, nx).astype(np.int64)
    diff = np.zeros((ny, nx + 1), dtype=np.int32)
    np.add.at(diff, (ra, ia), 1)
    np.add.at(diff, (ra, ib), -1)
    return (np.cumsum(diff, axis=1)[:, :nx] > 0).T


def _clean_polygon(pts: np.ndarray) -> np.ndarray:
    """Drop repeated consecutive points and a closing point equal to the first."""
    if len(pts) == 0:
        return pts
    d = np.any(np.abs(np.diff(pts, axis=0)) > 1e-9, axis=1)
    pts = pts[np.r_[True, d]]
    if len(pts) > 1 and np.all(np.abs(pts[-1] - pts[0]) <= 1e-9):
        pts = pts[:-1]
    return pts


def rasterise_roi(roi: ROI, grid: CTGrid, where: str = "") -> np.ndarray:
    """Boolean mask (grid.shape) of an ROI's closed planar contours on the CT grid; validates
    every contour (module docstring) and raises UserError naming the ROI and the slice."""
    nx, ny, nz = grid.shape
    inv = np.linalg.inv(grid.affine_lps)
    dz = grid.slice_spacing_mm
    tol_k = SLICE_TOL_MM / dz
    where = where or "RTSTRUCT"
    per_slice: dict[int, list[np.ndarray]] = {}
    z_lo, z_hi = sorted((grid.slice_z(0), grid.slice_z(nz - 1)))
    for c in roi.contours:
        zmm = float(np.mean(c.points[:, 2])) if len(c.points) else float("nan")
        at = f"{where}: ROI '{roi.name}' contour {c.number} at z = {zmm:.2f} mm"
        if c.geometric_type in _OPEN_TYPES:
            raise UserError(f"{at}: contour type {c.geometric_type} is not a closed polygon (needs CLOSED_PLANAR)")
        if c.geometric_type not in ("CLOSED_PLANAR", ""):
            raise UserError(f"{at}: unknown contour type {c.geometric_type!r} (needs CLOSED_PLANAR)")
        v = c.points @ inv[:3, :3].T + inv[:3, 3]
        if len(v) == 0:
            raise UserError(f"{at}: empty contour (no points)")
        kc = float(np.mean(v[:, 2]))
        k = round(kc)
        if np.max(np.abs(v[:, 2] - kc)) > tol_k:
            raise UserError(f"{at}: the contour is not in one CT slice plane (its points span "
                            f"{(v[:, 2].max() - v[:, 2].min()) * dz:.2f} mm along the slice normal)")
        if k < 0 or k >= nz:
            raise UserError(f"{at}: outside the CT volume {grid.label} (its slices span z = {z_lo:.2f} to "
                            f"{z_hi:.2f} mm)")
        at = f"{where}: ROI '{roi.name}' contour {c.number} at z = {zmm:.2f} mm (CT slice {k})"
        if abs(kc - k) > tol_k:
            raise UserError(f"{at}: the contour plane is {abs(kc - k) * dz:.2f} mm from the nearest CT slice "
                            f"(tolerance {SLICE_TOL_MM} mm): contours must lie on CT slices")
        xy = _clean_polygon(v[:, :2])
        if len(xy) < 3:
            raise UserError(f"{at}: a closed contour needs at least 3 distinct points, has {len(xy)} (open contour)")
        lo, hi = xy.min(0), xy.max(0)
        if lo[0] < -0.5 - EDGE_TOL_VOX or lo[1] < -0.5 - EDGE_TOL_VOX or hi[0] > nx - 0.5 + EDGE_TOL_VOX \
                or hi[1] > ny - 0.5 + EDGE_TOL_VOX:
            px = np.linalg.norm(grid.affine_lps[:3, :2], axis=0)
            out = max(-0.5 - lo[0], -0.5 - lo[1], hi[0] - nx + 0.5, hi[1] - ny + 0.5)
            raise UserError(f"{at}: the contour reaches {out * float(px.min()):.1f} mm outside the CT volume "
                            f"{grid.label} in-plane")
        bad = self_intersection(xy)
        if bad is not None:
            a, b = bad
            pa = c.points[min(a, len(c.points) - 1)]
            raise UserError(f"{at}: the polygon intersects itself (edges {a + 1} and {b + 1}, near x = {pa[0]:.1f}, "
                            f"y = {pa[1]:.1f} mm)")
        per_slice.setdefault(k, []).append(xy)
    mask = np.zeros(grid.shape, dtype=bool)
    for k, polys in per_slice.items():
        mask[:, :, k] = fill_polygons(polys, nx, ny)
    return mask


# ------------------------------------------------------------------------------------ names
def normalise_roi_name(name: str) -> str:
    """'PAROTID LT' -> 'parotid lt'; 'Glnd_Submand_R' -> 'glnd submand r'; 'LtParotid' -> 'lt parotid'."""
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", s)
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def _default_map_path():
    return resources.files("glandpet").joinpath("data/roi_names.tsv")


class RoiNameMap:
    """ROI name -> (gland, side), or None when unknown; ``(IGNORE, "")`` when a user map says to
    ignore it. The user map (exact names first, then normalised) overrides the default table."""

    def __init__(self, user_map: str | Path | None = None, default_table=None):
        self.user: dict[str, tuple[str, str]] = {}
        self.user_norm: dict[str, tuple[str, str]] = {}
        if user_map is not None:
            for name, gs in read_user_map(user_map).items():
                self.user[name] = gs
                self.user_norm.setdefault(normalise_roi_name(name), gs)
        text = (Path(default_table).read_text() if default_table is not None
                else _default_map_path().read_text(encoding="utf-8"))
        sides: dict[str, list[str]] = {"left": [], "right": []}
        glands: dict[str, list[str]] = {}
        self.exact: dict[str, tuple[str, str]] = {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            kind = parts[0].strip()
            if kind == "side" and len(parts) == 3 and parts[1] in SIDES:
                sides[parts[1]].append(parts[2].strip())
            elif kind == "gland" and len(parts) == 3 and parts[1] in GLANDS:
                glands.setdefault(parts[1], []).append(parts[2].strip())
            elif kind == "exact" and len(parts) == 4 and parts[2] in GLANDS and parts[3] in SIDES:
                self.exact[normalise_roi_name(parts[1])] = (parts[2], parts[3])
            else:
                raise ValueError(f"roi_names.tsv:{n}: cannot read {line!r}")
        self.patterns: list[tuple[re.Pattern, str, str]] = []
        for gland, gl in glands.items():
            g = "(?:" + "|".join(gl) + ")"
            for side, sl in sides.items():
                s = "(?:" + "|".join(sl) + ")"
                self.patterns.append((re.compile(rf"(?:{s} {g}|{g} {s})"), gland, side))

    def lookup(self, name: str) -> tuple[str, str] | None:
        if name in self.user:
            return self.user[name]
        norm = normalise_roi_name(name)
        if norm in self.user_norm:
            return self.user_norm[norm]
        if norm in self.exact:
            return self.exact[norm]
        hits = {(g, s) for pat, g, s in self.patterns if pat.fullmatch(norm)}
        return hits.pop() if len(hits) == 1 else None


def read_user_map(path) -> dict[str, tuple[str, str]]:
    """A user ROI map TSV: ``roi_name, gland, side`` (gland ``ignore`` drops that ROI)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--map {path}: no such file")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader((ln for ln in fh if not ln.startswith("#")), delimiter="\t"))
    if not rows or not {"roi_name", "gland", "side"} <= set(rows[0].keys()):
        raise UserError(f"--map {path}: needs a header with the columns roi_name, gland, side (tab-separated)")
    out: dict[str, tuple[str, str]] = {}
    for n, r in enumerate(rows, start=2):
        name = (r["roi_name"] or "").strip()
        gland = (r["gland"] or "").strip().lower()
        side = (r["side"] or "").strip().lower()
        if not name:
            raise UserError(f"--map {path}:{n}: empty roi_name")
        if gland == IGNORE:
            out[name] = (IGNORE, "")
            continue
        if gland not in GLANDS:
            raise UserError(f"--map {path}:{n}: unknown gland {gland!r} (one of {', '.join(GLANDS)}, or {IGNORE})")
        if side not in SIDES:
            raise UserError(f"--map {path}:{n}: unknown side {side!r} (left or right: the patient's side)")
        out[name] = (gland, side)
    return out


# ------------------------------------------------------------------------------------ atlas
@dataclass
class AtlasResult:
    labels: np.ndarray  # uint8 on the CT grid, DEFAULT_LABELS values
    table: list[Label]
    volumes_ml: dict[str, float]  # "gland_side" -> mL
    roi_of: dict[str, str]  # "gland_side" -> ROI name
    unmapped: list[str]
    ignored: list[str]
    warnings: list[str]


def rtstruct_to_labels(rs: StructureSet, grid: CTGrid, name_map: RoiNameMap) -> AtlasResult:
    """Map the ROIs to glands, check references, rasterise the mapped ROIs into one label map."""
    mapped: dict[tuple[str, str], ROI] = {}
    unmapped, ignored, warnings = [], [], []
    for roi in rs.rois:
        gs = name_map.lookup(roi.name)
        if gs is None:
            unmapped.append(roi.name)
        elif gs[0] == IGNORE:
            ignored.append(roi.name)
        elif gs in mapped:
            raise UserError(f"{rs.path}: ROIs '{mapped[gs].name}' and '{roi.name}' both map to {gs[0]} {gs[1]}: "
                            f"say which one to use with --map (roi_name, gland, side; gland 'ignore' drops an ROI)")
        else:
            mapped[gs] = roi
    if not mapped:
        raise UserError(f"{rs.path}: no ROI name maps to a gland (ROIs: {', '.join(unmapped + ignored) or 'none'}); "
                        f"give --map MAP.tsv (roi_name, gland, side)")
    warnings += check_references(rs, grid, list(mapped.values()))
    masks: dict[tuple[str, str], np.ndarray] = {}
    for gs, roi in mapped.items():
        if not roi.contours:
            warnings.append(f"ROI '{roi.name}' ({gs[0]} {gs[1]}) has no contours: left out")
            continue
        m = rasterise_roi(roi, grid, where=str(rs.path.name))
        if not m.any():
            warnings.append(f"ROI '{roi.name}' ({gs[0]} {gs[1]}) covers no voxel centre of the CT: left out")
            continue
        masks[gs] = m
    if not masks:
        raise UserError(f"{rs.path}: the mapped ROIs cover no voxel of the CT")
    vox_ml = abs(float(np.linalg.det(grid.affine_lps[:3, :3]))) / 1000.0
    labels = np.zeros(grid.shape, dtype=np.uint8)
    # overlaps: the smaller ROI keeps the shared voxels (larger ROIs painted first)
    for gs, m in sorted(masks.items(), key=lambda kv: -int(kv[1].sum())):
        shared = int((labels[m] > 0).sum())
        if shared:
            warnings.append(f"ROI '{mapped[gs].name}' overlaps another gland ROI in {shared} voxel(s) "
                            f"({shared * vox_ml:.2f} mL): given to '{mapped[gs].name}' (the smaller ROI)")
        labels[m] = label_value(*gs)
    table = sorted((Label(label_value(*gs), *gs) for gs in masks), key=lambda lab: lab.index)
    volumes = {lab.name: float((labels == lab.index).sum()) * vox_ml for lab in table}
    warnings += volume_warnings(volumes)
    # side sanity: the patient's left is +x in LPS
    for gland in GLANDS:
        if (gland, "left") in masks and (gland, "right") in masks:
            xl = _centroid_x(labels == label_value(gland, "left"), grid)
            xr = _centroid_x(labels == label_value(gland, "right"), grid)
            if xl < xr:
                warnings.append(f"{gland}: the 'left' ROI '{mapped[(gland, 'left')].name}' lies on the patient's "
                                f"right of the 'right' one (LPS x {xl:.1f} < {xr:.1f} mm): sides swapped?")
    return AtlasResult(labels=labels, table=table, volumes_ml=volumes,
                       roi_of={f"{g}_{s}": mapped[(g, s)].name for (g, s) in masks},
                       unmapped=unmapped, ignored=ignored, warnings=warnings)


def _centroid_x(mask: np.ndarray, grid: CTGrid) -> float:
    idx = np.argwhere(mask).mean(axis=0)
    return float((grid.affine_lps @ np.r_[idx, 1.0])[0])


def build_atlas(atlas_dir, ct_series_dir, rtstruct_path, map_path=None, *, force: bool = False) -> dict:
    """Write ``ATLAS_DIR/{ct.nii.gz, labels.nii.gz, labels.tsv}`` from a CT series and an RTSTRUCT.
    labels.nii.gz has exactly ct.nii.gz's grid and affine (same header geometry)."""
    import nibabel as nib

    from glandpet.dicom.convert import convert_series
    from glandpet.writers import write_nifti
    from glandpet.glands import write_label_table

    atlas_dir = Path(atlas_dir)
    out_ct, out_lab, out_tsv = atlas_dir / "ct.nii.gz", atlas_dir / "labels.nii.gz", atlas_dir / "labels.tsv"
    if not force and any(p.exists() for p in (out_ct, out_lab, out_tsv)):
        raise UserError(f"{atlas_dir}: already holds an atlas (ct.nii.gz / labels.nii.gz / labels.tsv); "
                        f"use --force to overwrite")
    name_map = RoiNameMap(map_path)
    grid = ct_grid(ct_series_dir)
    rs = read_rtstruct(rtstruct_path)
    res = rtstruct_to_labels(rs, grid, name_map)
    atlas_dir.mkdir(parents=True, exist_ok=True)
    convert_series(ct_series_dir, out_ct)
    ct_img = nib.load(str(out_ct))
    if tuple(ct_img.shape) != tuple(grid.shape) or not np.allclose(ct_img.affine, lps_to_ras(grid.affine_lps), atol=1e-3):
        raise UserError(f"{ct_series_dir}: the converted CT's grid differs from the series headers")  # pragma: no cover
    hdr = ct_img.header.copy()
    hdr.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(res.labels, None, header=hdr)
    img.set_qform(ct_img.get_qform(), code=int(ct_img.header["qform_code"]))
    img.set_sform(ct_img.get_sform(), code=int(ct_img.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = b"glandpet atlas labels"
    write_nifti(img, out_lab)
    write_label_table(out_tsv, res.table)
    side = out_ct.with_name("ct.json")  # the converter's sidecar: keep only with the CT
    return {"atlas_dir": str(atlas_dir), "ct": str(out_ct), "labels": str(out_lab), "label_table": str(out_tsv),
            "sidecar": str(side), "glands": [lab.name for lab in res.table], "volumes_ml": res.volumes_ml,
            "roi_of": res.roi_of, "unmapped": res.unmapped, "ignored": res.ignored, "warnings": res.warnings}
