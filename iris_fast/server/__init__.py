"""The iris-fast server: worker engine, HTTP endpoints, process entry point."""
