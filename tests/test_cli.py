"""The command-line plumbing every script shares: an expected error or a warning is one line on stderr."""

import subprocess
import sys
import textwrap

import pytest

from test_convert import REPO, assert_one_line_error, run_script


def test_errors_and_warnings_are_one_line_each():
    script = textwrap.dedent("""
        import warnings
        from jaxquant.cli import main_guard

        @main_guard
        def main(path):
            warnings.warn("dropped 1 of 2 images with an LR side under 32")
            open(path)

        main("/nonexistent/model.pth")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "warning: dropped 1 of 2 images with an LR side under 32",  # not the file, line and source that warned
        "error: [Errno 2] No such file or directory: '/nonexistent/model.pth'",  # any OSError, not a traceback
    ]


@pytest.mark.parametrize("script, name", [("scripts/export.py", "x.pth"), ("scripts/convert.py", "checkpoint")])
def test_an_output_under_a_file_is_refused_first(script, name, tmp_path):
    # Checked before the model is read (here it is missing), and named as it was given, not as orbax's temporary.
    (tmp_path / "afile").write_text("kept\n")
    out = tmp_path / "afile" / name
    result = run_script(script, str(tmp_path / "missing.pth"), "-o", str(out))
    assert_one_line_error(result, f"error: cannot write {out}: {tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "kept\n"
