"""Decoder families, one file each (see ``base``). Importing the package registers every family in it."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
