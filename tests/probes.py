"""Run code in a fresh Python and see which modules it loaded: the tests that hold an
import off a path (no torch in the CLI's help, no Ray in the router...)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADED = "LOADED "  # the line a probe ends with: the top-level modules, as JSON


def run_probe(code: str, *argv: str, timeout: float = 120
              ) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`code` run by a new interpreter (this one's) in the repository, with `argv` as its
    sys.argv[1:]; the finished process, and the top-level modules it had loaded at the end
    (AssertionError, with its output, when it did not get there)."""
    script = (f"{code}\nimport json as _json, sys as _sys\n"
              f"print({LOADED!r} + _json.dumps(sorted({{m.split('.')[0] "
              f"for m in _sys.modules}})))\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    last = done.stdout.splitlines()[-1:]
    assert last and last[0].startswith(LOADED), done.stdout[-2000:] + done.stderr[-3000:]
    return done, set(json.loads(last[0][len(LOADED):]))


def loaded_after(code: str, *argv: str, timeout: float = 120) -> set[str]:
    """The top-level modules a fresh Python has loaded after running `code`."""
    return run_probe(code, *argv, timeout=timeout)[1]
