"""smcp command line (typer + rich). The library lives in smcp_core."""
