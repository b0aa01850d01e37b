"""Quality control proper: pGT inference per candidate, metrics, scoring, decisions, one-case check."""
