"""Model specifications: a model family, its architecture and the dataset layout, validated at the edge.

Two families (docs/design.md sections 1 and 12), one registry (:data:`FAMILIES`):

* ``resnext``: {D, w, C} = depth, bottleneck width, cardinality, written ``"D,w,C"`` (``"29,8,8"``).
  Connectivity ``full`` (Fixed-Full = ResNeXt), ``random`` (Fixed-Random) or ``learned`` (MaskConnect):
  each branch of a module reads K of the C branches of the previous module.
* ``resnet``: the single-branch ResNets of the ECCV extension, written ``"resnetD"`` (``"resnet38"``).
  Connectivity ``prev`` (Fixed-Prev = the standard ResNet), ``random`` or ``learned``: each block reads
  the sum of K earlier blocks' outputs, chosen among all earlier blocks.

Names follow the paper: depth D, width w, cardinality C (1 for a ResNet), fan-in K. Torch-free: the grid
loader and the report read these rules too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from .defaults import DEFAULT_MASK_INIT
from .errors import ConfigError

MASKED = ("random", "learned")
CONNECTIVITIES = ("full", "prev", *MASKED)   # full: ResNeXt's baseline wiring; prev: ResNet's
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



class Family:
    """A model family: how its architectures are written, their stages and widths, its baseline wiring
    and the fan-ins its masks allow. One instance per family in :data:`FAMILIES`; the model classes of
    each family are registered in :mod:`maskconnect.models`."""

    name = ""
    title = ""
    baseline = ""                 # the connectivity of the original network (no masks)
    example = ""
    token_regex = ""              # the architecture's spelling in a run id
    paper_archs: dict[str, tuple[str, ...]] = {}   # layout -> the paper's architectures

    @property
    def connectivities(self) -> tuple[str, ...]:
        return (self.baseline, *MASKED)

    # -- architectures ----------------------------------------------------------------------------
    def parse(self, text) -> dict | None:
        """Fields (depth, width, cardinality) of ``text`` if it is this family's spelling, else None."""
        raise NotImplementedError

    def arch(self, spec: "ModelSpec") -> str:
        raise NotImplementedError

    def token(self, arch: str) -> str:
        """The architecture in a run id (no commas): ``29-8-8``, ``resnet38``."""
        return arch.replace(",", "-")

    def label(self, arch: str) -> str:
        """The paper's notation: ``{29,8,8}``, ``ResNet-38``."""
        raise NotImplementedError

    def stages(self, depth: int, layout: str) -> tuple[int, ...]:
        """Modules (ResNeXt) or blocks (ResNet) per stage."""
        raise NotImplementedError

    def check_depth(self, depth, layout: str) -> None:
        raise NotImplementedError

    def complete(self, spec: "ModelSpec") -> dict:
        """Fields the family derives from the layout (stage width, width); ``spec`` has its layout."""
        raise NotImplementedError

    # -- connectivity -----------------------------------------------------------------------------
    def max_fan_in(self, spec: "ModelSpec") -> int:
        """The largest K: every candidate a masked row can read."""
        raise NotImplementedError

    def baseline_fan_in(self, spec: "ModelSpec") -> int:
        """K of the baseline wiring (C for ResNeXt, 1 for ResNet)."""
        raise NotImplementedError

    def row_candidates(self, spec: "ModelSpec") -> list[int]:
        """How many sources each mask row may choose from, row by row (a row with at most K reads them all)."""
        raise NotImplementedError

    def paper_stage_width(self, arch: str) -> int | None:
        """Stage 1's output width in the paper's network ``arch``; None if the paper has no such model."""
        for layout, archs in self.paper_archs.items():
            if arch in archs:
                fields = self.parse(arch)
                probe = ModelSpec(family=self.name, layout=layout, **fields)
                return self.complete(probe)["stage_width"]
        return None


