"""Model specifications: {D, w, C} plus dataset layout, validated at the edge.

Names follow the paper: depth D, bottleneck width w, cardinality C, fan-in K, connectivity kinds
``full`` (Fixed-Full = ResNeXt), ``random`` (Fixed-Random) and ``learned`` (MaskConnect).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import ConfigError

CONNECTIVITIES = ("full", "random", "learned")
LAYOUTS = ("cifar", "imagenet")

# Dataset -> (layout, classes, input channels, image size). The data layer (maskconnect.data) knows
# how to load each; the model only needs these numbers.
DATASET_LAYOUTS = {
    "cifar10": ("cifar", 10, 3, 32),
    "cifar100": ("cifar", 100, 3, 32),
    "imagenet": ("imagenet", 1000, 3, 224),
    "digits": ("cifar", 10, 1, 8),
    "synthetic": ("cifar", 10, 3, 32),
}

# ImageNet depths -> modules per stage (ResNeXt-50 / -101).
IMAGENET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# Output width of the first stage, per named CIFAR spec (docs/design.md section 1). The small models'
# 64/128/256 widths are inferred from the paper's parameter counts; {29,64,8} is ResNeXt-29 8x64d.
CIFAR_STAGE_WIDTH = {(20, 4, 8): 64, (29, 8, 8): 64, (29, 64, 8): 256}
DEFAULT_CIFAR_STAGE_WIDTH = 64
IMAGENET_STAGE_WIDTH = 256

# The paper's configurations (name -> (D, w, C)), the registry the CLI and grids refer to.
PAPER_ARCHS = {
    "cifar": [(20, 4, 8), (29, 8, 8), (29, 64, 8)],
    "imagenet": [(50, 4, 32), (101, 4, 32), (101, 4, 64)],
}


def parse_arch(text: str | tuple | list) -> tuple[int, int, int]:
    """Parse ``"D,w,C"`` (also ``"D-w-C"`` or ``"{D,w,C}"``) into integers."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        s = str(text).strip().strip("{}()[]")
        # "29,8,8" is canonical; "29-8-8" (run directories) is accepted when no comma is present.
        sep = "," if "," in s else "-"
        parts = [p.strip() for p in s.split(sep)]
    try:
        if len(parts) != 3:
            raise ValueError
        d, w, c = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError("arch", text, "three integers 'D,w,C' (depth, bottleneck width, cardinality), e.g. '29,8,8'") from None
    return d, w, c


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model.

    ``fan_in`` is K: how many branches of the previous module each branch reads. For ``full`` it is C.
    ``stage_width`` is the output width of the first stage (it doubles per stage); ``None`` takes the
    default for the layout and {D,w,C} (see ``CIFAR_STAGE_WIDTH``).
    """

    depth: int
    width: int
    cardinality: int
    connectivity: str = "full"
    fan_in: int | None = None
    dataset: str = "cifar100"
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    stage_width: int | None = None
    seed: int = 0
    mask_init: float = 0.5
    layout: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    # -- derived -------------------------------------------------------------------------------
    @property
    def D(self) -> int:  # noqa: N802 - the paper's symbol
        return self.depth

    @property
    def w(self) -> int:
        return self.width

    @property
    def C(self) -> int:  # noqa: N802
        return self.cardinality

    @property
    def K(self) -> int:  # noqa: N802
        return self.fan_in if self.fan_in is not None else self.cardinality

    @property
    def arch(self) -> str:
        return f"{self.depth},{self.width},{self.cardinality}"

    @property
    def masked(self) -> bool:
        return self.connectivity != "full"

    @property
    def stages(self) -> tuple[int, ...]:
        """Modules per stage."""
        if self.layout == "imagenet":
            return IMAGENET_STAGES[self.depth]
        n = (self.depth - 2) // 9
        return (n, n, n)

    @property
    def num_modules(self) -> int:
        return sum(self.stages)

    def stage_widths(self) -> list[int]:
        return [self.stage_width * 2**s for s in range(len(self.stages))]

    def branch_widths(self) -> list[int]:
        """Width of one branch (w at stage 1, doubling per stage)."""
        return [self.width * 2**s for s in range(len(self.stages))]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    def replace(self, **kw) -> "ModelSpec":
        return replace(self, **kw)


def make_spec(
    arch: str | tuple,
    *,
    connectivity: str = "full",
    fan_in: int | None = None,
    dataset: str = "cifar100",
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    stage_width: int | None = None,
    seed: int = 0,
    mask_init: float = 0.5,
) -> ModelSpec:
    """Build and validate a :class:`ModelSpec`; every bad field raises :class:`ConfigError`."""
    d, w, c = parse_arch(arch)
    return validate(
        ModelSpec(
            depth=d, width=w, cardinality=c, connectivity=connectivity, fan_in=fan_in, dataset=dataset,
            num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            stage_width=stage_width, seed=seed, mask_init=mask_init,
        )
    )


def validate(spec: ModelSpec) -> ModelSpec:
    """Check every field and fill in dataset-derived defaults. Returns the completed spec."""
    if spec.dataset not in DATASET_LAYOUTS:
        raise ConfigError("dataset", spec.dataset, f"one of {', '.join(DATASET_LAYOUTS)}")
    layout, classes, chans, size = DATASET_LAYOUTS[spec.dataset]
    layout = spec.layout or layout
    if layout not in LAYOUTS:
        raise ConfigError("layout", layout, f"one of {', '.join(LAYOUTS)}")
    if spec.connectivity not in CONNECTIVITIES:
        raise ConfigError("connectivity", spec.connectivity, f"one of {', '.join(CONNECTIVITIES)}")
    for name in ("width", "cardinality"):
        v = getattr(spec, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(name, v, "a positive integer")
    if layout == "cifar":
        if not isinstance(spec.depth, int) or spec.depth < 11 or (spec.depth - 2) % 9:
            raise ConfigError("depth", spec.depth, "9n+2 with n >= 1 for CIFAR-style models (e.g. 20 or 29)")
    elif spec.depth not in IMAGENET_STAGES:
        raise ConfigError("depth", spec.depth, f"one of {sorted(IMAGENET_STAGES)} for ImageNet models")
    c = spec.cardinality
    k = spec.fan_in
    if spec.connectivity == "full":
        if k is not None and k != c:
            raise ConfigError("fan_in", k, f"equal to C={c} for connectivity 'full' (or omitted)")
        k = c
    elif k is None:
        raise ConfigError("fan_in", k, f"an integer K with 1 <= K <= C={c} for connectivity '{spec.connectivity}'")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= c:
        raise ConfigError("fan_in", k, f"an integer K with 1 <= K <= C={c}")
    if not 0.0 < float(spec.mask_init) <= 1.0:
        raise ConfigError("mask_init", spec.mask_init, "a number in (0, 1]")
    num_classes = spec.num_classes if spec.num_classes is not None else classes
    in_channels = spec.in_channels if spec.in_channels is not None else chans
    image_size = spec.image_size if spec.image_size is not None else size
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(name, v, "a positive integer")
    stage_width = spec.stage_width
    if stage_width is None:
        if layout == "imagenet":
            stage_width = IMAGENET_STAGE_WIDTH
        else:
            stage_width = CIFAR_STAGE_WIDTH.get((spec.depth, spec.width, c), DEFAULT_CIFAR_STAGE_WIDTH)
    if not isinstance(stage_width, int) or stage_width < 1:
        raise ConfigError("stage_width", stage_width, "a positive integer")
    return replace(
        spec, layout=layout, fan_in=k, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, stage_width=stage_width,
    )
