"""tasks: what users do with scores.

Owns cleaning and coreset selections and what-if retraining (curate), linear datamodeling
(lds), comparisons between runs (compare), the training-set map (maps), the methods' plain-words
descriptions (methodinfo) and ground-truth retraining used by tests and benchmarks (truth).

May import: errors, engine, project, methods, run. Layer 5 of 7.
"""
