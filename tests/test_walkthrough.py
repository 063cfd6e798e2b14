"""README "Your own study", step by step, on a phantom export laid out like a PACS dump (mixed tree:
patients matched by patient_id). The commands and the Python snippets are read from
README.md (section "Your own study"), so the walkthrough and this test cannot drift apart.

ONE run (the session fixture `walkthrough`): the small phantom cohort (a pSS patient with PSMA and
FAPI sessions, a control with FAPI only, one label-map atlas) -> PACS-style export -> `glandpet init`
-> the test fills the group column -> `glandpet check` -> `snakemake` -> tables."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "README.md"  # its section "Your own study" is the walkthrough

pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", walkthrough_text(), flags=re.DOTALL)


def walkthrough_text() -> str:
    """README's section "## Your own study" (up to the next section)."""
    text = DOC.read_text()
    start = text.index("## Your own study\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def command(prefix: str) -> list[str]:
    """The one command of the walkthrough that starts with `prefix`."""
    lines = [ln.strip() for b in blocks("bash") for ln in b.splitlines() if ln.strip().startswith(prefix)]
    assert len(lines) == 1, f"expected one '{prefix}' command in {DOC.name}, found {lines}"
    return shlex.split(lines[0])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    if argv[0] == "glandpet":  # the console script, through this interpreter
        argv = [sys.executable, "-c", "import sys; from glandpet.cli import main; sys.exit(main())", *argv[1:]]
    elif argv[0] == "snakemake":
        argv = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *argv[1:]]
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the jobs it started
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(argv)} timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="session")
def walkthrough(small_cohort, tmp_path_factory) -> dict:
    from glandpet.phantom.pacs_export import build_pacs_export
    from glandpet.study.draft import read_linkage_key

    w = tmp_path_factory.mktemp("walkthrough")
    build_pacs_export(small_cohort / "dicom", w / "export", patients_per_date=2, seed=7)
    # step 2: the atlas comes from a planning CT + RTSTRUCT: the phantom's atlas individual written as
    # DICOM (make_atlas is deterministic: the same individual as small_cohort's atlas01)
    from glandpet.phantom.cohort import make_atlas

    make_atlas(w / "rt_source", 0, 5, dicom=True)
    src = w / "rt_source" / "atlases" / "atlas01" / "dicom"
    shutil.copytree(src / "ct", w / "planning" / "hn01" / "ct")
    shutil.copy2(src / "rtstruct.dcm", w / "planning" / "hn01" / "RS.dcm")
    out: dict = {"dir": w, "labelmap_atlas": small_cohort / "atlases" / "atlas01"}
    out["atlas_add"] = run(command("glandpet atlas add"), w)
    assert out["atlas_add"].returncode == 0, out["atlas_add"].stdout + out["atlas_add"].stderr

    init = command("glandpet init")
    out["init"] = run(init, w)
    assert out["init"].returncode == 0, out["init"].stderr

    # step 4: the team fills the group column (here from the phantom's truth, through the PatientIDs)
    truth = pd.read_csv(small_cohort / "subjects.tsv", sep="\t", dtype=str)
    pid_group = {}
    for sub, group in zip(truth["subject_id"], truth["group"]):
        f = next(p for p in (small_cohort / "dicom" / sub).rglob("*") if p.is_file())
        pid_group[str(pydicom.dcmread(f, stop_before_pixels=True).PatientID)] = (sub, group)
    key = read_linkage_key(w / "study" / "linkage-key.tsv")
    sheet = pd.read_csv(w / "study" / "subjects.tsv", sep="\t", dtype=str, keep_default_na=False)
    out["drafted"] = sheet.copy()
    sheet["group"] = [pid_group[pid][1] for pid in sheet["patient_id"]]
    sheet.to_csv(w / "study" / "subjects.tsv", sep="\t", index=False)
    out["phantom_of"] = {key[pid]: sub for pid, (sub, _) in pid_group.items()}
    out["group_of"] = {key[pid]: g for pid, (_, g) in pid_group.items()}

    out["check"] = run(command("glandpet check"), w, timeout=120)
    out["snakemake"] = run(command("snakemake --cores"), w, timeout=1500)
    return out


