"""``python -m flashfn.bench``: the same as ``flashfn bench`` (see :mod:`flashfn.bench`)."""

from . import main

raise SystemExit(main())
