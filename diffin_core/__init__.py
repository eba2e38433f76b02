"""diffin: which training samples helped, hurt, or are mislabelled (Diff-In influence).

The engine. It imports no Streamlit; the app (app.py, pages/) and the CLI are views over it.

    from diffin_core import Recorder, Project, score, top_k
    with Recorder(project_dir, model, optimizer, train_size=len(train_set), every=50) as rec:
        ...  # call rec.step() after each optimizer.step()
    run = score(project_dir, "diffin")                 # runs/<run>/scores.parquet
    helpful, harmful = top_k(project_dir, run.name, [query_index], k=10)

Sign convention: influence(z, Q) = L_Q(theta_T without z) - L_Q(theta_T); > 0 helpful.
"""
from .checkpoints import Recorder
from .errors import DiffinError
from .methods import METHODS, ScoreSettings
from .project import Project
from .scoring import query_influence, score, top_k

__all__ = ["Recorder", "DiffinError", "METHODS", "ScoreSettings", "Project", "score", "top_k", "query_influence"]
__version__ = "0.1.0"
