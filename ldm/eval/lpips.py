"""LPIPS v0.1 (Zhang et al. 2018) for the DreamBooth DIV metric.

A port of richzhang/PerceptualSimilarity (`lpips` package) with the same module layout, so its
state dict has the package's key names: `scaling_layer.shift/scale`, `net.slice{1..5}.{i}.*` and the
linear heads `lin{k}.model.1.weight`. Weights come from two files: the official linear heads
(`alex.pth` / `vgg.pth`) and torchvision's ImageNet backbone (`features.{i}.*`).
"""

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ldm.eval.weights import (
    LPIPS_LIN_URLS,
    TORCHVISION_URLS,
    check_keys,
    load_state_dict_file,
    load_strict,
)

# torchvision constructor, `features` indices where the lpips package cuts its five slices
# (each ends after a ReLU), and the channels of those five outputs.
_NETS = {
    "alex": (torchvision.models.alexnet, (0, 2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": (torchvision.models.vgg16, (0, 4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}


def _torchvision_features(net: str) -> nn.Sequential:
    """The `features` part of a torchvision classifier, freshly initialised, without its classifier."""
    # Building on meta skips initialising the large fully connected classifier we throw away.
    with torch.device("meta"):
        features = _NETS[net][0]().features
    features.to_empty(device="cpu")
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return features


class ScalingLayer(nn.Module):
    """Maps [-1, 1] inputs to roughly ImageNet-normalised ones (the lpips package's constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """1x1 convolution C -> 1 without bias; `model.0` is the package's dropout, kept for key names."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dropout only ever acted while training the heads; a metric must be deterministic
        # whatever mode the module is in.
        return self.model[1](x)


class Backbone(nn.Module):
    """torchvision `features` cut into `slice1..slice5`; returns the five ReLU outputs."""

    def __init__(self, net: str):
        super().__init__()
        features = _torchvision_features(net)
        cuts = _NETS[net][1]
        for k in range(5):
            layers = nn.Sequential()
            for i in range(cuts[k], cuts[k + 1]):
                layers.add_module(str(i), features[i])
            self.add_module(f"slice{k + 1}", layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(5):
            x = getattr(self, f"slice{k + 1}")(x)
            outs.append(x)
        return outs


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise [B, C, H, W] features along C."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance, v0.1, linear heads on an AlexNet (default) or VGG16 trunk."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(_NETS)}")
        self.net_type = net
        self.scaling_layer = ScalingLayer()
        self.net = Backbone(net)
        for k, chn in enumerate(_NETS[net][2]):
            self.add_module(f"lin{k}", NetLinLayer(chn))

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> distances [B]: sum over layers of the spatial mean of
        the head-weighted squared difference of unit-normalised features."""
        feats0 = self.net(self.scaling_layer(in0))
        feats1 = self.net(self.scaling_layer(in1))
        dist = torch.zeros(in0.shape[0], device=in0.device, dtype=in0.dtype)
        for k, (f0, f1) in enumerate(zip(feats0, feats1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            dist = dist + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return dist


def load_lpips(
    lin_path: str | Path,
    backbone_path: str | Path,
    net: str = "alex",
    device: str | torch.device = "cpu",
) -> LPIPS:
    """LPIPS with the official linear heads (`alex.pth`) and torchvision's backbone
    (`alexnet-owt-7be5be79.pth`); for `net="vgg"`, `vgg.pth` and `vgg16-397923af.pth`."""
    model = LPIPS(net)
    lin = load_state_dict_file(lin_path, LPIPS_LIN_URLS[net])
    tv = load_state_dict_file(backbone_path, TORCHVISION_URLS[net])
    # LPIPS uses only the convolutional trunk: torchvision's `classifier.*` keys are not loaded.
    features = {k: v for k, v in tv.items() if not k.startswith("classifier.")}
    lin_model = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(5)})
    load_strict(lin_model, lin, lin_path)
    # Backbone key `slice{k}.{i}.weight` is torchvision's `features.{i}.weight`.
    names = {"features." + key.split(".", 1)[1]: key for key in model.net.state_dict()}
    check_keys(set(features), set(names), backbone_path)
    load_strict(model.net, {names[k]: v for k, v in features.items()}, backbone_path)
    return model.to(device)
