"""Phantom individuals built from real head-and-neck organ label maps (TCIA, Nikolov et al. 2018).

The label maps (``tcia-hn-oar-labels``: ``nrrds/<split>/<annotator>/<case>/segmentations/*.nrrd``,
binary uint8 gzip NRRD, LPS, about 0.98 x 0.98 x 2.5 mm) hold the parotid, submandibular and
lacrimal glands and context organs (brain, brainstem, mandible, spinal canal and cord, orbits,
lenses, optic nerves, cochleae, lungs), but no CT and no body outline. This module

* takes the real parotid / submandibular / lacrimal labels as the glands (patient side kept:
  ``*-Lt`` is the patient's left, larger LPS x),
* synthesises the rest of the head and neck around the real landmarks: skull (cortical and
  diploe) around the brain, skull base, petrous bones, facial skeleton (maxilla, hard palate,
  nasal cavity, maxillary / sphenoid / ethmoid sinuses), teeth, cervical vertebrae around the
  spinal canal, pharyngeal airway anterior to the spine with its mucosa and tonsils, tongue and
  floor of mouth inside the mandibular arch, eyes with orbital fat and bony orbits, carotid
  arteries and jugular veins, masseter / pterygoid / neck muscles, a body outline (per-slice
  hull of the structures grown by realistic soft-tissue thickness, smoothed across slices)
  with skin and subcutaneous fat, and a few level II lymph nodes,
* adds the glands the labels lack: sublingual glands (floor of mouth, medial to the mandibular
  body, above and medial to the anterior part of the submandibular gland) and tubarial glands
  (posterolateral nasopharyngeal wall over the torus tubarius, just below the skull base,
  medial to the parotids, anterior to the spine),
* crops to the head and neck (vertex, as far as the scan reaches, to below the hyoid).

The affine is exactly the NRRD's (space directions and origin), shifted by the crop.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from glandpet.geometry import ras_to_lps
from glandpet.glands import label_value
from glandpet.phantom.model import Anatomy, Tissue

__all__ = [
    "GLAND_FILES",
    "CONTEXT_FILES",
    "ANNOTATORS",
    "list_real_cases",
    "is_usable_case",
    "select_real_cases",
    "build_real_anatomy",
    "load_annotator_pair",
    "load_case_labels",
]

ANNOTATORS: tuple[str, ...] = ("oncologist", "radiographer")

#: label-map file stem -> (gland, patient side)
GLAND_FILES: dict[str, tuple[str, str]] = {
    "Parotid-Lt": ("parotid", "left"),
    "Parotid-Rt": ("parotid", "right"),
    "Submandibular-Lt": ("submandibular", "left"),
    "Submandibular-Rt": ("submandibular", "right"),
    "Lacrimal-Lt": ("lacrimal", "left"),
    "Lacrimal-Rt": ("lacrimal", "right"),
}
CONTEXT_FILES: tuple[str, ...] = (
    "Brain", "Brainstem", "Mandible", "Spinal-Canal", "Spinal-Cord", "Orbit-Lt", "Orbit-Rt",
    "Lens-Lt", "Lens-Rt", "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Cochlea-Lt", "Cochlea-Rt",
    "Lung-Lt", "Lung-Rt",
)
#: context labels without which the synthesis cannot place the rest of the anatomy
REQUIRED_CONTEXT: tuple[str, ...] = ("Brain", "Mandible", "Spinal-Canal", "Orbit-Lt", "Orbit-Rt")


# ----------------------------------------------------------------------------------------------
# finding and reading label files


def _case_dirs(labels_dir: str | Path) -> dict[str, dict[str, Path]]:
    """case id -> annotator -> segmentations folder."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"label-map folder not found: {root}")
    out: dict[str, dict[str, Path]] = {}
    segs = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        if "segmentations" in dirnames:
            segs.append(Path(dirpath) / "segmentations")
    for seg in sorted(segs):
        case, annot = seg.parent.name, seg.parent.parent.name
        out.setdefault(case, {})[annot] = seg
    return out


@lru_cache(maxsize=64)
def _zero_stream_size(n: int) -> int:
    """Size of a gzip stream (zlib level 6) of ``n`` zero bytes, extrapolated from 4 MiB."""
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    unit = 1 << 22
    per = len(c.compress(bytes(unit)) + c.flush())
    return int(per * n / unit)


@lru_cache(maxsize=4096)
def _nonempty_cached(path: str, mtime: float, size: int) -> bool:
    raw = Path(path).read_bytes()
    head_end = raw.find(b"\n\n")
    if head_end < 0:
        return False
    header = raw[:head_end].decode("latin-1").lower()
    payload = raw[head_end + 2:]
    if "encoding: gzip" in header or "encoding: gz" in header:
        # fast path: a stream clearly larger than an all-zero stream of the same length holds
        # labels (all-zero deflate streams at levels >= 2 are ~1/1030 of the raw size)
        try:
            sizes = [int(v) for v in header.split("sizes:")[1].splitlines()[0].split()]
            if len(payload) > _zero_stream_size(int(np.prod(sizes))) * 1.01 + 512:
                return True
        except (IndexError, ValueError):
            pass
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        for pos in range(0, len(payload), 1 << 18):
            if d.decompress(payload[pos:pos + (1 << 18)]).strip(b"\x00"):
                return True
        return False
    if "encoding: raw" in header:
        return bool(payload.strip(b"\x00"))
    import nrrd  # other encodings: read fully

    data, _ = nrrd.read(path)
    return bool(np.any(data))


def _nonempty(path: Path) -> bool:
    """True when the label file exists, parses and holds at least one voxel (early exit)."""
    try:
        st = path.stat()
        return _nonempty_cached(str(path), st.st_mtime, st.st_size)
    except (OSError, ValueError, zlib.error):
        return False


def _read_label(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 array (x, y, z), possibly a Fortran-ordered view, 4x4 voxel -> LPS affine) or None
    when missing / unreadable / empty. gzip and raw encodings are decoded here in one pass
    (about 3x faster than ``nrrd.read``); other encodings go through pynrrd."""
    import nrrd

    if path is None or not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        head_end = raw.find(b"\n\n")
        with open(path, "rb") as fh:
            hdr = nrrd.read_header(fh)
        sizes = [int(v) for v in hdr["sizes"]]
        enc = str(hdr.get("encoding", "raw")).lower()
        if hdr.get("type") in ("uint8", "unsigned char", "uchar") and enc in ("gzip", "gz", "raw") and "data file" not in hdr and head_end > 0:
            payload = raw[head_end + 2:]
            buf = zlib.decompress(payload, 16 + zlib.MAX_WBITS) if enc in ("gzip", "gz") else payload
            data = np.frombuffer(buf, dtype=np.uint8, count=int(np.prod(sizes))).reshape(sizes, order="F")
        else:
            data, hdr = nrrd.read(str(path))
    except Exception:  # noqa: BLE001 - a broken file is a missing label
        return None
    if data.ndim != 3 or not data.any():
        return None
    return data, _affine_from_header(hdr)


def _affine_from_header(hdr: dict) -> np.ndarray:
    dirs = np.asarray(hdr["space directions"], dtype=float)  # rows: one vector per axis
    org = np.asarray(hdr.get("space origin", np.zeros(3)), dtype=float)
    a = np.eye(4)
    a[:3, :3] = dirs.T
    a[:3, 3] = org
    space = str(hdr.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        a = ras_to_lps(a)
    elif space not in ("left-posterior-superior", "lps"):
        raise ValueError(f"unsupported NRRD space {space!r}")
    return a


def _label_path(dirs: dict[str, Path], annot: str, name: str) -> Path | None:
    d = dirs.get(annot)
    return None if d is None else d / f"{name}.nrrd"


def _annotator_order(annotator: str) -> list[str]:
    if annotator not in ANNOTATORS:
        raise ValueError(f"unknown annotator {annotator!r} (expected one of {', '.join(ANNOTATORS)})")
    return [annotator] + [a for a in ANNOTATORS if a != annotator]


def _usable(dirs: dict[str, Path], order: list[str]) -> bool:
    for name in (*GLAND_FILES, *REQUIRED_CONTEXT):
        if not any((p := _label_path(dirs, a, name)) is not None and _nonempty(p) for a in order):
            return False
    return True


def is_usable_case(labels_dir: str | Path, case_id: str, annotator: str = "oncologist") -> bool:
    """True when one case can be built (see :func:`list_real_cases`); checks that case's files only."""
    dirs = _case_dirs(labels_dir).get(case_id)
    return dirs is not None and _usable(dirs, _annotator_order(annotator))


