"""Localization: detection and sub-pixel fitting in KDEs (detection), scoring against the truth (metrics)."""
