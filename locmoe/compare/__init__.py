"""The experiment runner: side-by-side runs of every router, the paper's claims (design §6), the
compute–quality frontier and the report."""
