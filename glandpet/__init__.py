"""glandpet: dual-tracer PSMA/FAPI PET/CT quantification of the salivary and lacrimal glands."""

__version__ = "0.1.0"
