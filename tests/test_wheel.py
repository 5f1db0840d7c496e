"""A wheel built from the repository carries the shipped model and runs it from anywhere.

``python -m build`` makes an sdist and then the wheel from the unpacked sdist, so this checks
``MANIFEST.in`` as well as ``setup.py``'s copy of ``checkpoints/`` into the package. The
wheel is installed with its dependencies from the package index into a fresh virtual
environment (a full install: a runtime dependency missing from ``pyproject.toml`` would fail
here, where the test environment's extras would hide it), then ``flashjax generate`` and
``flashjax info`` run there from a directory outside the repository. It needs the package
index and takes about a minute, most of it pip; ``.ci/run`` runs it in a step of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from flashjax import shipped

REPO = Path(__file__).resolve().parent.parent
NAME = "flashjax-docs-9m"
pytestmark = pytest.mark.wheel


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                                  f"\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, REPO])
    (whl,) = out.glob("flashjax-*.whl")
    return whl


def test_wheel_carries_the_shipped_model(wheel):
    src = REPO / "checkpoints" / NAME
    expected = {p.relative_to(src).as_posix(): p.stat().st_size for p in src.rglob("*")
                if p.is_file() and p.suffix != ".png"}  # the figures stay in the repository
    prefix = f"flashjax/_shipped/{NAME}/"
    with zipfile.ZipFile(wheel) as z:
        packaged = {i.filename.removeprefix(prefix): i.file_size for i in z.infolist()
                    if i.filename.startswith(prefix)}
        assert z.read(prefix + "config.json") == (src / "config.json").read_bytes()
        assert not [n for n in z.namelist() if n.startswith("checkpoints/")]
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "predictors/metrics.json"} <= packaged.keys()
    assert packaged == expected


def test_wheel_installs_and_generates_with_the_shipped_model(wheel, tmp_path, monkeypatch):
    env_dir, elsewhere, cache = tmp_path / "venv", tmp_path / "elsewhere", tmp_path / "cache"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "venv", env_dir])
    python, flashjax_cli = env_dir / "bin" / "python", env_dir / "bin" / "flashjax"
    start = time.perf_counter()
    _run([python, "-m", "pip", "install", "--quiet", wheel])
    print(f"pip install of the wheel and its dependencies: {time.perf_counter() - start:.1f} s")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(FLASHJAX_CACHE=str(cache), PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}")
    probe = ("import sysconfig, flashjax, flashjax.shipped as s; h = s.shipped_checkpoint(); "
             "print(sysconfig.get_path('purelib'), flashjax.__file__, h, s.converted_dir(h), "
             "sep='\\n')")
    site, module, hf_dir, converted = map(Path, _run([python, "-c", probe], cwd=elsewhere,
                                                     env=env).stdout.split("\n")[:4])
    assert module.is_relative_to(site) and site.is_relative_to(env_dir)
    assert hf_dir == site / "flashjax" / "_shipped" / NAME
    # the same files in the package and in checkpoints/ share one converted copy in the cache
    monkeypatch.setenv("FLASHJAX_CACHE", str(cache))
    assert converted == shipped.converted_dir(REPO / "checkpoints" / NAME)

    proc = _run([flashjax_cli, "generate", "--max-new-tokens", "8", "--prompt",
                 "The Python interpreter"], cwd=elsewhere, env=env)
    assert proc.stdout.startswith("The Python interpreter")
    assert len(proc.stdout.strip()) > len("The Python interpreter")
    assert f"converting the shipped model {NAME} into {converted}" in proc.stderr
    assert (converted / "manifest.json").is_file()
    info = _run([flashjax_cli, "info"], cwd=elsewhere, env=env).stdout
    assert f"shipped model        {hf_dir}\n  converted            {converted}\n" in info
