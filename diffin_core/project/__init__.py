"""project: the project-folder contract a user's work lives in.

Owns diffin.toml (folder.Project), checkpoints and their manifest (checkpoints.Recorder, which
training scripts call), the data splits and their on-disk sources, the score store, the named
resumable stages, atomic file writes, the project's [train] recipe and the bundled sample project.

May import: diffin_core.errors and diffin_core.engine. Layer 2 of 7.
"""
