"""Reference architectures used in the paper's experiments.

Source: Adnan et al., "Sparse Training from Random Initialization: Aligning
Lottery Ticket Masks using Weight Symmetry" (ICML 2025), Appendix A.1
"Architectures": a width-scalable CIFAR ResNet20 (He et al., 2016) and the
modified VGG11 of Jordan et al. (REPAIR, ICLR 2023); for ImageNet (the ICML
paper's Figure 7) the standard bottleneck ResNet50 (v1.5, torchvision's layout
and names, so torchvision checkpoints load by name). A small MLP is added for
quick demos on the 8x8 digits data set.

Module attribute names are chosen to be readable (``conv1``, ``bn1``,
``layer1.0.conv1``, ``shortcut``, ``fc``, ``classifier``) because parameter
names appear in user-facing output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ArgumentValueError, _did_you_mean

__all__ = [
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "ResNet20",
    "ResNet50",
    "VGG11",
    "VGG11_CFG",
    "MODEL_NAMES",
    "build_model",
]

MODEL_NAMES: tuple[str, ...] = ("mlp", "resnet20", "resnet50", "vgg11")

#: VGG11 layer configuration: channel counts (before the width multiplier) and
#: ``"M"`` for a 2x2 max-pool. Source: Simonyan & Zisserman (2015), config "A".
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_positive(**values: int) -> None:
    """Raise :class:`ArgumentValueError` naming the first argument that is not a positive int."""
    for name, value in values.items():
        if value < 1:
            raise ArgumentValueError(f"Argument '{name}' is {value}; pass a positive integer.")


class MLP(nn.Module):
    """Fully connected ReLU network.

    Input: ``(N, in_features)`` or any ``(N, *dims)`` whose trailing dims
    multiply to ``in_features`` (e.g. images ``(N, C, H, W)``); it is flattened
    first. Output: logits ``(N, num_classes)``.

    Parameters are named ``layers.<i>.weight``/``.bias`` for the hidden layers
    and ``fc.weight``/``fc.bias`` for the output layer.

    Raises:
        ValueError: if a size is not positive or ``hidden`` is empty.
    """

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 128), num_classes: int = 10) -> None:
        super().__init__()
        if not hidden:
            raise ArgumentValueError(
                "Argument 'hidden' is empty; list at least one hidden layer size, e.g. (128, 128)."
            )
        _check_positive(in_features=in_features, num_classes=num_classes)
        _check_positive(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        self.flatten = nn.Flatten()
        sizes = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.fc = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, ...)`` inputs to ``(N, num_classes)`` logits."""
        x = self.flatten(x)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.fc(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN layers and a residual shortcut.

    Input ``(N, in_planes, H, W)``; output ``(N, planes, H', W')`` with
    ``H' = ceil(H / stride)``. The shortcut is a 1x1 conv (no bias) + BN when
    the shape changes (``stride != 1`` or ``in_planes != planes``), else the
    identity. Source: He et al. (2016), "Deep Residual Learning", option B.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(planes),
                )
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(N, in_planes, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet20 with a width multiplier (He et al., 2016; paper App. A.1).

    ``conv1`` (3x3, ``in_channels -> 16w``) + ``bn1`` + ReLU, then ``layer1``,
    ``layer2``, ``layer3`` of three :class:`BasicBlock` each with ``16w``,
    ``32w``, ``64w`` channels (stride 2 in the first block of ``layer2`` and
    ``layer3``), global average pooling and ``fc`` (``64w -> num_classes``).

    Input ``(N, in_channels, H, W)``; output logits ``(N, num_classes)``.

    Raises:
        ValueError: if ``width``, ``num_classes`` or ``in_channels`` is not positive.
    """

    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive(width=width, num_classes=num_classes, in_channels=in_channels)
        planes = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.layer1 = self._make_stage(planes[0], planes[0], stride=1)
        self.layer2 = self._make_stage(planes[0], planes[1], stride=2)
        self.layer3 = self._make_stage(planes[1], planes[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes[2], num_classes)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        """Stack ``blocks`` basic blocks; only the first one may downsample."""
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_channels, H, W)`` images to ``(N, num_classes)`` logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


class Bottleneck(nn.Module):
    """ResNet bottleneck block, v1.5 (torchvision's ``Bottleneck``): 1x1 conv
    (``in_planes -> planes``), 3x3 conv carrying the stride (``planes ->
    planes``), 1x1 conv (``planes -> 4 * planes``), each followed by BatchNorm;
    ReLU after the first two and after the residual sum.

    ``downsample`` is ``Sequential(1x1 conv with the stride, BatchNorm)`` (named
    ``downsample.0`` / ``downsample.1``) when the shape changes, else ``None``
    (the identity), exactly as torchvision. Unlike torchvision the ReLU is not
    in place and the residual sum is out of place (same function, same
    parameter names; no tensor is overwritten under a hook).

    Input ``(N, in_planes, H, W)``; output ``(N, 4 * planes, ceil(H / stride), ...)``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(N, in_planes, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ImageNet ResNet50 (He et al., 2016; v1.5 as torchvision; ICML paper Fig. 7).

    ``conv1`` (7x7, stride 2, ``in_channels -> 64w``) + ``bn1`` + ``relu`` +
    ``maxpool`` (3x3, stride 2), then ``layer1`` .. ``layer4`` of 3, 4, 6, 3
    :class:`Bottleneck` blocks with ``64w``, ``128w``, ``256w``, ``512w``
    inner channels (outputs 4x that; stride 2 on ``conv2`` of the first block
    of ``layer2`` .. ``layer4``), ``avgpool`` (global) and ``fc``
    (``2048w -> num_classes``). With ``width=1`` every parameter and buffer
    name and shape is torchvision's ``resnet50()``, so its state_dict (and
    checkpoints) load with ``strict=True``; 25,557,032 parameters at 1000
    classes.

    Initialisation as torchvision: convolutions Kaiming normal (fan-out,
    ReLU gain), BatchNorm weight 1 and bias 0, ``fc`` PyTorch's default.
    ``zero_init_residual=True`` zeroes every block's ``bn3.weight`` (Goyal et
    al., 2017), so each block starts as the identity; off by default, as in
    torchvision.

    Input ``(N, in_channels, H, W)``, any ``H, W >= 1`` (224 for ImageNet; the
    spatial size is divided by 32); output logits ``(N, num_classes)``.

    Raises:
        ArgumentValueError: (a ``ValueError``) a size argument is not positive.
    """

    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, width: int = 1, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        base = 64 * width
        self.conv1 = nn.Conv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._in_planes = base
        self.layer1 = self._make_stage(base, 3, stride=1)
        self.layer2 = self._make_stage(2 * base, 4, stride=2)
        self.layer3 = self._make_stage(4 * base, 6, stride=2)
        self.layer4 = self._make_stage(8 * base, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * base * Bottleneck.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """``blocks`` bottlenecks of ``planes`` inner channels; the first may downsample."""
        layers = [Bottleneck(self._in_planes, planes, stride)]
        self._in_planes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._in_planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_channels, H, W)`` images to ``(N, num_classes)`` logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG11(nn.Module):
    """Modified VGG11 of Jordan et al. (REPAIR, ICLR 2023; paper App. A.1).

    ``features`` holds, for each entry of :data:`VGG11_CFG`, either
    ``conv<i>`` (3x3, padding 1, ``channels * width`` outputs) + ``bn<i>`` +
    ``relu<i>``, or ``pool<j>`` (2x2 max-pool). A pool is skipped when the
    feature map is already 1x1, so the model also runs on 8x8 inputs.
    ``classifier`` is a single Linear layer from the flattened final feature
    map (``C * H * W``, computed from ``image_size``) to ``num_classes``.

    Convolutions have no bias: the BatchNorm that follows each one makes a bias
    redundant (REPAIR's reference code keeps it; the function is the same).
    With ``batch_norm=False`` there is no ``bn<i>`` and every convolution has a
    bias: the VGG11 without normalisation of the paper's Figure 3 (REPAIR's
    "plain" VGG). Without normalisation PyTorch's default initialisation
    shrinks the signal at every layer and SGD stays at chance, so these
    convolutions get He initialisation (Kaiming normal, fan-out, ReLU gain)
    and zero biases, as torchvision's VGG (He et al., ICCV 2015).

    Input ``(N, in_channels, image_size, image_size)``; output ``(N, num_classes)``.

    Raises:
        ArgumentValueError: (a ``ValueError``) a size argument is not positive.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 1,
        image_size: int = 32,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size, n_conv, n_pool = in_channels, image_size, 0, 0
        for item in VGG11_CFG:
            if item == "M":
                if size > 1:
                    n_pool += 1
                    layers[f"pool{n_pool}"] = nn.MaxPool2d(2, 2)
                    size //= 2
                continue
            n_conv += 1
            out_channels = int(item) * width
            layers[f"conv{n_conv}"] = nn.Conv2d(channels, out_channels, 3, padding=1, bias=not batch_norm)
            if batch_norm:
                layers[f"bn{n_conv}"] = nn.BatchNorm2d(out_channels)
            layers[f"relu{n_conv}"] = nn.ReLU()
            channels = out_channels
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * size * size, num_classes)
        if not batch_norm:
            for module in self.features:
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, in_channels, image_size, image_size)`` to ``(N, num_classes)``."""
        return self.classifier(self.flatten(self.features(x)))


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 1,
    hidden: tuple[int, ...] = (128, 128),
) -> nn.Module:
    """Build one of :data:`MODEL_NAMES` (case-insensitive) for a data set.

    For ``"mlp"`` the input size is ``in_channels * image_size**2`` and
    ``width`` multiplies every entry of ``hidden``; ``hidden`` is ignored by the
    convolutional models, ``image_size`` by all but the MLP and VGG11.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the valid
            names) or a non-positive size.
    """
    key = name.lower()
    if key == "mlp":
        return MLP(in_channels * image_size**2, tuple(h * width for h in hidden), num_classes)
    if key == "resnet20":
        return ResNet20(width=width, num_classes=num_classes, in_channels=in_channels)
    if key == "resnet50":
        return ResNet50(num_classes=num_classes, in_channels=in_channels, width=width)
    if key == "vgg11":
        return VGG11(num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)
    raise ArgumentValueError(
        f"Model {name!r} is unknown; pass one of {', '.join(MODEL_NAMES)}.{_did_you_mean(name, MODEL_NAMES)}"
    )
