"""Gland names, sides, and the default label table shared by phantom, atlases and measurement.

Side is always the patient's side. In the DICOM patient frame (LPS) the patient's left is +x.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GLANDS: tuple[str, ...] = ("parotid", "submandibular", "sublingual", "lacrimal", "tubarial")
SIDES: tuple[str, ...] = ("left", "right")
SESSIONS: tuple[str, ...] = ("psma", "fapi")
GROUPS: tuple[str, ...] = ("pss", "control")


@dataclass(frozen=True)
class Label:
    index: int
    gland: str
    side: str

    @property
    def name(self) -> str:
        return f"{self.gland}_{self.side}"


#: Default label values: parotid L/R = 1/2, submandibular 3/4, sublingual 5/6, lacrimal 7/8, tubarial 9/10.
DEFAULT_LABELS: tuple[Label, ...] = tuple(
    Label(2 * i + j + 1, gland, side) for i, gland in enumerate(GLANDS) for j, side in enumerate(SIDES)
)


def label_value(gland: str, side: str) -> int:
    """Label value of a gland and side in the default label table."""
    for lab in DEFAULT_LABELS:
        if lab.gland == gland and lab.side == side:
            return lab.index
    raise KeyError(f"unknown gland/side: {gland!r}/{side!r}")


def write_label_table(path: str | Path, labels: tuple[Label, ...] | list[Label] = DEFAULT_LABELS) -> None:
    """Write a label table TSV (`index, gland, side`)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "gland", "side"])
        for lab in labels:
            w.writerow([lab.index, lab.gland, lab.side])


def read_label_table(path: str | Path) -> list[Label]:
    """Read and validate a label table TSV (`index, gland, side`). Raises ValueError naming the problem."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: label table is empty")
    missing = {"index", "gland", "side"} - set(rows[0].keys())
    if missing:
        raise ValueError(f"{path}: label table lacks column(s) {sorted(missing)} (needs index, gland, side)")
    out: list[Label] = []
    seen: set[int] = set()
    for n, row in enumerate(rows, start=2):
        try:
            idx = int(row["index"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{n}: index {row['index']!r} is not an integer") from None
        gland = (row["gland"] or "").strip().lower()
        side = (row["side"] or "").strip().lower()
        if gland not in GLANDS:
            raise ValueError(f"{path}:{n}: unknown gland {gland!r} (expected one of {', '.join(GLANDS)})")
        if side not in SIDES:
            raise ValueError(f"{path}:{n}: unknown side {side!r} (expected left or right)")
        if idx <= 0 or idx in seen:
            raise ValueError(f"{path}:{n}: label index {idx} is not positive or repeated")
        seen.add(idx)
        out.append(Label(idx, gland, side))
    return out


#: Label-editor colours (RGB 0-255) per gland, those of the QC montage (glandpet.cohort.figures.GLAND_COLOUR)
#: for the left side; the right side is darker (RIGHT_SHADE) so the two sides stay apart in the editor.
EDITOR_RGB: dict[str, tuple[int, int, int]] = {
    "parotid": (0, 229, 255),
    "submandibular": (118, 255, 3),
    "sublingual": (255, 79, 216),
    "lacrimal": (47, 123, 255),
    "tubarial": (255, 255, 255),
}
RIGHT_SHADE = 0.6


def editor_rgb(lab: Label) -> tuple[int, int, int]:
    rgb = EDITOR_RGB[lab.gland]
    return rgb if lab.side == "left" else tuple(int(round(c * RIGHT_SHADE)) for c in rgb)


def write_slicer_ctbl(path: str | Path, labels: tuple[Label, ...] | list[Label] = DEFAULT_LABELS) -> None:
    """3D Slicer colour table (``.ctbl``: ``value name R G B A``), so a label map loaded as a
    segmentation shows the gland names and keeps glandpet's label values on export."""
    lines = ["# glandpet gland labels (3D Slicer colour table)", f"# {len(labels) + 1} values",
             "0 background 0 0 0 0"]
    lines += [f"{lab.index} {lab.name} {' '.join(map(str, editor_rgb(lab)))} 255" for lab in labels]
    Path(path).write_text("\n".join(lines) + "\n")


