"""``maskconnect prepare-data``: download and verify a dataset (a marker file for pipelines)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("prepare-data", help="download and verify a dataset (no-op for digits and synthetic)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--marker", help="file written (JSON) once the data is ready, for pipelines")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    import time

    from ..data import build_data, dataset_info
    from ..io import atomic_write_json

    info = dataset_info(args.dataset)
    if info.name not in ("digits", "synthetic"):
        data = build_data(info.name, data_dir=args.data_dir, batch_size=128, device="cpu", download=info.name != "imagenet")
        sizes = {"train": data.train_size, "test": data.test_size}
    else:
        sizes = {}
    if args.marker:
        atomic_write_json(args.marker, {"dataset": info.name, "data_dir": args.data_dir, **sizes,
                                        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"{info.name}: ready {sizes}")
    return 0
