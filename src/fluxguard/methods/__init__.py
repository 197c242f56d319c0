"""Protection methods: one module each, registered here by name (imported lazily)."""

from fluxguard.registry import Registry

METHODS: Registry = Registry("method", {
    "fluxguard": "fluxguard.methods.fluxguard:FluxGuard",
})
