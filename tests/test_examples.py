"""The examples a user copies from: the Python API script composes the same run as the YAML quickstart."""

from __future__ import annotations

import runpy
from pathlib import Path

import adaptkit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_python_api_example_is_the_yaml_quickstart():
    typed = runpy.run_path(str(EXAMPLES / "python_api.py"))["quickstart_spec"]()
    from_yaml = adaptkit.load_spec(EXAMPLES / "quickstart.yaml")
    ours, theirs = typed.to_dict(), from_yaml.to_dict()
    assert ours.pop("name") == "quickstart_python" and theirs.pop("name") == "quickstart"
    assert ours == theirs  # every setting, defaults included
