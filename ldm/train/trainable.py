"""What trains and what is frozen, decided in one place from `train.trainable`.

Frozen means: `requires_grad_(False)`, `eval()`, out of the optimizer and run under `no_grad`
(the VAE always; the text encoder unless trained). With `token_embedding`, only the embedding
rows of the identifier's tokens train: every other row's gradient is masked to zero, and that
parameter has no weight decay, so AdamW leaves the masked rows bitwise unchanged.
"""

import torch
import torch.nn as nn


def identifier_token_ids(model, token: str) -> list[int]:
    """Token ids of the identifier (e.g. "sks" -> [48136]), without start, end and padding."""
    ids = model.cond_stage_model.tokenize([token])[0].tolist()
    end = ids.index(49407, 1)
    return ids[1:end]


def configure_trainable(model, parts: list[str], token_ids: list[int]) -> list[dict]:
    """Freeze everything, then unfreeze `parts`; returns the optimizer's parameter groups.

    Call it after the weights are loaded and the model is on its device: loading replaces the
    parameter objects, and the gradient mask lives on the parameter's device."""
    model.requires_grad_(False)
    model.eval()
    groups = []
    if "unet" in parts:
        unet = model.model.diffusion_model
        unet.requires_grad_(True).train()
        groups.append({"name": "unet", "params": list(unet.parameters())})
    text = model.cond_stage_model
    if "text_encoder" in parts:
        text.requires_grad_(True).train()
        # What the conditioning never uses stays frozen (no gradient; no optimizer state).
        for p in text.unused_parameters():
            p.requires_grad_(False)
        used = [p for p in text.parameters() if p.requires_grad]
        groups.append({"name": "text_encoder", "params": used})
    elif "token_embedding" in parts:
        weight = text.token_embedding.weight
        weight.requires_grad_(True)
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[token_ids] = 1.0
        weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
        groups.append({"name": "token_embedding", "params": [weight], "weight_decay": 0.0})
    return groups


def text_encoder_trains(parts: list[str]) -> bool:
    return "text_encoder" in parts or "token_embedding" in parts


def frozen_modules(model, parts: list[str]) -> list[nn.Module]:
    """Top-level parts with nothing to train: they can be held in the autocast dtype."""
    frozen = [model.first_stage_model]
    if not text_encoder_trains(parts):
        frozen.append(model.cond_stage_model)
    if "unet" not in parts:
        frozen.append(model.model)
    return frozen


def trained_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
