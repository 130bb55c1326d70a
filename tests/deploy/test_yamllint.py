"""yamllint (pinned in the test extras) passes, strict, on every YAML file of the deployment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deploykit import DEPLOY, ROOT, yaml_files

CONFIG = DEPLOY / "yamllint.yml"


def yamllint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "yamllint", "-s", "-f", "parsable", "-c", str(CONFIG),
                           *map(str, paths)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_yamllint_passes() -> None:
    files = yaml_files()
    assert len(files) >= 20, f"only {len(files)} YAML files found"
    result = yamllint(*files)
    assert result.returncode == 0, f"yamllint:\n{result.stdout}{result.stderr}"


def test_yamllint_config_is_strict_enough(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nkey: yes\nkey: no\n")  # a truthy value and a duplicated key
    result = yamllint(bad)
    assert result.returncode != 0 and "truthy" in result.stdout and "key-duplicates" in result.stdout
