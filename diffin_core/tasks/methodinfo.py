"""What a method's numbers mean, for people: a plain description and whether its influence is
*calibrated* (a change of the mean query loss in nats you can add up) or a *ranking only*.

The claim rests on benchmarks/results/deletion.csv (MNIST CNN, 3 seeds): remove the k most
harmful training samples, retrain, and compare the predicted change of the mean query loss (the
sum of their influence) with the actual one. tests/test_methodinfo.py re-reads that file and
checks every calibrated method stays within 2x of the actual change and every other one does not.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

# A calibrated method's predicted/actual ratio stays in [1/CAL_RATIO, CAL_RATIO] at every k.
CAL_RATIO = 2.0


@dataclass(frozen=True)
class MethodInfo:
    name: str
    calibrated: bool
    evidence: str   # the measured figure behind ``calibrated`` (or why there is none)
    summary: str = ""  # a plain sentence for methods whose docstring is missing or formula-only

    @property
    def scale(self) -> str:
        return "calibrated: Δ query loss (nats)" if self.calibrated else "ranking only"


_NOT_MEASURED = "not in the deletion benchmark: use its order, not its size"
_NO_INFLUENCE = "scores labels only (label_issue); its influence column carries no loss change"

INFO = {i.name: i for i in [
    MethodInfo("diffin", True, "deletion benchmark: predicted/actual query-loss change 1.08-1.37 "
               "(k = 1, 5, 10% removed; e.g. -0.131 predicted vs -0.121 actual at 5%)",
               "Diff-In (arXiv 2508.14648): sums the change of the influence over the training "
               "steps, each step to second order, by carrying the query gradient back through "
               "every saved checkpoint with Hessian-vector products (Lanczos); a sample's "
               "influence estimates how the final mean query loss would change without it. Its "
               "label_issue is the sample's estimated leave-one-out loss (its loss plus its Diff-In "
               "self-influence, nats) for the model at the saved checkpoint with the lowest query "
               "loss: a memorised wrong label has a low loss but a high leave-one-out loss."),
    MethodInfo("diffin-paper", False, _NOT_MEASURED,
               "Diff-In as written in the paper: one random batch per checkpoint and a finite-"
               "difference Hessian-vector product along the query direction; cheaper, noisier."),
    MethodInfo("influence-function", False, "deletion benchmark: predicted/actual 4.5-5.5x "
               "(overstates the loss change; the order is useful)",
               "Classic influence function at the final checkpoint: the query gradient times the "
               "damped inverse Hessian (explicit for small models, conjugate gradients otherwise) "
               "times the sample's gradient; ignores the training trajectory."),
    MethodInfo("tracin", False, "deletion benchmark: predicted/actual 63-80x (an unscaled sum of "
               "gradient dot products)"),
    MethodInfo("tracin-adam", False, _NOT_MEASURED),
    MethodInfo("grad-dot", False, "deletion benchmark: predicted/actual about 11,500x"),
    MethodInfo("grad-cos", False, "a cosine in [-1, 1], not a loss change"),
]}
for _name in ("loss", "margin", "cleanlab", "cleanlab-cv", "mean-loss", "aum", "forgetting"):
    INFO[_name] = MethodInfo(_name, False, _NO_INFLUENCE)


def info(name: str) -> MethodInfo:
    """The entry for ``name``; a method not listed is a ranking only."""
    return INFO.get(name) or MethodInfo(name, False, _NOT_MEASURED)


def description(name: str, cls=None) -> str:
    """The full description: the plain summary and then the class docstring, on one line."""
    if cls is None:
        from diffin_core.methods import METHODS
        cls = METHODS.get(name)
    doc = " ".join((getattr(cls, "__doc__", None) or "").split())
    parts = [p for p in (info(name).summary, doc) if p]
    return " ".join(parts) or "(no description)"


def describe_all(width: int = 100) -> str:
    """Every method, its scale and its full description (the text of ``diffin methods``)."""
    from diffin_core.methods import METHODS
    out = []
    for name, cls in METHODS.items():
        i = info(name)
        out.append(f"{name}  [{i.scale}]")
        for text in (description(name, cls), f"scale: {i.evidence}"):
            out += textwrap.wrap(text, width, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False, break_long_words=False)
    return "\n".join(out)


# --- a run's settings, for people: only those the method reads ------------------------------------
GENERAL = ("batch_size", "memory_budget")  # every method chunks the training set
SETTINGS_USED = {
    "diffin": ("hessian_batch", "lanczos_steps", "hvp", "eps", "seed"),
    "diffin-paper": ("paper_batch", "lanczos_steps", "eps", "seed"),
    "influence-function": ("damping", "explicit_max_params", "cg_iters"),
    "cleanlab-cv": ("seed",),
    **{m: () for m in ("tracin", "tracin-adam", "grad-dot", "grad-cos", "loss", "margin", "cleanlab",
                       "mean-loss", "aum", "forgetting")},
}
LABELS = {"batch_size": "batch", "memory_budget": "memory budget", "hessian_batch": "Hessian batch",
          "lanczos_steps": "Lanczos steps", "hvp": "HVP", "eps": "eps", "seed": "seed",
          "paper_batch": "batch B", "damping": "damping", "explicit_max_params": "explicit Hessian up to",
          "cg_iters": "CG iterations"}
_HVP = {"fd": "finite differences", "exact": "exact (forward-over-reverse)",
        "auto": "auto (exact where finite differences are not accurate enough)"}


def settings_text(method: str, settings: dict) -> str:
    """The settings a run of ``method`` used, readable: "batch 256 · Hessian batch 256 · ...".
    Unknown methods show every setting; the device is not a setting here."""
    used = SETTINGS_USED.get(method)
    keys = [k for k in settings if k != "device"] if used is None else [*GENERAL, *used]
    parts = []
    for k in keys:
        if k not in settings or settings[k] is None or (k == "memory_budget" and not settings[k]):
            continue                     # an auto memory budget (0) is no choice: not shown
        v = settings[k]
        if k == "hvp":
            v = _HVP.get(v, v)
        elif k == "explicit_max_params":
            v = f"{v:,} params"
        elif k == "memory_budget":
            v = f"{v / 2**30:.3g} GiB" if isinstance(v, (int, float)) and v > 0 else "auto" if not v else v
        elif isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        parts.append(f"{LABELS.get(k, k.replace('_', ' '))} {v}")
    return " · ".join(parts) or "defaults"
