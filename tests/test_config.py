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
