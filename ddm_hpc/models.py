"""Model registry: build networks by name for every stage of the pipeline.

Every built-in model is buffer-free (instance norm as ``GroupNorm(C, C)`` instead of
BatchNorm) and avoids in-place ops on activations, so hundreds of stacked copies can be
fine-tuned with ``torch.func.functional_call`` + ``vmap`` and differentiated twice
(gradient matching). Register your own with ``@register_model("mynet")`` on a factory
``mynet(in_channels, num_classes, image_size, width=32) -> nn.Module`` and build it with
``build_model("mynet", 1, 10, (28, 28), width=64)``, or name any importable factory without
registering it: ``--model package.module:function`` (or ``path/to/file.py:function``), or any builder of
``torchvision.models`` as ``--model torchvision:resnet18`` (random init, nothing downloaded). The name is a
string in the config, so worker processes and SLURM jobs import the same factory.

Models with buffers (BatchNorm) train as usual (running statistics updated); everywhere else they are
called through :func:`forward_with`: eval mode, the parameters *and* buffers of the checkpoint in use.

Room: imports ``config`` (and ``errors``, ``utils``).
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ddm_hpc.config import Config
from ddm_hpc.errors import ConfigError
from ddm_hpc.utils import import_object

logger = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]
MODEL_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str, overwrite: bool = False) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that adds ``f(in_channels, num_classes, image_size, **kwargs) -> nn.Module`` to the registry.

    Args:
        name: Registry key used by ``build_model`` and the CLI.
        overwrite: Replace an existing entry instead of raising.

    Raises:
        ConfigError: ``name`` is already registered and ``overwrite`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODEL_REGISTRY and not overwrite:
            raise ConfigError(f"model {name!r} is already registered; pick another name or pass overwrite=True")
        MODEL_REGISTRY[name] = factory
        return factory

    return decorator


def model_factory(name: str) -> ModelFactory:
    """A registered factory, ``torchvision:<builder>``, or the one ``package.module:function`` names; else a
    ConfigError listing the names."""
    if name.startswith("torchvision:"):
        return _torchvision_factory(name.split(":", 1)[1])
    if ":" in name:
        factory = import_object(name, "--model")
        if not callable(factory):
            raise ConfigError(f"--model {name!r} is a {type(factory).__name__}, not a function; name a factory "
                              "f(in_channels, num_classes, image_size, **options) -> nn.Module")
        return factory
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(sorted(MODEL_REGISTRY))}, or "
                          "package.module:function naming a factory")
    return MODEL_REGISTRY[name]


def _keyword_params(factory: ModelFactory) -> list[inspect.Parameter]:
    """Parameters of a factory after (in_channels, num_classes, image_size), minus *args/**kwargs."""
    params = list(inspect.signature(factory).parameters.values())[3:]
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def model_kwargs_for(name: str) -> dict[str, Any]:
    """Keyword options of a registered model and their defaults.

    Args:
        name: Registered model name.

    Returns:
        Mapping option name -> default (``inspect.Parameter.empty`` for a required option).
    """
    return {p.name: p.default for p in _keyword_params(model_factory(name))}


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: tuple[int, int], **kwargs: Any
) -> nn.Module:
    """Build a registered model after checking its keyword options.

    Args:
        name: Registered model name (see ``MODEL_REGISTRY``).
        in_channels: Image channels C of inputs shaped [N, C, H, W].
        num_classes: Number of logits K; the model maps [N, C, H, W] -> [N, K].
        image_size: (H, W).
        **kwargs: Model options; ``model_kwargs_for(name)`` lists them.

    Raises:
        ConfigError: Unknown name, unexpected or missing option, or an invalid option value.
    """
    factory = model_factory(name)
    params = _keyword_params(factory)
    accepted = [p.name for p in params]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    bad = [] if takes_any else sorted(set(kwargs) - set(accepted))
    if bad:
        ok = ", ".join(accepted) or "(none)"
        raise ConfigError(f"model {name!r} got unexpected option(s) {', '.join(bad)}; accepted options: {ok}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(f"model {name!r} needs option(s) {', '.join(missing)}; pass them as keyword arguments")
    try:
        model = factory(in_channels, num_classes, tuple(image_size), **kwargs)
    except TypeError as err:  # a factory that does not take (in_channels, num_classes, image_size, **options)
        raise ConfigError(f"model {name!r} could not be built ({err}); a factory takes (in_channels, num_classes, "
                          "image_size, **options) and returns an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module; make the factory "
                          "return the network")
    logger.debug("built %s with %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model


def build_target(cfg: Config, shape: object, seed: int | None = None) -> nn.Module:
    """The run's target architecture (``--model`` and its options), initialised from ``seed`` (default
    ``cfg.seed``): theta_0. ``shape`` is anything with ``in_channels``, ``num_classes`` and ``image_size``
    (a ``DatasetBundle``)."""
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = build_model(cfg.model.model, shape.in_channels, shape.num_classes, shape.image_size,
                        **cfg.model.factory_kwargs())
    check_output_width(model, cfg.model.model, shape.in_channels, shape.num_classes, shape.image_size)
    return model


def check_output_width(model: nn.Module, name: str, in_channels: int, num_classes: int,
                       image_size: tuple[int, int]) -> None:
    """Raise unless ``model`` maps two [C, H, W] zero images to [2, num_classes] logits (one eval-mode forward;
    no random numbers drawn, nothing in the model changed)."""
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, in_channels, *image_size))
    except (RuntimeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise ConfigError(f"model {name!r} fails on {in_channels}x{image_size[0]}x{image_size[1]} images ({reason}); "
                          "build it for the dataset's image shape") from None
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"model {name!r} outputs {got} for 2 images but the dataset has {num_classes} classes: "
                          f"make its last layer output num_classes ({num_classes}) logits")


def forward_with(model: nn.Module, params: dict[str, Tensor], x: Tensor,
                 buffers: dict[str, Tensor] | None = None) -> Tensor:
    """``model(x)`` in eval mode with ``params`` (and ``buffers``: BatchNorm statistics of the same checkpoint).

    The one ``functional_call`` of the per-cluster gradients, fine-tunes and peers: vmap-safe (eval-mode
    BatchNorm only reads its statistics). For a buffer-free model it is ``functional_call(model, params, (x,))``.
    """
    if model.training:
        model.eval()
    return functional_call(model, {**params, **buffers} if buffers else params, (x,))


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """Input of the model's last ``nn.Linear`` (in ``model.modules()`` order), without gradients.

    Args:
        model: Any model containing at least one ``nn.Linear``.
        x: Inputs, e.g. [N, C, H, W].

    Returns:
        Features [N, D] (D = the last Linear's ``in_features`` for the built-in models).

    Raises:
        ConfigError: The model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear; penultimate features need a Linear head")
    captured: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if not captured:
        raise ConfigError(f"the last nn.Linear of {type(model).__name__} never ran; register the head last")
    return captured[-1].flatten(1)


def check_functional(model: nn.Module, what: str = "this step") -> None:
    """Raise if the model has buffers, for the paths that cannot carry them (``replay`` differentiates through
    training, where BatchNorm's statistics change at every step).

    Raises:
        ConfigError: The model has buffers (e.g. BatchNorm running statistics).
    """
    names = [n for n, _ in model.named_buffers()]
    if names:
        raise ConfigError(
            f"{what} needs a buffer-free model but {type(model).__name__} has buffers "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): use nn.GroupNorm instead of BatchNorm"
        )


def _torchvision_factory(builder: str) -> ModelFactory:
    """A factory for ``torchvision.models.<builder>(num_classes=..., weights=None)`` (never downloads)."""
    import torchvision.models as tvm  # heavy optional import: only for torchvision: models

    names = tvm.list_models(module=tvm)
    if builder not in names:
        raise ConfigError(f"--model torchvision:{builder}: torchvision.models has no classifier {builder!r}; "
                          f"e.g. {', '.join(n for n in ('resnet18', 'resnet50', 'mobilenet_v3_small', 'vgg11_bn'))}")

    def factory(in_channels: int, num_classes: int, image_size: tuple[int, int], small_stem: bool = False,
                width: int | None = None, **options: Any) -> nn.Module:
        """torchvision's ``builder`` with ``options``; ``small_stem``: the CIFAR stem (3x3 stride-1 first conv, no
        max-pool) for 32x32 inputs; a new first conv for ``in_channels`` other than 3. ``width`` (``--width``, for
        the built-in models) is ignored: a builder's widths are its own."""
        try:
            model = tvm.get_model(builder, weights=None, num_classes=num_classes, **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"--model torchvision:{builder} rejected its options ({err}); pass options the "
                              "builder takes in --model-args") from None
        first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ConfigError(f"--model torchvision:{builder} has no Conv2d: use an image classifier")
        name, conv = first
        if small_stem or conv.in_channels != in_channels:
            k, stride, pad = ((3, 1, 1) if small_stem else (conv.kernel_size, conv.stride, conv.padding))
            _set_module(model, name, nn.Conv2d(in_channels, conv.out_channels, k, stride, pad,
                                               bias=conv.bias is not None))
        if small_stem:
            if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
                raise ConfigError(f"--model torchvision:{builder}: small_stem applies to ResNet-style stems (conv1, "
                                  "maxpool); drop the option")
            model.maxpool = nn.Identity()
        return model

    factory.__name__ = f"torchvision_{builder}"
    return factory


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ConfigError when a string option is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{option}={value!r} is not supported; use one of {', '.join(choices)}")


def _check_positive(**values: int) -> None:
    """Raise a ConfigError for any non-positive integer option."""
    for option, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a positive integer, got {value!r}")


def _flat_dim(features: nn.Module, in_channels: int, image_size: tuple[int, int]) -> int:
    """Flattened output size of ``features`` for one [1, C, H, W] input (dummy forward)."""
    try:
        with torch.no_grad():
            return features(torch.zeros(1, in_channels, *image_size)).flatten(1).shape[1]
    except (RuntimeError, ValueError) as err:  # too-small maps: pooling gives 0x0, GroupNorm rejects 1x1
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        msg = f"image_size {tuple(image_size)} is too small ({reason}); use bigger images or fewer stages"
        raise ConfigError(msg) from None


def _instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm without buffers: one GroupNorm group per channel."""
    return nn.GroupNorm(channels, channels, affine=True)


class _FeaturesClassifier(nn.Module):
    """``classifier(features(x).flatten(1))``."""

    def __init__(self, features: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("convnet")
def convnet(
    in_channels: int, num_classes: int, image_size: tuple[int, int],
    width: int = 128, depth: int = 3, norm: str = "instancenorm", pooling: str = "avg",
) -> nn.Module:
    """ConvNet of dataset condensation (Zhao et al.): ``depth`` x [conv3x3, norm, ReLU, pool] + Linear.

    28x28 inputs get padding 3 in the first conv (28 -> 32), so width 128, depth 3 gives
    32 -> 16 -> 8 -> 4 and a Linear(2048, num_classes).

    Args:
        width: Channels of every conv.
        depth: Number of conv blocks.
        norm: "instancenorm" (GroupNorm, one group per channel) or "none".
        pooling: "avg", "max" or "none" (2x2, stride 2).

    Returns:
        Module mapping [N, in_channels, H, W] -> [N, num_classes].
    """
    _check_positive(width=width, depth=depth)
    _check_choice("norm", norm, ("instancenorm", "none"))
    _check_choice("pooling", pooling, ("avg", "max", "none"))
    layers: list[nn.Module] = []
    channels = in_channels
    for d in range(depth):
        padding = 3 if d == 0 and tuple(image_size) == (28, 28) else 1
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=padding))
        if norm == "instancenorm":
            layers.append(_instance_norm(width))
        layers.append(nn.ReLU())
        if pooling == "avg":
            layers.append(nn.AvgPool2d(2))
        elif pooling == "max":
            layers.append(nn.MaxPool2d(2))
        channels = width
    features = nn.Sequential(*layers)
    return _FeaturesClassifier(features, nn.Linear(_flat_dim(features, in_channels, image_size), num_classes))


@register_model("alexnet")
def alexnet(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128) -> nn.Module:
    """Small-image AlexNet of the dataset-condensation code (five convs, three max-pools, one Linear).

    Args:
        width: Channels of the first conv (the others are fixed at 192, 256, 192, 192).

    Returns:
        Module mapping [N, in_channels, H, W] -> [N, num_classes]; Linear(192 * 4 * 4) for 28/32-pixel inputs.
    """
    _check_positive(width=width)
    features = nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=5, padding=4 if in_channels == 1 else 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 192, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    return _FeaturesClassifier(features, nn.Linear(_flat_dim(features, in_channels, image_size), num_classes))


class _BasicBlockAP(nn.Module):
    """ResNet BasicBlock that downsamples with AvgPool2d(2) after a stride-1 conv."""

    def __init__(self, in_planes: int, planes: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=False)
        self.norm1 = _instance_norm(planes)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.norm2 = _instance_norm(planes)
        self.shortcut: nn.Module = nn.Identity()
        if downsample or in_planes != planes:
            pool = nn.AvgPool2d(2) if downsample else nn.Identity()
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), pool, _instance_norm(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(F.relu(self.norm1(self.conv1(x))))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 64) -> nn.Module:
    """ResNet-18 "AP" (DC's ResNet18AP): stride-1 convs + AvgPool2d(2) downsampling, instance norm.

    Args:
        width: Channels of the first stage; stages have width, 2w, 4w, 8w.

    Returns:
        Module mapping [N, in_channels, H, W] -> [N, num_classes] (H, W >= 8).
    """
    _check_positive(width=width)
    if min(image_size) < 8:
        raise ConfigError(f"resnet18 needs images of at least 8x8 (three 2x poolings), got {tuple(image_size)}")
    stem = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
    layers: list[nn.Module] = [stem, _instance_norm(width), nn.ReLU()]
    planes = width
    for stage, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [_BasicBlockAP(planes, out, downsample=stage > 0), _BasicBlockAP(out, out, downsample=False)]
        planes = out
    layers.append(nn.AdaptiveAvgPool2d(1))  # global average pool
    return _FeaturesClassifier(nn.Sequential(*layers), nn.Linear(8 * width, num_classes))


def _posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding [h * w, dim] (float32, CPU)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / max(dim // 4 - 1, 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class _Attention(nn.Module):
    """Pre-norm multi-head self-attention with an explicit softmax (vmap- and double-backward-safe)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(n, t, d))


class _SimpleViT(nn.Module):
    """lucidrains' SimpleViT: patch embedding, sin-cos positions, pre-norm blocks, mean pool, head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 patch_size: int, dim: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = in_channels * patch_size**2
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        # A plain attribute, not a buffer: the model must stay buffer-free for functional_call.
        self.pos_embedding = _posemb_sincos_2d(image_size[0] // patch_size, image_size[1] // patch_size, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                _Attention(dim, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim)),
            ])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img: Tensor) -> Tensor:
        n, c, h, w = img.shape
        p = self.patch_size
        patches = img.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
        x = self.patch_embed(patches) + self.pos_embedding.to(device=img.device, dtype=img.dtype)
        for attn, ff in self.blocks:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.norm(x.mean(dim=1)))


@register_model("simplevit")
def simplevit(
    in_channels: int, num_classes: int, image_size: tuple[int, int],
    patch_size: int = 4, dim: int = 128, depth: int = 4, heads: int = 4, mlp_dim: int = 256,
) -> nn.Module:
    """SimpleViT (Beyer et al. 2022, lucidrains' implementation) without buffers.

    Args:
        patch_size: Square patch side; must divide both image sides.
        dim: Token width; a multiple of 4 (sin-cos embedding) and of ``heads``.
        depth: Number of transformer blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of each block's MLP.

    Returns:
        Module mapping [N, in_channels, H, W] -> [N, num_classes].
    """
    _check_positive(patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim)
    if image_size[0] % patch_size or image_size[1] % patch_size:
        msg = f"image_size {tuple(image_size)} is not divisible by patch_size={patch_size}; change patch_size"
        raise ConfigError(msg)
    if dim % 4 or dim % heads:
        raise ConfigError(f"simplevit dim={dim} must be a multiple of 4 and of heads={heads}; change dim or heads")
    return _SimpleViT(in_channels, num_classes, tuple(image_size), patch_size, dim, depth, heads, mlp_dim)


@register_model("mlp")
def mlp(
    in_channels: int, num_classes: int, image_size: tuple[int, int], hidden: int = 512, depth: int = 2
) -> nn.Module:
    """Multi-layer perceptron on flattened pixels: Flatten, ``depth`` x [Linear, ReLU], Linear.

    Args:
        hidden: Width of every hidden layer.
        depth: Number of hidden layers (0 gives multinomial logistic regression).

    Returns:
        Module mapping [N, in_channels, H, W] -> [N, num_classes].
    """
    _check_positive(hidden=hidden)
    if not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"mlp depth must be a non-negative integer, got {depth!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = in_channels * math.prod(image_size)
    for _ in range(depth):
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
