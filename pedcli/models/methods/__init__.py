"""Method registry: importing this package imports every method module, each registering itself."""

import importlib
import pkgutil

from pedcli.models.methods.base import (
    DataInfo,
    Method,
    Stage,
    TrainConfig,
    create_method,
    index_features,
    list_methods,
    method_class,
    register_method,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "DataInfo",
    "Method",
    "Stage",
    "TrainConfig",
    "create_method",
    "index_features",
    "list_methods",
    "method_class",
    "register_method",
]
