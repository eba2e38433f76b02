"""Which Hessian-vector product the engine uses: ``settings.hvp`` = "fd", "exact" or "auto".

fd     finite differences of gradients (paper Eq. 6): one extra batch gradient per product, step
       ||eps v|| = settings.eps, TF32 off.
exact  forward-over-reverse (torch.func.jvp of grad): about two batch gradients per product; a
       Lanczos view's products keep the batch's gradient graph instead (reverse-over-reverse,
       FunctionalModel.hvp_retained) where it fits the memory plan (``retains``): the forward and
       the first backward are then made once per view, not once per product.
auto   (the default) exact where finite differences are measured not to be accurate enough:
       - Adam's per-step replay (adam_batches.py): exact. Its directions are Adam-preconditioned
         (D = 1/(sqrt(v_hat)+eps) reaches 1e3 and more where v is small), and finite differences
         along them were measured 8.5% off (digits MLP, AdamW); the replay's Spearman against
         true leave-one-out at one checkpoint per epoch went 0.983 (fd) -> 0.989 (exact).
       - every Lanczos view (one per checkpoint): its first product is made both ways; when the
         finite difference misses the exact product by more than ``AUTO_TOL`` the view uses exact
         products, else finite differences (cheaper), the first one included. The measured error
         is recorded per checkpoint (meta.json "hvp" "views"). Once a view of the context has
         measured finite differences ``FAR_TOL`` or more off, the later views take exact products
         without a probe ("inherited" in the log): a ResNet-18 (ReLU kinks, 11.2M parameters)
         missed by 7-10x at every checkpoint, the same in float64 and with central differences at
         any step (docs/performance.md), and each probe cost a batch gradient and a finite
         difference (2.4 s there). Exact products are never the less accurate choice.
       - diffin's query plan after its label_issue plan at k* (label_issue.share_probes): the
         same batch at the same checkpoints 0..k*, so the decisions and errors of the label plan's
         probes are adopted the same way (within ``ADOPT_TOL``), each recorded with its error.
       - a query on a finished run (`diffin top`, Explore: ``adopt``): a checkpoint where the run
         measured finite differences within ``AUTO_TOL / 2`` takes them without a new probe (the
         probe's exact product cost about 4 gradients, a third of a new query's plan on the
         sample CNN); elsewhere it probes as above.
       - SGD's per-step replay (sgd_batches.py): probed the same way once per checkpoint interval:
         its directions are not preconditioned, and exact products cost several finite
         differences on a small batch.
       A model whose exact product fails (an op without forward-mode AD) falls back to finite
       differences, and that is recorded too.
What was used lands in meta.json ("hvp": summary()).
"""
from __future__ import annotations

import torch

AUTO_TOL = 0.01        # relative error of a finite-difference HVP above which auto takes exact ones
FAR_TOL = 10 * AUTO_TOL   # a view's error from which the context's later views take exact ones unprobed
MODES = ("auto", "exact", "fd")


def _log(ctx) -> list:
    log = getattr(ctx, "hvp_log", None)
    if log is None:
        log = []
        try:
            ctx.hvp_log = log
        except AttributeError:
            pass
    return log


def check_mode(mode: str) -> str:
    if mode not in MODES:
        from diffin_core.errors import DiffinError
        raise DiffinError(f"unknown HVP mode {mode!r}: choose auto, exact or fd")
    return mode


RETAINED_ACTIVATION = 3.0   # a kept gradient graph's bytes per batch row, in one sample's forward activations
                            # (measured 1.8 on a ResNet-18's 32-row batch: 329 MB, activations 5.7 MB a row)


