"""The configuration schema: the default config validates; bad values are errors naming the key."""

import copy
import re

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO

SCHEMA = str(REPO / "config.schema.yaml")


def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid():
    validate(default_config(), SCHEMA)


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"suv_type": "lean"}, "suv_type"),
        ({"pvc": {"method": "gtm", "fwhm_mm": {"psma": -1, "fapi": 6}}}, "psma"),
        ({"index": {"definition": "difference"}}, "definition"),
        ({"demo": {"subjects": 0, "seed": 0, "atlases": 3}}, "subjects"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"atlases": [{"name": "a", "ct": "x"}]}, "labels"),
    ],
)
def test_bad_values_name_the_key(patch, key):
    cfg = default_config()
    cfg.update(copy.deepcopy(patch))
    with pytest.raises(Exception) as err:
        validate(cfg, SCHEMA)
    assert re.search(key, str(err.value))


def test_a_typo_is_one_line_with_a_suggestion():
    """Before: the workflow printed Snakemake's 50-line schema dump; `glandpet check` and the
    workflow now share one wording (glandpet.study.preflight.config_error_line)."""
    from glandpet.study.preflight import config_error_line, validate_config

    cfg = default_config()
    cfg["pvc"] = dict(cfg["pvc"], methd="gtm")
    assert config_error_line(cfg, SCHEMA) == "config: unknown key pvc.methd (did you mean pvc.method?)"
    assert [p.message for p in validate_config(cfg, SCHEMA)] == ["unknown key pvc.methd (did you mean pvc.method?)"]
    cfg = default_config()
    cfg["zzz"] = 1
    assert config_error_line(cfg, SCHEMA) == "config: unknown key zzz"
    assert config_error_line(default_config(), SCHEMA) is None


def test_the_workflow_says_a_typo_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text("pvc:\n  methd: gtm\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "-n", "--cores", "1"],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config: unknown key pvc.methd (did you mean pvc.method?)" in out
    assert "Failed validating" not in out and len(out.splitlines()) <= 8, out


def test_the_schema_holds_the_defaults_config_yaml_shows():
    """Defaults once (issue 20): validate() fills an empty config from config.schema.yaml's `default:`
    values, and the result is config.yaml, key for key; a partial section gets its missing keys."""
    filled: dict = {}
    validate(filled, SCHEMA)
    assert filled == default_config()
    partial = {"segmentation": {"fusion": "majority"}, "pvc": {"fwhm_mm": {"psma": 5.0}}}
    validate(partial, SCHEMA)
    expected = copy.deepcopy(default_config()["segmentation"])
    expected["fusion"] = "majority"
    assert partial["segmentation"] == expected
    assert partial["pvc"] == {"method": "gtm", "fwhm_mm": {"psma": 5.0, "fapi": "auto"}}


def test_rules_read_config_keys_without_a_second_default():
    """No rule writes a default a second time (`config.get(key, default)`): the schema has it."""
    rules = REPO / "rules"
    found = [f"{p.name}: {m.group(0)}" for p in sorted(rules.glob("*.smk"))
             for m in re.finditer(r"config(?:\[[^\]]+\])*\.get\([^)]*\)", p.read_text())]
    assert found == []


def test_each_rule_sets_its_resources_once_and_the_slurm_profile_repeats_none():
    """Issue 20: memory and runtime live in the rules (glandpet.workflow.dag.per_attempt: the first
    attempt's value, x2 and x3 on the profile's retries); profiles/slurm has no second list."""
    from glandpet.workflow.dag import per_attempt

    assert [per_attempt(3000)(None, a) for a in (1, 2, 3)] == [3000, 6000, 9000]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert "set-resources" not in profile and profile["retries"] >= 1
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=(?:rule|checkpoint) )", smk.read_text())[1:]:
            name = block.split()[1].rstrip(":")
            assert re.search(r"mem_mb=per_attempt\(\d+\)", block), f"{smk.name}: {name} has no mem_mb"
            assert re.search(r"runtime=per_attempt\(\d+\)", block), f"{smk.name}: {name} has no runtime"


def test_series_overrides_take_every_session_name():
    """An override may name a follow-up session (psma2); the schema's pattern is the layout's."""
    from glandpet import layout
    from glandpet.study.preflight import validate_config

    schema = yaml.safe_load((REPO / "config.schema.yaml").read_text())
    item = schema["properties"]["series_overrides"]["items"]["properties"]["session"]
    assert item["pattern"] == f"^{layout.SESSION_PATTERN}$"
    for ses, ok in (("psma", True), ("fapi", True), ("psma2", True), ("fapi12", True), ("psma1", False),
                    ("fdg", False)):
        cfg = dict(default_config(), series_overrides=[{"subject_id": "S001", "session": ses, "series_key": "ab12"}])
        assert (validate_config(cfg, SCHEMA) == []) is ok, ses
