"""smcp_core: the SMCP pruning library (no CLI concerns: no typer, no rich)."""

__version__ = "0.1.0"
