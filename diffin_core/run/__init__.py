"""run: scoring a project end to end.

Owns the scoring context built from a project (context), a method's run written to
runs/<run>/ (scoring: scores.parquet, meta.json, top-k), the feature store that answers new
queries (features) and sharding a run over Ray (distributed).

May import: errors, engine, project, methods. Layer 4 of 7.
"""
