"""The machine and the software a run measured: device, CPU, versions, commit, date."""

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _git_commit() -> str | None:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "jax_device": str(dev),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "elbo_jax",
                "jax",
                "jaxlib",
                "numpy",
                "scipy",
                "scikit-learn",
                "torch",
                "pomegranate",
                "hmmlearn",
                "dynamax",
                "tfp-nightly",
                "pykalman",
                "optax",
                "equinox",
            )
        },
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def device_dir_name() -> str:
    import jax

    platform_name = jax.devices()[0].platform
    return "gpu" if platform_name in ("gpu", "cuda", "rocm") else platform_name


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _import_error(modules: list[str], timeout_s: float = 120.0) -> str | None:
    """``None`` if ``modules`` import in a fresh interpreter (with float64 JAX), else the
    last line of the error: a peer that is installed but cannot run with this JAX is
    skipped with that reason instead of failing every task."""
    code = "import jax; jax.config.update('jax_enable_x64', True)\n" + "".join(
        f"import {m}\n" for m in modules
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"importing {', '.join(modules)} took over {timeout_s:.0f} s"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {proc.returncode}"


def peers_available(needed=None, families=()) -> dict[str, str | None]:
    """``None`` where a peer can run, else why not. ``needed``: the contenders of the run
    (default: the mixtures' peers only); ``families``: its model families. A key
    ``"<contender>@<family>"`` says a contender cannot run one family (elbo_jax without
    ``ej.models.LinearGaussianSSM``)."""
    needed = {"sklearn", "pomegranate"} if needed is None else set(needed)
    out: dict[str, str | None] = {"sklearn": None, "pomegranate": None}
    hint = "(pip install -e '.[bench]')"
    if importlib.util.find_spec("sklearn") is None:
        out["sklearn"] = f"not installed {hint}"
    missing = [m for m in ("torch", "pomegranate") if importlib.util.find_spec(m) is None]
    if missing:
        out["pomegranate"] = f"not installed: {', '.join(missing)} {hint}"
    for peer, modules in (("hmmlearn", ["hmmlearn"]), ("pykalman", ["pykalman"])):
        if peer in needed:
            absent = [m for m in modules if importlib.util.find_spec(m) is None]
            out[peer] = f"not installed: {', '.join(absent)} {hint}" if absent else None
    if "dynamax" in needed:
        if importlib.util.find_spec("dynamax") is None:
            out["dynamax"] = f"not installed {hint}"
        else:
            err = _import_error(["dynamax.hidden_markov_model", "dynamax.linear_gaussian_ssm"])
            jax_version = _version("jax")
            out["dynamax"] = None if err is None else f"not runnable with jax {jax_version} ({err})"
    if "lgssm" in families:
        import elbo_jax as ej

        if not hasattr(ej.models, "LinearGaussianSSM"):
            out["elbo_jax@lgssm"] = (
                "not available: this elbo_jax has no ej.models.LinearGaussianSSM yet"
            )
    return out
