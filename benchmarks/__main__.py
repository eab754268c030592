"""``python -m benchmarks run [--quick] [--only NAME[,NAME]] [--out DIR] [--in-process]``,
``python -m benchmarks online [--quick] [--out DIR]``,
``python -m benchmarks vae [--quick] [--out DIR]`` and
``python -m benchmarks lda [--quick] [--out DIR]``."""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from . import _workloads


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write results.json / results.md")
    run.add_argument(
        "--quick",
        action="store_true",
        help="every workload at N/20 with fewer iterations (a few minutes)",
    )
    run.add_argument(
        "--only",
        default=None,
        help=f"comma-separated workloads (default all: {','.join(_workloads.WORKLOADS)})",
    )
    run.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device kind>/)"
    )
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run every contender in this process (peak memory is then not reported)",
    )
    # Hidden knobs for tests and smoke runs: shrink every workload further, pick gradient methods.
    run.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("ELBO_JAX_BENCH_SCALE", 1.0)),
        help=argparse.SUPPRESS,
    )
    run.add_argument("--methods", default=None, help=argparse.SUPPRESS)  # ";"-separated names
    online = sub.add_parser(
        "online",
        help="online (stepwise, inertia), out-of-core (ej.Stream) and sharded EM; writes "
        "results_online.json / results_online.md",
    )
    online.add_argument("--quick", action="store_true", help="N/20, float64 only (a minute or two)")
    online.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device kind>/)"
    )
    # Hidden knobs for tests and smoke runs: shrink further, fewer device counts, the
    # out-of-core rows in this process (their peak memory is then not reported), and the
    # test's small grid (gmm-diag only, one batch size and kappa, two passes).
    online.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("ELBO_JAX_BENCH_SCALE", 1.0)),
        help=argparse.SUPPRESS,
    )
    online.add_argument("--devices", default=None, help=argparse.SUPPRESS)  # e.g. "1,2"
    online.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    online.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    _comparison_parser(
        sub,
        "vae",
        "elbo_jax's VAE against numpyro SVI (same networks, optimizer, minibatches); "
        "writes results_vae.json / results_vae.md",
        quick="the synthetic set at 1/10, fewer passes (~2 min)",
    )
    _comparison_parser(
        sub,
        "lda",
        "elbo_jax's LDA (batch and online VB) against scikit-learn and gensim on a "
        "synthetic corpus and gensim's Lee corpus; writes results_lda.json / results_lda.md",
        quick="2,000 synthetic training documents (~2 min)",
    )
    return p


def _comparison_parser(sub: Any, name: str, help: str, *, quick: str) -> None:
    """The ``vae`` and ``lda`` subcommands: ``--quick``, ``--out``, and the hidden knobs for
    tests and smoke runs (``--scale`` of the synthetic set, ``--smoke``: the test's sizes)."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device kind>/)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("ELBO_JAX_BENCH_SCALE", 1.0)),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)


def _run_online(args: argparse.Namespace) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 rows and scoring; float32 built explicitly

    from . import _device, _online

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / _device.device_dir_name()
    )
    results = _online.run(
        quick=args.quick,
        scale=args.scale,
        out_dir=out,
        devices=args.devices,
        in_process=args.in_process,
        smoke=args.smoke,
    )
    print(_online.markdown(results))
    print(f"wrote {results['paths']['json']} and {results['paths']['md']}", file=sys.stderr)
    return results


def _run_vae(args: argparse.Namespace) -> dict:
    # float32 throughout: the run sets JAX's 64-bit mode off itself (as a context), not here.
    from . import _device, _vae

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / _device.device_dir_name()
    )
    results = _vae.run(quick=args.quick, scale=args.scale, out_dir=out, smoke=args.smoke)
    print(_vae.markdown(results))
    print(f"wrote {results['paths']['json']} and {results['paths']['md']}", file=sys.stderr)
    return results


def _run_lda(args: argparse.Namespace) -> dict:
    # float32 training, float64 scoring: the run sets JAX's 64-bit mode itself (as contexts).
    from . import _device, _lda

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / _device.device_dir_name()
    )
    results = _lda.run(quick=args.quick, scale=args.scale, out_dir=out, smoke=args.smoke)
    print(_lda.markdown(results))
    print(f"wrote {results['paths']['json']} and {results['paths']['md']}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.command == "online":
        return _run_online(args)
    if args.command == "vae":
        return _run_vae(args)
    if args.command == "lda":
        return _run_lda(args)
    # OpenMP threads that spin while waiting make torch (pomegranate) many times slower on a
    # machine with other load; passive waiting costs nothing on a quiet one. Set before torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 rows; float32 rows are built explicitly

    from . import _device, _report, _runner
    from ._contenders import GRADIENT_METHODS

    names = list(_workloads.WORKLOADS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in _workloads.WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(_workloads.WORKLOADS)}")
    methods = None
    if args.methods is not None:
        wanted = {m.replace(" ", "") for m in args.methods.split(";") if m}
        methods = [m for m in GRADIENT_METHODS if m.replace(" ", "") in wanted]
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / _device.device_dir_name()
    )
    results = _runner.run(
        names=names, quick=args.quick, scale=args.scale, in_process=args.in_process, methods=methods
    )
    paths = _report.write(results, out, args.quick)
    print(_report.markdown(results))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
