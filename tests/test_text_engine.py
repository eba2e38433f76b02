"""The engine's derivatives on a transformers text model called with packed (B, C, L) batches
(docs/text.md): per-sample gradients, jvps and HVPs agree with each other and with plain
autograd on the model's own keyword call; a text project scores end to end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffin_core.engine.functional import FunctionalModel
from diffin_core.engine.textmodel import adapt


def tiny_bert(seed=0, vocab=40, L=12):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=L, num_labels=3)
    return BertForSequenceClassification(cfg).double()


def batch(n=5, L=12, vocab=40, pair=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    ids = torch.randint(5, vocab, (n, L), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask                                      # pad id 0 after each text
    chans = [ids, mask] + ([(torch.arange(L)[None] >= lengths[:, None] // 2).long() * mask] if pair else [])
    x = torch.stack(chans, 1).double()
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("pair", [False, True])
def test_packed_call_equals_the_keyword_call(pair):
    plain = tiny_bert().eval()
    model = adapt(tiny_bert()).eval()
    x, _ = batch(pair=pair)
    kw = {"input_ids": x[:, 0].long(), "attention_mask": x[:, 1].long()}
    if pair:
        kw["token_type_ids"] = x[:, 2].long()
    with torch.no_grad():
        want = plain(**kw).logits                          # transformers' default attention (sdpa)
        got = model(x)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_gradients_hvps_and_jvps_on_a_transformer():
    model = adapt(tiny_bert())
    fm = FunctionalModel(model)
    theta = fm.theta_of(model)
    x, y = batch()
    # the batch gradient against plain autograd on the keyword call
    ref = tiny_bert().eval()
    loss = F.cross_entropy(ref(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()).logits, y)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for p in ref.parameters()])])
    g = fm.batch_grad(theta, x, y)
    torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-11)
    ps = fm.per_sample_grads(theta, x, y)                 # vmap over a padded batch
    torch.testing.assert_close(ps.mean(0), g, rtol=1e-8, atol=1e-11)
    for i in range(len(y)):                               # each row is that sample's own gradient
        torch.testing.assert_close(ps[i], fm.batch_grad(theta, x[i:i + 1], y[i:i + 1]), rtol=1e-8, atol=1e-11)
    v = torch.randn(fm.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fm.directional(theta, x, y, v), ps @ v, rtol=1e-8, atol=1e-11)
    hv = fm.hvp_exact(theta, x, y, v)
    hv_fd = fm.hvp_fd(theta, x, y, v, eps=1e-6)
    assert torch.linalg.vector_norm(hv - hv_fd) / torch.linalg.vector_norm(hv) < 1e-4
    # the token ids are never differentiated: the embedding rows of absent tokens get nothing
    emb = fm.names.index("bert.embeddings.word_embeddings.weight")
    a = sum(fm.sizes[:emb])
    rows = ps[:, a:a + fm.sizes[emb]].reshape(len(y), 40, 16)
    for i in range(len(y)):
        present = set(x[i, 0].long().tolist())
        absent = [t for t in range(40) if t not in present]
        assert rows[i, absent].abs().max() == 0



MODEL_PY = '''
from pathlib import Path
import torch
from transformers import BertConfig, BertForSequenceClassification
from diffin_core import load_tokenizer

def build():
    torch.manual_seed(0)
    tok = load_tokenizer(Path(__file__).parent)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=24, num_labels=2)
    return BertForSequenceClassification(cfg)
'''


@pytest.mark.slow
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_a_text_project_scores_end_to_end(tmp_path, pair):
    """diffin.toml kind = "text" + a transformers model.py + a Recorder run -> `diffin score`
    writes scores for every training row; the tokenizer is trained once, on the train split.
    With text_pair_column (NLI-style pairs) the model gets token_type_ids, and `diffin clean`
    writes both texts back."""
    from diffin_core.cli import main
    from diffin_core.project.checkpoints import Recorder
    from diffin_core.project.folder import Project
    from diffin_core.tasks.text_truth import sms_frame
    df = sms_frame().iloc[:60].copy()
    if pair:
        df["second"] = [f"reply {i}: " + t[::-1][:20] for i, t in enumerate(df["text"])]
    proj = tmp_path / "sms"
    (proj / "data").mkdir(parents=True)
    df.iloc[:40].to_csv(proj / "data/train.csv", index=False)
    df.iloc[40:].to_csv(proj / "data/query.csv", index=False)
    (proj / "model.py").write_text(MODEL_PY)
    (proj / "diffin.toml").write_text('[model]\nfactory = "model.py:build"\n[data]\nkind = "text"\n'
                                      'train = "data/train.csv"\nquery = "data/query.csv"\ntext_column = "text"\n'
                                      'max_length = 24\ntruncation = true\nvocab_size = 200\n'
                                      + ('text_pair_column = "second"\n' if pair else ""))
    p = Project(proj)
    assert p.train.x.shape[1] == (3 if pair else 2)
    if pair:
        assert p.train.text_pairs([1]) == [df["second"][1]] and p.train.x[:, 2].max() == 1
    assert p.num_classes == 2 and p.train.classes == ["ham", "spam"] and (proj / "tokenizer/tokenizer.json").is_file()
    model = p.build_model()
    model.train()
    x, y = torch.as_tensor(p.train.x), torch.as_tensor(p.train.y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(proj, model, opt, train_size=40, every=3) as rec:
        for start in list(range(0, 40, 8)) * 2:
            idx = np.arange(start, start + 8)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.step(batch_ids=idx)
    main(["score", str(proj), "--method", "diffin", "--method", "tracin"])
    for run in ("diffin", "tracin"):
        scores = Project(proj).scores(next(r.name for r in Project(proj).runs() if r.method == run))
        assert len(scores) == 40 and np.isfinite(scores["influence"]).all()
        assert scores["influence"].abs().max() > 0
    if pair:
        import pandas as pd
        out = tmp_path / "clean.csv"
        main(["clean", str(proj), "--run", "tracin-1", "--fraction", "0.1", "--out", str(out)])
        got = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert list(got.columns) == ["label", "text", "second"] and len(got) == 36
        src = df.iloc[:40].astype(str).set_index("text")
        assert all(src.loc[t, "second"] == s for t, s in zip(got["text"], got["second"]))


def test_a_users_hf_tokenizer_folder_and_a_from_pretrained_model(tmp_path):
    """A project with its own Hugging Face tokenizer folder (saved by save_pretrained; kept as
    is, never retrained) and a model.py that loads a model folder inside the project with
    from_pretrained(local_files_only=True): the stored ids are the tokenizer's own, and the
    model is called with them."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from diffin_core.project.folder import Project
    from diffin_core.tasks.text_truth import sms_frame
    proj = tmp_path / "own"
    (proj / "data").mkdir(parents=True)
    df = sms_frame().iloc[:30]
    words = sorted({w for t in df["text"] for w in t.lower().split() if w.isalpha()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.save_pretrained(proj / "tokenizer")
    before = {p.name: p.read_bytes() for p in (proj / "tokenizer").iterdir()}
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=32, num_labels=2)).save_pretrained(proj / "hf_model")
    df.iloc[:20].to_csv(proj / "data/train.csv", index=False)
    df.iloc[20:].to_csv(proj / "data/query.csv", index=False)
    (proj / "model.py").write_text(
        "from pathlib import Path\nfrom transformers import AutoModelForSequenceClassification\n\n\ndef build():\n"
        "    return AutoModelForSequenceClassification.from_pretrained(Path(__file__).parent / 'hf_model', "
        "local_files_only=True)\n")
    (proj / "diffin.toml").write_text('[model]\nfactory = "model.py:build"\n[data]\nkind = "text"\n'
                                      'train = "data/train.csv"\nquery = "data/query.csv"\ntext_column = "text"\n'
                                      'max_length = 32\ntruncation = true\n')
    p = Project(proj)
    for i in (0, 7, 19):
        enc = tok(df["text"][i], truncation=True, max_length=32)["input_ids"]
        assert p.train.x[i, 0, :len(enc)].astype(int).tolist() == enc and p.train.x[i, 1].sum() == len(enc)
    assert {f.name: f.read_bytes() for f in (proj / "tokenizer").iterdir()} == before
    model = p.build_model()
    assert type(model).__name__ == "BertForSequenceClassification"
    x = torch.as_tensor(p.train.x[:3])
    want = model(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long())
    assert torch.allclose(model(x), want.logits if hasattr(want, "logits") else want)
