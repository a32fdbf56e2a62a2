"""Prefect tasks: one module per pipeline step, each a thin wrapper over an ssdopt function."""
