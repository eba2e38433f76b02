"""diffin: find the training samples that helped, hurt, or are mislabelled; review; export.

    streamlit run app.py [-- --workspace DIR]      (or DIFFIN_WORKSPACE=DIR; default ./workspace)
"""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "pages"))
import _common as ui  # noqa: E402
from diffin_core import appstate  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

st.set_page_config(page_title="diffin", page_icon="🔎", layout="wide")
st.title("diffin: which training samples helped, hurt, or carry the wrong label?")
st.markdown(
    "Bring a PyTorch classifier's **checkpoints** and **data**. diffin scores every training "
    "sample's influence on the query loss (Diff-In: positive = helpful, negative = harmful) and "
    "how likely its label is wrong, lets you **review** the suspects one click at a time, and "
    "**exports** a cleaned split. Pages: Setup → Score → Explore → Review → Export.")

ws = ui.workspace()
st.caption(f"Workspace: `{ws}` (set with `DIFFIN_WORKSPACE` or `streamlit run app.py -- --workspace DIR`)")

left, right = st.columns(2)
with left:
    st.subheader("Open a project")
    projects = appstate.list_projects(ws)
    if projects:
        names = [p.name for p in projects]
        current = Path(st.session_state.get("project_dir", "")).name
        choice = st.selectbox("Project folder", names, key="home_project",
                              index=names.index(current) if current in names else 0)
        if st.button("Open", key="home_open", type="primary"):
            ui.set_project(ws / choice)
    else:
        st.write("No projects in the workspace yet.")
    st.page_link("pages/1_Setup.py", label="…or set up a new project from uploads", icon="📤")
with right:
    st.subheader("Try the sample project")
    st.write("MNIST, 4,000 training digits with 10% of labels flipped on purpose, and a small CNN "
             "with 12 SGD checkpoints (MNIST: LeCun, Cortes & Burges).")
    if st.button("Try the sample project", key="home_sample", type="primary"):
        try:
            ui.set_project(appstate.copy_sample(ws))
        except DiffinError as e:
            st.error(str(e))

if st.session_state.get("project_dir"):
    try:
        project = ui.open_project(st.session_state["project_dir"])
    except DiffinError as e:
        st.error(str(e))
    else:
        st.divider()
        st.subheader(f"Open: {project.name}")
        problems = project.validate()
        for p in problems:
            st.error(p)
        if not problems:
            runs = project.runs()
            c = st.columns(4)
            c[0].metric("Training samples", f"{len(project.train):,}")
            c[1].metric("Query samples", f"{len(project.query):,}")
            c[2].metric("Checkpoints", len(project.manifest.checkpoints))
            c[3].metric("Finished runs", len(runs))
            st.page_link("pages/2_Score.py", label="Next: score it", icon="⚡")
