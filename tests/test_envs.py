"""The conda env files and pyproject agree: every pinned version satisfies pyproject's bounds."""

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def pyproject_requirements():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def env_pins(path):
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==?\s*([0-9][^\s]*)", item)
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def test_env_files_exist_and_pin_exact_versions():
    assert ENV_FILES, "envs/*.yaml missing"
    for path in ENV_FILES:
        env = yaml.safe_load(path.read_text())
        for dep in env["dependencies"]:
            for item in dep["pip"] if isinstance(dep, dict) else []:
                assert "==" in item, f"{path.name}: {item} is not pinned exactly"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_satisfy_pyproject(path):
    reqs = pyproject_requirements()
    for name, version in env_pins(path).items():
        if name in reqs:
            assert reqs[name].specifier.contains(Version(version)), f"{path.name}: {name}=={version} violates {reqs[name]}"


def test_every_rule_names_an_existing_env():
    for smk in (REPO / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (REPO / "rules" / env).resolve().is_file(), f"{smk.name}: env {env} missing"
