"""What trains and what is frozen, decided in one place from `train.trainable`.

Frozen means: `requires_grad_(False)`, `eval()`, out of the optimizer and run under `no_grad`
(the VAE always; the text encoder unless trained). With `token_embedding`, only the embedding
rows of the identifier's tokens train: every other row's gradient is masked to zero, and that
parameter has no weight decay, so AdamW leaves the masked rows bitwise unchanged. With `lora`
(and `text_encoder_lora`), only low-rank adapters added to the UNet's (the text encoder's)
layers train (ldm/train/lora.py); every weight of the model itself stays frozen.
"""

import torch
import torch.nn as nn

from ldm.train.lora import add_adapters


def identifier_token_ids(model, token: str) -> list[int]:
    """Token ids of the identifier (e.g. "sks" -> [48136]), without start, end and padding."""
    ids = model.cond_stage_model.tokenize([token])[0].tolist()
    end = ids.index(49407, 1)
    return ids[1:end]


def configure_trainable(
    model, parts: list[str], token_ids: list[int], lora=None, seed: int = 0
) -> list[dict]:
    """Freeze everything, then unfreeze `parts` (adding adapters for the LoRA parts, as
    `lora`, the train.lora config, says); returns the optimizer's parameter groups.

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
    for part, module, targets, unused in (
        ("lora", model.model.diffusion_model, lora and lora.targets, []),
        ("text_encoder_lora", text, lora and lora.text_encoder_targets, text.unused_parameters()),
    ):
        if part in parts:
            alpha = lora.alpha if lora.alpha is not None else lora.rank
            adapters = add_adapters(module, targets, lora.rank, alpha, lora.dropout, seed, unused)
            module.train()  # for the adapters' dropout; the frozen layers have none
            groups.append({"name": part, "params": adapters})
    return groups


def text_encoder_trains(parts: list[str]) -> bool:
    """The text encoder's output changes during training (it cannot be cached)."""
    return bool({"text_encoder", "token_embedding", "text_encoder_lora"} & set(parts))


def frozen_modules(model, parts: list[str]) -> list[nn.Module]:
    """Top-level parts whose own weights do not train (LoRA adapters inside them aside): they
    can be held in the autocast dtype, and checkpoints store them as loaded."""
    frozen = [model.first_stage_model]
    if not {"text_encoder", "token_embedding"} & set(parts):
        frozen.append(model.cond_stage_model)
    if "unet" not in parts:
        frozen.append(model.model)
    return frozen


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Hold a frozen module in `dtype`; parameters that train inside it (LoRA adapters) stay
    float32, like every trained weight."""
    trained = [p for p in module.parameters() if p.requires_grad]
    module.to(dtype)
    for p in trained:
        p.data = p.data.float()


def trained_parameters(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
