"""``maskconnect describe``: parameters, FLOPs, modules and branches of a model."""

from __future__ import annotations

import argparse
import json

DESCRIBE_DATASETS = ("cifar10", "cifar100", "imagenet", "digits", "synthetic")


def _add_spec_arguments(p: argparse.ArgumentParser, *, dataset_required: bool = True) -> None:
    p.add_argument("--dataset", required=dataset_required, help="dataset: " + ", ".join(DESCRIBE_DATASETS))
    p.add_argument("--arch", required=True, help="a ResNeXt {D,w,C} as 'D,w,C' (e.g. 29,8,8 or 50,4,32) or a ResNet as "
                                                  "'resnetD' (e.g. resnet38, resnet50)")
    p.add_argument("--connectivity", default=None,
                   help="full (ResNeXt) or prev (ResNet): the network's own wiring, the default; random (Fixed-Random) "
                        "or learned (MaskConnect)")
    p.add_argument("--fan-in", type=int, default=None, dest="fan_in", metavar="K",
                   help="fan-in K for random/learned: 1..C for a ResNeXt, 1..L-1 earlier blocks for a ResNet of L "
                        "blocks; full uses K=C, prev K=1")
    p.add_argument("--seed", type=int, default=0, help="seed (Fixed-Random masks, initial weights); default 0")
    p.add_argument("--stage-width", type=int, default=None, dest="stage_width",
                   help="output width of stage 1 (doubles per stage); default the paper's (64 or 256 for a ResNeXt, "
                        "16 or 256 for a ResNet)")


def _spec_from_args(args):
    from ..specs import make_spec

    return make_spec(args.arch, connectivity=args.connectivity, fan_in=args.fan_in, dataset=args.dataset,
                     seed=args.seed, stage_width=args.stage_width)


def _cmd_describe(args) -> int:
    from ..describe import describe

    info = describe(_spec_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = 1e6
    from ..specs import arch_label

    unit = "blocks" if info["family"] == "resnet" else "modules"
    print(f"{info['dataset']} {arch_label(info['arch'])} connectivity={info['connectivity']} K={info['fan_in']} seed={info['seed']}")
    print(f"  stages          : {info['modules_per_stage']} {unit}, output widths {info['stage_widths']}")
    print(f"  modules         : {info['modules']}, branches {info['branches_train']} (train) -> {info['branches_test']} (test)")
    print(f"  branches/module : {info['branches_per_module']}")
    print(f"  params train    : {info['params_train'] / m:.3f}M  ({info['params_train']:,})")
    print(f"  params test     : {info['params_test'] / m:.3f}M  ({info['params_test']:,}) after pruning")
    print(f"  mask entries    : {info['masks']:,} (not weights)")
    print(f"  FLOPs/image     : {info['flops'] / 1e9:.3f}G train model, {info['flops_test'] / 1e9:.3f}G pruned (2 x MACs)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("describe", help="parameters (before/after pruning), FLOPs, modules and branches of a model",
                       description="Describe a model: parameters before ('train') and after ('test') pruning, "
                                   "FLOPs per image (torch.utils.flop_counter, 2 x MACs), modules and branches. "
                                   "Mask entries are counted separately from weights.")
    _add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (keys include params_train, params_test, flops)")
    p.set_defaults(func=_cmd_describe)
