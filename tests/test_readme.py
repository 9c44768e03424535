"""The README's research-code snippet runs as written (on the data root the tests use)."""

import re
from pathlib import Path

import jaxquant
from conftest import DATA_ROOT

README = Path(__file__).resolve().parents[1] / "README.md"


def test_research_code_snippet_runs():
    section = README.read_text().split("## In research code", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(snippet.replace('"../shared/data', f'"{DATA_ROOT}'), namespace)
    assert namespace["sr"].shape == (1, 128, 128, 3)
    fp = jaxquant.evaluate(namespace["model"], namespace["set5"])["Set5"]["psnr"]
    drop = fp - namespace["scores"]["Set5"]["psnr"]
    assert 0 < drop < 0.1, f"W4A4 after DOBI on the snippet's 4 noise patches: {drop:.3f} dB below FP"
