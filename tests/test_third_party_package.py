"""The example third-party package installs with pip and mixes with built-in components."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import forked

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugins" / "adaptkit-extras"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(PACKAGE)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
            "target": str(target)}


def adaptkit(env, *args, cwd=None):
    """The CLI in a fresh interpreter with the package on PYTHONPATH, as a user runs it."""
    env = {k: v for k, v in env.items() if k != "target"}
    return subprocess.run([sys.executable, "-m", "adaptkit.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def forked_with(installed, argv, logs, **options):
    """Like :func:`adaptkit` (or ``options['entry']``: pytest) in a fork of this process with the package's
    folder first on ``sys.path``: the registry finds its entry point as a fresh interpreter does (the
    test above checks that in one), without importing torch and the libraries again."""
    return forked([str(a) for a in argv], logs, paths=(installed["target"],), **options)


def test_the_package_registers_through_its_entry_point(installed):
    done = adaptkit(installed, "plugins", "--json")
    listing = json.loads(done.stdout)
    ia3 = next(m for m in listing["method"] if m["name"] == "ia3")
    assert ia3["source"] == "package adaptkit-extras"
    assert any(b["name"] == "convnext" for b in listing["backbone"])
    assert any(p["name"] == "convnext_tiny_digits" for p in listing["preset"])
    assert not listing["failures"]


def test_a_yaml_mixing_its_components_with_built_in_ones_runs(installed, tmp_path):
    spec = yaml.safe_load((PACKAGE / "ia3_convnext_digits.yaml").read_text())
    spec["methods"].append({"name": "ia3", "scale_outputs": [], "scale_inputs": ["mlp.out"]})  # its method too
    spec["train"] = {"max_steps": 4, "eval_every": 2, "progress": False, "batch_size": 16}
    spec["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert adaptkit(installed, "validate", path).returncode == 0
    done = forked_with(installed, ["run", path], tmp_path / "cli")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "convnext + [full, lora, ia3]" in done.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1


def test_without_the_package_its_components_are_unknown(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text((PACKAGE / "ia3_convnext_digits.yaml").read_text())
    done = adaptkit({**os.environ}, "validate", path)
    assert done.returncode == 2 and "unknown backbone 'convnext'" in done.stderr


@pytest.mark.slow
def test_the_package_passes_its_own_contract_tests(installed, tmp_path):
    """The package's tests use adaptkit.testing's contract suite on its own components."""
    import pytest as nested

    done = forked_with(installed, ["-q", "-o", "addopts=", "-p", "no:cacheprovider", str(PACKAGE / "tests")], tmp_path / "pytest",
                       cwd=PACKAGE, entry=nested.main)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
