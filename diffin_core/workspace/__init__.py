"""workspace: what the app and the CLI use around a project.

Owns review decisions (sqlite3 log), saved selections, exports of cleaned splits, uploads and
safe zip extraction, running user code in a child process, background jobs and the app's
workspace state. Imports no Streamlit.

May import: every other diffin_core package. Layer 6 of 7 (only cli.py sits above it).
"""
