"""``from iris_client import IrisClient``: the seed's client import, kept working unchanged.

The seed's acceptance scripts import the client under this top-level name; the library lives in
``iris_fast.client`` and this module only re-exports it (the same names, declared there once).
"""

from iris_fast.client import *  # noqa: F403
from iris_fast.client import __all__  # noqa: F401
