"""The specification's import path: ``transformers.flash_mode`` is an alias of ``flashfn.flash_mode``.

Each check runs in a fresh interpreter, so that what is imported at start-up
(and what is not: torch) is observed, not inherited from the test process.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALIAS_DIR = ROOT / "flashfn" / "_alias"


def python(code: str, *, pythonpath: list | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


SPEC_IMPORTS = (
    "import flashfn_alias, sys; assert 'torch' not in sys.modules; "
    "from transformers.flash_mode import FlashConfig, FlashModeCallback; "
    "from transformers.flash_mode.alas import ALASTracker; "
    "from transformers.flash_mode.sample_weighter import SampleWeighter; "
    "from transformers.flash_mode.gca import ConservativeGCA; "
    "import flashfn; assert FlashConfig is flashfn.FlashConfig"
)


def test_spec_import_paths_from_a_source_checkout(tmp_path) -> None:
    check(python(SPEC_IMPORTS, pythonpath=[ROOT, ALIAS_DIR], cwd=tmp_path))


def test_alias_modules_are_the_flashfn_modules(tmp_path) -> None:
    code = (
        "import flashfn_alias, sys, importlib\n"
        "import transformers.flash_mode as fm\n"
        "import flashfn.flash_mode as real\n"
        "assert fm is real, (fm, real)\n"
        "assert sys.modules['transformers.flash_mode'] is real\n"
        "for sub in ('alas', 'sample_weighter', 'gca', 'callback', 'config'):\n"
        "    a = importlib.import_module('transformers.flash_mode.' + sub)\n"
        "    assert a is importlib.import_module('flashfn.flash_mode.' + sub), sub\n"
        "import flashfn\n"
        "from transformers.flash_mode.alas import ALASTracker\n"
        "from transformers.flash_mode.sample_weighter import SampleWeighter\n"
        "from transformers.flash_mode.gca import ConservativeGCA\n"
        "from transformers.flash_mode import FlashModeCallback\n"
        "assert ALASTracker is flashfn.ALASTracker and SampleWeighter is flashfn.SampleWeighter\n"
        "assert ConservativeGCA is flashfn.ConservativeGCA and FlashModeCallback is flashfn.FlashModeCallback\n"
        "from transformers import Trainer, TrainerCallback\n"  # the real transformers is untouched
        "assert issubclass(FlashModeCallback, TrainerCallback)\n"
        "try:\n"
        "    import transformers.flash_mode.no_such_module\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a missing submodule must not import')\n"
    )
    check(python(code, pythonpath=[ROOT, ALIAS_DIR], cwd=tmp_path))


def test_alias_finder_only_claims_its_own_names(tmp_path) -> None:
    code = (
        "import flashfn_alias, sys\n"
        "finder = next(f for f in sys.meta_path if isinstance(f, flashfn_alias.FlashModeAliasFinder))\n"
        "assert finder.find_spec('transformers') is None\n"
        "assert finder.find_spec('transformers.flash_modex') is None\n"
        "assert finder.find_spec('json') is None\n"
        "flashfn_alias.install()\n"
        "assert sum(isinstance(f, flashfn_alias.FlashModeAliasFinder) for f in sys.meta_path) == 1\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    check(python(code, pythonpath=[ROOT, ALIAS_DIR], cwd=tmp_path))


def _installed() -> bool:
    try:
        importlib.metadata.distribution("flashfn")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="flashfn is not installed as a distribution (pip install .)")
def test_installed_pth_makes_the_spec_import_work_without_pythonpath(tmp_path) -> None:
    files = [str(f) for f in (importlib.metadata.distribution("flashfn").files or [])]
    assert "flashfn_alias.pth" in files and "flashfn_alias.py" in files
    code = (
        "import sys; assert 'torch' not in sys.modules; "
        "from transformers.flash_mode import FlashConfig; "
        "import flashfn; assert FlashConfig is flashfn.FlashConfig"
    )
    check(python(code, pythonpath=None, cwd=tmp_path))
