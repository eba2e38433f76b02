"""Streamlit glue shared by app.py and the pages: the job manager, the open project, errors.

Not a page (Streamlit only turns pages/*.py into pages). Everything heavy lives in diffin_core.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import streamlit as st

from diffin_core.workspace import appstate
from diffin_core.errors import DiffinError
from diffin_core.workspace.jobs import JobManager
from diffin_core.project.folder import Project


# The app's pages in sidebar order (app.py hands them to st.navigation). Icons are Streamlit's
# material icons: emoji render as empty boxes in Chromium without an emoji font (Debian's).
PAGES = [("pages/home.py", "Home"), ("pages/1_Setup.py", "Setup"), ("pages/2_Score.py", "Score"),
         ("pages/3_Explore.py", "Explore"), ("pages/4_Review.py", "Review"), ("pages/5_Export.py", "Export"),
         ("pages/6_What-if.py", "What-if")]
ICONS = {"Home": ":material/home:", "Setup": ":material/upload_file:", "Score": ":material/bolt:",
         "Explore": ":material/explore:", "Review": ":material/fact_check:", "Export": ":material/download:",
         "What-if": ":material/science:"}
_TITLE = dict(PAGES)


def page_link(path: str, label: str) -> None:
    """A link to one of the app's pages, with that page's icon (none to a page the signed-in
    user's role may not open: the navigation does not list it)."""
    title = _TITLE.get(path, "")
    user = st.session_state.get("_user")
    if user is not None and title and not user.may_open(title):
        return
    st.page_link(path, label=label, icon=ICONS.get(title, ":material/arrow_forward:"))


# --- sign-in and roles (issue 20; diffin_core/workspace/accounts.py) ----------------------------
def _oidc_configured() -> bool:
    """Streamlit's own OIDC sign-in (st.login) is set up in .streamlit/secrets.toml's [auth]."""
    try:
        return "auth" in st.secrets
    except Exception:            # no secrets.toml at all
        return False


def _try_sign_in() -> None:
    from diffin_core.workspace.accounts import Accounts
    name = st.session_state.get("signin_name", "")
    user = Accounts(workspace()).verify(name, st.session_state.get("signin_password", ""))
    st.session_state["signin_password"] = ""
    if user is None:
        import time
        fails = st.session_state["signin_fails"] = st.session_state.get("signin_fails", 0) + 1
        time.sleep(min(fails, 5) * 0.4)          # slows guessing from one tab
        st.session_state["signin_error"] = "Wrong user name or password."
        return
    st.session_state.pop("signin_fails", None)
    st.session_state["auth_user"] = {"name": user.name, "source": "local"}


def _sign_out() -> None:
    was = st.session_state.pop("auth_user", None)
    st.session_state.pop("_user", None)
    if was and was.get("source") == "oidc":
        st.logout()


def _sign_in_form(oidc: bool) -> None:
    st.title("diffin: sign in")
    st.write("This diffin server has accounts: sign in to review. "
             "An admin adds accounts with `diffin users add NAME --role admin|reviewer`.")
    if oidc:
        st.button("Sign in with your identity provider", key="signin_oidc", on_click=st.login, type="primary")
    st.text_input("User name", key="signin_name")
    st.text_input("Password", type="password", key="signin_password")
    st.button("Sign in", key="signin", on_click=_try_sign_in, type="primary")
    if "signin_error" in st.session_state:
        st.error(st.session_state.pop("signin_error"))


def client_address() -> str | None:
    """The address this session's browser connects from; None from this machine (loopback) or
    where Streamlit does not say (its test harness answers with a mock, not an address)."""
    try:
        ip = st.context.ip_address
    except Exception:
        return None
    return ip if isinstance(ip, str) and ip else None


def signed_in():
    """The signed-in user (accounts.User); without one, draws the sign-in form and stops.

    No accounts and no OIDC on 127.0.0.1: the single unsigned user ($USER, admin), as before.
    Beyond 127.0.0.1 without either, the page says why it refuses to serve and stops."""
    from diffin_core.workspace import accounts
    acc = accounts.Accounts(workspace())
    try:
        has_accounts = acc.any()
    except DiffinError as e:
        st.error(e.brief())
        st.stop()
    oidc = _oidc_configured()
    auth = st.session_state.get("auth_user")
    user = None
    if auth and auth.get("source") == "local":
        found = acc.get(auth["name"])               # removed or role changed since: follow the file
        user = None if found is None else accounts.User(found.name, found.role, "local")
    elif oidc and getattr(st.user, "is_logged_in", False):
        name = str(st.user.get("email") or st.user.get("name") or "")
        listed = acc.get(name) if name else None
        user = accounts.User(name, listed.role if listed else "reviewer", "oidc") if name else None
        if user is not None:
            st.session_state["auth_user"] = {"name": name, "source": "oidc"}
    if user is None:
        st.session_state.pop("auth_user", None)
        if has_accounts or oidc:
            _sign_in_form(oidc)
            st.stop()
        try:
            accounts.check_serving(st.get_option("server.address"), workspace(),
                                   insecure_open="--insecure-open" in sys.argv[1:], client=client_address())
        except DiffinError as e:
            st.error(e.brief())
            st.stop()
        user = accounts.open_user()
    st.session_state["_user"] = user
    return user


def user_box(user) -> None:
    """Who is signed in, in the sidebar, with a sign-out button."""
    with st.sidebar:
        if user.source == "open":
            from diffin_core.workspace.accounts import is_local
            if is_local(st.get_option("server.address")):
                st.caption(f"Single user **{user.name}** (no accounts: local use only; "
                           "`diffin users add` turns on sign-in)")
            else:
                st.warning(f"No sign-in (--insecure-open): everyone who reaches this server acts as "
                           f"**{user.name}**, an admin.", icon=":material/lock_open:")
        else:
            st.caption(f"Signed in as **{user.name}** ({user.role})")
            st.button("Sign out", key="signout", on_click=_sign_out, icon=":material/logout:")


def current_user():
    """The user this script run signed in (signed_in() ran first: app.py or page())."""
    return st.session_state.get("_user") or signed_in()


def require(name: str):
    """Stop the page unless the signed-in user's role may open it; returns the user."""
    user = signed_in()
    if not user.may_open(name):
        st.error(f"{name} is for admins: you are signed in as {user.name} ({user.role}).")
        st.stop()
    return user


@st.cache_resource
def job_manager() -> JobManager:
    """The background workers shared by every session of this server: at most one job per project
    at a time, ``jobs.default_workers()`` in all, each job under its time limit (jobs.py)."""
    from diffin_core.workspace.jobs import default_workers
    try:
        workers = default_workers()
    except DiffinError as e:            # a bad DIFFIN_JOB_WORKERS: said on the page, nothing runs
        st.error(e.brief())
        st.stop()
    return JobManager(workers=workers)


def user_first() -> None:
    """Cancel this session's planning-ahead job (Explore) before a job the user asked for: a
    project runs one job at a time, so a queued top-k, rescore, per-checkpoint plot or map would
    otherwise wait behind up to ``features.AHEAD`` planned queries. Explore's grid queues planning
    ahead again once the user's job is done."""
    ahead = st.session_state.pop("explore_ahead_job", None)
    if ahead:
        job_manager().cancel(ahead)
        st.session_state.pop("explore_ahead_for", None)


def wait_for_job(job_id: str, text, fraction=None, on_end=None) -> None:
    """Redraw every second while the background job ``job_id`` is queued or running, then rerun the
    whole page (which draws the job's result). ``text(job) -> str`` says what is awaited: a
    caption, or a progress bar at ``fraction(job)`` when given (e.g. ``lambda j: j.fraction``);
    ``on_end(job)`` (job None when it is gone) runs once it has ended, before the rerun."""
    jm = job_manager()

    @st.fragment(run_every=1.0)
    def wait():
        job = jm.get(job_id)
        if job is None or job.status not in ("queued", "running"):
            if on_end is not None:
                on_end(job)
            st.rerun(scope="app")
        if fraction is None:
            st.caption(text(job))
        else:
            st.progress(fraction(job), text=text(job))
    wait()


def workspace() -> Path:
    if "workspace" not in st.session_state:
        st.session_state["workspace"] = str(appstate.workspace_dir(sys.argv[1:]))
        from diffin_core.project.atomic import clean_staging
        clean_staging(st.session_state["workspace"])   # uploads a crash left half-done (dead pids only)
    return Path(st.session_state["workspace"])


@st.cache_resource(max_entries=8)
def _project(path: str, stamp: float) -> Project:
    return Project(path)


def open_project(path: str | Path) -> Project:
    """A cached Project (reopened when diffin.toml or the manifest changes)."""
    p = Path(path)
    stamp = sum(f.stat().st_mtime for f in (p / "diffin.toml", p / "checkpoints" / "manifest.json") if f.exists())
    return _project(str(p.resolve()), stamp)


def set_project(path: str | Path) -> None:
    st.session_state["project_dir"] = str(Path(path).resolve())
    st.query_params["project"] = str(Path(path).resolve())
    appstate.remember(workspace(), path)


def current_project() -> Project | None:
    """The project this session opened (session state, else ?project=); shows why when none."""
    path = (st.session_state.get("project_dir") or st.query_params.get("project")
            or appstate.last_project(workspace()))
    if not path:
        st.info("No project is open. Open one (or the sample project) on the Home page.")
        page_link("pages/home.py", "Go to Home")
        return None
    try:
        project = open_project(path)
    except DiffinError as e:
        st.error(e.brief())
        return None
    st.session_state["project_dir"] = str(project.root)
    st.query_params["project"] = str(project.root)
    return project


def page(name: str, icon: str = "", heading: str | None = None) -> Project:
    """Every page's head: config, title, and the open project (the script stops when none)."""
    st.set_page_config(page_title=f"diffin · {name}", page_icon=ICONS.get(name, ":material/search:"), layout="wide")
    require(name)
    st.title(heading or name)
    project = current_project()
    if project is None:
        st.stop()
    try:        # a split that does not load (e.g. a text column under kind = "tabular"): one line, no traceback
        project.train, project.query
    except DiffinError as e:
        st.error(e.brief())
        page_link("pages/home.py", "Go to Home")
        st.stop()
    return project


def chosen_run(project: Project, key: str, label: str = "Run") -> str:
    """The run picker, defaulting to the run in the URL (?run=), else the preferred run (a diffin
    run first); the choice is written back to the URL, so a reload keeps it. Stops when none."""
    default = st.query_params.get("run") if key not in st.session_state else None
    names = [r.name for r in project.runs()]
    run = run_picker(project, key=key, label=label,
                     default=default if default in names else appstate.preferred_run(project.runs()))
    if run is None:
        st.stop()
    if st.query_params.get("run") != run:
        st.query_params["run"] = run
    return run


@st.cache_data(max_entries=16, show_spinner=False)
def _scores(path: str, run: str, stamp: float):
    return open_project(path).scores(run)


def scores(project: Project, run: str):
    """A run's scores table (cached until the run is rewritten)."""
    f = project.run(run).path / "scores.parquet"
    return _scores(str(project.root), run, f.stat().st_mtime)


def run_picker(project: Project, key: str, label: str = "Run", default: str | None = None) -> str | None:
    runs = project.runs()
    if not runs:
        st.info("No finished runs yet: score the project on the Score page first.")
        page_link("pages/2_Score.py", "Go to Score")
        return None
    names = [r.name for r in runs]
    index = names.index(default) if default in names else 0
    return st.selectbox(label, names, index=index, key=key,
                        format_func=lambda n: f"{n} ({project.run(n).method})")


def image(x: np.ndarray) -> np.ndarray:
    """A (C, H, W) float sample as an HxW or HxWx3 uint8 picture."""
    x = np.asarray(x, dtype=np.float32)
    x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    return np.clip((x - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)


def label_name(project: Project, y) -> str:
    names = project.label_names or (project.train.classes if project.kind == "text" else None)
    y = int(y)
    return names[y] if names and 0 <= y < len(names) else str(y)


@st.cache_data(max_entries=32, show_spinner="Loading the project (its model.py runs in a separate process)…")
def _problems(root: str, stamp: tuple) -> list[str]:
    from diffin_core.workspace.usercode import check_project
    return check_project(root, brief=True)            # file names without the server's folders


def project_problems(project: Project) -> list[str]:
    """``project.validate()`` run in a child process (user code cannot hang or crash the
    server), cached until diffin.toml, the model, the manifest or the data files change."""
    files = [project.config_path, project.manifest_path,
             *(project.root / v for k, v in project.config["model"].items() if k in ("factory", "program")
               for v in [v.split(":")[0]]),
             *(project.root / project.config["data"][k] for k in ("train", "query"))]
    stamp = tuple(f.stat().st_mtime if f.exists() else None for f in files)
    return _problems(str(project.root), stamp)


@st.cache_resource(show_spinner=False)
def _autoscore(workspace: str, methods: str) -> list[str]:
    """Once per server and workspace: copy the sample project and queue its scoring."""
    dest = appstate.copy_sample(workspace)
    jm = job_manager()
    ids = []
    if "diffin" in methods.split(",") and appstate.install_prebuilt(dest):
        # the shipped diffin run is on Home at once; the job checks it (checksum, a few rows
        # recomputed), rescoring on a mismatch, then builds its feature store (run/prebuilt.py)
        ids.append(jm.submit_child("score", "diffin_core.run.prebuilt:verify_then_rescore", (str(dest),),
                                   label="diffin (checking the shipped run)", project_dir=dest))
    done = {r.method for r in Project(dest).runs()}
    return ids + [jm.submit_child("score", "diffin_core.run.scoring:score", (str(dest), m), label=m, project_dir=dest)
                  for m in dict.fromkeys(methods.split(",")) if m and m not in done]


def autoscore() -> None:
    """With ``DIFFIN_AUTOSCORE="diffin,tracin,loss"`` (scripts/run.sh sets it) the server copies
    the sample project into the workspace and scores it in the background job while it already
    serves; methods with a finished run are skipped."""
    methods = os.environ.get("DIFFIN_AUTOSCORE", "").replace(" ", "")
    if methods:
        try:
            _autoscore(str(workspace()), methods)
        except DiffinError as e:
            st.error(e.brief())


def next_steps(project: Project, runs) -> None:
    """Home's "what now": score it when there is no run yet, else explore and review."""
    from diffin_core.workspace.jobs import display_order
    active = display_order([j for j in job_manager().active(project.root) if j.kind == "score"])
    shipped_note(project, runs)
    if active:
        st.info("Scoring in the background: " + "; ".join(job_line(project, j, runs) for j in active)
                + ". The pages fill in as runs finish.", icon=":material/hourglass_top:")
        page_link("pages/2_Score.py", "Watch it on the Score page")
        if not runs:
            return
    if not runs:
        page_link("pages/2_Score.py", "Next: score it")
        return
    page_link("pages/3_Explore.py", "Next: explore the scores")
    page_link("pages/4_Review.py", "Next: review the suspects")
    page_link("pages/2_Score.py", "Score with another method")


def _estimates(runs) -> dict:
    """Seconds each background step took where the shipped run was built (run/prebuilt.py)."""
    for r in runs:
        est = (r.meta.get("prebuilt") or {}).get("estimates_s")
        if est:
            return est
    return {}


def job_line(project: Project, job, runs) -> str:
    """'tracin (running: scoring training samples, 1,024/4,000, about 40 s left)' or
    'loss (queued, about 5 s on a quiet 2-core CPU)'."""
    if job.status == "running":
        parts = [job.message] if job.message else []
        if job.total and job.done:
            parts.append(f"{job.done:,}/{job.total:,}")
        if job.eta_s is not None:
            parts.append(f"about {fmt_seconds(job.eta_s)} left")
        if job.message.startswith("features"):
            parts.insert(0, "scores published; building the feature store for Explore's fast top-k")
        return f"{job.label} (running{': ' + ', '.join(parts) if parts else ''})"
    est = _estimates(runs)
    key = "check" if "shipped" in job.label else job.label
    hint = f", about {fmt_seconds(est[key])} where the sample was built" if key in est else ""
    return f"{job.label} ({job.status}{hint})"


def shipped_note(project: Project, runs) -> None:
    """Home/Score: a shipped (prebuilt) run says what it is and where its check stands."""
    from diffin_core.run import prebuilt
    for r in runs:
        state = prebuilt.status(r.meta)
        if state is None:
            continue
        rec = r.meta["prebuilt"]
        if state == "unverified":
            st.info(f"`{r.name}` was shipped with diffin, scored where the sample was built, so you can explore "
                    f"and review at once. The background job checks it now: a checksum of the model, "
                    f"checkpoints and data it was scored on, then {prebuilt.SPOT_ROWS} rows recomputed here "
                    f"and compared; a mismatch rescores the project. Its feature store (Explore's fast "
                    f"top-k) is built after the check; until then top-k takes the exact path.",
                    icon=":material/verified_user:")
        elif state == "verified":
            errs = rec.get("max_rel_error") or {}
            st.caption(f"`{r.name}` was shipped with diffin and verified here: inputs' checksum equal, "
                       f"{len(rec.get('rows', []))} rows recomputed (largest difference "
                       f"{max(errs.values()) if errs else 0:.1g} of a column's RMS) in {fmt_seconds(rec.get('check_s'))}.")
        elif state == "failed":
            st.warning(f"`{r.name}` (shipped with diffin) failed its check here: {rec.get('reason', '?')}. "
                       "The background job rescores the project.", icon=":material/sync_problem:")


def job_ids() -> list[str]:
    raw = st.query_params.get("jobs", "")
    return [j for j in raw.split(",") if j]


def add_job_ids(ids: list[str]) -> None:
    st.query_params["jobs"] = ",".join(dict.fromkeys(job_ids() + ids))


def fmt_seconds(s: float | None) -> str:
    """A duration for people: 0.4 s, 12 s, 3 min 05 s, 1 h 02 min."""
    if s is None:
        return "?"
    if s < 10:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@st.cache_resource(max_entries=8)
def review_log(root: str):
    """One ReviewLog (SQLite connection, thread-safe) per project folder, shared by sessions."""
    from diffin_core.workspace.review import ReviewLog
    return ReviewLog(root)


@st.cache_resource(max_entries=8, show_spinner=False)
def positions(root: str, stamp: float) -> dict:
    """sample_id -> row of the training split (shared, never mutated: no per-call copy)."""
    ids = open_project(root).train.ids
    return {int(s): i for i, s in enumerate(ids)}


def row_of(project: Project, sample_id: int) -> int:
    return positions(str(project.root), (project.root / "diffin.toml").stat().st_mtime)[int(sample_id)]


def show_sample(project: Project, sample_id: int, width: int = 160) -> None:
    """The picture of an image sample, the whole text of a text sample, or its feature row."""
    if project.kind == "text":
        from _common import text_views
        text_views.show_text(text_views.texts(project.train, [row_of(project, sample_id)])[0])
        return
    x = project.train.x[row_of(project, sample_id)]
    if project.kind == "image":
        st.image(image(x), width=width)
    else:
        st.dataframe(np.asarray(x).reshape(1, -1), hide_index=True)


def selected_ids(event) -> list[int]:
    """Sample ids of a plotly selection event; customdata comes back as a list or a {"0": id} dict."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(event, "selection", None), "points", None) or []
    out = []
    for p in points:
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, dict):
            cd = cd.get("0", next(iter(cd.values()), None))
        elif isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        if cd is not None:
            out.append(int(cd))
    return out


def sample_grid(project: Project, table, columns: int = 8, score_col: str = "influence") -> None:
    """Image grid (or rows for tabular data) with label, score and prediction under each sample."""
    if table is None or len(table) == 0:
        st.write("Nothing to show.")
        return
    if project.kind == "text":         # text cards: truncated text with expand, label, pred, score
        from _common import text_views
        text_views.text_grid(project, table, [row_of(project, s) for s in table["sample_id"]], score_col, label_name)
        return
    if project.kind != "image":
        st.dataframe(table, hide_index=True)
        return
    x = project.train.x
    for start in range(0, len(table), columns):
        cols = st.columns(columns)
        for col, (_, r) in zip(cols, table.iloc[start:start + columns].iterrows()):
            sid = int(r["sample_id"])
            with col:
                st.image(image(x[row_of(project, sid)]), width="stretch")
                true = (f" (true {label_name(project, r['true_label'])})"      # when the data knows it
                        if "true_label" in r and r["true_label"] == r["true_label"] else "")
                approx = "≈" if "exact" in r and not r["exact"] else ""      # a value not the exact path's
                st.caption(f"#{sid} · label {label_name(project, r['label'])}{true} · pred {label_name(project, r['pred'])}"
                           f" · {score_col} {approx}{r[score_col]:+.3g}")


def save_selection(project: Project, ids: list[int], source: str, key: str = "selection",
                   announce: bool = True) -> str | None:
    """A name box and a Save button that keep ``ids`` as a named selection in the project
    (selections.json), for What-if and for after a reload; returns the stored name when saved.
    ``announce=False``: the caller says it was saved (one message, not two)."""
    from diffin_core.workspace import selections
    c = st.columns([3, 1])
    name = c[0].text_input("Save this selection as", key=f"{key}_name", placeholder="e.g. odd cluster of 7s",
                           label_visibility="collapsed")
    if c[1].button(f"Save selection ({len(ids):,})", key=f"{key}_save", icon=":material/bookmark_add:"):
        try:
            stored = selections.save(project.root, name, ids, source)
        except DiffinError as e:
            st.error(e.brief())
        else:
            if announce:
                st.success(f"Saved {len(set(ids)):,} samples as “{stored}”: the What-if page can remove them.")
            return stored
    return None


def pick_selection(project: Project, key: str) -> list[int]:
    """A picker over the project's named selections; says how to make one when there is none."""
    from diffin_core.workspace import selections
    try:
        saved = selections.load(project.root)
    except DiffinError as e:
        st.error(e.brief())
        return []
    if not saved:
        st.info("No saved selections yet. On the Explore page, open the map, draw a lasso around "
                "samples, name the selection and press Save selection.")
        page_link("pages/3_Explore.py", "Go to Explore")
        return []
    name = st.selectbox("Selection", list(saved), key=key,
                        format_func=lambda n: f"{n} ({len(saved[n]['ids']):,} samples"
                                              + (f", {saved[n]['source']}" if saved[n]["source"] else "") + ")")
    return list(saved[name]["ids"])
