"""docs/configuration.md is the output of scripts/config_reference.py: it lists every schema key, no other."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from lm.config.reference import render
from lm.config.schema import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def test_committed_page_is_the_generated_one():
    assert PAGE.read_text() == render(), (
        "docs/configuration.md is out of date with lm/config/schema.py: "
        "run `python scripts/config_reference.py > docs/configuration.md`")


def test_script_prints_the_page():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    assert out == render()


def test_page_lists_exactly_the_schema_keys_with_their_defaults():
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| [^|]+ \| `([^`]*)` \|", render(), flags=re.M)
    listed = {(s, k) for s, k, _ in rows}
    schema = {(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert listed == schema and len(rows) == len(schema)
    defaults = {(s, k): d for s, k, d in rows}
    assert defaults[("optim", "lr")] == "30.0" and defaults[("data", "path")] == "null"
    assert defaults[("train", "progress")] == "true"
