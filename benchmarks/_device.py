"""The machine and the software a run measured: device, CPU, versions, commit, date."""

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
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


def peers_available() -> dict[str, str | None]:
    """``None`` where a peer can run, else why not."""
    out = {"sklearn": None, "pomegranate": None}
    if importlib.util.find_spec("sklearn") is None:
        out["sklearn"] = "not installed (pip install -e '.[bench]')"
    missing = [m for m in ("torch", "pomegranate") if importlib.util.find_spec(m) is None]
    if missing:
        out["pomegranate"] = f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    return out
