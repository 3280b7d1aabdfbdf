"""One module per CLI command; each defines `register(subparsers)`. Imports of torch stay inside the
command functions so that usage errors answer instantly."""