def write_itksnap_labels(path: str | Path, labels: tuple[Label, ...] | list[Label] = DEFAULT_LABELS) -> None:
    """ITK-SNAP label description file (Segmentation > Import Label Descriptions)."""
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL", "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    lines += [f"{lab.index:5d} {r:5d} {g:4d} {b:4d} {1:8d} {1:2d} {1:2d}    \"{lab.name}\""
              for lab in labels for r, g, b in [editor_rgb(lab)]]
    Path(path).write_text("\n".join(lines) + "\n")


#: Plausible adult gland volumes (mL, one side) for sanity checks of contours, not for measurement:
#: CT/MRI volumetry reports parotid ~15-35 mL (extremes 8-60), submandibular ~6-12 (3-20),
#: sublingual ~2-4 (0.5-8), lacrimal ~0.4-0.9 (0.15-2); the tubarial glands (Valstar et al. 2020)
#: are a thin layer over the torus tubarius of at most a few mL. Outside the range: a contour that
#: is truncated, holds a neighbouring structure, or has the wrong voxel size.
PLAUSIBLE_VOLUME_ML: dict[str, tuple[float, float]] = {
    "parotid": (8.0, 60.0),
    "submandibular": (3.0, 20.0),
    "sublingual": (0.5, 8.0),
    "lacrimal": (0.15, 2.0),
    "tubarial": (0.1, 4.0),
}
#: a side smaller than this fraction of the other side of the same gland is flagged
MIN_SIDE_RATIO = 0.4
#: an atlas contour smaller than this fraction of the atlases' median for its gland does not vote
MIN_FRACTION_OF_ATLAS_MEDIAN = 0.4


def volume_warnings(volumes_ml: dict[str, float]) -> list[str]:
    """Warnings for gland contours whose volume is implausible: outside
    :data:`PLAUSIBLE_VOLUME_ML`, or one side under :data:`MIN_SIDE_RATIO` of the other side.
    ``volumes_ml``: ``"gland_side" -> mL`` (the keys of :attr:`Label.name`)."""
    out = []
    for name, ml in volumes_ml.items():
        gland = name.rsplit("_", 1)[0]
        lo, hi = PLAUSIBLE_VOLUME_ML.get(gland, (0.0, float("inf")))
        if not lo <= ml <= hi:
            out.append(f"{name}: {ml:.2f} mL is outside the plausible adult range {lo:g}-{hi:g} mL "
                       f"(truncated contour, a neighbouring structure included, or wrong voxel size?)")
    for gland in GLANDS:
        left, right = volumes_ml.get(f"{gland}_left"), volumes_ml.get(f"{gland}_right")
        if left and right and min(left, right) < MIN_SIDE_RATIO * max(left, right):
            small = "left" if left < right else "right"
            out.append(f"{gland}_{small}: {min(left, right):.2f} mL is under {MIN_SIDE_RATIO:.0%} of the other "
                       f"side ({max(left, right):.2f} mL): truncated contour?")
    return out


def volume_outliers(volumes_ml: list[dict[int, float]], min_fraction: float = MIN_FRACTION_OF_ATLAS_MEDIAN,
                    min_atlases: int = 3) -> list[set[int]]:
    """Per atlas, the label values whose contour is a low outlier among the atlases: smaller than
    ``min_fraction`` of the median volume of the same gland (both sides of every atlas pooled),
    judged only when at least ``min_atlases`` atlases hold the gland. ``volumes_ml[a]``: label
    value (:data:`DEFAULT_LABELS`) -> mL of atlas a. A truncated atlas contour should not vote."""
    by_index = {lab.index: lab for lab in DEFAULT_LABELS}
    pooled: dict[str, list[float]] = {}
    holders: dict[str, set[int]] = {}
    for a, vols in enumerate(volumes_ml):
        for L, ml in vols.items():
            if L in by_index and ml > 0:
                g = by_index[L].gland
                pooled.setdefault(g, []).append(ml)
                holders.setdefault(g, set()).add(a)
    out: list[set[int]] = [set() for _ in volumes_ml]
    for a, vols in enumerate(volumes_ml):
        for L, ml in vols.items():
            if L not in by_index:
                continue
            g = by_index[L].gland
            if len(holders.get(g, ())) >= min_atlases and ml < min_fraction * float(np.median(pooled[g])):
                out[a].add(L)
    return out
