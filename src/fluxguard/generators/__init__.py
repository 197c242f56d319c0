"""Generative backends (diffusion models), loaded lazily by name."""

from fluxguard.registry import Registry

GENERATORS: Registry = Registry(
    "generator",
    {
        "sd": "fluxguard.generators.sd:SDBackend",
    },
)