def retains(ctx, fm, x) -> bool:
    """Whether a Lanczos view's exact products keep the batch's gradient graph (hvp_retained): its
    estimate (RETAINED_ACTIVATION x the batch's activations + 2 P) fits the room the walk's
    per-sample-gradient chunks take (ctx.memory; that room is idle while the plan is made), or a
    quarter of the default budget without a memory plan."""
    from diffin_core.engine.budget import activation_bytes, default_budget
    p_bytes = fm.num_params * torch.tensor([], dtype=x.dtype).element_size()
    try:
        need = RETAINED_ACTIVATION * activation_bytes(fm.model, x[:1]) * len(x) + 2 * p_bytes
    except Exception:                  # a model the forward probe cannot hook: the per-product path
        return False
    mem = getattr(ctx, "memory", None)
    room = mem.grad_chunk * mem.row_bytes_grad if mem is not None else default_budget(x.device) // 4
    return need <= room


def _far_off(ctx) -> int | None:
    """The checkpoint of a view of this context whose probe measured finite differences FAR_TOL
    or more off, or None."""
    for e in getattr(ctx, "hvp_log", None) or []:
        if e["where"] == "lanczos" and e.get("fd_error", 0.0) >= FAR_TOL:
            return int(e["checkpoint"])
    return None


def product(ctx, k: int, fm, theta, x, y, g0, where: str = "lanczos",
            state: dict | None = None):
    """hv(v) -> H v of the batch (x, y) at ``theta`` (fm: the model with checkpoint k's buffers);
    ``g0``: the batch gradient at theta (finite differences' base), or a function giving it
    (computed only when a finite difference is made). ``where``: "lanczos" (auto:
    probe the first product), "sgd" (SGD's replay: probed likewise, once per ``state``) or
    "adam" (auto: exact). ``state``: a dict shared by products that
    should follow one decision (Adam's replay: every step of a checkpoint's interval)."""
    mode = check_mode(getattr(ctx.settings, "hvp", "fd"))
    eps = ctx.settings.eps

    def fd(v):
        return fm.hvp_fd(theta, x, y, v, base_grad=g0() if callable(g0) else g0, eps=eps)

    kept: list = []                    # a Lanczos view's kept gradient graph (hvp_retained), or None

    def exact(v):
        if where == "lanczos":
            if not kept:
                kept.append(fm.hvp_retained(theta, x, y) if retains(ctx, fm, x) else None)
            if kept[0] is not None:
                try:
                    return kept[0](v)
                except (RuntimeError, NotImplementedError):     # no double backward: forward-over-reverse
                    kept[0] = None
        return fm.hvp_exact(theta, x, y, v)
    if mode == "fd":
        return fd
    if mode == "exact":
        return exact
    state = {} if state is None else state

    def auto(v):
        fn = state.get("fn")
        if fn is not None:
            return (exact if fn == "exact" else fd)(v)
        if where == "lanczos" and (getattr(ctx, "hvp_views", None) or {}).get(int(k)) == "fd":
            state["fn"] = "fd"                 # the run measured fd accurate here (adopt)
            entry = {"checkpoint": int(k), "where": where, "used": "fd", "adopted": True}
            err = (getattr(ctx, "hvp_view_errors", None) or {}).get(int(k))
            if err is not None:                # measured by this score's label_issue plan (label_issue.share_probes):
                entry["fd_error"] = err        # meta.json's views keep it for the run's queries
            _log(ctx).append(entry)
            return fd(v)
        far = _far_off(ctx) if where == "lanczos" else None
        if far is not None:
            try:
                e = exact(v)
            except (RuntimeError, NotImplementedError):
                e = None
            if e is not None:
                state["fn"] = "exact"
                _log(ctx).append({"checkpoint": int(k), "where": where, "used": "exact", "inherited": far})
                return e
        try:
            e = exact(v)
        except (RuntimeError, NotImplementedError) as err:
            state["fn"] = "fd"
            _log(ctx).append({"checkpoint": int(k), "where": where, "used": "fd",
                              "why": f"exact HVP failed ({str(err).splitlines()[0][:80] if str(err) else type(err).__name__})"})
            return fd(v)
        if where == "adam":
            state["fn"] = "exact"
            _log(ctx).append({"checkpoint": int(k), "where": where, "used": "exact"})
            return e
        f = fd(v)
        err = float(torch.linalg.vector_norm(f - e) / torch.linalg.vector_norm(e).clamp_min(1e-30))
        state["fn"] = "exact" if not err <= AUTO_TOL else "fd"
        if state["fn"] == "fd":
            kept[:] = [None]               # the probe's kept graph is not needed any more
        _log(ctx).append({"checkpoint": int(k), "where": where, "used": state["fn"],
                          "fd_error": round(err, 6)})
        return e if state["fn"] == "exact" else f
    return auto


