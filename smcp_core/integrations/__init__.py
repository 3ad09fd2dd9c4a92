"""Optional framework glue: :mod:`smcp_core.integrations.lightning` (extra ``lightning``)."""
