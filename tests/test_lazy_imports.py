"""`import accelengine` stays light: optional heavy packages are imported only when used."""

from __future__ import annotations

import subprocess
import sys


def test_import_accelengine_imports_no_optional_package():
    code = (
        "import sys, accelengine, accelengine.callbacks, accelengine.report, accelengine.cli; "
        "print(sorted(m for m in ('tensorboard', 'matplotlib', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
