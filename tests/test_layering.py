"""The model library never imports Flower: every hiermodel module, and the CLI's parser, load without it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import hiermodel


def test_hiermodel_imports_no_flower() -> None:
    modules = [m.name for m in pkgutil.walk_packages(hiermodel.__path__, "hiermodel.")]
    code = (
        "import sys, importlib\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "import hiermodel.cli as cli; cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray', 'dp_accounting'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"hiermodel pulled in: {result.stdout.strip()[:200]}"
    assert "hiermodel.model" in modules and "hiermodel.data.uci_retail" in modules
