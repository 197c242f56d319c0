"""Protection methods, loaded lazily by name."""

from fluxguard.registry import Registry

METHODS: Registry = Registry(
    "method",
    {
        "wdp": "fluxguard.methods.wdp:WDP",
    },
)
