"""Protection methods: one module each, one line each in ``METHODS`` (loaded lazily by name)."""

from fluxguard.methods.base import MethodResult, Mode, ProtectionMethod
from fluxguard.registry import Registry

METHODS: Registry[type[ProtectionMethod]] = Registry(
    "method",
    {
        "fluxguard": "fluxguard.methods.fluxguard:FluxGuard",
        "pgd": "fluxguard.methods.pgd:PGD",
        "wdp": "fluxguard.methods.wdp:WDP",
    },
)

__all__ = ["METHODS", "MethodResult", "Mode", "ProtectionMethod"]
