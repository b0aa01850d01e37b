"""Cohort data: file IO, the demo phantoms, ingestion, split, fingerprint, plan and invertible preprocessing."""