def list_real_cases(labels_dir: str | Path, annotator: str = "oncologist") -> list[str]:
    """Case ids that can be built: every gland label and every required context label
    (brain, mandible, spinal canal, orbits) exists and is non-empty for the preferred annotator
    or, label by label, for the other one. Sorted.

    This reads every case's label files (tens of seconds for the whole TCIA set): to pick a few
    cases use :func:`select_real_cases`, which checks only the cases it takes."""
    order = _annotator_order(annotator)
    return sorted(case for case, dirs in _case_dirs(labels_dir).items() if _usable(dirs, order))


def select_real_cases(labels_dir: str | Path, n_first: int, n_last: int = 0,
                      annotator: str = "oncologist") -> tuple[list[str], list[str]]:
    """Up to ``n_first`` usable cases from the start of the sorted case list and up to ``n_last``
    other usable cases from its end (disjoint), checking cases one by one in that order and
    skipping the unusable ones, so that only the cases taken (and the ones skipped) are read.
    Deterministic: the result depends only on the case names and their files. Returns
    ``(first, last)``, ``first`` in ascending and ``last`` in descending name order; ``first``
    stops where ``last`` begins, so both may be shorter than asked when too few cases are usable."""
    order = _annotator_order(annotator)
    cases = _case_dirs(labels_dir)
    names = sorted(cases)
    last: list[str] = []
    lo = 0  # names[:lo] were checked from the front; names[hi:] from the back
    hi = len(names)
    while len(last) < n_last and hi > lo:
        hi -= 1
        if _usable(cases[names[hi]], order):
            last.append(names[hi])
    first: list[str] = []
    while len(first) < n_first and lo < hi:
        if _usable(cases[names[lo]], order):
            first.append(names[lo])
        lo += 1
    return first, last


def load_case_labels(
    labels_dir: str | Path, case_id: str, annotator: str = "oncologist", names=None
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str]]:
    """Masks of one case: ({label name: bool mask}, affine, {label name: annotator used}).

    Each label comes from the preferred annotator, else from the other; missing or empty labels
    are left out. All masks share one grid (checked)."""
    dirs = _case_dirs(labels_dir).get(case_id)
    if dirs is None:
        raise KeyError(f"case {case_id!r} not found under {labels_dir}")
    names = tuple(names) if names is not None else (*GLAND_FILES, *CONTEXT_FILES)
    masks: dict[str, np.ndarray] = {}
    used: dict[str, str] = {}
    affine = None
    shape = None
    for name in names:
        for a in _annotator_order(annotator):
            p = _label_path(dirs, a, name)
            r = _read_label(p) if p is not None else None
            if r is None:
                continue
            m, aff = r
            if affine is None:
                affine, shape = aff, m.shape
            elif m.shape != shape or not np.allclose(aff, affine, atol=1e-3):
                continue  # a label on another grid: unusable here
            masks[name], used[name] = m, a
            break
    if affine is None:
        raise ValueError(f"case {case_id!r}: no readable label")
    return masks, affine, used


