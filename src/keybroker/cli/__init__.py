"""Command lines. They parse arguments and call the SDK or the server; nothing more."""
