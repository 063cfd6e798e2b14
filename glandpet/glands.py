"""Gland names, sides, and the default label table shared by phantom, atlases and measurement.

Side is always the patient's side. In the DICOM patient frame (LPS) the patient's left is +x.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

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
