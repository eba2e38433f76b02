"""How many threads torch may use here, and OpenMP's wait policy: set once per process, early.

Why. torch's default is one intra-op thread per core with OpenMP's *active* wait: idle threads
spin at 100% CPU between parallel regions. On a machine doing other things (a laptop with a
browser, a shared workstation, a CI runner, the app's own server) every parallel region then
waits for its slowest thread, which the kernel has descheduled, and the spinning threads steal
the CPU the others need. Measured on a 2-core machine at load average 8-13 (issue 19): the
sample project took > 17 min with the default, 554 s with one thread.

The rule (``choose``, a pure function of the CPUs, the load and the environment):
  1. ``--threads N`` (CLI) or ``DIFFIN_THREADS=N``: N (``auto`` or empty: the rule below);
  2. ``OMP_NUM_THREADS`` set by the user (not by diffin): that many;
  3. auto: the CPUs this process may use (``os.sched_getaffinity``, capped by a cgroup CPU
     quota) minus the 1-minute load average, rounded, at least 1 and at most the CPUs.
The wait policy is ``OMP_WAIT_POLICY=PASSIVE`` unless the user set one. Both go into
``os.environ`` before torch loads (OpenMP reads them when its library is loaded), so every child
process (usercode's spawned children, Ray workers, DataLoader workers, benchmark pools) inherits
the policy; a child recomputes the automatic thread count from its own load (diffin marks the
``OMP_NUM_THREADS`` it wrote with ``DIFFIN_THREADS_AUTO``, so a child does not take it for the
user's). When torch is already imported, ``torch.set_num_threads`` is called as well.

``configure`` runs when ``diffin_core`` is imported; ``record()`` is what meta.json stores. During a
long walk ``adapt`` follows the load (an automatic count only), between row ranges.
"""
from __future__ import annotations

import math
import os
import sys

ENV = "DIFFIN_THREADS"
MARK = "DIFFIN_THREADS_AUTO"      # the OMP_NUM_THREADS value diffin itself wrote (not the user's)

_record: dict | None = None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup's quota (cpu.max or cfs_quota_us / cfs_period_us), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
        return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 or p <= 0 else q / p
    except (OSError, ValueError):
        return None


def current_load() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def _positive_int(value, what: str) -> int:
    from diffin_core.errors import DiffinError
    try:
        n = int(str(value).strip())
    except ValueError:
        raise DiffinError(f"{what} must be a whole number of threads or 'auto', not {value!r}") from None
    if n < 1:
        raise DiffinError(f"{what} must be at least 1, not {n}")
    return n


def auto_threads(cpus: int, load: float) -> int:
    """The automatic count: the CPUs left over by the current load, rounded, in [1, cpus]."""
    return int(max(1, min(cpus, math.floor(cpus - max(load, 0.0) + 0.5))))


def choose(cpus: int, load: float, env: dict, requested=None, strict: bool = True) -> tuple[int, str]:
    """(threads, source) by the module's rule. ``env``: the environment (a mapping);
    ``requested``: ``--threads`` (int, 'auto' or None). Source: '--threads', 'DIFFIN_THREADS',
    'OMP_NUM_THREADS' or 'auto'. A bad value raises DiffinError (``strict``) or is skipped."""
    from diffin_core.errors import DiffinError
    for value, source in ((requested, "--threads"), (env.get(ENV), ENV)):
        if value is not None and str(value).strip().lower() not in ("", "auto"):
            try:
                return _positive_int(value, source), source
            except DiffinError:
                if strict:
                    raise
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp and omp != env.get(MARK, "").strip():
        try:
            return max(1, int(omp.split(",")[0])), "OMP_NUM_THREADS"
        except ValueError:
            pass                                   # not a number: OpenMP ignores it too
    return auto_threads(cpus, load), "auto"


def configure(requested=None, environ=None, strict: bool = True) -> dict:
    """Decide and apply the thread count and the wait policy for this process (and, through
    the environment, its children). Returns the record meta.json stores."""
    global _record
    env = os.environ if environ is None else environ
    cpus, load = usable_cpus(), current_load()
    n, source = choose(cpus, load, env, requested, strict)
    if requested is not None and source == "--threads":
        env[ENV] = str(n)                          # children follow an explicit choice
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if source != "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = str(n)
        env["MKL_NUM_THREADS"] = str(n)
        if source == "auto":
            env[MARK] = str(n)                     # a child recomputes its own count
        else:
            env.pop(MARK, None)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        try:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        except RuntimeError:
            pass
    _record = {"threads": n, "source": source, "cpus": cpus, "load_1min": round(load, 2),
               "omp_wait_policy": env.get("OMP_WAIT_POLICY")}
    return dict(_record)


def readjusted(cpus: int, load: float, own: int) -> int:
    """The automatic count during a run: the load average counts this process's own ``own``
    busy threads, so the CPUs the others leave are cpus - (load - own)."""
    return auto_threads(cpus, load - own)


def adapt() -> int | None:
    """Between row ranges of a long walk: follow the machine's load when the count is automatic
    (others started or stopped work since the process began). Returns the new count when it
    changed, else None. Explicit choices (--threads, DIFFIN_THREADS, OMP_NUM_THREADS) stay."""
    global _record
    torch = sys.modules.get("torch")
    if _record is None or _record.get("source") != "auto" or torch is None:
        return None
    own = int(torch.get_num_threads())
    n = readjusted(_record["cpus"], current_load(), own)
    if n == own:
        return None
    torch.set_num_threads(n)
    _record = {**_record, "threads": n, "readjusted": int(_record.get("readjusted", 0)) + 1}
    return n


def record() -> dict:
    """This process's setting (meta.json "threads"): torch's actual count when it is loaded."""
    rec = dict(_record) if _record is not None else configure()
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        rec["torch_threads"] = int(torch.get_num_threads())
    return rec


def report() -> dict:
    """The setting as a child process sees it (tests call this through usercode.run)."""
    import torch
    return {**record(), "torch_threads": int(torch.get_num_threads()),
            "env_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
