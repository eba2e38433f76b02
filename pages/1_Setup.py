"""Set up a project from uploads: model, checkpoints, train and query data."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as ui  # noqa: E402
from diffin_core.workspace import appstate
from diffin_core.workspace import uploads
from diffin_core.workspace import usercode  # noqa: E402
from diffin_core.errors import DiffinError  # noqa: E402

st.set_page_config(page_title="diffin · Setup", page_icon=":material/upload_file:", layout="wide")
ui.require("Setup")         # uploads run the uploader's model.py on this server: admins only
st.title("Set up a project from uploads")
st.write("Each file is checked as it arrives and written straight into the project folder; "
         "a file that fails its check is not kept.")

ws = ui.workspace()
name = st.text_input("Project folder name (inside the workspace)", value="my-project", key="setup_name")
try:
    folder = ws / appstate.safe_name(name)
except DiffinError as e:
    st.error(e.brief())
    st.stop()
st.caption(f"Project folder: `{folder}`")

messages = st.session_state.setdefault("setup_messages", {})
SPECS = [("modules", "Optional, before model.py: other Python files model.py imports (.py files, or one .zip "
                     "of them with package folders)", True),
         ("model", "Model: model.py (with build()) or model.pt2 (torch.export)", False),
         ("checkpoint", "Checkpoints: several .safetensors / .pt / .pth files, or one .zip", True),
         ("train", "Train data: .npz, .csv, .parquet, or an ImageFolder .zip (class_name/file.png); text: .csv, "
                   ".tsv, .jsonl or .parquet with a text column and a 'label' column", False),
         ("query", "Query data (the samples whose loss influence is measured): same formats", False),
         ("tokenizer", "Text data only: a tokenizer (a .zip of a Hugging Face tokenizer folder, or its "
                       "tokenizer.json; or the folder itself, below). Without one, diffin trains a WordPiece "
                       "tokenizer on the train texts.", False)]

for role, label, multiple in SPECS:
    # no type= filter: the engine checks the kind itself and says what is wrong in one line
    got = st.file_uploader(label, accept_multiple_files=multiple, key=f"setup_{role}")
    files = got if multiple else [got] if got is not None else []
    for f in files:
        token = f"{folder}|{role}|{getattr(f, 'file_id', '')}|{f.name}|{f.size}"
        if token not in messages:
            try:
                messages[token] = ("ok", usercode.store_upload(folder, role, f.name, f))  # model code: a child
            except DiffinError as e:
                messages[token] = ("error", e.brief())
        kind, text = messages[token]
        (st.success if kind == "ok" else st.error)(text, icon=":material/check_circle:" if kind == "ok" else ":material/warning:")

# a tokenizer folder as it is on disk: every file of the chosen folder, stored together
got = st.file_uploader("…or the tokenizer's folder itself (a Hugging Face tokenizer folder: tokenizer.json, "
                       "tokenizer_config.json, vocab.txt…)", accept_multiple_files="directory", key="setup_tokenizer_dir")
if got:
    token = f"{folder}|tokenizer_dir|" + "|".join(f"{getattr(f, 'file_id', '')}:{f.name}:{f.size}" for f in got)
    if token not in messages:
        try:
            messages[token] = ("ok", uploads.store_tokenizer_folder(folder, [(f.name, f) for f in got]))
        except DiffinError as e:
            messages[token] = ("error", e.brief())
    kind, text = messages[token]
    (st.success if kind == "ok" else st.error)(text, icon=":material/check_circle:" if kind == "ok" else ":material/warning:")

st.subheader("Checkpoint steps and learning rates")
table = uploads.checkpoint_table(folder)
if table.empty:
    st.write("No checkpoints yet.")
    edited = table
else:
    st.caption("Read from each checkpoint when it has them; fill in or correct the empty cells.")
    edited = st.data_editor(table, key=f"setup_table_{'|'.join(table['file'])}", num_rows="fixed",
                            disabled=["file"], hide_index=True)

draft = uploads.read_draft(folder)
shape = None
if draft.get("train_info", {}).get("kind") == "tabular":
    raw = st.text_input("Image shape C,H,W (leave empty for tabular data)", value="", key="setup_image_shape")
    if raw.strip():
        try:
            shape = [int(s) for s in raw.replace("x", ",").split(",")]
        except ValueError:
            st.error(f"image shape {raw!r}: write three whole numbers like 1,28,28")

max_length = 128
if draft.get("train_info", {}).get("kind") == "text":
    max_length = int(st.number_input("Tokens per text (max_length; longer texts are cut and counted)", 8, 4096, 128,
                                     key="setup_max_length"))
missing = uploads.missing_parts(folder)
if missing:
    st.info(f"Still needed: {', '.join(missing)}.")
if st.button("Create project", key="setup_finish", type="primary", disabled=bool(missing)):
    problems = usercode.finish(folder, edited, image_shape=shape, max_length=max_length,   # builds the model in a child
                               brief=True)                                          # no server folders
    for p in problems:
        st.error(p)
    if not problems:
        ui.set_project(folder)
        st.success(f"Project ready and opened: {folder.name}")
        ui.page_link("pages/2_Score.py", "Next: score it")
