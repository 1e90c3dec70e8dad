"""Runnable demos behind ``fesmia-hooks demo``; each imports its framework only when run."""
