"""Integrations of SCOPE with other training engines (each optional)."""
