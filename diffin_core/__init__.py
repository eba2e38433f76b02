"""diffin: which training samples helped, hurt, or are mislabelled (Diff-In influence).

The engine. It imports no Streamlit; the app (app.py, pages/) and the CLI are views over it.

    from diffin_core import Recorder, Project, score, top_k
    with Recorder(project_dir, model, optimizer, train_size=len(train_set), every=50) as rec:
        ...  # call rec.step() after each optimizer.step()
    run = score(project_dir, "diffin")                 # runs/<run>/scores.parquet
    helpful, harmful = top_k(project_dir, run.name, [query_index], k=10)

Sign convention: influence(z, Q) = L_Q(theta_T without z) - L_Q(theta_T); > 0 helpful.
"""
from diffin_core.errors import DiffinError
from diffin_core.engine import threads as _threads

# Before torch loads: OpenMP's passive wait and a thread count that fits this machine's CPUs and
# load (engine/threads.py; children inherit it). A bad DIFFIN_THREADS is reported by the CLI, skipped here.
_threads.configure(strict=False)

# The rest loads on first use (PEP 562), so `diffin` starts without importing torch and a
# Ctrl-C during that import reaches the CLI's handler (one line, exit 130).
_LAZY = {"Recorder": "project.checkpoints", "DiffinCallback": "project.hf", "METHODS": "methods",
         "ScoreSettings": "methods", "Project": "project.folder", "query_influence": "run.scoring",
         "score": "run.scoring", "top_k": "run.scoring", "load_tokenizer": "project.text",
         "train_tokenizer": "project.text"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Recorder", "DiffinCallback", "DiffinError", "METHODS", "ScoreSettings", "Project", "score", "top_k", "query_influence",
           "load_tokenizer", "train_tokenizer"]
__version__ = "0.1.0"