def load_annotator_pair(labels_dir: str | Path, case_id: str, names: Iterable[str] | None = None,
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For inter-observer agreement: {label name: (mask_oncologist, mask_radiographer, affine)} for
    every label that both annotators drew (non-empty) on the same grid; only ``names`` if given
    (the glands alone read in a tenth of the time of every context structure)."""
    dirs = _case_dirs(labels_dir).get(case_id)
    if dirs is None:
        raise KeyError(f"case {case_id!r} not found under {labels_dir}")
    out = {}
    for name in (*GLAND_FILES, *CONTEXT_FILES) if names is None else names:
        po, pr = _label_path(dirs, "oncologist", name), _label_path(dirs, "radiographer", name)
        if po is None or pr is None:
            continue
        ro, rr = _read_label(po), _read_label(pr)
        if ro is None or rr is None:
            continue
        if ro[0].shape != rr[0].shape or not np.allclose(ro[1], rr[1], atol=1e-3):
            continue
        out[name] = (ro[0] > 0, rr[0] > 0, ro[1])
    return out


# ----------------------------------------------------------------------------------------------
# geometry helpers on the cropped grid (world coordinates in mm, axis-aligned LPS grid)


class _Grid:
    def __init__(self, shape, affine):
        self.shape = shape
        self.affine = affine
        self.sp = np.abs(np.diag(affine)[:3]).astype(float)
        self.sign = np.sign(np.diag(affine)[:3])
        self.x = affine[0, 3] + affine[0, 0] * np.arange(shape[0])
        self.y = affine[1, 3] + affine[1, 1] * np.arange(shape[1])
        self.z = affine[2, 3] + affine[2, 2] * np.arange(shape[2])

    def idx(self, axis: int, value: float) -> int:
        """Nearest index of a world coordinate along an axis (clipped)."""
        a = self.affine[axis, axis]
        i = int(round((value - self.affine[axis, 3]) / a))
        return int(np.clip(i, 0, self.shape[axis] - 1))

    def box(self, lo, hi):
        """Index slices covering the world box [lo, hi] (mm, per axis), clipped to the grid."""
        sl = []
        for ax in range(3):
            i0, i1 = sorted((self.idx(ax, lo[ax]), self.idx(ax, hi[ax])))
            sl.append(slice(i0, i1 + 1))
        return tuple(sl)

    def coords(self, sl):
        return (
            self.x[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.z[sl[2]][None, None, :],
        )

    def ellipsoid(self, centre, radii, rot_z_deg: float = 0.0) -> tuple[tuple, np.ndarray]:
        """(index box, bool mask inside the box) of an ellipsoid, optionally rotated about z."""
        r = max(radii)
        sl = self.box(np.asarray(centre) - r - 1, np.asarray(centre) + r + 1)
        X, Y, Z = self.coords(sl)
        dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
        if rot_z_deg:
            t = np.deg2rad(rot_z_deg)
            dx, dy = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        m = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0
        return sl, m


def _paint(vol, grid: _Grid, centre, radii, value, rot_z_deg=0.0, where=None):
    sl, m = grid.ellipsoid(centre, radii, rot_z_deg)
    if where is not None:
        m = m & where[sl]
    vol[sl][m] = value
    return sl, m


def _bbox(mask: np.ndarray, margin=(0, 0, 0)) -> tuple[slice, slice, slice] | None:
    """Index bounding box of a mask, grown by ``margin`` voxels per axis (None when empty)."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        out.append(slice(max(nz[0] - margin[ax], 0), min(nz[-1] + 1 + margin[ax], mask.shape[ax])))
    return tuple(out)


def _centroid(mask: np.ndarray, grid: _Grid) -> np.ndarray:
    bb = _bbox(mask)
    idx = np.argwhere(mask[bb]) + np.array([b.start for b in bb])
    return (grid.affine[:3, :3] @ idx.mean(0)) + grid.affine[:3, 3]


def _extent(mask: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    bb = _bbox(mask)
    lo = np.array([b.start for b in bb], float)
    hi = np.array([b.stop - 1 for b in bb], float)
    w0 = grid.affine[:3, :3] @ lo + grid.affine[:3, 3]
    w1 = grid.affine[:3, :3] @ hi + grid.affine[:3, 3]
    return np.minimum(w0, w1), np.maximum(w0, w1)


def _edt_mm(mask: np.ndarray, sp, max_mm: float = 40.0) -> np.ndarray:
    """Distance (mm) of every voxel outside ``mask`` to it (0 inside), computed in the mask's
    bounding box grown by ``max_mm``; farther voxels get a large value."""
    out = np.full(mask.shape, 1e4, np.float32)
    bb = _bbox(mask, tuple(int(np.ceil(max_mm / v)) + 1 for v in sp))
    if bb is None:
        return out
    out[bb] = ndi.distance_transform_edt(~mask[bb], sampling=sp)
    return out


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation (6-connected, ``iterations`` times) computed in the bounding box only."""
    out = np.zeros_like(mask)
    bb = _bbox(mask, (iterations + 1,) * 3)
    if bb is None:
        return out
    out[bb] = ndi.binary_dilation(mask[bb], iterations=iterations)
    return out


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    out = np.zeros_like(mask)
    bb = _bbox(mask, (1, 1, 1))
    if bb is None:
        return out
    out[bb] = ndi.binary_erosion(mask[bb], iterations=iterations)
    return out


_LUTS: dict[tuple, np.ndarray] = {}


def _isin(T: np.ndarray, codes) -> np.ndarray:
    """``np.isin`` for uint8 tissue codes through a lookup table (much faster)."""
    key = tuple(sorted(int(c) for c in codes))
    lut = _LUTS.get(key)
    if lut is None:
        lut = np.zeros(256, bool)
        lut[list(key)] = True
        _LUTS[key] = lut
    return lut[T]


def _slice_hull(points_xy: np.ndarray, shape_xy) -> np.ndarray:
    """Filled convex hull of 2-D index points on a (nx, ny) grid."""
    from scipy.spatial import ConvexHull, QhullError

    out = np.zeros(shape_xy, bool)
    if len(points_xy) < 3:
        out[tuple(points_xy.T)] = True
        return out
    try:
        hull = ConvexHull(points_xy)
    except QhullError:
        out[tuple(points_xy.T)] = True
        return out
    lo = points_xy.min(0)
    hi = points_xy.max(0)
    gx, gy = np.mgrid[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1]
    pts = np.stack([gx.ravel(), gy.ravel()], 1).astype(float)
    eq = hull.equations  # a x + b y + c <= 0 inside
    inside = np.all(pts @ eq[:, :2].T + eq[:, 2] <= 1e-9, axis=1)
    out[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1] = inside.reshape(gx.shape)
    return out


# ----------------------------------------------------------------------------------------------
# the synthesis


def build_real_anatomy(
    labels_dir: str | Path, case_id: str, rng: np.random.Generator, annotator: str = "oncologist"
) -> Anatomy:
    """An Anatomy from one real case: real parotid/submandibular/lacrimal glands, synthesised
    context, sublingual and tubarial glands added; cropped to the head and neck."""
    names = [n for n in (*GLAND_FILES, *CONTEXT_FILES) if not n.startswith("Lung")]
    masks, affine, used = load_case_labels(labels_dir, case_id, annotator, names)
    missing = [n for n in (*GLAND_FILES, *REQUIRED_CONTEXT) if n not in masks]
    if missing:
        raise ValueError(f"case {case_id!r} lacks label(s) {', '.join(missing)}: not buildable")
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])), atol=1e-6):
        raise ValueError(f"case {case_id!r}: label grid is not axis-aligned")
    builder = _Builder(masks, affine, rng)
    anat = builder.build()
    anat.source = f"tcia-hn-oar:{case_id}"
    anat.extra.update(
        case_id=case_id,
        annotators=used,
        **builder.info,
    )
    return anat


class _Builder:
    def __init__(self, masks: dict[str, np.ndarray], affine: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        self.info: dict = {}
        self._crop(masks, affine)

    # -- crop -----------------------------------------------------------------------------------
    def _crop(self, masks, affine):
        sp = np.abs(np.diag(affine)[:3])
        zsign = np.sign(affine[2, 2])
        anyshape = next(iter(masks.values())).shape

        def zrange(m):
            zz = np.nonzero(m.any(axis=(0, 1)))[0]
            return zz.min(), zz.max()

        # world-superior direction along the index axis
        def sup(i):  # world z of index i
            return affine[2, 3] + affine[2, 2] * i

        brain = masks["Brain"]
        b0, b1 = zrange(brain)
        top_i = b1 if zsign > 0 else b0  # most superior brain slice
        low_parts = [masks[n] for n in ("Submandibular-Lt", "Submandibular-Rt", "Mandible")]
        lows = [zrange(m) for m in low_parts]
        bottom_i = min(l[0] for l in lows) if zsign > 0 else max(l[1] for l in lows)
        margin_top = int(np.ceil(14.0 / sp[2]))  # skull + scalp above the brain
        # hyoid and a margin below the glands, enough that a session's head tilt (poses up to
        # ~10 degrees) does not bring the oblique cut of the grid into the CT's lowest slices
        margin_bot = int(np.ceil(45.0 / sp[2]))
        if zsign > 0:
            k0, k1 = max(bottom_i - margin_bot, 0), min(top_i + margin_top, anyshape[2] - 1)
        else:
            k0, k1 = max(top_i - margin_top, 0), min(bottom_i + margin_bot, anyshape[2] - 1)
        # in-plane: everything labelled + generous margin for the body outline
        allm = np.zeros(anyshape[:2], bool)
        for m in masks.values():
            allm |= m[:, :, k0:k1 + 1].any(axis=2)
        ii, jj = np.nonzero(allm)
        mx, my = int(np.ceil(45.0 / sp[0])), int(np.ceil(75.0 / sp[1]))
        i0, i1 = max(ii.min() - mx, 0), min(ii.max() + mx, anyshape[0] - 1)
        j0, j1 = max(jj.min() - my, 0), min(jj.max() + my, anyshape[1] - 1)
        self.sl = (slice(i0, i1 + 1), slice(j0, j1 + 1), slice(k0, k1 + 1))
        self.m = {n: np.ascontiguousarray(v[self.sl] > 0) for n, v in masks.items()}
        a = affine.copy()
        a[:3, 3] = affine[:3, :3] @ np.array([i0, j0, k0]) + affine[:3, 3]
        self.affine = a
        self.g = _Grid(self.m["Brain"].shape, a)
        self.info["crop_index"] = [(int(s.start), int(s.stop)) for s in self.sl]
        self.info["brain_top_in_scan"] = bool((zsign > 0 and top_i >= anyshape[2] - 1) or (zsign < 0 and top_i <= 0))

    # -- helpers --------------------------------------------------------------------------------
    def mask(self, name):
        m = self.m.get(name)
        return m if m is not None else np.zeros(self.g.shape, bool)

    def zworld_range(self, m):
        lo, hi = _extent(m, self.g)
        return lo[2], hi[2]

    def kz(self, zw):
        return self.g.idx(2, zw)

    def krange(self, z_lo, z_hi):
        a, b = sorted((self.kz(z_lo), self.kz(z_hi)))
        return range(a, b + 1)

    # -- main -----------------------------------------------------------------------------------
    def build(self) -> Anatomy:
        g, rng = self.g, self.rng
        shape = g.shape
        T = np.zeros(shape, np.uint8)
        glands = np.zeros(shape, np.uint8)
        self._landmarks()
        L = self.L

        body_core = np.zeros(shape, bool)  # anchors of the body outline

        # --- brain, skull, CSF ---------------------------------------------------------------
        brain = self.mask("Brain") | self.mask("Brainstem")
        d_brain = _edt_mm(brain, g.sp, 26.0)
        orbits = self.mask("Orbit-Lt") | self.mask("Orbit-Rt")
        canal = self.mask("Spinal-Canal")
        d_orbit = _edt_mm(orbits, g.sp, 36.0)
        # skull: a shell at 1.5-7.5 mm from the brain; thicker in the occiput (variation)
        thick = rng.uniform(5.5, 7.5)
        shell = (d_brain > 1.5) & (d_brain <= 1.5 + thick)
        # keep the shell clear of the orbits, foramen magnum and everything below the skull base
        Z = g.z[None, None, :]
        low_brain_z = L["brain_bottom_z"]
        shell &= d_orbit > 2.0
        shell &= ~_dilate(canal, 2)
        skull_base_floor = Z >= (low_brain_z - thick)
        shell &= skull_base_floor
        csf = (d_brain > 0) & (d_brain <= 1.5) & skull_base_floor
        inner = shell & (d_brain <= 3.0)
        outer = shell & (d_brain > thick - 0.5)
        T[shell] = Tissue.BONE_SPONGY
        T[inner | outer] = Tissue.BONE_CORTICAL
        T[csf] = Tissue.CSF
        T[brain] = Tissue.BRAIN
        body_core |= shell | brain
        self._ventricles(T, brain)

        # --- eyes, orbital fat, bony orbit ------------------------------------------------------
        for side in ("Lt", "Rt"):
            om = self.mask(f"Orbit-{side}")
            if not om.any():
                continue
            c = _centroid(om, g)
            lo, hi = _extent(om, g)
            r = (hi - lo) / 2 + g.sp / 2
            # the fat cone behind the globe towards the apex (posterior-medial)
            apex = c + np.array([-np.sign(c[0] - L["mid_x"]) * 8.0, 28.0, 2.0])
            for t in np.linspace(0.0, 1.0, 8):
                p = c * (1 - t) + apex * t
                rad = np.array([r[0] * (1.15 - 0.8 * t), r[1] * 0.6, r[2] * (1.1 - 0.7 * t)])
                _paint(T, g, p, rad, Tissue.FAT)
            # bony orbital walls: a 2 mm shell around globe + fat
            cone = _isin(T, (Tissue.FAT,)) & (d_orbit < 35.0)
            cone |= om
            wall = _dilate(cone, 2) & ~cone & ~brain
            T[wall & (T != Tissue.BRAIN)] = Tissue.BONE_CORTICAL
            T[om] = Tissue.EYE
            body_core |= cone | wall
        for n in ("Lens-Lt", "Lens-Rt"):
            T[self.mask(n)] = Tissue.SOFT
        for n in ("Optic-Nerve-Lt", "Optic-Nerve-Rt"):
            T[self.mask(n) & (T != Tissue.BRAIN)] = Tissue.SOFT

        # --- petrous bone, mastoid, external ear canal -------------------------------------------
        for side in ("Lt", "Rt"):
            cm = self.mask(f"Cochlea-{side}")
            if cm.any():
                c = _centroid(cm, g)
            else:
                c = L["cochlea_est"][side]
            s = np.sign(c[0] - L["mid_x"]) or (1.0 if side == "Lt" else -1.0)
            # petrous ridge: elongated along the posterolateral -> anteromedial axis
            _paint(T, g, c + np.array([-s * 4, 0, 0]), (24, 9, 9), Tissue.BONE_CORTICAL,
                   rot_z_deg=-s * 45, where=~brain)
            # mastoid (spongy with air cells) posterolateral
            mc = c + np.array([s * 14, 14, -10])
            sl, mm = _paint(T, g, mc, (11, 12, 14), Tissue.BONE_SPONGY, where=~brain)
            cells = rng.random(mm.shape) < 0.35
            cells = ndi.binary_opening(cells) | (ndi.gaussian_filter(rng.random(mm.shape), 1.0) > 0.55)
            sub = T[sl]
            sub[mm & cells] = Tissue.AIRWAY
            if cm.any():
                T[cm] = Tissue.CSF
            # external acoustic meatus: air tube from lateral of the cochlea to the skin
            for t in np.linspace(12, 34, 10):
                _paint(T, g, c + np.array([s * t, 2, -2]), (2.5, 3.5, 3.5), Tissue.AIRWAY, where=~brain)
            body_core[sl] |= mm

        # --- skull base ------------------------------------------------------------------------
        # a bony floor (clivus, sphenoid, occipital) between the brain's lowest part and the top
        # of the nasopharynx, midline, in front of the foramen magnum
        sb = L["skull_base_z"]
        _paint(T, g, (L["mid_x"], L["canal_top_y"] - 14, sb - 6), (22, 16, 8), Tissue.BONE_SPONGY, where=~brain)
        _paint(T, g, (L["mid_x"], L["canal_top_y"] - 24, sb + 2), (12, 11, 9), Tissue.AIRWAY, where=~brain)  # sphenoid sinus

        # --- facial skeleton: maxilla, palate, nasal cavity, sinuses, nose --------------------------
        self._face(T, body_core, brain)

        # --- mandible, teeth -------------------------------------------------------------------
        mand = self.mask("Mandible")
        mand_sp = _erode(mand, 1)
        T[mand] = Tissue.BONE_CORTICAL
        T[mand_sp] = Tissue.BONE_SPONGY
        T[self.teeth_lower] = Tissue.TEETH
        T[self.teeth_upper] = Tissue.TEETH
        body_core |= mand | self.teeth_upper

        # --- spine ---------------------------------------------------------------------------
        self._spine(T, body_core)

        # --- airway, mucosa, tongue, floor of mouth ----------------------------------------------
        self._pharynx(T, body_core)
        self._tongue(T, body_core)

        # --- muscles of mastication, neck muscles, vessels, nodes ------------------------------------
        self._muscles_vessels(T, body_core)

        # --- body outline ---------------------------------------------------------------------
        for n in GLAND_FILES:
            body_core |= self.mask(n)
        body = self._body(body_core)
        self.body = body
        d_skin = ndi.distance_transform_edt(body, sampling=g.sp)
        interior_free = body & (T == Tissue.AIR)
        # neck and face: muscle with fat planes; scalp: soft tissue
        marbling = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (2.5, 2.5, 1.2))
        fatplanes = marbling > np.quantile(marbling[interior_free], 0.88) if interior_free.any() else marbling > 9
        T[interior_free] = Tissue.MUSCLE
        T[interior_free & fatplanes] = Tissue.FAT
        # parapharyngeal fat, buccal fat
        self._fat_spaces(T, interior_free)
        # subcutaneous fat and skin (thinner over the skull)
        fat_thick = rng.uniform(4.0, 9.0)
        head = (Z >= L["brain_bottom_z"] + 10) & (d_brain < 25)
        subcut = body & (d_skin <= 2.0 + fat_thick) & ~head & _isin(T, (Tissue.MUSCLE, Tissue.FAT, Tissue.SOFT))
        T[subcut] = Tissue.FAT
        scalp = body & head & (T == Tissue.AIR)
        T[scalp] = Tissue.SOFT
        T[body & (d_skin <= 2.0) & ~_isin(T, (Tissue.AIRWAY,))] = Tissue.SOFT
        T[~body] = Tissue.AIR
        # keep real structures inside the body
        T[brain] = Tissue.BRAIN

        # --- glands -----------------------------------------------------------------------------
        for name, (gland, side) in GLAND_FILES.items():
            m = self.mask(name)
            glands[m] = label_value(gland, side)
        sub_l = self._sublingual(T, glands)
        tub_l = self._tubarial(T, glands)
        self.info["added_glands"] = {**sub_l, **tub_l}
        gm = glands > 0
        # glands sit in soft tissue: a thin fascia/fat rim around them, soft tissue under them
        rim = _dilate(gm, 1) & ~gm & _isin(T, (Tissue.MUSCLE,))
        T[rim] = Tissue.FAT
        T[gm] = Tissue.SOFT
        # no bone against the small glands: a real lacrimal gland lies in orbital fat below the
        # fossa's periosteum, a tubarial gland under the mucosa; bone within ~2 mm in-plane and one
        # slice would read as the gland's CT number after the CT's slice profile (lacrimal glands of
        # the label maps overlap the synthesised orbital wall: 140-180 HU before)
        for gname, fill in (("lacrimal", Tissue.FAT), ("tubarial", Tissue.SOFT)):
            gmask = np.isin(glands, [label_value(gname, "left"), label_value(gname, "right")])
            near = _dilate(gmask, 1)
            bb = _bbox(near, (2, 2, 0))
            if bb is None:
                continue
            near[bb] |= ndi.binary_dilation(near[bb], np.array([[[0], [1], [0]], [[1], [1], [1]], [[0], [1], [0]]], bool))
            T[near & ~gmask & _isin(T, (Tissue.BONE_CORTICAL, Tissue.BONE_SPONGY, Tissue.TEETH))] = fill
        T[~body] = Tissue.AIR
        glands[~body] = 0
        self.info["gland_volumes_ml"] = {
            f"{lab_g}_{lab_s}": float((glands == label_value(lab_g, lab_s)).sum() * np.prod(g.sp) / 1000.0)
            for lab_g in ("parotid", "submandibular", "sublingual", "lacrimal", "tubarial")
            for lab_s in ("left", "right")
        }
        self.info["frame"] = self._frame()
        return Anatomy(tissue=T, glands=glands, affine=self.affine.copy(), source="real")

    def _frame(self) -> dict:
        """Landmarks of this individual in its anatomy frame (the NRRD's LPS world, mm) that the
        cohort needs: the head centre (the analogue of the parametric frame's (0, 0, -20): on the
        midline, at the ear canals' y, 20 mm below them), used as the rotation centre of the
        session poses, and the neck landmarks that place a control's lesion."""
        L = self.L
        return {
            "head_centre": [float(L["mid_x"]), float(L["cochlea_y"]), float(L["cochlea_z"] - 20.0)],
            "mid_x": float(L["mid_x"]),
            "cochlea_z": float(L["cochlea_z"]),
            "crest_z": float(L["crest_z"]),
            "palate_z": float(L["palate_z"]),
            "mand_bottom_z": float(L["mand_bottom_z"]),
            "smg_bottom_z": {"left": float(L["smg_lo"]["Lt"][2]), "right": float(L["smg_lo"]["Rt"][2])},
            "parotid_bottom_z": {"left": float(L["par_lo"]["Lt"][2]), "right": float(L["par_lo"]["Rt"][2])},
            "canal_r": float(L["canal_r"]),
            "vb_ap": float(L["vb_ap"]),
            # spinal canal centre per slice k of the anatomy grid (x, y in mm)
            "canal_x": [float(v) for v in L["canal_x"]],
            "canal_y": [float(v) for v in L["canal_y"]],
        }

    # ------------------------------------------------------------------------------------------
    def _landmarks(self):
        g = self.g
        L: dict = {}
        brain = self.mask("Brain")
        canal = self.mask("Spinal-Canal")
        mand = self.mask("Mandible")
        par = {s: self.mask(f"Parotid-{s}") for s in ("Lt", "Rt")}
        smg = {s: self.mask(f"Submandibular-{s}") for s in ("Lt", "Rt")}
        orb = {s: self.mask(f"Orbit-{s}") for s in ("Lt", "Rt")}
        pc = {s: _centroid(par[s], g) for s in par}
        L["mid_x"] = float((pc["Lt"][0] + pc["Rt"][0]) / 2)
        L["brain_bottom_z"], L["brain_top_z"] = self.zworld_range(brain)
        # spinal canal centre per slice (interpolated / extrapolated where the label is absent)
        nz = g.shape[2]
        cx = np.full(nz, np.nan)
        cy = np.full(nz, np.nan)
        for k in range(nz):
            sl = canal[:, :, k]
            if sl.any():
                ii, jj = np.nonzero(sl)
                cx[k], cy[k] = g.x[ii].mean(), g.y[jj].mean()
        have = ~np.isnan(cx)
        ks = np.arange(nz)
        if have.sum() >= 2:
            cx = np.interp(ks, ks[have], cx[have])
            cy = np.interp(ks, ks[have], cy[have])
        else:  # fall back: behind the parotids
            cx[:] = L["mid_x"]
            cy[:] = (pc["Lt"][1] + pc["Rt"][1]) / 2 + 15
        L["canal_x"], L["canal_y"] = cx, cy
        ck = ks[have]
        top_k = ck.max() if g.affine[2, 2] > 0 else ck.min()
        L["canal_top_z"] = float(g.z[top_k]) if have.any() else L["brain_bottom_z"]
        L["canal_top_y"] = float(cy[top_k]) if have.any() else float(cy[0])
        # skull base in the midline: the foramen magnum level, raised anteriorly
        L["skull_base_z"] = float(max(L["canal_top_z"], L["brain_bottom_z"]) + 12.0)  # refined below
        # orbits
        oc = {s: _centroid(orb[s], g) for s in orb}
        L["orbit_c"] = oc
        olo = {s: _extent(orb[s], g)[0] for s in orb}
        ohi = {s: _extent(orb[s], g)[1] for s in orb}
        L["orbit_bottom_z"] = float(min(olo[s][2] for s in orb))
        L["orbit_front_y"] = float(min(olo[s][1] for s in orb))
        L["orbit_halfwidth"] = float(abs(oc["Lt"][0] - oc["Rt"][0]) / 2)
        # mandible
        mlo, mhi = _extent(mand, g)
        L["mand_lo"], L["mand_hi"] = mlo, mhi
        mc = _centroid(mand, g)
        # alveolar crest: top of the mandibular body (columns in front of the rami)
        ii, jj, kk = np.nonzero(mand)
        ys = g.y[jj]
        zs = g.z[kk]
        front = ys <= np.quantile(ys, 0.35)
        L["crest_z"] = float(np.quantile(zs[front], 0.97))
        L["mand_bottom_z"] = float(mlo[2])
        L["chin_y"] = float(ys.min())
        L["condyle_z"] = float(mhi[2])
        L["mand_c"] = mc
        # hard palate ~ 12 mm above the lower alveolar crest (occlusion)
        L["palate_z"] = L["crest_z"] + 14.0
        # submandibular
        L["smg_lo"] = {s: _extent(smg[s], g)[0] for s in smg}
        L["smg_hi"] = {s: _extent(smg[s], g)[1] for s in smg}
        L["par_c"] = pc
        L["par_lo"] = {s: _extent(par[s], g)[0] for s in par}
        L["par_hi"] = {s: _extent(par[s], g)[1] for s in par}
        # cochlea estimate when absent: above the parotid, medial
        L["cochlea_est"] = {
            s: np.array([L["mid_x"] + (pc[s][0] - L["mid_x"]) * 0.6, pc[s][1] - 5, L["par_hi"][s][2] + 5])
            for s in ("Lt", "Rt")
        }
        coch_z, coch_y = [], []
        for s in ("Lt", "Rt"):
            m = self.mask(f"Cochlea-{s}")
            c = _centroid(m, g) if m.any() else L["cochlea_est"][s]
            coch_z.append(c[2])
            coch_y.append(c[1])
        L["cochlea_z"] = float(np.mean(coch_z))
        L["cochlea_y"] = float(np.mean(coch_y))
        # skull base over the nasopharynx: ~10 mm below the cochleae (petrous level)
        L["skull_base_z"] = float(max(L["canal_top_z"] + 10.0, L["cochlea_z"] - 10.0))
        # the vertebral body's anterior surface and the posterior pharyngeal wall, per slice
        L["vb_ap"] = 16.0
        L["canal_r"] = 7.5
        self.L = L

        # teeth (computed here, used by face + mandible)
        self.teeth_lower = np.zeros(g.shape, bool)
        self.teeth_upper = np.zeros(g.shape, bool)
        top = np.full(g.shape[:2], -np.inf)
        colany = mand.any(axis=2)
        if colany.any():
            kidx = np.where(mand, np.arange(g.shape[2])[None, None, :], -1 if g.affine[2, 2] > 0 else 10**6)
            ktop = kidx.max(axis=2) if g.affine[2, 2] > 0 else kidx.min(axis=2)
            top[colany] = g.z[np.clip(ktop[colany], 0, g.shape[2] - 1)]
        body_cols = colany & (top <= L["crest_z"] + 3.0) & (top >= L["crest_z"] - 12.0)
        zz = g.z[None, None, :]
        t3 = top[:, :, None]
        self.teeth_lower = mand & body_cols[:, :, None] & (zz >= t3 - 7.0)
        self.teeth_upper = body_cols[:, :, None] & (zz > t3 + 1.0) & (zz <= t3 + 9.0)
        self.arch_cols = body_cols

    # ------------------------------------------------------------------------------------------
    def _ventricles(self, T, brain):
        g, L = self.g, self.L
        bc = _centroid(self.mask("Brain"), g)
        lo, hi = _extent(self.mask("Brain"), g)
        c = np.array([L["mid_x"], bc[1] - 2, lo[2] + 0.62 * (hi[2] - lo[2])])
        for s in (-1, 1):
            _paint(T, g, c + np.array([s * 7, 0, 0]), (5, 22, 9), Tissue.CSF, rot_z_deg=s * 8, where=brain)
        _paint(T, g, c + np.array([0, 8, -18]), (1.5, 9, 6), Tissue.CSF, where=brain)  # third ventricle

    def _face(self, T, body_core, brain):
        g, L, rng = self.g, self.L, self.rng
        mid = L["mid_x"]
        z_pal = L["palate_z"]
        z_orb = L["orbit_bottom_z"]
        if z_orb < z_pal + 15:  # implausible landmarks: keep a minimal midface
            z_orb = z_pal + 15
        y_front = L["orbit_front_y"]
        y_back = L["canal_top_y"] - 32.0  # choanae / posterior nasal cavity
        hw = L["orbit_halfwidth"]
        # maxilla block (spongy bone + cortical), which the cavities are carved from
        zc = (z_pal + z_orb) / 2
        h = (z_orb - z_pal) / 2 + 4
        ymid = (y_front + 8 + y_back) / 2
        ylen = abs(y_back - (y_front + 8)) / 2 + 4
        sl, mx = _paint(T, g, (mid, ymid, zc), (hw + 12, ylen, h), Tissue.BONE_CORTICAL, where=~brain)
        body_core[sl] |= mx
        # maxillary sinuses
        for s in (-1, 1):
            _paint(T, g, (mid + s * (hw * 0.75), ymid + 2, zc - 2), (hw * 0.55, ylen * 0.62, h * 0.62),
                   Tissue.AIRWAY, where=~brain)
        # nasal cavity (two fossae with a septum and turbinates)
        nz_lo, nz_hi = z_pal + 2, z_orb + 14
        for k in self.krange(nz_lo, nz_hi):
            z = g.z[k]
            yi = slice(*sorted((g.idx(1, y_front - 14), g.idx(1, y_back))))
            for s in (-1, 1):
                xi = slice(*sorted((g.idx(0, mid + s * 1.2), g.idx(0, mid + s * 13.0))))
                sub = T[xi, yi, k]
                sub[:] = Tissue.AIRWAY
            # turbinates: soft tissue shelves on the lateral walls
            for zt in (z_pal + 8, z_pal + 20, z_pal + 30):
                if abs(z - zt) < 4:
                    for s in (-1, 1):
                        xi = slice(*sorted((g.idx(0, mid + s * 8.0), g.idx(0, mid + s * 13.0))))
                        T[xi, yi, k] = Tissue.MUCOSA
        # ethmoid cells between the orbits (bone with air)
        sl, em = _paint(T, g, (mid, y_front + 20, z_orb + 14), (hw * 0.45, 20, 12), Tissue.BONE_SPONGY, where=~brain)
        air = ndi.gaussian_filter(rng.random(em.shape), 0.8) > 0.5
        T[sl][em & air] = Tissue.AIRWAY
        # hard palate: a 5 mm bony plate inside the upper dental arch
        arch = self.arch_cols
        if arch.any():
            fill = np.zeros(g.shape[:2], bool)
            ii, jj = np.nonzero(arch)
            fill = _slice_hull(np.stack([ii, jj], 1), g.shape[:2])
            for k in self.krange(z_pal - 3, z_pal + 2):
                T[:, :, k][fill & (T[:, :, k] == Tissue.AIR)] = Tissue.BONE_CORTICAL
            # maxillary alveolar bone around the upper teeth
            for k in self.krange(z_pal - 6, z_pal + 4):
                ring = ndi.binary_dilation(self.teeth_upper[:, :, k] | (fill & (abs(g.z[k] - z_pal) < 3)), iterations=2)
                T[:, :, k][ring & (T[:, :, k] == Tissue.AIR)] = Tissue.BONE_SPONGY
                body_core[:, :, k] |= ring
        # zygomatic arches: from below the orbit laterally back to in front of the ear
        for s in (-1, 1):
            a = np.array([mid + s * (hw + 16), y_front + 12, z_orb - 2])
            b = np.array([mid + s * (hw + 28), L["canal_top_y"] - 20, z_orb - 8])
            for t in np.linspace(0, 1, 12):
                p = a * (1 - t) + b * t
                sl, m = _paint(T, g, p, (3.5, 5, 4), Tissue.BONE_CORTICAL, where=~brain)
                body_core[sl] |= m
        # external nose: soft tissue wedge in front of the nasal cavity
        for k in self.krange(z_pal + 2, z_orb + 8):
            z = g.z[k]
            t = (z - z_pal) / max(z_orb + 8 - z_pal, 1)
            proj = 22 * (1 - abs(t - 0.35) / 0.75)  # projection of the nose (mm)
            if proj <= 0:
                continue
            width = 9 + 9 * (1 - t)
            sl, m = _paint(T, g, (mid, y_front - 8 - proj / 2, z), (width, proj / 2 + 3, 2.5), Tissue.SOFT)
            body_core[sl] |= m
            if t < 0.4:  # nostrils
                for s in (-1, 1):
                    _paint(T, g, (mid + s * 5, y_front - 8 - proj / 2, z), (3, proj / 3, 2.0), Tissue.AIRWAY)
        # lips/cheeks in front of the teeth: anchors
        for k in self.krange(L["crest_z"] - 8, z_pal + 2):
            _, m = _paint(body_core, g, (mid, L["chin_y"] - 4, g.z[k]), (hw + 6, 10, 2), True)

    def pharynx_centre(self, k):
        """(x, y) of the pharyngeal airway centre at slice k, and the posterior wall y."""
        L = self.L
        cx, cy = L["canal_x"][k], L["canal_y"][k]
        z = self.g.z[k]
        naso = z > L["palate_z"] - 4
        prevert = 12.0 if naso else 5.0
        ppw = cy - L["canal_r"] - L["vb_ap"] - prevert
        return cx, ppw, naso

    # ------------------------------------------------------------------------------------------
    def _spine(self, T, body_core):
        g, L = self.g, self.L
        canal = self.mask("Spinal-Canal")
        cord = self.mask("Spinal-Cord")
        zlo = g.z.min()
        ztop = L["canal_top_z"]
        disc_phase = self.rng.uniform(0, 15)
        for k in range(g.shape[2]):
            z = g.z[k]
            if z > ztop + 2:
                continue
            cx, cy = L["canal_x"][k], L["canal_y"][k]
            c_sl = canal[:, :, k]
            level_from_top = ztop - z
            # C1/C2 (upper ~25 mm): ring + dens; below: body + arch + spinous process
            xs = slice(*sorted((g.idx(0, cx - 40), g.idx(0, cx + 40))))
            ys = slice(*sorted((g.idx(1, cy - 45), g.idx(1, cy + 55))))
            X = g.x[xs][:, None] - cx
            Y = g.y[ys][None, :] - cy
            r = L["canal_r"]
            ring = ((X / (r + 4.0)) ** 2 + (Y / (r + 4.5)) ** 2 <= 1) & ((X / r) ** 2 + (Y / r) ** 2 > 1)
            if level_from_top < 25:
                # atlas: anterior arch + lateral masses; dens behind the anterior arch
                lateral = ((np.abs(X) - (r + 9)) / 7.0) ** 2 + ((Y + 2) / 9.0) ** 2 <= 1
                ant_arch = (X / 9.0) ** 2 + ((Y + r + 14) / 4.0) ** 2 <= 1
                dens = (X / 5.5) ** 2 + ((Y + r + 5) / 5.5) ** 2 <= 1
                bone = ring | lateral | ant_arch | (dens & (level_from_top > 8))
                spongy = ((np.abs(X) - (r + 9)) / 4.5) ** 2 + ((Y + 2) / 6.0) ** 2 <= 1
            else:
                vb_c = -(r + 1.5 + L["vb_ap"] / 2)
                body = (X / 9.0) ** 2 + ((Y - vb_c) / (L["vb_ap"] / 2)) ** 2 <= 1
                spin = (np.abs(X) <= 3.0) & (Y > r) & (Y < r + 24)
                trans = ((np.abs(X) - 20) / 5.0) ** 2 + ((Y + 3) / 5.0) ** 2 <= 1
                bone = body | ring | spin | trans
                spongy = (X / 7.5) ** 2 + ((Y - vb_c) / (L["vb_ap"] / 2 - 1.5)) ** 2 <= 1
                # intervertebral discs every ~15 mm
                if ((level_from_top + disc_phase) % 15.0) < 3.5:
                    spongy = np.zeros_like(spongy)
                    T[xs, ys, k][body] = Tissue.SOFT
                    bone = bone & ~body
            sub = T[xs, ys, k]
            sub[bone] = Tissue.BONE_CORTICAL
            sub[spongy & bone] = Tissue.BONE_SPONGY
            body_core[xs, ys, k] |= bone
            # posterior neck muscles anchor: ~45-60 mm behind the canal, +-45 mm wide
            post = ((X / 48.0) ** 2 + ((Y - 22) / 42.0) ** 2 <= 1) & (Y > 0)
            body_core[xs, ys, k] |= post
        T[canal & ~_isin(T, (Tissue.BRAIN,))] = Tissue.CSF
        T[cord] = Tissue.SPINAL_CORD

    def _pharynx(self, T, body_core):
        g, L = self.g, self.L
        z_top = max(L["cochlea_z"] - 13.0, L["palate_z"] + 18.0)  # nasopharynx roof
        self.naso_top_z = z_top
        airway = np.zeros(g.shape, bool)
        for k in range(g.shape[2]):
            z = g.z[k]
            if z > z_top:
                continue
            cx, ppw, naso = self.pharynx_centre(k)
            if naso:
                ap, w = 16.0, 15.0  # nasopharynx: continues forward into the choanae
            elif z > L["mand_bottom_z"]:
                ap, w = 10.0, 14.0  # oropharynx
            else:
                ap, w = 9.0, 11.0  # hypopharynx / laryngeal vestibule
            cy = ppw - ap / 2
            xs = slice(*sorted((g.idx(0, cx - w - 1), g.idx(0, cx + w + 1))))
            ys = slice(*sorted((g.idx(1, cy - ap - 1), g.idx(1, cy + ap / 2 + 1))))
            X = g.x[xs][:, None] - cx
            Y = g.y[ys][None, :] - cy
            airway[xs, ys, k] = (X / w) ** 2 + (Y / (ap / 2)) ** 2 <= 1
        muc = _dilate(airway, 3) & ~airway
        T[muc & _isin(T, (Tissue.AIR, Tissue.SOFT, Tissue.MUSCLE))] = Tissue.MUCOSA
        T[airway] = Tissue.AIRWAY
        body_core |= muc | airway
        self.airway = airway
        # palatine tonsils (oropharynx, lateral walls) and adenoid (nasopharynx roof)
        zt = (L["palate_z"] + L["mand_bottom_z"]) / 2 + 5
        k = self.kz(zt)
        cx, ppw, _ = self.pharynx_centre(k)
        for s in (-1, 1):
            _paint(T, g, (cx + s * 15, ppw - 6, zt), (5, 7, 9), Tissue.MUCOSA)
        k = self.kz(z_top - 4)
        cx, ppw, _ = self.pharynx_centre(k)
        _paint(T, g, (cx, ppw + 1, z_top - 3), (11, 4, 5), Tissue.MUCOSA, where=~airway)

    def _tongue(self, T, body_core):
        g, L = self.g, self.L
        mand = self.mask("Mandible")
        z_floor = L["mand_bottom_z"] + 0.35 * (L["crest_z"] - L["mand_bottom_z"])
        for k in self.krange(L["mand_bottom_z"] + 2, L["palate_z"] - 3):
            z = g.z[k]
            pts = np.argwhere(mand[:, :, k] | self.arch_cols & (z > L["crest_z"]))
            if len(pts) < 10:
                continue
            hull = _slice_hull(pts, g.shape[:2])
            inner = hull & ~ndi.binary_dilation(mand[:, :, k], iterations=2)
            cx, ppw, _ = self.pharynx_centre(k)
            jback = g.idx(1, ppw - 12)
            inner[:, jback:] = False  # stop in front of the oropharynx
            free = inner & _isin(T[:, :, k], (Tissue.AIR, Tissue.MUSCLE, Tissue.SOFT))
            T[:, :, k][free] = Tissue.TONGUE if z > z_floor else Tissue.MUSCLE  # mylohyoid / geniohyoid
            body_core[:, :, k] |= hull
        # the tongue's dorsum: under the palate a thin air layer (oral cavity) in some individuals
        if self.rng.random() < 0.5:
            for k in self.krange(L["palate_z"] - 5, L["palate_z"] - 3):
                m = T[:, :, k] == Tissue.TONGUE
                T[:, :, k][m & ~ndi.binary_erosion(m, iterations=3)] = Tissue.AIRWAY

    def _muscles_vessels(self, T, body_core):
        g, L, rng = self.g, self.L, self.rng
        mand = self.mask("Mandible")
        lo, hi = L["mand_lo"], L["mand_hi"]
        for s_name, s in (("Lt", 1.0), ("Rt", -1.0)):
            # masseter: lateral to the ramus; medial pterygoid: medial to the ramus
            side = (g.x[:, None, None] - L["mid_x"]) * s > 20
            ram = mand & side & (g.z[None, None, :] > L["crest_z"] - 5)
            if ram.any():
                c = _centroid(ram, g)
                _paint(T, g, c + np.array([s * 9, -2, -6]), (6, 14, 22), Tissue.MUSCLE,
                       where=_isin(T, (Tissue.AIR,)))
                _paint(T, g, c + np.array([-s * 10, 2, -8]), (5, 12, 18), Tissue.MUSCLE,
                       where=_isin(T, (Tissue.AIR,)))
                body_core |= _dilate(ram, 8)
            # vessels: internal/common carotid and internal jugular, from the skull base down
            for k in range(g.shape[2]):
                z = g.z[k]
                if z > L["skull_base_z"] - 4:
                    continue
                cx, cy = L["canal_x"][k], L["canal_y"][k]
                vb_front = cy - L["canal_r"] - L["vb_ap"]
                car = (cx + s * 21, vb_front + 2)
                jug = (cx + s * 30, vb_front + 8)
                for (px, py), rad in ((car, 3.2), (jug, 5.0 + rng.uniform(-0.5, 1.0) * (s > 0))):
                    xs = slice(*sorted((g.idx(0, px - rad - 1), g.idx(0, px + rad + 1))))
                    ys = slice(*sorted((g.idx(1, py - rad - 1), g.idx(1, py + rad + 1))))
                    X = g.x[xs][:, None] - px
                    Y = g.y[ys][None, :] - py
                    T[xs, ys, k][X**2 + Y**2 <= rad**2] = Tissue.VESSEL
            # sternocleidomastoid: from the mastoid down along the lateral neck
            for k in range(g.shape[2]):
                z = g.z[k]
                if z > L["cochlea_z"] - 12:
                    continue
                cx, cy = L["canal_x"][k], L["canal_y"][k]
                t = (L["cochlea_z"] - 12 - z) / 80.0
                px, py = cx + s * (45 - 8 * t), cy - 5 - 25 * t
                xs = slice(*sorted((g.idx(0, px - 9), g.idx(0, px + 9))))
                ys = slice(*sorted((g.idx(1, py - 14), g.idx(1, py + 14))))
                X = g.x[xs][:, None] - px
                Y = g.y[ys][None, :] - py
                m = (X / 7.0) ** 2 + (Y / 12.0) ** 2 <= 1
                body_core[xs, ys, k] |= m
                sub = T[xs, ys, k]
                sub[m & (sub == Tissue.AIR)] = Tissue.MUSCLE
            # level II lymph nodes: below the parotid tail, near the jugular vein
            for n in range(int(rng.integers(1, 4))):
                z = L["par_lo"][s_name][2] - rng.uniform(0, 20)
                k = self.kz(z)
                cx, cy = L["canal_x"][k], L["canal_y"][k]
                p = (cx + s * rng.uniform(33, 42), cy - L["canal_r"] - L["vb_ap"] + rng.uniform(0, 12), z)
                _paint(T, g, p, (rng.uniform(2.5, 4), rng.uniform(3, 5), rng.uniform(4, 7)), Tissue.LYMPH_NODE,
                       where=_isin(T, (Tissue.AIR, Tissue.MUSCLE)))

    def _fat_spaces(self, T, free):
        g, L = self.g, self.L
        # parapharyngeal fat: lateral to the pharynx, medial to the parotid deep lobe
        for k in self.krange(L["mand_bottom_z"] + 5, self.naso_top_z):
            cx, ppw, _ = self.pharynx_centre(k)
            for s in (-1, 1):
                px, py = cx + s * 22, ppw - 2
                xs = slice(*sorted((g.idx(0, px - 6), g.idx(0, px + 6))))
                ys = slice(*sorted((g.idx(1, py - 9), g.idx(1, py + 9))))
                X = g.x[xs][:, None] - px
                Y = g.y[ys][None, :] - py
                m = ((X / 5.0) ** 2 + (Y / 8.0) ** 2 <= 1) & free[xs, ys, k]
                T[xs, ys, k][m] = Tissue.FAT

    # ------------------------------------------------------------------------------------------
    def _body(self, core: np.ndarray) -> np.ndarray:
        """Body outline: per-slice convex hull of the anchors, grown by soft-tissue thickness,
        smoothed across slices; slices below the last anchored neck slice follow the neck.
        Computed at half the in-plane resolution, then interpolated back."""
        g, L, rng = self.g, self.L, self.rng
        nx, ny, nz = g.shape
        f = 2
        px, py = -(-nx // f) * f, -(-ny // f) * f
        padded = np.zeros((px, py, nz), bool)
        padded[:nx, :ny] = core
        low = padded.reshape(px // f, f, py // f, f, nz).any(axis=(1, 3))
        sp = np.array([g.sp[0] * f, g.sp[1] * f, g.sp[2]])
        hulls = np.zeros(low.shape, bool)
        area = np.zeros(nz)
        for k in range(nz):
            pts = np.argwhere(low[:, :, k])
            if len(pts) >= 3:
                hulls[:, :, k] = _slice_hull(pts, low.shape[:2])
                area[k] = hulls[:, :, k].sum()
        # neck slices below the submandibular glands: carry the last neck hull down, following
        # the spinal canal, narrowing slightly
        zsup = g.affine[2, 2] > 0
        order = range(nz - 1, -1, -1) if zsup else range(nz)  # from head to feet
        lowest_smg = min(L["smg_lo"]["Lt"][2], L["smg_lo"]["Rt"][2])
        ref = None
        ref_k = None
        for k in order:
            z = g.z[k]
            if z >= lowest_smg + 8:
                if area[k] > 0:
                    ref, ref_k = hulls[:, :, k], k
                continue
            if ref is None:
                continue
            dx = (L["canal_x"][k] - L["canal_x"][ref_k]) / sp[0]
            dy = (L["canal_y"][k] - L["canal_y"][ref_k]) / sp[1]
            zoom = 1 - min((lowest_smg + 8 - z) / 60.0, 0.25)
            c = np.array(ndi.center_of_mass(ref))
            mat = np.diag([1 / zoom, 1 / zoom])
            off = c - mat @ (c + np.array([dx, dy]))
            moved = ndi.affine_transform(ref.astype(np.float32), mat, offset=off, order=1) > 0.5
            hulls[:, :, k] |= moved
        # grow by soft-tissue thickness (thicker in the neck and face than over the skull)
        grow_neck = rng.uniform(9.0, 15.0)
        grow_head = rng.uniform(5.0, 7.0)
        d_out = ndi.distance_transform_edt(~hulls, sampling=sp)
        grow = np.where(g.z[None, None, :] > L["orbit_bottom_z"] + 10, grow_head, grow_neck)
        field = ndi.gaussian_filter((d_out <= grow).astype(np.float32), (3.0 / sp[0], 3.0 / sp[1], 4.0 / sp[2]))
        full = ndi.zoom(field, (f, f, 1), order=1, grid_mode=True, mode="nearest")[:nx, :ny]
        body = full > 0.5
        for k in range(nz):
            body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
        return body

    # ------------------------------------------------------------------------------------------
    def _select_volume(self, score: np.ndarray, cand: np.ndarray, target_ml: float) -> np.ndarray:
        """The ``target_ml`` of candidate voxels with the lowest score."""
        vox = float(np.prod(self.g.sp)) / 1000.0
        n = int(round(target_ml / vox))
        idx = np.flatnonzero(cand)
        if n <= 0 or idx.size == 0:
            return np.zeros(cand.shape, bool)
        n = min(n, idx.size)
        sc = score.ravel()[idx]
        keep = idx[np.argpartition(sc, n - 1)[:n]] if n < idx.size else idx
        out = np.zeros(cand.size, bool)
        out[keep] = True
        return out.reshape(cand.shape)

    def _sublingual(self, T, glands) -> dict:
        """Sublingual glands: almond-shaped, along the inner surface of the mandibular body in the
        floor of the mouth, above the mylohyoid, anterior-superior-medial to the submandibular."""
        g, L, rng = self.g, self.L, self.rng
        mand = self.mask("Mandible")
        out = {}
        crest, bottom = L["crest_z"], L["mand_bottom_z"]
        for s_name, side, s in (("Lt", "left", 1.0), ("Rt", "right", -1.0)):
            target = rng.uniform(2.0, 4.0)
            smg_lo, smg_hi = L["smg_lo"][s_name], L["smg_hi"][s_name]
            z_c = min(max(smg_hi[2] + 4.0, bottom + 0.45 * (crest - bottom)), crest - 8.0)
            h = 6.5
            y_ant = L["chin_y"] + 9.0
            y_post = max(smg_lo[1] + 8.0, y_ant + 28.0)
            y_post = min(y_post, y_ant + 40.0)
            ks = self.krange(z_c - h - 3, z_c + h + 3)
            k0, k1 = min(ks), max(ks) + 1
            mslab = mand[:, :, k0:k1]
            d = np.stack([ndi.distance_transform_edt(~mslab[:, :, i], sampling=g.sp[:2])
                          if mslab[:, :, i].any() else np.full(mslab.shape[:2], 1e3)
                          for i in range(mslab.shape[2])], axis=2)
            X = g.x[:, None, None] - L["mid_x"]
            Y = g.y[None, :, None]
            Zs = g.z[None, None, k0:k1]
            # inside the arch (medial to the bone) on this side
            arch = np.zeros(mslab.shape, bool)
            for i in range(mslab.shape[2]):
                pts = np.argwhere(mslab[:, :, i] | self.arch_cols)
                if len(pts) >= 3:
                    arch[:, :, i] = _slice_hull(pts, g.shape[:2])
            w = 9.0
            u = (d - (1.5 + w / 2)) / (w / 2)
            v = (Zs - z_c) / h
            t = (Y - (y_ant + y_post) / 2) / ((y_post - y_ant) / 2)
            score = u**2 + v**2 + t**2
            cand = arch & ~mslab & (X * s > 3.0) & (score <= 2.5)
            cand &= glands[:, :, k0:k1] == 0
            cand &= ~_isin(T[:, :, k0:k1], (Tissue.BONE_CORTICAL, Tissue.BONE_SPONGY, Tissue.TEETH, Tissue.AIRWAY))
            sel = self._select_volume(score, cand, target)
            glands[:, :, k0:k1][sel] = label_value("sublingual", side)
            out[f"sublingual_{side}_target_ml"] = target
        return out

    def _tubarial(self, T, glands) -> dict:
        """Tubarial glands: flat, on the posterolateral nasopharyngeal wall over the torus tubarius,
        just below the skull base, medial to the parotids, anterior to the spine."""
        g, L, rng = self.g, self.L, self.rng
        out = {}
        z_top = self.naso_top_z - 1.0
        z_bot = max(z_top - rng.uniform(20.0, 28.0), L["palate_z"] - 6)
        airway = self.airway
        ks = self.krange(z_bot, z_top)
        k0, k1 = min(ks), max(ks) + 1
        d = np.stack([ndi.distance_transform_edt(~airway[:, :, k], sampling=g.sp[:2])
                      if airway[:, :, k].any() else np.full(g.shape[:2], 1e3) for k in range(k0, k1)], axis=2)
        for s_name, side, s in (("Lt", "left", 1.0), ("Rt", "right", -1.0)):
            target = rng.uniform(0.5, 1.5)
            score = np.full(d.shape, np.inf)
            cand = np.zeros(d.shape, bool)
            for i, k in enumerate(range(k0, k1)):
                cx, ppw, _ = self.pharynx_centre(k)
                X = g.x[:, None] - cx
                Y = g.y[None, :] - (ppw - 8.0)  # the torus: posterolateral, ~8 mm in front of the wall
                ang = np.arctan2(Y, X * s)  # 0 = lateral, +pi/2 = posterior
                lat_ok = (X * s > 6.0) & (X * s < 30.0)
                par_medial = L["par_lo"][s_name][0] if s > 0 else L["par_hi"][s_name][0]
                lat_ok &= (g.x[:, None] - par_medial) * s < -8.0  # medial to the parotid
                zc = (z_top + z_bot) / 2
                sc = ((d[:, :, i] - 4.5) / 2.0) ** 2 + ((ang - 0.5) / 0.7) ** 2 + ((g.z[k] - zc) / ((z_top - z_bot) / 2)) ** 2
                c = lat_ok & (d[:, :, i] > 1.0) & (d[:, :, i] < 9.0)
                score[:, :, i] = np.where(c, sc, np.inf)
                cand[:, :, i] = c
            cand &= glands[:, :, k0:k1] == 0
            cand &= ~_isin(T[:, :, k0:k1], (Tissue.BONE_CORTICAL, Tissue.BONE_SPONGY, Tissue.AIRWAY, Tissue.VESSEL))
            sel = self._select_volume(score, cand, target)
            glands[:, :, k0:k1][sel] = label_value("tubarial", side)
            out[f"tubarial_{side}_target_ml"] = target
        return out
