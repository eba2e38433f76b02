"""Text models behind the engine's one-tensor calling convention (contract: docs/text.md).

Every engine path calls ``model(x)`` with one float tensor. A text split's ``x`` is the packed
``(B, C, L)`` tensor of text.py (channel 0 input_ids, 1 attention_mask, 2 token_type_ids for
pairs); ``adapt(model)`` attaches two hooks so that such a call runs
``model(input_ids=x[:, 0].long(), attention_mask=x[:, 1].long()[, token_type_ids=...])`` and
returns the logits tensor (``out.logits`` of a transformers output, the first item of a tuple,
or the tensor itself). Parameter and state_dict names are untouched (no wrapper module), so
checkpoints stay the model's own ``state_dict()``; torch.func's functional_call, vmap, grad and
jvp see the hooks as part of the forward.

The integer inputs are never differentiated or perturbed: the ``.long()`` cast cuts any
autograd/forward-mode path to them, every derivative is with respect to the parameters, and a
packed tensor in a dtype that cannot hold the ids exactly (float16 / bfloat16) is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from diffin_core.errors import DiffinError

_EXACT = (torch.float32, torch.float64, torch.int32, torch.int64)


def unpack(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword inputs of a packed (B, C, L) text batch."""
    if x.dtype not in _EXACT:
        raise DiffinError(f"a packed text batch must be float32/float64/int (token ids exact), got {x.dtype}")
    if x.ndim != 3 or x.shape[1] not in (2, 3):
        raise DiffinError(f"a packed text batch has shape (B, 2 or 3, L), got {list(x.shape)}")
    x = x.detach()
    out = {"input_ids": x[:, 0].long(), "attention_mask": x[:, 1].long()}
    if x.shape[1] == 3:
        out["token_type_ids"] = x[:, 2].long()
    return out


def logits_of(out) -> torch.Tensor:
    """The logits tensor of a model output: ``.logits``, a tuple's first item, or the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise DiffinError(f"the text model returned {type(out).__name__}: return logits, or an object with .logits")


def _pre(module, args, kwargs):
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].ndim == 3 \
            and args[0].is_floating_point():
        return (), unpack(args[0])
    return None


def _post(module, args, kwargs, out):
    return logits_of(out)


def _in_functorch() -> bool:
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:          # pragma: no cover - older torch
        return False


def _patch_transformers_masks() -> None:
    """transformers (>= 5) decides whether an attention mask can be skipped with
    ``padding_mask.all()``: data-dependent control flow that torch.func.vmap refuses. Inside a
    torch.func transform the check answers "don't skip" (the mask is built; a mask without
    padding changes nothing in the result); everywhere else transformers runs unchanged."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return
    for name in ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa", "_can_skip_bidirectional_mask_xpu"):
        fn = getattr(mu, name, None)
        if fn is None or getattr(fn, "_diffin", False):
            continue

        def safe(*args, _fn=fn, **kwargs):
            return False if _in_functorch() else _fn(*args, **kwargs)
        safe._diffin = True
        setattr(mu, name, safe)


def _eager_attention(model: nn.Module) -> None:
    """Plain (eager) attention: torch's fused SDPA kernels have no forward-mode derivative (the
    engine's jvp), and the same math in plain ops gives the same logits up to rounding."""
    try:
        model.set_attn_implementation("eager")
    except Exception:  # noqa: BLE001 - older transformers, or a model without the switch
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            try:
                cfg._attn_implementation = "eager"
            except Exception:  # noqa: BLE001
                pass


def adapt(model: nn.Module) -> nn.Module:
    """Attach the packed-batch hooks to ``model`` (once); returns the same module."""
    if getattr(model, "_diffin_text", False):
        return model
    if type(model).__module__.startswith("transformers"):
        _patch_transformers_masks()
        _eager_attention(model)
    model.register_forward_pre_hook(_pre, with_kwargs=True)
    model.register_forward_hook(_post, with_kwargs=True)
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model._diffin_text = True
    return model


def is_text_model(model: nn.Module) -> bool:
    return bool(getattr(model, "_diffin_text", False))
