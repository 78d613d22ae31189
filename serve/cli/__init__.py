"""The `crosstask` command line: one module per command, `main` joins them."""
