"""Collection rules for the doctests of the package (pytest runs ``--doctest-modules`` on prunable/)."""

import importlib.util

# prunable.lightning imports Lightning, an optional extra: skip its doctests where it is not installed
collect_ignore = [] if importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning") else [
    "prunable/lightning.py"]
