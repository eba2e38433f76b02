"""Which tokens of one training text push its loss up or down: gradient x input on the word
embeddings, at the final checkpoint, for the sample's given label (eval mode).

    s_t = < dL/de_t , e_t >      e_t = the word embedding of token t (the embedding layer's output)

is the first-order estimate of how much the loss of the given label would fall if token t's
embedding were zeroed: s_t > 0 the token raises the loss (it speaks against the given label),
s_t < 0 it lowers it (it supports the label). It is a local, first-order attribution of the
final model's loss, not an influence of training data and not a causal effect of deleting the
word; position and segment embeddings are not attributed. The text is re-tokenised with the
project's tokenizer (a fast one, for character offsets) and must give the very ids that were
scored, else nothing is highlighted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffin_core.errors import DiffinError


def token_saliency(project_dir: str, sample_id: int, progress=None) -> dict:
    """{"text", "label", "spans": [(start, end, token, score)], "cut": char offset where the
    model stopped reading (None: whole text), "loss"} for one training sample."""
    import torch
    from torch.nn import functional as F

    from diffin_core.project.checkpoints import complete_state, read_state
    from diffin_core.project.folder import Project
    from diffin_core.project.text import load_tokenizer
    p = Project(project_dir)
    if p.kind != "text":
        raise DiffinError("token highlights are for text projects", p.root)
    split = p.train
    rows = np.flatnonzero(np.asarray(split.ids) == int(sample_id))
    if len(rows) != 1:
        raise DiffinError(f"no training sample has id {int(sample_id)}", p.root)
    row = int(rows[0])
    if split.text_pairs([row]) is not None:
        raise DiffinError("token highlights are not offered for text pairs", p.root)
    text = split.texts([row])[0]
    x = torch.as_tensor(np.asarray(split.x[row:row + 1]), dtype=torch.float32)
    ids = x[0, 0].long().numpy()
    mask = x[0, 1].long().numpy().astype(bool)
    tok = load_tokenizer(p.path(p.config["data"].get("tokenizer", "tokenizer")))
    if not getattr(tok, "is_fast", False):
        raise DiffinError("the tokenizer gives no character offsets (not a fast tokenizer)", p.root)
    enc = tok(text, add_special_tokens=True, truncation=True, max_length=len(ids), return_offsets_mapping=True)
    if list(enc["input_ids"]) != [int(i) for i in ids[mask]]:
        raise DiffinError("re-tokenising the text does not give the ids that were scored", p.root)
    model = p.build_model().eval()
    c = p.manifest.checkpoints[-1]
    state, _ = read_state(Path(p.manifest.path).parent / c.file)
    model.load_state_dict(complete_state(model, state))
    for prm in model.parameters():
        prm.requires_grad_(True)
    emb_layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb_layer, torch.nn.Embedding):
        raise DiffinError("the model has no word-embedding layer (get_input_embeddings)", p.root)
    kept = {}

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
        kept["e"] = out
    handle = emb_layer.register_forward_hook(keep)
    try:
        logits = model(x)
        y = torch.as_tensor([int(split.y[row])])
        loss = F.cross_entropy(logits, y)
        loss.backward()
    finally:
        handle.remove()
    e = kept["e"]
    if e.grad is None:
        raise DiffinError("no gradient reached the word embeddings", p.root)
    scores = (e.grad * e)[0].sum(-1).detach().double().numpy()
    spans, cut = [], None
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    for t, ((a, b), name) in enumerate(zip(enc["offset_mapping"], tokens)):
        if b > a:                                   # special tokens have no characters
            spans.append((int(a), int(b), str(name), float(scores[t])))
    last = max((b for a, b, _, _ in spans), default=0)
    if len(tok(text, add_special_tokens=True)["input_ids"]) > len(enc["input_ids"]):
        cut = last
    return {"text": text, "label": int(split.y[row]), "spans": spans, "cut": cut, "loss": float(loss.item()),
            "checkpoint": c.file}
