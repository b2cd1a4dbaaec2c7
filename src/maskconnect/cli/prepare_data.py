"""``maskconnect prepare-data``: download and verify a dataset (a marker file for pipelines)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("prepare-data", help="download and verify a dataset (no-op for digits and synthetic)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--marker", help="file written (JSON) once the data is ready, for pipelines")
    p.add_argument("--check-images", dest="check_images", choices=["header", "full", "none"], default="header",
                   help="ImageNet: open every image's header (default; minutes), decode every image (full; as long "
                        "as an epoch's loading) or neither. Unreadable files are listed on stdout, and it exits 2")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    import time

    from ..data import build_data, dataset_info
    from ..errors import DataError
    from ..io import atomic_write_json, check_output_file

    info = dataset_info(args.dataset)
    if args.marker:  # before any download: a marker that cannot be written fails in a second
        check_output_file(args.marker, "--marker")
    if info.name not in ("digits", "synthetic"):
        data = build_data(info.name, data_dir=args.data_dir, batch_size=128, device="cpu", download=info.name != "imagenet")
        sizes = {"train": data.train_size, "test": data.test_size}
    else:
        sizes = {}
    if info.name == "imagenet" and args.check_images != "none":
        from ..data.imagenet import find_bad_images

        checked, bad = find_bad_images(data.root, full=args.check_images == "full")
        for path, why in bad:
            print(f"{path}\t{why}")  # stdout: the list to remove or replace
        if bad:
            raise DataError(f"imagenet: {len(bad)} of {checked} images in {data.root} cannot be read "
                            f"({args.check_images} check), e.g. {bad[0][0]} ({bad[0][1]}); all of them are listed on "
                            "stdout: remove or replace them and rerun")
    if args.marker:
        atomic_write_json(args.marker, {"dataset": info.name, "data_dir": args.data_dir, **sizes,
                                        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"{info.name}: ready {sizes}")
    return 0
