"""Recognise the PET tracer and radionuclide of a series from the free text and codes of its header.

Real headers name tracers in many ways ("68Ga-PSMA-11", "GA68 PSMA", "Ga-68-Gozetotide",
"Illuccix", "Pylarify", "[18F]FAPI-74", "FAP-2286" ...). :func:`classify_tracer` maps them to a
normalised tracer name, its session (tracer family: ``psma`` | ``fapi``; ``None`` for any other
tracer such as FDG, and for an unrecognised one) and the radionuclide.

Rules
-----
* Text fields are tried in priority order (for a dataset: Radiopharmaceutical (0018,0031), the
  RadiopharmaceuticalCodeSequence meaning, SeriesDescription, ProtocolName, StudyDescription).
  The first field that names a tracer fixes the tracer; a lower-priority field may only make a
  generic name specific within the same family ("PSMA" + "PSMA-11" -> "PSMA-11").
* A field whose tracer cannot carry the measured radionuclide (e.g. a scanner default "FDG" while
  the radionuclide code or half-life says Ga-68) is not trusted; the next field is used instead.
* Fields that name a different tracer family than the one chosen are reported in ``conflict``:
  callers should surface that, not resolve it silently.
* An unrecognised text gives ``tracer=None`` and ``session=None`` with the text in
  ``unrecognised`` (reported, never guessed).
* Radionuclide: RadionuclideCodeSequence code value (SNOMED RT ``C-...`` or SNOMED CT), else the
  code meaning, else text ("68Ga", "GA 68", "F-18", "Gallium-68" ...), else the half-life
  (within 2 %), else the nuclide that the tracer is only ever made with (e.g. DCFPyL -> F-18).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["TracerMatch", "classify_tracer", "classify_dataset", "tracer_slug", "radionuclide_from_text"]


@dataclass(frozen=True)
class TracerMatch:
    session: str | None  # 'psma' | 'fapi' | None
    tracer: str | None  # normalised name, e.g. 'PSMA-11', 'FAPI-46', 'FDG'; None when unrecognised
    radionuclide: str | None  # 'F-18', 'Ga-68', ...
    matched_on: str | None  # the field that named the tracer
    radionuclide_from: str | None = None  # 'code' | 'code_meaning' | 'text:<field>' | 'half_life' | 'tracer'
    unrecognised: str | None = None  # the highest-priority non-empty text when no tracer was recognised
    conflict: str | None = None  # e.g. "SeriesDescription names PSMA-11"

    @property
    def slug(self) -> str | None:
        return tracer_slug(self.tracer)


def tracer_slug(tracer: str | None) -> str | None:
    """File-name-safe tracer label: 'PSMA-11' -> 'psma11', 'PSMA I&T' -> 'psmait', 'FAPI-04' -> 'fapi04'."""
    if not tracer:
        return None
    return re.sub(r"[^a-z0-9]", "", tracer.lower()) or None


# --------------------------------------------------------------------------------------------
# radionuclides

#: (symbol, mass number, element name, half-life in seconds)
_NUCLIDES: tuple[tuple[str, str, str, float], ...] = (
    ("F", "18", "FLUORINE", 6586.2),
    ("Ga", "68", "GALLIUM", 4062.6),
    ("Cu", "64", "COPPER", 45720.0),
    ("Cu", "61", "COPPER", 11998.0),
    ("Cu", "62", "COPPER", 584.0),
    ("Lu", "177", "LUTETIUM", 574300.0),
    ("Zr", "89", "ZIRCONIUM", 282276.0),
    ("C", "11", "CARBON", 1223.4),
    ("N", "13", "NITROGEN", 597.9),
    ("O", "15", "OXYGEN", 122.2),
    ("Rb", "82", "RUBIDIUM", 76.4),
    ("I", "124", "IODINE", 360806.0),
    ("Y", "86", "YTTRIUM", 53064.0),
    ("Y", "90", "YTTRIUM", 230400.0),
    ("Sc", "44", "SCANDIUM", 14292.0),
    ("Sc", "43", "SCANDIUM", 14007.0),
    ("Tb", "152", "TERBIUM", 63720.0),
    ("Ga", "66", "GALLIUM", 34164.0),
    ("Na", "22", "SODIUM", 8.2e7),
    ("Tc", "99m", "TECHNETIUM", 21624.0),
    ("In", "111", "INDIUM", 242290.0),
)


def _nuclide_name(sym: str, mass: str) -> str:
    return f"{sym}-{mass}"


#: RadionuclideCodeSequence code values (SNOMED RT 'SRT'/'SNM3'/'99SDM' and SNOMED CT 'SCT').
NUCLIDE_CODES: dict[str, str] = {
    "C-111A1": "F-18", "77004003": "F-18",
    "C-131A3": "Ga-68", "35337001": "Ga-68",
    "C-127A2": "Cu-64", "3932008": "Cu-64",
    "C-127A1": "Cu-61", "71425003": "Cu-61",
    "C-127A5": "Cu-62", "422934004": "Cu-62",
    "C-127A4": "Cu-60", "425364008": "Cu-60",
    "C-168A4": "Zr-89", "63360001": "Zr-89",
    "C-105A1": "C-11", "40565003": "C-11",
    "C-107A1": "N-13", "21576001": "N-13",
    "C-B1038": "O-15", "129504001": "O-15",
    "C-159A2": "Rb-82", "79197006": "Rb-82",
    "C-114A5": "I-124", "40937006": "I-124",
    "C-162A3": "Y-86", "10738001": "Y-86",
    "C-162A7": "Y-90", "14691008": "Y-90",
    "C-131A1": "Ga-66", "79477007": "Ga-66",
    "C-155A1": "Na-22", "71633006": "Na-22",
    "126600": "Sc-44", "126605": "Sc-43", "126606": "Tb-152",
    "447553000": "Lu-177",
}


def _normalise(text: str) -> str:
    """Upper-case ASCII with superscript markers removed and separators collapsed to single spaces."""
    t = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    t = t.upper().replace("^", "")
    t = re.sub(r"(?<=\d)[.,](?=\d)", "p", t)  # keep decimal points (rhPSMA-7.3) as 'p'
    t = re.sub(r"[^A-Z0-9&p]+", " ", t)
    return " " + t.strip() + " "


def _nuclide_patterns() -> list[tuple[re.Pattern[str], str]]:
    pats = []
    for sym, mass, name, _ in _NUCLIDES:
        s = sym.upper()
        nuc = _nuclide_name(sym, mass)
        mass = mass.upper()
        alts = [
            rf"(?<![A-Z0-9]){s} ?{mass}(?![0-9])",  # GA68, GA 68, F18, F 18
            rf"(?<![A-Z0-9]){name} ?{mass}(?![0-9])",  # GALLIUM 68
            rf"(?<![A-Z0-9p]){mass} ?{name}",  # 68 GALLIUM
        ]
        if len(s) == 2 or s == "F":
            alts.append(rf"(?<![A-Z0-9p]){mass}{s}")  # 68GA..., 18F..., 18FDG
        else:
            alts.append(rf"(?<![A-Z0-9p]){mass}{s}(?![A-Z])")  # 11C, 13N, 15O (not 11CT)
        pats.append((re.compile("|".join(alts)), nuc))
    return pats


_NUCLIDE_PATTERNS = _nuclide_patterns()


def radionuclide_from_text(text: str | None) -> str | None:
    """Radionuclide named in free text ('68Ga-PSMA-11' -> 'Ga-68'), or None."""
    if not text:
        return None
    t = _normalise(text)
    hits = {nuc for pat, nuc in _NUCLIDE_PATTERNS if pat.search(t)}
    return hits.pop() if len(hits) == 1 else None


def radionuclide_from_half_life(half_life_s: float | None, rel_tol: float = 0.02) -> str | None:
    """Radionuclide whose half-life is within `rel_tol` of `half_life_s` (seconds), if exactly one."""
    try:
        h = float(half_life_s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not h > 0:
        return None
    hits = {_nuclide_name(s, m) for s, m, _, hl in _NUCLIDES if abs(h - hl) <= rel_tol * hl}
    return hits.pop() if len(hits) == 1 else None


# --------------------------------------------------------------------------------------------
# tracers: (regex on normalised text, tracer name, session, nuclide it is only made with or None)

_T: list[tuple[str, str, str | None, str | None]] = [
    # PSMA family, specific ligands first
    (r"RADELUMIN", "PSMA-1007", "psma", "F-18"),
    (r"PSMA ?1007(?!\d)", "PSMA-1007", "psma", None),
    (r"DCFPYL|PIFLUFOLASTAT|PYLARIFY|PYLCLARI", "DCFPyL", "psma", "F-18"),
    (r"FLOTUFOLASTAT|POSLUMA", "rhPSMA-7.3", "psma", "F-18"),
    (r"RH ?PSMA ?7p3", "rhPSMA-7.3", "psma", None),
    (r"RH ?PSMA ?7(?![p\d])", "rhPSMA-7", "psma", None),
    (r"RH ?PSMA", "rhPSMA", "psma", None),
    (r"PSMA ?617(?!\d)|VIPIVOTIDE|PLUVICTO", "PSMA-617", "psma", None),
    (r"PSMA ?I ?& ?T|PSMA ?I ?AND ?T(?![A-Z])|PSMA ?IT(?![A-Z])|ZADAVOTIDE", "PSMA I&T", "psma", None),
    (r"GOZETOTIDE|ILLUCCIX|LOCAMETZ|GOZELLIX", "PSMA-11", "psma", "Ga-68"),
    (r"PSMA ?11(?!\d)|PSMA ?HBED|HBED ?CC", "PSMA-11", "psma", None),
    (r"DCFBC", "DCFBC", "psma", "F-18"),
    (r"PSMA|PROSTATE SPECIFIC MEMBRANE", "PSMA", "psma", None),
    # FAP family
    (r"FAPI? ?2286(?!\d)", "FAP-2286", "fapi", None),
    (r"ONCO ?FAP", "OncoFAP", "fapi", None),
    (r"FAPI ?(\d{1,3})(?!\d)", "FAPI-{n}", "fapi", None),
    (r"FAPI|(?<![A-Z])FAP(?![A-Z])|FIBROBLAST ACTIVATION", "FAPI", "fapi", None),
    # other tracers: named, session None
    (r"(?<![A-Z])FDG|FLUORO ?DEOXY ?GLUCOSE|FLUDEOXYGLUCOSE|DEOXYGLUCOSE", "FDG", None, "F-18"),
    (r"DOTA ?TATE|NETSPOT|DETECTNET|OXODOTREOTIDE", "DOTATATE", None, None),
    (r"DOTA ?TOC|EDOTREOTIDE", "DOTATOC", None, None),
    (r"DOTA ?NOC", "DOTANOC", None, None),
    (r"FLUCICLOVINE|AXUMIN|FACBC", "fluciclovine", None, "F-18"),
    (r"CHOLINE|(?<![A-Z])FCH(?![A-Z])", "choline", None, None),
    (r"(?<![A-Z])NAF(?![A-Z])|SODIUM FLUORIDE|(?<![A-Z])FLUORIDE", "NaF", None, "F-18"),
    (r"(?<![A-Z])FLT(?![A-Z])|FLUOROTHYMIDINE", "FLT", None, "F-18"),
    (r"(?<![A-Z])FET(?![A-Z])|FLUOROETHYL ?L? ?TYROSINE", "FET", None, "F-18"),
    (r"F ?DOPA|FLUORODOPA", "FDOPA", None, "F-18"),
    (r"(?<![A-Z])FES(?![A-Z])|FLUOROESTRADIOL|CERIANNA", "FES", None, "F-18"),
    (r"FMISO|FLUOROMISONIDAZOLE", "FMISO", None, "F-18"),
    (r"FLORBETAPIR|AMYVID|FLORBETABEN|NEURACEQ|FLUTEMETAMOL|VIZAMYL|(?<![A-Z])PIB(?![A-Z])", "amyloid", None, None),
    (r"FLORTAUCIPIR|TAUVID|(?<![A-Z])PI ?2620", "tau", None, "F-18"),
    (r"PENTIXAFOR", "pentixafor", None, None),
    (r"AMMONIA|(?<![A-Z])NH3(?![A-Z])", "ammonia", None, "N-13"),
    (r"RUBIDIUM|(?<![A-Z])RB ?82", "rubidium", None, "Rb-82"),
    (r"(?<![A-Z])H2 ?O(?![A-Z])|(?<![A-Z])WATER(?![A-Z])", "water", None, "O-15"),
    (r"METHIONINE", "methionine", None, "C-11"),
    (r"ACETATE", "acetate", None, None),
    (r"EXENDIN", "exendin", None, None),
]
_TRACERS = [(re.compile(p), name, ses, nuc) for p, name, ses, nuc in _T]
_GENERIC = {"PSMA", "FAPI", "rhPSMA"}

#: RadiopharmaceuticalCodeSequence code values known to name a tracer.
_RADIOPHARM_CODES = {"C-B1031": "FDG", "35321007": "FDG", "C-B1034": "NaF"}


def _tracer_in_text(text: str) -> tuple[str, str | None, str | None] | None:
    t = _normalise(text)
    for pat, name, ses, nuc in _TRACERS:
        m = pat.search(t)
        if m:
            if "{n}" in name:
                n = int(m.group(1))
                name = name.format(n=f"{n:02d}")
            return name, ses, nuc
    return None


def _code_parts(code: Any) -> tuple[str | None, str | None]:
    """(code value, code meaning) of a code given as a str, tuple, dict or pydicom Dataset item."""
    if code is None:
        return None, None
    if isinstance(code, str):
        return code.strip() or None, None
    if isinstance(code, dict):
        return code.get("CodeValue") or code.get("value"), code.get("CodeMeaning") or code.get("meaning")
    if isinstance(code, (tuple, list)):
        value = code[0] if len(code) > 0 else None
        meaning = code[-1] if len(code) > 1 else None
        return value, meaning
    value = getattr(code, "CodeValue", None) or getattr(code, "LongCodeValue", None)
    return (str(value) if value else None), (str(getattr(code, "CodeMeaning", "") or "") or None)


def _as_fields(texts: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for i, t in enumerate(texts):
        if t is None:
            continue
        if isinstance(t, (tuple, list)) and len(t) == 2:
            name, value = t
        else:
            name, value = f"text{i}", t
        if value is None:
            continue
        if not isinstance(value, str):
            value = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        if value.strip():
            out.append((str(name), value.strip()))
    return out


def classify_tracer(
    *texts: Any,
    radionuclide_codes: Iterable[Any] = (),
    radiopharmaceutical_codes: Iterable[Any] = (),
    half_life_s: float | None = None,
) -> TracerMatch:
    """Classify a tracer from text fields (highest priority first) and code sequence values.

    `texts`: strings, or ``(field_name, value)`` pairs so that ``matched_on`` names the field.
    `radionuclide_codes` / `radiopharmaceutical_codes`: code values ('C-111A1'), ``(value, scheme,
    meaning)`` tuples, dicts or pydicom code items. `half_life_s`: RadionuclideHalfLife.
    """
    fields = _as_fields(texts)
    # radiopharmaceutical code meanings rank just after the first text field (the Radiopharmaceutical text)
    code_fields: list[tuple[str, str]] = []
    for c in radiopharmaceutical_codes or ():
        value, meaning = _code_parts(c)
        if value in _RADIOPHARM_CODES:
            code_fields.append(("RadiopharmaceuticalCodeSequence", _RADIOPHARM_CODES[value]))
        elif meaning:
            code_fields.append(("RadiopharmaceuticalCodeSequence", meaning))
    fields = fields[:1] + code_fields + fields[1:]

    # radionuclide: code value, code meaning, text, half-life
    nuclide, nuclide_from = None, None
    for c in radionuclide_codes or ():
        value, meaning = _code_parts(c)
        if value and value.strip() in NUCLIDE_CODES:
            nuclide, nuclide_from = NUCLIDE_CODES[value.strip()], "code"
            break
        got = radionuclide_from_text(meaning)
        if got:
            nuclide, nuclide_from = got, "code_meaning"
            break
    if nuclide is None:
        for name, value in fields:
            got = radionuclide_from_text(value)
            if got:
                nuclide, nuclide_from = got, f"text:{name}"
                break
    if nuclide is None:
        got = radionuclide_from_half_life(half_life_s)
        if got:
            nuclide, nuclide_from = got, "half_life"

    found: list[tuple[str, str, str | None, str | None]] = []  # (field, tracer, session, intrinsic nuclide)
    for name, value in fields:
        hit = _tracer_in_text(value)
        if hit:
            found.append((name, *hit))
    chosen = None
    for f in found:
        if nuclide and f[3] and f[3] != nuclide:
            continue  # this field's tracer cannot carry the measured radionuclide (e.g. default "FDG")
        chosen = f
        break
    if chosen is None:
        rp = [v for n, v in fields if n.lower().startswith("radiopharmaceutical")]
        unnamed = [v for n, v in fields if re.fullmatch(r"text\d+", n)]
        unrec = rp[0] if rp else (unnamed[0] if unnamed else None)
        if found:  # only nuclide-inconsistent names: report, don't guess
            unrec = f"{found[0][1]} (named in {found[0][0]}) but radionuclide is {nuclide}"
        return TracerMatch(None, None, nuclide, None, nuclide_from, unrecognised=unrec)
    field, tracer, session, intrinsic = chosen
    if tracer in _GENERIC:  # a lower-priority field may name the ligand
        for f in found:
            if f[2] == session and f[1] not in _GENERIC and not (nuclide and f[3] and f[3] != nuclide):
                tracer = f[1]
                intrinsic = f[3]
                break
    conflicts = sorted({f"{f[0]} names {f[1]}" for f in found if f[2] != session})
    if nuclide is None and intrinsic:
        nuclide, nuclide_from = intrinsic, "tracer"
    return TracerMatch(
        session, tracer, nuclide, field, nuclide_from, None, "; ".join(conflicts) if conflicts else None
    )


def classify_dataset(ds: Any) -> TracerMatch:
    """Classify the tracer of a pydicom dataset (or any object with the same attribute names)."""
    get = ds.get if hasattr(ds, "get") else (lambda k, d=None: getattr(ds, k, d))
    texts: list[tuple[str, Any]] = []
    rn_codes: list[Any] = []
    rp_codes: list[Any] = []
    half_life = None
    for item in get("RadiopharmaceuticalInformationSequence", None) or []:
        texts.append(("Radiopharmaceutical", item.get("Radiopharmaceutical")))
        rn_codes.extend(item.get("RadionuclideCodeSequence", None) or [])
        rp_codes.extend(item.get("RadiopharmaceuticalCodeSequence", None) or [])
        if half_life is None:
            half_life = item.get("RadionuclideHalfLife")
    for key in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        texts.append((key, get(key, None)))
    return classify_tracer(
        *texts, radionuclide_codes=rn_codes, radiopharmaceutical_codes=rp_codes, half_life_s=half_life
    )
