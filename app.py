"""diffin: find the training samples that helped, hurt, or are mislabelled; review; export.

    streamlit run app.py [-- --workspace DIR]      (or DIFFIN_WORKSPACE=DIR; default ./workspace)

The entry point: it names the pages (st.navigation, so the sidebar says "Home", not "app")
and runs the chosen one. The pages live in pages/; Home is pages/home.py.
"""
import sys
from pathlib import Path

import diffin_core  # noqa: F401  first: OpenMP's passive wait and the thread count (threads.py)
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "pages"))
import _common as ui  # noqa: E402

st.set_page_config(page_title="diffin", page_icon=ui.ICONS["Home"], layout="wide")
user = ui.signed_in()   # the sign-in form (and a stop) when the workspace has accounts (issue 20)
ui.user_box(user)
ui.autoscore()  # DIFFIN_AUTOSCORE (scripts/run.sh): score the sample project in the background
pages = [st.Page(path, title=title, icon=ui.ICONS[title], default=(title == "Home"))
         for path, title in ui.PAGES if user.may_open(title)]   # a reviewer's sidebar has no Setup
st.navigation(pages).run()
