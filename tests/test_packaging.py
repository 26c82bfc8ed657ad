"""The wheel: build it from a copy of the repository, install it into a fresh virtualenv and
import every module from there, so `packages` in setup.cfg cannot fall behind the folders.

The fresh venv has no pip and no dependencies of its own: a .pth file puts the test
interpreter's site-packages (where the dependencies are) after its own. Only directories are
added that way (the editable install's import hook there is not run), so `txsms` can only come
from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a venv (a few seconds)

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"core": "txsms.core", "connectors": "txsms.connectors", "webhooks": "txsms.webhooks"}
# Alembic runs env.py itself (it reads the engine from Alembic's context at import time):
# it is checked by running the migrations from the installed wheel instead.
RUN_BY_ALEMBIC = {"txsms.core.migrations.env"}
SKIP_DIRS = {".venv", ".git", "build", "dist", "tests", "bench", "__pycache__"}


def source_modules() -> dict[str, Path]:
    """Every module under the three folders, by the name it has once installed."""
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def wheel_path(module: str, source: Path) -> str:
    folder = next(f for f, p in FOLDERS.items() if module.startswith(p))
    return "txsms/" + folder + "/" + source.relative_to(REPO / folder).as_posix()


def run(*args: str | os.PathLike, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy, so the repository gets no build/ folder or refreshed egg-info."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=lambda folder, names: [
            n for n in names if n in SKIP_DIRS or n.endswith((".egg-info", "_cache"))
        ],
    )
    dist = root / "dist"
    # No isolation: the build backend comes from this venv, so no network is needed.
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src, cwd=src)
    [built] = dist.glob("txsms-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding only the wheel; returns its bin folder and an environment."""
    target = tmp_path_factory.mktemp("venv") / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    purelib = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=target
        ).strip()
    )
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "--quiet",
        wheel,
        cwd=target,
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TXSMS_", "VIRTUAL_ENV"))
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return target / "bin", env


def test_the_wheel_holds_every_module_and_the_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [
        wheel_path(module, path)
        for module, path in source_modules().items()
        if wheel_path(module, path) not in names
    ]
    assert missing == []
    migrations = REPO / "core" / "migrations"
    versions = sorted(p.name for p in (migrations / "versions").glob("*.py"))
    assert versions, "no migration scripts found"
    for name in ["env.py", "script.py.mako", *(f"versions/{v}" for v in versions)]:
        assert f"txsms/core/migrations/{name}" in names
    # One namespace: nothing generic such as core/ lands in site-packages.
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"txsms"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "txsms = txsms.core.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_module_imports_from_the_installed_wheel(installed, tmp_path):
    bin_dir, env = installed
    modules = sorted(set(source_modules()) - RUN_BY_ALEMBIC)
    assert "txsms.core.cli" in modules and "txsms.webhooks" in modules
    script = (
        "import importlib, json, sys\n"
        "files = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}\n"
        "print(json.dumps(files))\n"
    )
    files = json.loads(run(bin_dir / "python", "-c", script, *modules, cwd=tmp_path, env=env))
    venv_root = bin_dir.parent.resolve()
    for module, file in files.items():
        path = Path(file).resolve()
        assert path.is_relative_to(venv_root), (module, file)
        assert not path.is_relative_to(REPO), (module, file)


def test_the_installed_console_script_and_migrations_work(installed, tmp_path):
    bin_dir, env = installed
    out = run(bin_dir / "txsms", "--help", cwd=tmp_path, env=env)
    for command in ("serve", "worker", "check-config", "send", "messages", "rotate-keys", "db"):
        assert command in out

    # Alembic runs env.py and versions/*.py from inside the installed package.
    config = tmp_path / "txsms.toml"
    config.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path / "wheel.db"}"\ndata_dir = "{tmp_path / "data"}"\n'
    )
    out = run(bin_dir / "txsms", "db", "upgrade", "--config", config, cwd=tmp_path, env=env)
    head = run(
        bin_dir / "python",
        "-c",
        "from txsms.core import storage; print(storage.head_revision(), storage.MIGRATIONS)",
        cwd=tmp_path,
        env=env,
    ).split()
    assert out.strip() == f"database at revision {head[0]}"
    assert Path(head[1]).resolve().is_relative_to(bin_dir.parent.resolve())
