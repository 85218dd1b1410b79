"""The experiment runner: side-by-side runs of every router, the SPEC §8 claims and the report."""
