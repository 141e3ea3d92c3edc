"""Tests for ddm_hpc.models: registry, shapes, buffer-freeness, vmap and double backward."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ddm_hpc.errors import ConfigError
from ddm_hpc.models import (
    MODEL_REGISTRY,
    build_model,
    check_functional,
    model_kwargs_for,
    penultimate_features,
    register_model,
)

BUILTIN = ("convnet", "alexnet", "resnet18", "simplevit", "mlp")
REGISTERED = sorted(MODEL_REGISTRY)  # snapshot before any test registers a user model
# Small options so the gradient tests stay fast on 2 CPU cores.
TINY = {
    "convnet": {"width": 8},
    "alexnet": {"width": 8},
    "resnet18": {"width": 4},
    "simplevit": {"dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32},
    "mlp": {"hidden": 16},
}
SHAPES = [(1, (28, 28)), (3, (32, 32))]
ATOL = 1e-5


def _tiny(name: str, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels, 10, image_size, **TINY[name])


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.fixture
def user_names() -> Iterator[list[str]]:
    """Names registered by a test; removed from the global registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        MODEL_REGISTRY.pop(name, None)


def test_builtins_are_registered() -> None:
    assert set(BUILTIN) <= set(REGISTERED)
    assert set(TINY) == set(BUILTIN)


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", REGISTERED)
def test_every_model_builds_with_defaults(name: str, in_channels: int, image_size: tuple[int, int]) -> None:
    model = build_model(name, in_channels, 10, image_size)
    check_functional(model)
    assert list(model.buffers()) == []
    out = model(torch.randn(2, in_channels, *image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_convnet_mnist_geometry() -> None:
    model = build_model("convnet", 1, 10, (28, 28), width=128)
    head = _last_linear(model)
    assert (head.in_features, head.out_features) == (2048, 10)
    assert build_model("convnet", 3, 10, (32, 32)).classifier.in_features == 2048
    assert build_model("alexnet", 1, 10, (28, 28)).classifier.in_features == 192 * 4 * 4


def test_convnet_options() -> None:
    x = torch.randn(2, 1, 28, 28)
    for norm in ("instancenorm", "none"):
        for pooling in ("avg", "max", "none"):
            model = build_model("convnet", 1, 10, (28, 28), width=4, depth=2, norm=norm, pooling=pooling)
            assert model(x).shape == (2, 10)
    assert not any(isinstance(m, nn.GroupNorm) for m in build_model("convnet", 1, 10, (28, 28), norm="none").modules())
    assert not any(isinstance(m, nn.ReLU) and m.inplace for name in BUILTIN for m in _tiny(name).modules())


@pytest.mark.parametrize(
    "name,kwargs,fragment",
    [
        ("convnet", {"norm": "batchnorm"}, "instancenorm"),
        ("convnet", {"pooling": "sum"}, "avg"),
        ("convnet", {"width": 0}, "width"),
        ("convnet", {"depth": 6}, "too small"),
        ("simplevit", {"patch_size": 5}, "patch_size"),
        ("simplevit", {"dim": 18}, "dim"),
    ],
)
def test_invalid_options_raise(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        build_model(name, 1, 10, (28, 28), **kwargs)
    assert "\n" not in str(err.value)


def test_penultimate_matches_manual_convnet_forward() -> None:
    model = _tiny("convnet")
    x = torch.randn(4, 1, 28, 28)
    h = x
    for layer in model.features:
        h = layer(h)
    manual = h.flatten(1)
    feats = penultimate_features(model, x)
    assert feats.shape == (4, 8 * 4 * 4)
    assert not feats.requires_grad
    torch.testing.assert_close(feats, manual.detach())
    torch.testing.assert_close(model.classifier(feats), model(x).detach())


@pytest.mark.parametrize("name", BUILTIN)
def test_penultimate_shape_every_model(name: str) -> None:
    model = _tiny(name, 3, (32, 32))
    x = torch.randn(3, 3, 32, 32)
    feats = penultimate_features(model, x)
    head = _last_linear(model)
    assert feats.shape == (3, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(head(feats), model(x))  # the head is the model's last op
    assert len(head._forward_pre_hooks) == 0  # hook removed


def test_penultimate_without_linear_raises() -> None:
    with pytest.raises(ConfigError, match="nn.Linear"):
        penultimate_features(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), torch.randn(1, 1, 5, 5))


def _stacked_params(model: nn.Module, copies: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        k: torch.stack([v.detach() + 0.1 * torch.randn(v.shape, generator=gen) for _ in range(copies)])
        for k, v in model.named_parameters()
    }


@pytest.mark.parametrize("name", BUILTIN)
def test_vmap_over_stacked_params_matches_loop(name: str) -> None:
    model = _tiny(name)
    x = torch.randn(2, 1, 28, 28)
    stacked = _stacked_params(model)
    batched = vmap(lambda p, inp: functional_call(model, p, (inp,)), in_dims=(0, None))(stacked, x)
    looped = torch.stack([functional_call(model, {k: v[i] for k, v in stacked.items()}, (x,)) for i in range(3)])
    assert batched.shape == (3, 2, 10)
    torch.testing.assert_close(batched, looped, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(looped[0], looped[1])  # the copies really differ


def _ce(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def _grad_norm_input_grad_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx sum_k ||dCE/dθ_k||² with the inner gradient from torch.func.grad."""
    x = x.clone().requires_grad_(True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: _ce(model, p, x, y))(params)
    sum(gi.pow(2).sum() for gi in g.values()).backward()
    return x.grad


@pytest.mark.parametrize("name", BUILTIN)
def test_double_backward(name: str) -> None:
    model = _tiny(name)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 1, 28, 28, generator=gen), torch.tensor([0, 3, 7])
    x_grad = _grad_norm_input_grad_func(model, x, y)
    assert x_grad is not None and x_grad.shape == x.shape
    assert torch.isfinite(x_grad).all()
    assert x_grad.abs().sum() > 0


def test_double_backward_matches_autograd_create_graph() -> None:
    model = _tiny("convnet")
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 1, 28, 28, generator=gen), torch.tensor([1, 2, 9])
    expected_x = x.clone().requires_grad_(True)
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(expected_x), y), params, create_graph=True)
    (expected,) = torch.autograd.grad(sum(gi.pow(2).sum() for gi in g), expected_x)
    torch.testing.assert_close(_grad_norm_input_grad_func(model, x, y), expected, atol=ATOL, rtol=1e-4)


def test_register_user_model(user_names: list[str]) -> None:
    user_names.append("test_tiny_user")

    @register_model("test_tiny_user")
    def tiny(in_channels: int, num_classes: int, image_size: tuple[int, int], hidden: int = 8) -> nn.Module:
        pixels = in_channels * image_size[0] * image_size[1]
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    assert MODEL_REGISTRY["test_tiny_user"] is tiny
    assert model_kwargs_for("test_tiny_user") == {"hidden": 8}
    model = build_model("test_tiny_user", 1, 10, (28, 28), hidden=5)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert penultimate_features(model, torch.randn(2, 1, 28, 28)).shape == (2, 5)

    with pytest.raises(ConfigError, match="already registered"):
        register_model("test_tiny_user")(tiny)
    register_model("test_tiny_user", overwrite=True)(lambda c, k, s: nn.Linear(c, k))
    assert MODEL_REGISTRY["test_tiny_user"] is not tiny
    with pytest.raises(ConfigError, match="already registered"):
        register_model("convnet")(tiny)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet1000", 1, 10, (28, 28))
    msg = str(err.value)
    assert "resnet1000" in msg and "\n" not in msg
    assert all(name in msg for name in BUILTIN)
    with pytest.raises(ConfigError, match="resnet1000"):
        model_kwargs_for("resnet1000")


def test_bad_kwarg_lists_accepted() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("convnet", 1, 10, (28, 28), widht=8)
    msg = str(err.value)
    assert "widht" in msg and "\n" not in msg
    assert all(opt in msg for opt in ("width", "depth", "norm", "pooling"))


def test_model_kwargs_for_builtins() -> None:
    assert model_kwargs_for("convnet") == {"width": 128, "depth": 3, "norm": "instancenorm", "pooling": "avg"}
    assert model_kwargs_for("simplevit") == {"patch_size": 4, "dim": 128, "depth": 4, "heads": 4, "mlp_dim": 256}
    assert model_kwargs_for("mlp") == {"hidden": 512, "depth": 2}


def test_check_functional_rejects_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match="GroupNorm") as err:
        check_functional(model)
    assert "running_mean" in str(err.value) and "\n" not in str(err.value)
    check_functional(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(4, 4)))
