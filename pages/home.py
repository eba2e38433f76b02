"""Home: open a project or the sample project; what to do next."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.workspace import appstate  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

st.title("diffin: which training samples helped, hurt, or carry the wrong label?")
st.markdown(
    "Bring a PyTorch classifier's **checkpoints** and **data**. diffin scores every training "
    "sample's influence on the query loss (Diff-In: positive = helpful, negative = harmful) and "
    "how likely its label is wrong, lets you **review** the suspects one click at a time, and "
    "**exports** a cleaned split. Pages: Setup → Score → Explore → Review → Export.")

ws = ui.workspace()
st.caption(f"Workspace: `{ws}` (set with `DIFFIN_WORKSPACE` or `streamlit run app.py -- --workspace DIR`)")


def _open_sample() -> None:  # a callback: runs before the page draws, so the list below has it
    try:
        ui.set_project(appstate.copy_sample(ws))
        st.session_state.pop("home_project", None)  # the picker follows the opened project
    except DiffinError as e:
        st.session_state["home_error"] = e.brief()


def _open_text_sample() -> None:
    """The SMS spam sample: open it when built, else build it in the background job (a child
    process: it trains a small transformer with the Trainer, about a minute)."""
    if appstate.text_sample_ready(ws):
        ui.set_project(appstate.text_sample_dir(ws))
        st.session_state.pop("home_project", None)
        return
    st.session_state["home_text_job"] = ui.job_manager().submit_child(
        "build", "diffin_core.workspace.appstate:copy_text_sample", (str(ws),),
        label="build the SMS spam sample", project_dir=str(appstate.text_sample_dir(ws)))


def _open_chosen() -> None:
    ui.set_project(ws / st.session_state["home_project"])


left, right = st.columns(2)
with left:
    st.subheader("Open a project")
    projects = appstate.list_projects(ws)
    if projects:
        names = [p.name for p in projects]
        current = Path(st.session_state.get("project_dir", "")).name
        st.selectbox("Project folder", names, key="home_project",
                     index=names.index(current) if current in names else 0)
        st.button("Open", key="home_open", type="primary", on_click=_open_chosen)
    else:
        st.write("No projects in the workspace yet.")
    ui.page_link("pages/1_Setup.py", "…or set up a new project from uploads")
with right:
    st.subheader("Try the sample project")
    st.write("MNIST, 4,000 training digits with 10% of labels flipped on purpose, and a small CNN "
             "with 12 SGD checkpoints (MNIST: LeCun, Cortes & Burges).")
    st.button("Try the sample project", key="home_sample", type="primary", on_click=_open_sample)
    st.write("Text: 800 real SMS messages (ham or spam) with 10% of labels flipped, and a 2-layer "
             "transformer trained by the Hugging Face Trainer, recorded by `DiffinCallback` (SMS Spam "
             "Collection: Almeida, Gómez Hidalgo & Yamakami, 2011, CC BY 4.0).")
    st.button("Try the text sample (SMS spam)", key="home_text_sample", on_click=_open_text_sample,
              help="Built in the background the first time (tokenizer + a short training run, about a minute).")
    if "home_error" in st.session_state:
        st.error(st.session_state.pop("home_error"))
    if st.session_state.get("home_text_job"):
        def _text_built(job):
            st.session_state.pop("home_text_job", None)
            if job is not None and job.status == "failed":
                st.session_state["home_error"] = f"Building the text sample failed: {job.error}"
            elif appstate.text_sample_ready(ws):
                ui.set_project(appstate.text_sample_dir(ws))
                st.session_state.pop("home_project", None)
        ui.wait_for_job(st.session_state["home_text_job"],
                        lambda job: f"Building the SMS spam sample in the background: {job.status}"
                                    + (f" · {job.message}" if job.message else ""),
                        fraction=lambda job: job.fraction, on_end=_text_built)

opened = (st.session_state.get("project_dir") or st.query_params.get("project")
          or appstate.last_project(ws))  # the workspace's only project opens by itself
if opened:
    try:
        project = ui.open_project(opened)
    except DiffinError as e:
        st.error(e.brief())
    else:
        st.divider()
        st.subheader(f"Open: {project.name}")
        problems = ui.project_problems(project)
        for p in problems:
            st.error(p)
        if not problems:
            runs = project.runs()
            c = st.columns(4)
            c[0].metric("Training samples", f"{len(project.train):,}")
            c[1].metric("Query samples", f"{len(project.query):,}")
            c[2].metric("Checkpoints", len(project.manifest.checkpoints))
            c[3].metric("Finished runs", len(runs))
            ui.next_steps(project, runs)

me = ui.current_user()
if me.is_admin:                      # accounts (issue 20): the same as `diffin users ...` on the server
    from diffin_core.workspace.accounts import ROLES, Accounts
    acc = Accounts(ws)

    def _add_user() -> None:
        try:
            u = acc.add(st.session_state["users_new_name"], st.session_state["users_new_password"],
                        st.session_state["users_new_role"])
        except DiffinError as e:
            st.session_state["users_msg"] = ("error", e.brief())
        else:
            st.session_state["users_msg"] = ("success", f"Added {u.name} ({u.role}).")
            st.session_state["users_new_name"] = st.session_state["users_new_password"] = ""

    def _change(name: str, action: str) -> None:
        try:
            if name == me.name and me.source == "local":
                raise DiffinError("you cannot change or remove your own account while signed in with it")
            if action == "remove":
                acc.remove(name)
            else:
                acc.set_role(name, action)
        except DiffinError as e:
            st.session_state["users_msg"] = ("error", e.brief())
        else:
            st.session_state["users_msg"] = ("success", f"{name}: {'removed' if action == 'remove' else action}.")

    st.divider()
    with st.expander("Users (admins only)", expanded="users_msg" in st.session_state):
        users = acc.users()
        if not users:
            st.caption("No accounts yet: this app is single-user on 127.0.0.1. Adding one turns on sign-in for "
                       "everyone (docs/serving.md).")
        for u in users:
            c = st.columns([3, 2, 2])
            c[0].write(f"**{u.name}** ({u.role})")
            other = "reviewer" if u.role == "admin" else "admin"
            c[1].button(f"Make {other}", key=f"users_role_{u.name}", on_click=_change, args=(u.name, other))
            c[2].button("Remove", key=f"users_remove_{u.name}", on_click=_change, args=(u.name, "remove"))
        c = st.columns([3, 2, 3, 2])
        c[0].text_input("New user name", key="users_new_name")
        c[1].selectbox("Role", ROLES, index=1, key="users_new_role")
        c[2].text_input("Password (8+ characters)", type="password", key="users_new_password")
        c[3].button("Add user", key="users_add", on_click=_add_user)
        if "users_msg" in st.session_state:
            kind, text = st.session_state.pop("users_msg")
            (st.error if kind == "error" else st.success)(text)
