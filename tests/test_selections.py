"""Named selections: saved in <project>/selections.json, replaced whole, survive a new process."""
from __future__ import annotations

import json
import threading

import pytest

from diffin_core.workspace import selections
from diffin_core.errors import DiffinError


def test_save_load_replace_delete(tmp_path):
    assert selections.load(tmp_path) == {}
    assert selections.save(tmp_path, "  odd   sevens ", [9, 3, 3, 5], "explore lasso") == "odd sevens"
    selections.save(tmp_path, "second", [1])
    got = selections.load(tmp_path)
    assert list(got) == ["second", "odd sevens"]  # newest first
    assert got["odd sevens"]["ids"] == [3, 5, 9] and got["odd sevens"]["source"] == "explore lasso"
    selections.save(tmp_path, "odd sevens", [1, 2])  # same name: replaced
    assert selections.load(tmp_path)["odd sevens"]["ids"] == [1, 2]
    assert selections.delete(tmp_path, "second") is True and selections.delete(tmp_path, "second") is False
    on_disk = json.loads((tmp_path / "selections.json").read_text())
    assert on_disk["version"] == 1 and list(on_disk["selections"]) == ["odd sevens"]
    assert not [p for p in tmp_path.iterdir() if p.name != "selections.json"]  # no temp files left


def test_bad_input_is_one_line_and_changes_nothing(tmp_path):
    selections.save(tmp_path, "keep", [1])
    before = (tmp_path / "selections.json").read_bytes()
    with pytest.raises(DiffinError, match="give the selection a name"):
        selections.save(tmp_path, "   ", [1])
    with pytest.raises(DiffinError, match="empty"):
        selections.save(tmp_path, "none", [])
    with pytest.raises(DiffinError, match="at most 60"):
        selections.save(tmp_path, "x" * 61, [1])
    assert (tmp_path / "selections.json").read_bytes() == before
    (tmp_path / "selections.json").write_text("{not json")
    with pytest.raises(DiffinError, match=r"selections.json: not a readable selections file"):
        selections.load(tmp_path)


def test_concurrent_saves_all_land(tmp_path):
    threads = [threading.Thread(target=selections.save, args=(tmp_path, f"s{i}", [i])) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(selections.load(tmp_path)) == sorted(f"s{i}" for i in range(20))
