"""Protection methods: one module each, one line each in ``METHODS``."""

from fluxguard.methods.base import MethodResult, Mode, ProtectionMethod
from fluxguard.registry import Registry

METHODS: Registry[type[ProtectionMethod]] = Registry(
    "method",
    {
        "pgd": "fluxguard.methods.pgd:PGD",
    },
)

__all__ = ["METHODS", "MethodResult", "Mode", "ProtectionMethod"]
