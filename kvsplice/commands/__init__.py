"""One module per CLI verb (see kvsplice/cli.py)."""