def test_rtstruct_atlas_equals_the_label_map_atlas(walkthrough):
    """The atlas built by `glandpet atlas add` from the phantom's RTSTRUCT holds the same glands on the
    same grid as the phantom's label-map atlas of that individual (Dice per gland >= 0.95)."""
    import nibabel as nib
    import numpy as np

    built = walkthrough["dir"] / "atlases" / "hn01"
    ref = walkthrough["labelmap_atlas"]
    a, b = nib.load(built / "labels.nii.gz"), nib.load(ref / "labels.nii.gz")
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    from glandpet.glands import read_label_table

    la, lb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    built_of = {(lab.gland, lab.side): lab.index for lab in read_label_table(built / "labels.tsv")}
    ref_of = {(lab.gland, lab.side): lab.index for lab in read_label_table(ref / "labels.tsv")}
    present = {k for k, v in ref_of.items() if np.any(lb == v)}
    assert present and present <= set(built_of), (present, built_of)
    for k in present:
        x, y = la == built_of[k], lb == ref_of[k]
        dice = 2 * np.sum(x & y) / (np.sum(x) + np.sum(y))
        assert dice >= 0.95, (k, dice)


def test_init_drafts_a_patient_id_sheet(walkthrough):
    sheet = walkthrough["drafted"]
    assert list(sheet["subject_id"]) == ["S0001", "S0002"]
    assert (sheet["group"] == "").all() and (sheet["dicom_dir"] == "").all()  # mixed tree: patient_id rows
    assert (sheet["patient_id"] != "").all()
    sessions = {walkthrough["phantom_of"][s]: x for s, x in zip(sheet["subject_id"], sheet["sessions"])}
    assert sessions == {"S001": "psma,fapi", "S002": "fapi"}
    assert "snakemake --cores all --configfile" in walkthrough["init"].stdout


def test_check_passes(walkthrough):
    chk = walkthrough["check"]
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert "0 error(s), 0 warning(s)" in chk.stdout


def test_snakemake_reaches_the_tables(walkthrough):
    smk = walkthrough["snakemake"]
    assert smk.returncode == 0, smk.stdout[-3000:] + smk.stderr[-6000:]
    tables = walkthrough["dir"] / "study" / "results" / "tables"
    for name in ("series", "gland_stats", "gland_index", "qc"):
        assert (tables / f"{name}.parquet").is_file()
    stats = pd.read_parquet(tables / "gland_stats.parquet")
    got = stats.groupby("subject_id")["session"].agg(lambda s: ",".join(sorted(set(s)))).to_dict()
    phantom_of = walkthrough["phantom_of"]
    assert {phantom_of[s]: v for s, v in got.items()} == {"S001": "fapi,psma", "S002": "fapi"}
    assert dict(zip(stats["subject_id"], stats["group"])) == walkthrough["group_of"]
    # no PatientID in any table
    for pid in walkthrough["drafted"]["patient_id"]:
        for f in tables.glob("*.parquet"):
            assert pid not in pd.read_parquet(f).to_csv()


def test_doc_snippets_run(walkthrough, monkeypatch, capsys):
    assert (walkthrough["snakemake"].returncode == 0), "the workflow did not finish"
    snippets = blocks("python")
    assert len(snippets) == 3 and "pandas" in snippets[0] and "polars" in snippets[1] and "duckdb" in snippets[2]
    monkeypatch.chdir(walkthrough["dir"])
    ns: dict = {}
    for code in snippets:
        exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the documented snippets, verbatim
    assert len(ns["stats"]) > 0 and len(ns["parotid"]) > 0
    assert ns["summary"].height > 0 and set(ns["summary"]["group"].to_list()) == {"pss", "control"}
    joined = ns["joined"]
    assert len(joined) == len(ns["stats"])  # every measurement has its subject x gland x side index row
    assert joined["psma_fapi_index"].notna().any()  # the pSS subject has both sessions
    assert "suv_mean" in capsys.readouterr().out


def test_walkthrough_folders_are_ignored_by_git():
    """The walkthrough keeps the export, the planning CTs, the atlases and the study (linkage key
    included) inside the clone: git must not offer any of it for a commit (issue 17)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    paths = [a for prefix in ("glandpet init", "glandpet atlas add") for a in command(prefix)[len(prefix.split()):]
             if not a.startswith("-")]
    folders = sorted({Path(a).parts[0] for a in paths})
    assert {"export", "study", "atlases", "planning"} <= set(folders), folders
    for folder in folders:
        for probe in (f"{folder}/linkage-key.tsv", f"{folder}/sub/IM00001"):
            proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO)
            assert proc.returncode == 0, f"{probe} is not ignored by .gitignore"
