"""Makes ``transformers.flash_mode`` an alias of ``flashfn.flash_mode``.

Installed at the top of ``site-packages`` together with ``flashfn_alias.pth``,
whose one ``import`` line runs this module at interpreter start-up. It only
puts a finder on ``sys.meta_path``: nothing is imported (not torch, not
transformers, not flashfn) until a program imports ``transformers.flash_mode``
or one of its submodules, and the installed transformers is not modified.
"""

import importlib
import importlib.abc
import importlib.util
import sys

PREFIX = "transformers.flash_mode"
TARGET = "flashfn.flash_mode"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # the real module object is returned under the alias
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # already executed by create_module
        return None


class FlashModeAliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.flash_mode[.sub]`` as ``flashfn.flash_mode[.sub]``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PREFIX and not fullname.startswith(PREFIX + "."):
            return None
        real = TARGET + fullname[len(PREFIX):]
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real), is_package=fullname == PREFIX)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, FlashModeAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, FlashModeAliasFinder())


install()
