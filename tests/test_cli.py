"""The command-line plumbing every script shares: an expected error or a warning is one line on stderr."""

import subprocess
import sys
import textwrap

from test_convert import REPO


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
