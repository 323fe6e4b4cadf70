"""Bridges to other libraries' formats and pipelines (diffusers)."""
