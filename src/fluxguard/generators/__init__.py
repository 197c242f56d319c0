"""Generator backends (latent generative models a method edits through), registered by name (imported lazily)."""

from fluxguard.registry import Registry

GENERATORS: Registry = Registry(
    "generator",
    {
        "flux": "fluxguard.generators.flux:FluxBackend",
        "sd": "fluxguard.generators.sd:SDBackend",
    },
)