class ResNeXtFamily(Family):
    name, title, baseline, example = "resnext", "ResNeXt", "full", "29,8,8"
    token_regex = r"[0-9]+-[0-9]+-[0-9]+"
    # ImageNet depths -> modules per stage (ResNeXt-50 / -101).
    IMAGENET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
    # Stage 1's output width per named CIFAR model (docs/design.md section 1): the small models' 64 is
    # inferred from the paper's parameter counts; {29,64,8} is ResNeXt-29 8x64d.
    CIFAR_STAGE_WIDTH = {(20, 4, 8): 64, (29, 8, 8): 64, (29, 64, 8): 256}
    DEFAULT_CIFAR_STAGE_WIDTH = 64
    IMAGENET_STAGE_WIDTH = 256
    paper_archs = {"cifar": ("20,4,8", "29,8,8", "29,64,8"), "imagenet": ("50,4,32", "101,4,32", "101,4,64")}

    def parse(self, text) -> dict | None:
        if isinstance(text, (tuple, list)):
            parts = list(text)
        else:
            s = str(text).strip().strip("{}()[]")
            sep = "," if "," in s else "-"   # "29,8,8" is canonical; "29-8-8" (run ids) without a comma
            parts = [p.strip() for p in s.split(sep)]
        try:
            if len(parts) != 3 or any(isinstance(p, bool) for p in parts):
                return None
            d, w, c = (int(p) for p in parts)
        except (TypeError, ValueError):
            return None
        return {"depth": d, "width": w, "cardinality": c}

    def arch(self, spec) -> str:
        return f"{spec.depth},{spec.width},{spec.cardinality}"

    def label(self, arch: str) -> str:
        return "{" + arch + "}"

    def stages(self, depth: int, layout: str) -> tuple[int, ...]:
        if layout == "imagenet":
            return self.IMAGENET_STAGES[depth]
        n = (depth - 2) // 9
        return (n, n, n)

    def check_depth(self, depth, layout: str) -> None:
        if layout == "cifar":
            if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
                raise ConfigError("depth", depth, "9n+2 with n >= 1 for CIFAR-style ResNeXts (e.g. 20 or 29)")
        elif depth not in self.IMAGENET_STAGES:
            raise ConfigError("depth", depth, f"one of {sorted(self.IMAGENET_STAGES)} for ImageNet ResNeXts")

    def complete(self, spec) -> dict:
        if spec.stage_width is not None:
            width = spec.stage_width
        elif spec.layout == "imagenet":
            width = self.IMAGENET_STAGE_WIDTH
        else:
            width = self.CIFAR_STAGE_WIDTH.get((spec.depth, spec.width, spec.cardinality), self.DEFAULT_CIFAR_STAGE_WIDTH)
        return {"stage_width": width}

    def max_fan_in(self, spec) -> int:
        return spec.cardinality

    def baseline_fan_in(self, spec) -> int:
        return spec.cardinality

    def row_candidates(self, spec) -> list[int]:
        return [spec.cardinality] * ((spec.num_modules - 1) * spec.cardinality)   # C branches of the previous module


