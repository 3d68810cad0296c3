"""Shared test fixtures (none yet: each test module builds what it needs)."""
