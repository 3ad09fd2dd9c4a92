"""One module per smcp command."""
