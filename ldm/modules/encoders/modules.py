"""Text encoders of Stable Diffusion: CLIP ViT-L/14 (SD v1) and OpenCLIP ViT-H/14 (SD v2).

Class names and constructor arguments are CompVis' / Stability's so their YAML configs work
unchanged, and the state dicts have the layout of the released checkpoints
(``cond_stage_model.transformer.text_model.*`` for v1, ``cond_stage_model.model.*`` for v2).
Nothing is downloaded: the modules start with random weights and get theirs from a checkpoint.
Nothing freezes itself either: the training code decides what trains and freezes the rest in one place.
"""

import math
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ldm.modules.encoders.tokenizer import END_TOKEN, clip_tokenizer, open_clip_tokenizer

# The text tower of openai/clip-vit-large-patch14 (its config.json). pad_token_id 1 is what that
# config says; it is unused, as SD v1 pads with the end token and CLIP attends causally.
CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ),
}


class CLIPTextTransformer(nn.Module):
    """The CLIP text transformer under ``.text_model``, the nesting of every SD v1 checkpoint.

    Every SD v1 checkpoint names the encoder ``cond_stage_model.transformer.text_model.*``.
    transformers up to 5.3 nest the transformer as ``CLIPTextModel.text_model``; later 5.x
    dropped that level. Either way ``.text_model`` here is the module whose state dict starts at
    ``embeddings.``: a real module, rather than keys renamed in state-dict hooks, keeps
    ``state_dict``, strict ``load_state_dict`` and ``named_parameters`` in the checkpoint layout.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        model = CLIPTextModel(config)
        inner = getattr(model, "text_model", None)
        self.text_model = inner if isinstance(inner, nn.Module) else model
        # The PreTrainedModel, kept out of the module tree (it would add a level to the keys):
        # its gradient-checkpointing switch reaches the layers of `text_model` either way.
        self.__dict__["pretrained"] = model

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """input_ids [B, L] -> transformers' output (last_hidden_state [B, L, hidden], ...)."""
        # Through the PreTrainedModel: before 5.4 it is what collects `hidden_states`.
        return self.pretrained(input_ids=input_ids, **kwargs)


