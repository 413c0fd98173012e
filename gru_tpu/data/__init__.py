"""Data sources and pipelines (no model code)."""