ADOPT_TOL = AUTO_TOL / 2    # a run's measured fd error a query's plan trusts without probing again


def adopt(ctx, summary_dict: dict | None) -> None:
    """Let query plans on a finished run reuse its per-checkpoint decisions (``summary()["views"]``):
    finite differences without a probe where the run measured them within ADOPT_TOL; every other
    checkpoint probes. Runs scored before the decisions were recorded adopt nothing."""
    views = (summary_dict or {}).get("views") or {}
    if (summary_dict or {}).get("setting") != "auto":
        return
    ctx.hvp_views = {int(k): "fd" for k, rec in views.items()
                     if rec.get("used") == "fd" and rec.get("fd_error", 1.0) <= ADOPT_TOL}


def summary(ctx) -> dict:
    """meta.json "hvp": the setting and, for auto, where exact / finite-difference products were
    used and the largest finite-difference error measured."""
    mode = getattr(ctx.settings, "hvp", "fd")
    out: dict = {"setting": mode}
    log = getattr(ctx, "hvp_log", None) or []
    if log:
        errs = [e["fd_error"] for e in log if "fd_error" in e]
        views = [e for e in log if e["where"] == "lanczos"]
        out["lanczos_views"] = {"exact": sum(e["used"] == "exact" for e in views),
                                "fd": sum(e["used"] == "fd" for e in views)}
        per: dict = {}                     # per checkpoint: exact if any probe chose it, the largest error
        for e in views:
            if "fd_error" not in e:
                continue
            rec = per.setdefault(str(e["checkpoint"]), {"used": "fd", "fd_error": 0.0})
            rec["fd_error"] = max(rec["fd_error"], e["fd_error"])
            if e["used"] == "exact":
                rec["used"] = "exact"
        if per:
            out["views"] = per
        if errs:
            out["fd_error_max"] = max(errs)
        for name in ("adam", "sgd"):
            used = [e for e in log if e["where"] == name]
            if used:
                out[f"{name}_replay"] = "exact" if all(e["used"] == "exact" for e in used) else "fd"
        sizes = {str(e["checkpoint"]): e["products"] for e in log if e["where"] == "view"}
        if sizes:                          # the Hessian-vector products each plan view took
            out["view_products"] = sizes
        why = [e["why"] for e in log if "why" in e]
        if why:
            out["fallback"] = why[0]
    return out


def text(summary_dict: dict | None) -> str:
    """One short line for people: 'HVP auto: exact in 3 of 10 views (fd error up to 2.1%)'."""
    if not summary_dict:
        return ""
    mode = summary_dict.get("setting", "fd")
    parts = [f"HVP {mode}"]
    views = summary_dict.get("lanczos_views")
    if views and (views["exact"] or views["fd"]):
        parts.append(f"exact in {views['exact']} of {views['exact'] + views['fd']} views")
    if "fd_error_max" in summary_dict:
        parts.append(f"fd error up to {100 * summary_dict['fd_error_max']:.2g}%")
    for name in ("adam", "sgd"):
        if f"{name}_replay" in summary_dict:
            parts.append(f"{name.upper() if name == 'sgd' else 'Adam'} replay {summary_dict[f'{name}_replay']}")
    if "fallback" in summary_dict:
        parts.append(summary_dict["fallback"])
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")
