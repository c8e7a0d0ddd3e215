"""The README's "bring your own model" module and recipe are what `sparsetrain check` accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def _section_blocks(title: str) -> dict[str, str]:
    text = README.read_text()
    section = text[text.index(title):]
    section = section[:section.index("\n### ", 1)]
    return {lang: code for lang, code in re.findall(r"```(python|yaml)\n(.*?)```", section, re.S)[::-1]}


def test_bring_your_own_model_example_checks(tmp_path):
    blocks = _section_blocks("### Bring your own model")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(blocks["python"])
    (tmp_path / "mynet.yaml").write_text(blocks["yaml"])
    r = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "check", "mynet.yaml", "--devices", "1"],
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model: ModelTask built on meta" in r.stdout
    assert "callbacks[0] dynamic_sparsity: 2 layer(s): model.body.0, model.body.2" in r.stdout
