"""One module per ``sparse-dit`` subcommand."""
