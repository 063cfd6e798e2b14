"""Where the workflow's own files are: the source checkout, its default config and its schema.

glandpet is run from a source checkout (the Snakefile, ``config.yaml``, ``config.schema.yaml`` and
``scripts/`` beside the package); the package's modules find those files here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

#: The package folder (``glandpet/``).
PACKAGE_DIR = Path(__file__).resolve().parent
#: The checkout: the folder holding the package, the Snakefile and the workflow's config files.
REPO_DIR = PACKAGE_DIR.parent
#: The workflow's defaults (every key, with its comment) and the schema that validates a config.
DEFAULT_CONFIG = REPO_DIR / "config.yaml"
CONFIG_SCHEMA = REPO_DIR / "config.schema.yaml"
#: The Snakemake wrappers, one per rule.
SCRIPTS_DIR = REPO_DIR / "scripts"