class ResNetFamily(Family):
    """The ResNets of the ECCV extension (docs/design.md section 12): CIFAR's (3x3 stem of 16, three
    stages of n basic blocks, widths 16/32/64, option-A shortcuts, D = 6n + 2) and ImageNet's bottleneck
    ResNets (torchvision's layout). Cardinality 1; ``width`` is a block's inner width at stage 1."""

    name, title, baseline, example = "resnet", "ResNet", "prev", "resnet38"
    token_regex = r"resnet[0-9]+"
    IMAGENET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
    CIFAR_STAGE_WIDTH = 16
    IMAGENET_STAGE_WIDTH = 256    # bottleneck blocks: inner width 64, output 4 x 64
    EXPANSION = {"cifar": 1, "imagenet": 4}
    paper_archs = {"cifar": ("resnet38", "resnet74", "resnet110"), "imagenet": ("resnet50",)}
    _RE = re.compile(r"^resnet[-_ ]?(\d+)$")

    def parse(self, text) -> dict | None:
        if not isinstance(text, str):
            return None
        m = self._RE.match(text.strip().lower())
        if not m:
            return None
        return {"depth": int(m.group(1)), "width": 0, "cardinality": 1}   # width: from the layout

    def arch(self, spec) -> str:
        return f"resnet{spec.depth}"

    def label(self, arch: str) -> str:
        return f"ResNet-{arch.removeprefix('resnet')}"

    def stages(self, depth: int, layout: str) -> tuple[int, ...]:
        if layout == "imagenet":
            return self.IMAGENET_STAGES[depth]
        n = (depth - 2) // 6
        return (n, n, n)

    def check_depth(self, depth, layout: str) -> None:
        if layout == "cifar":
            if not isinstance(depth, int) or depth < 14 or (depth - 2) % 6:
                raise ConfigError("depth", depth, "6n+2 with n >= 2 for CIFAR ResNets (e.g. 38, 74 or 110)")
        elif depth not in self.IMAGENET_STAGES:
            raise ConfigError("depth", depth, f"one of {sorted(self.IMAGENET_STAGES)} for ImageNet ResNets "
                                              "(bottleneck blocks)")

    def complete(self, spec) -> dict:
        default = self.IMAGENET_STAGE_WIDTH if spec.layout == "imagenet" else self.CIFAR_STAGE_WIDTH
        width = spec.stage_width if spec.stage_width is not None else default
        expansion = self.EXPANSION[spec.layout]
        if not isinstance(width, int) or isinstance(width, bool) or width < 1 or width % expansion:
            raise ConfigError("stage_width", width, f"a positive multiple of {expansion} for this ResNet")
        return {"stage_width": width, "width": width // expansion}

    def max_fan_in(self, spec) -> int:
        return sum(self.stages(spec.depth, spec.layout)) - 1   # the last block's candidates

    def baseline_fan_in(self, spec) -> int:
        return 1

    def row_candidates(self, spec) -> list[int]:
        return list(range(1, spec.num_modules))   # block j (1-based) reads among blocks 1..j-1; the stem only block 1


FAMILIES: dict[str, Family] = {f.name: f for f in (ResNeXtFamily(), ResNetFamily())}


def family_of(arch) -> Family:
    """The family whose spelling ``arch`` is ("29,8,8": resnext, "resnet38": resnet)."""
    for fam in FAMILIES.values():
        if fam.parse(arch) is not None:
            return fam
    raise ConfigError("arch", arch, "a ResNeXt as 'D,w,C' (depth, bottleneck width, cardinality), e.g. '29,8,8', "
                                    "or a ResNet as 'resnetD', e.g. 'resnet38'")


def canonical_arch(arch) -> str:
    """``arch`` in its canonical spelling: "29-8-8", "{29,8,8}", (29, 8, 8) -> "29,8,8"; "ResNet-38" -> "resnet38"."""
    fam = family_of(arch)
    f = fam.parse(arch)
    return fam.arch(ModelSpec(family=fam.name, **f))


def arch_token(arch) -> str:
    """The architecture as a run id spells it (no commas): "29,8,8" -> "29-8-8", "resnet38" -> "resnet38"."""
    fam = family_of(arch)
    return fam.token(canonical_arch(arch))


def baseline_of(arch) -> tuple[str, int]:
    """The baseline connectivity of ``arch``'s family and its fan-in: ("full", C) or ("prev", 1)."""
    fam = family_of(arch)
    spec = ModelSpec(family=fam.name, **fam.parse(arch))
    return fam.baseline, fam.baseline_fan_in(spec)


def arch_label(arch) -> str:
    """The paper's notation of an architecture: {29,8,8}, ResNet-38."""
    fam = family_of(arch)
    return fam.label(canonical_arch(arch))


def parse_arch(text: str | tuple | list) -> tuple[int, int, int]:
    """(D, w, C) of a ResNeXt ``"D,w,C"`` (also ``"D-w-C"`` or ``"{D,w,C}"``) or of a ResNet ``"resnetD"``
    ((D, 0, 1): its width comes from the layout)."""
    f = family_of(text).parse(text)
    return f["depth"], f["width"], f["cardinality"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model.

    ``fan_in`` is K: how many sources each masked row reads (branches of the previous module for a
    ResNeXt, earlier blocks for a ResNet); for the baseline wiring it is the family's (C, or 1).
    ``stage_width`` is the output width of the first stage (it doubles per stage); ``None`` takes the
    family's default for the layout.
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
    mask_init: float = DEFAULT_MASK_INIT
    layout: str | None = None
    family: str = "resnext"

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
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def K(self) -> int:  # noqa: N802
        return self.fan_in if self.fan_in is not None else self.fam.baseline_fan_in(self)

    @property
    def arch(self) -> str:
        return self.fam.arch(self)

    @property
    def masked(self) -> bool:
        return self.connectivity in MASKED

    @property
    def max_fan_in(self) -> int:
        return self.fam.max_fan_in(self)

    @property
    def stages(self) -> tuple[int, ...]:
        """Modules (ResNeXt) or blocks (ResNet) per stage."""
        return self.fam.stages(self.depth, self.layout or DATASET_LAYOUTS[self.dataset][0])

    @property
    def num_modules(self) -> int:
        return sum(self.stages)

    def stage_widths(self) -> list[int]:
        return [self.stage_width * 2**s for s in range(len(self.stages))]

    def branch_widths(self) -> list[int]:
        """Width inside one branch (ResNeXt: w at stage 1) or block (ResNet), doubling per stage."""
        return [self.width * 2**s for s in range(len(self.stages))]

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "ModelSpec":
        return replace(self, **kw)


def make_spec(
    arch: str | tuple,
    *,
    connectivity: str | None = None,
    fan_in: int | None = None,
    dataset: str = "cifar100",
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    stage_width: int | None = None,
    seed: int = 0,
    mask_init: float = DEFAULT_MASK_INIT,
) -> ModelSpec:
    """Build and validate a :class:`ModelSpec`; every bad field raises :class:`ConfigError`.
    ``connectivity`` defaults to the family's baseline (``full``, ``prev``)."""
    fam = family_of(arch)
    return validate(
        ModelSpec(
            **fam.parse(arch), family=fam.name, connectivity=connectivity or fam.baseline, fan_in=fan_in,
            dataset=dataset, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            stage_width=stage_width, seed=seed, mask_init=mask_init,
        )
    )


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(name, v, "a positive integer")


def validate(spec: ModelSpec) -> ModelSpec:
    """Check every field and fill in dataset- and family-derived defaults. Returns the completed spec."""
    if spec.dataset not in DATASET_LAYOUTS:
        raise ConfigError("dataset", spec.dataset, f"one of {', '.join(DATASET_LAYOUTS)}")
    if spec.family not in FAMILIES:
        raise ConfigError("family", spec.family, f"one of {', '.join(FAMILIES)}")
    fam = FAMILIES[spec.family]
    layout, classes, chans, size = DATASET_LAYOUTS[spec.dataset]
    layout = spec.layout or layout
    if layout not in LAYOUTS:
        raise ConfigError("layout", layout, f"one of {', '.join(LAYOUTS)}")
    if spec.connectivity not in fam.connectivities:
        raise ConfigError("connectivity", spec.connectivity,
                          f"one of {', '.join(fam.connectivities)} for a {fam.title} ({fam.baseline}: the {fam.title}'s "
                          "own wiring)")
    fam.check_depth(spec.depth, layout)
    spec = replace(spec, layout=layout)
    spec = replace(spec, **fam.complete(spec))
    for name in ("width", "cardinality", "stage_width"):
        _positive(name, getattr(spec, name))
    k, kmax = spec.fan_in, fam.max_fan_in(spec)
    if spec.connectivity == fam.baseline:
        base = fam.baseline_fan_in(spec)
        if k is not None and k != base:
            raise ConfigError("fan_in", k, f"{base} for connectivity '{fam.baseline}' (or omitted)")
        k = base
    elif k is None or not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= kmax:
        what = f"C={kmax}" if fam.name == "resnext" else f"{kmax} (the blocks before the last of this {fam.label(spec.arch)})"
        raise ConfigError("fan_in", k, f"an integer K with 1 <= K <= {what} for connectivity '{spec.connectivity}'")
    if isinstance(spec.mask_init, bool) or not isinstance(spec.mask_init, (int, float)) or not 0.0 < float(spec.mask_init) <= 1.0:
        raise ConfigError("mask_init", spec.mask_init, "a number in (0, 1]")
    num_classes = spec.num_classes if spec.num_classes is not None else classes
    in_channels = spec.in_channels if spec.in_channels is not None else chans
    image_size = spec.image_size if spec.image_size is not None else size
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        _positive(name, v)
    return replace(spec, fan_in=k, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
