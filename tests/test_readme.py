"""The README's Python example runs as written, and everything the README links is in the repository."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_python_blocks_run_as_written(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "(10,) (10, 64, 64)" in out and "(10, 1)" in out
    import numpy as np

    np.testing.assert_allclose(namespace["out"]["local_embeds"], namespace["same"]["local_embeds"], atol=1e-5)


def test_links_stay_inside_the_repository():
    for target in re.findall(r"\]\(([^)]+)\)", README):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (ROOT / target).exists(), target
        assert os.path.commonpath([ROOT, (ROOT / target).resolve()]) == str(ROOT), target
    assert "../shared" not in README.replace("../shared/data/mvtec_ad", "")
