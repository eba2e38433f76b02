"""Token highlights (diffin_core/tasks/tokens.py): gradient x input on the word embeddings of
the final checkpoint, for the given label, mapped onto the text's characters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from text_fixtures import text_sample  # noqa: F401
from torch.nn import functional as F

from diffin_core.errors import DiffinError
from diffin_core.project.checkpoints import complete_state, read_state
from diffin_core.project.folder import Project
from diffin_core.tasks.tokens import token_saliency

pytestmark = pytest.mark.slow


def test_scores_are_gradient_times_input_and_spans_are_the_tokens(text_sample):
    p = Project(text_sample)
    sid = int(p.train.ids[5])
    r = token_saliency(str(text_sample), sid)
    assert r["text"] == p.train.texts([5])[0] and r["label"] == int(p.train.y[5])
    same = [r["text"][a:b].lower() == name.replace("##", "") for a, b, name, _ in r["spans"]]
    assert len(same) >= 3 and np.mean(same) >= 0.9       # each span is its token's characters
    # independently: the HF model called with inputs_embeds, autograd w.r.t. them
    model = p.build_model().eval()
    state, _ = read_state(text_sample / "checkpoints" / p.manifest.checkpoints[-1].file)
    model.load_state_dict(complete_state(model, state))
    x = torch.as_tensor(np.asarray(p.train.x[5:6]))
    ids, mask = x[:, 0].long(), x[:, 1].long()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=mask)
    logits = getattr(logits, "logits", logits)
    loss = F.cross_entropy(logits, torch.as_tensor([r["label"]]))
    (g,) = torch.autograd.grad(loss, emb)
    expect = (g * emb)[0].sum(-1).detach().numpy()[mask[0].bool().numpy()]
    got = np.array([s for *_, s in r["spans"]])
    # special tokens ([CLS], [SEP]) have no characters: the spans are the tokens between them
    np.testing.assert_allclose(got, expect[1:1 + len(got)], rtol=1e-4, atol=1e-7)
    assert r["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_unknown_sample_is_one_line(text_sample):
    with pytest.raises(DiffinError, match="no training sample has id 99999999"):
        token_saliency(str(text_sample), 99999999)
