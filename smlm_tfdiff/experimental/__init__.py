"""Options that were measured and did not pay off; kept for reproducing the measurements in docs/."""
