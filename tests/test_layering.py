"""docs/architecture.md dependency rules: core/, timesteps/, ema/, autoencoders/ are pure torch; callbacks hold no math."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_diffusion"
PURE = ("core", "timesteps", "ema", "autoencoders")
# What each pure folder may import from the package (core <- timesteps, ema); io.py is a
# stdlib-only leaf (atomic file writes) that every layer may use.
ALLOWED_INTERNAL = {"core": {"core", "io"}, "timesteps": {"core", "timesteps", "io"}, "ema": {"core", "ema", "io"},
                    "autoencoders": {"autoencoders", "io"}}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by a file; relative imports resolved against the package."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                names.append(".".join(base + ((node.module,) if node.module else ())))
            else:
                names.append(node.module or "")
    return [(n, 0) for n in names]


@pytest.mark.parametrize("folder", PURE)
def test_pure_folders_import_no_lightning(folder):
    files = sorted((PACKAGE / folder).glob("**/*.py"))
    if folder != "ema":  # ema/ arrives with the post-hoc EMA issue
        assert files, f"{folder}/ has no source files"
    for path in files:
        for name, _ in _imports(path):
            top = name.split(".")[0]
            assert top not in ("lightning", "pytorch_lightning", "lightning_fabric"), f"{path} imports {name}"
            if top == "lightning_diffusion":
                sub = name.split(".")[1] if "." in name else ""
                assert sub in ALLOWED_INTERNAL[folder], f"{path} imports {name}, against docs/architecture.md's arrows"


def test_io_is_a_stdlib_leaf():
    for name, _ in _imports(PACKAGE / "io.py"):
        assert name.split(".")[0] in ("__future__", "os", "re", "shutil", "pathlib", "typing"), f"io.py imports {name}"


def test_scanner_sees_relative_imports():
    # The rule must not pass vacuously: module.py imports lightning and relative core modules.
    names = [n for n, _ in _imports(PACKAGE / "module.py")]
    assert any(n.startswith("lightning") and not n.startswith("lightning_diffusion") for n in names)
    assert "lightning_diffusion.core.noise" in names