class FrozenCLIPEmbedder(nn.Module):
    """SD v1 conditioning: the CLIP ViT-L/14 text encoder, prompts -> [B, 77, 768].

    ``version`` only names the architecture (its weights come from the SD checkpoint); ``device``
    and ``freeze`` are accepted for CompVis configs and ignored: tokens follow the weights' device,
    and the module does not freeze itself (the training code does, in one place).
    ``layer``: "last" -> ``last_hidden_state`` (after the final LayerNorm, as SD v1 was trained),
    "pooled" -> the end-token state [B, 1, hidden], "hidden" -> ``hidden_states[layer_idx]``
    (0 is the embeddings, no final LayerNorm). ``text_config`` overrides ``CLIPTextConfig`` fields
    (tiny models for tests).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if version not in CLIP_TEXT_CONFIGS:
            raise ValueError(f"unknown CLIP version {version!r}; known: {list(CLIP_TEXT_CONFIGS)}")
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        config = CLIPTextConfig(**{**CLIP_TEXT_CONFIGS[version], **(text_config or {})})
        num_states = config.num_hidden_layers + 1
        if layer == "hidden" and (layer_idx is None or not -num_states <= layer_idx < num_states):
            raise ValueError(f"layer 'hidden' needs layer_idx in [-{num_states}, {num_states})")
        self.tokenizer = clip_tokenizer(END_TOKEN)
        self.transformer = CLIPTextTransformer(config)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx

    @property
    def token_embedding(self) -> nn.Embedding:
        """The embedding of token ids, [49408, hidden] (what textual inversion trains)."""
        return self.transformer.text_model.embeddings.token_embedding

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> LongTensor [B, max_length] on the CPU: start 49406, ids, end 49407, pad 49407."""
        batch = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_length=True,
            return_overflowing_tokens=False,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def forward(self, text: list[str] | torch.Tensor) -> torch.Tensor:
        """Prompts or token ids [B, L] -> FloatTensor [B, L, hidden] ([B, 1, hidden] if pooled)."""
        tokens = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        tokens = tokens.to(self.token_embedding.weight.device)
        out = self.transformer(tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]

    def encode(self, text: list[str] | torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` (CompVis' name)."""
        return self(text)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the conditioning never reaches: with ``layer: hidden``, the layers after
        ``layer_idx`` and the final LayerNorm (training must freeze them: no gradient)."""
        if self.layer != "hidden":
            return []
        model = self.transformer.text_model
        layers = model.encoder.layers
        first_unused = self.layer_idx % (len(layers) + 1)  # hidden state i comes from layer i-1
        unused = [*layers[first_unused:], model.final_layer_norm]
        return [p for module in unused for p in module.parameters()]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each encoder layer in backward (non-reentrant ``torch.utils.checkpoint``).

        As in every transformers model, it only acts in training mode with grad enabled.
        """
        model = self.transformer.pretrained
        # activation_checkpointing_* from transformers 5.23 on, where gradient_checkpointing_*
        # became a deprecated alias; before it, gradient_checkpointing_* is the only switch.
        prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
        if not enabled:
            getattr(model, f"{prefix}_checkpointing_disable")()
            return
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        # transformers also hooks the token embedding so that its output requires grad, which only
        # reentrant checkpointing needs; it would make a frozen encoder build a backward graph.
        model.disable_input_require_grads()


class OpenCLIPTextModel(TextTransformer):
    """open_clip's text tower plus CLIP's ``logit_scale``, without the visual tower.

    Its state dict is exactly SD v2's ``cond_stage_model.model.*``: ``token_embedding.weight``,
    ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final.*``, ``text_projection``
    [width, embed_dim] and ``logit_scale`` (Stability deleted ``model.visual`` before training).
    The causal ``attn_mask`` buffer is not persistent.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        layers: int,
        embed_dim: int,
        context_length: int = 77,
        vocab_size: int = 49408,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=embed_dim,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
        )
        # open_clip's CLIP initialises the temperature to 1 / 0.07.
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD v2 conditioning: the OpenCLIP ViT-H/14 text encoder, prompts -> [B, 77, 1024].

    ``arch`` picks open_clip's architecture config; ``version`` names the pretrained weights and is
    ignored (they come from the SD checkpoint), as are ``device`` and ``freeze`` (see
    ``FrozenCLIPEmbedder``). ``layer``: "last" runs all blocks, "penultimate" (SD v2) all but the
    last; ``ln_final`` follows either way. ``text_config`` overrides width/heads/layers/embed_dim.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: Any = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        text_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        text_cfg = config["text_cfg"]
        dims = dict(
            width=text_cfg["width"],
            heads=text_cfg["heads"],
            layers=text_cfg["layers"],
            embed_dim=config["embed_dim"],
        )
        unknown = set(text_config or {}) - set(dims)
        if unknown:
            raise ValueError(f"text_config may only set {sorted(dims)}, got {sorted(unknown)}")
        self.model = OpenCLIPTextModel(
            **{**dims, **(text_config or {})},
            context_length=text_cfg.get("context_length", 77),
            vocab_size=text_cfg.get("vocab_size", 49408),
            quick_gelu=config.get("quick_gelu", False),
        )
        self.tokenizer = open_clip_tokenizer(max_length)
        self.max_length = max_length
        self.layer = layer
        # Number of blocks left out at the end.
        self.layer_idx = self.LAYERS.index(layer)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The embedding of token ids, [49408, width]."""
        return self.model.token_embedding

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> LongTensor [B, max_length] on the CPU: start 49406, ids, end 49407, pad 0."""
        return self.tokenizer(texts)

    def forward(self, text: list[str] | torch.Tensor) -> torch.Tensor:
        """Prompts or token ids [B, L] -> FloatTensor [B, L, width], after ``ln_final``."""
        tokens = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        tokens = tokens.to(self.token_embedding.weight.device)
        length = tokens.shape[1]
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[:length]
        attn_mask = self.model.attn_mask[:length, :length]
        # open_clip's blocks are batch-first now: x stays [B, L, width]. CompVis' permute to
        # [L, B, width] (for older open_clip) would make the blocks attend across the batch.
        blocks = self.model.transformer.resblocks
        recompute = (
            self.training and torch.is_grad_enabled() and self.model.transformer.grad_checkpointing
        )
        for block in blocks[: len(blocks) - self.layer_idx]:
            if recompute:
                # Positional: open_clip blocks take (q_x, k_x, v_x, attn_mask).
                x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return self.model.ln_final(x)

    def encode(self, text: list[str] | torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` (CompVis' name)."""
        return self(text)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the conditioning never reaches: ``text_projection`` and ``logit_scale``
        (CLIP's contrastive head), and with ``penultimate`` (SD v2) the last block. Training
        must freeze them: they get no gradient, which DDP would wait for."""
        blocks = self.model.transformer.resblocks
        skipped = [
            p for block in blocks[len(blocks) - self.layer_idx :] for p in block.parameters()
        ]
        return [self.model.text_projection, self.model.logit_scale, *skipped]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward (non-reentrant); only in training mode with grad
        enabled, like ``FrozenCLIPEmbedder``."""
        self.model.set_grad_checkpointing(enabled)
