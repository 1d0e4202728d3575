"""Offline tasks for real models (generated here, never downloaded)."""
