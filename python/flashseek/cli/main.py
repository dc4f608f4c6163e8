"""The `flashseek` command: `bench`, `generate`, `info`."""
from __future__ import annotations

import argparse
import importlib.util
import sys


def _add_info(sub):
    p = sub.add_parser("info", help="show the build, the device and where each op runs")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import torch

    import flashseek

    print(f"flashseek {flashseek.__version__}  torch {torch.__version__}")
    print(f"CUDA kernels compiled in: {flashseek.built_with_cuda()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
    else:
        print("device: no CUDA GPU; every op runs its pure-torch reference on the CPU")
    print(f"kernels usable here: {flashseek.cuda_kernels_available()}")
    for name, backend in flashseek.op_backends().items():
        print(f"  torch.ops.flashseek.{name:<30} CUDA: {backend}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from flashseek.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    if importlib.util.find_spec("flashseek.cli.generate") is not None:
        from flashseek.cli import generate

        generate.add_parser(sub)
    _add_info(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
