"""Bad input: a one-line error naming the file and the problem, exit status 2, nothing on disk changed."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from diffin_core.cli import main

from helpers import make_tiny_project, tree_digest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("bad") / "proj")


@pytest.fixture
def proj(pristine, tmp_path):
    dest = tmp_path / "proj"
    shutil.copytree(pristine, dest)
    return dest


def break_toml_missing(p):
    t = (p / "diffin.toml").read_text().replace('query = "data/query.npz"\n', "")
    (p / "diffin.toml").write_text(t)
    return "diffin.toml", r"missing key 'query' in \[data\]"


def break_toml_misspelt(p):
    t = (p / "diffin.toml").read_text().replace("train = ", "trian = ")
    (p / "diffin.toml").write_text(t)
    return "diffin.toml", r"unknown key 'trian' in \[data\]; did you mean 'train'"


def break_checkpoint_shape(p):
    from safetensors.torch import load_file, save_file
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    f = p / "checkpoints" / m["checkpoints"][3]["file"]
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.zeros(5, 5)
    save_file(state, str(f))
    return f.name, r"tensors don't fit the model: .* has shape \[5, 5\]"


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def break_pickled_code(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload()}, p / "checkpoints/evil.pt")
    m["checkpoints"][2]["file"] = "evil.pt"
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "evil.pt", r"pickled code"


def break_manifest_lr(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    del m["checkpoints"][1]["lr"]
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "manifest.json", r"checkpoint 1 .* has no 'lr'"


def break_manifest_step(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    del m["checkpoints"][0]["step"]
    (p / "checkpoints/manifest.json").write_text(json.dumps(m))
    return "manifest.json", r"checkpoint 0 .* has no 'step'"


def break_labels(p):
    d = dict(np.load(p / "data/train.npz"))
    d["y"][5] = 7
    np.savez(p / "data/train.npz", **d)
    return "train.npz", r"label 7 is out of range: the model has 3 classes"


def break_nan(p):
    d = dict(np.load(p / "data/train.npz"))
    d["x"][10, 2] = np.nan
    np.savez(p / "data/train.npz", **d)
    return "train.npz", r"NaN or infinite values \(first at row 10\)"


def break_empty_query(p):
    np.savez(p / "data/query.npz", x=np.zeros((0, 6), np.float32), y=np.zeros(0, np.int64))
    return "query.npz", r"no samples"


def break_truncated_checkpoint(p):
    m = json.loads((p / "checkpoints/manifest.json").read_text())
    f = p / "checkpoints" / m["checkpoints"][-1]["file"]
    f.write_bytes(f.read_bytes()[:100])
    return f.name, r"corrupt or truncated"


def break_shapes(p):
    d = dict(np.load(p / "data/query.npz"))
    d["x"] = d["x"][:, :4]
    np.savez(p / "data/query.npz", **d)
    return "query.npz", r"query samples have shape \[4\] but train samples have \[6\]"


def break_model_input(p):
    (p / "model.py").write_text("from diffin_core.models import MLP\n\n\ndef build():\n    return MLP(5, (8,), 3)\n")
    return "train.npz", r"the model can't take samples of shape \[6\]"


def break_model_raises(p):
    (p / "model.py").write_text("def build():\n    raise ValueError('no GPU here')\n")
    return "model.py", r"build\(\) raised ValueError: no GPU here"


CASES = [break_toml_missing, break_toml_misspelt, break_checkpoint_shape, break_pickled_code,
         break_manifest_lr, break_manifest_step, break_labels, break_nan, break_empty_query,
         break_truncated_checkpoint, break_shapes, break_model_input, break_model_raises]


@pytest.mark.parametrize("breaker", CASES, ids=[c.__name__[6:] for c in CASES])
def test_one_line_error_naming_the_file_and_nothing_changes(proj, breaker, capsys):
    fname, pattern = breaker(proj)
    before = tree_digest(proj)
    with pytest.raises(SystemExit) as ex:
        main(["score", str(proj), "--method", "tracin"])
    assert ex.value.code == 2
    err = capsys.readouterr()
    lines = [ln for ln in err.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err.err
    assert "Traceback" not in err.err and "pickled code ran" not in err.out
    assert fname in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert tree_digest(proj) == before
    assert not (proj / "runs").exists()


def test_top_with_out_of_range_query_index(proj, capsys):
    main(["score", str(proj), "--method", "grad-dot", "--run", "g"])
    with pytest.raises(SystemExit) as ex:
        main(["top", str(proj), "--run", "g", "--query-index", "999"])
    assert ex.value.code == 2
    assert "query index out of range" in capsys.readouterr().err


def test_unknown_method_and_missing_project(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path), "--method", "tracin"])
    assert "diffin.toml" in capsys.readouterr().err
