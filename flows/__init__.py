"""Prefect flows: optimize (the whole pipeline), promote, serve (schedules)."""
