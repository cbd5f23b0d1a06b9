"""`make test-qemu-user`: the guest's arm64 CPython under qemu-aarch64 user-mode emulation.

The fast lane next to the full-system guest: no kernel, no boot, no binfmt_misc —
``qemu-aarch64 -L ROOTFS ROOTFS/usr/bin/python3`` runs pytest on this repository's
core tests with the guest's own Python, cbor2 and cryptography (aarch64 builds).
pytest and hypothesis (pure Python wheels) are downloaded once into the image cache.

    python simulators/qemu/user_mode.py [-- PYTEST_ARGS...]
    python simulators/qemu/user_mode.py --licagent status --state DIR ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hw.backends.qemu import default_image_dir, load_manifest  # noqa: E402

PIP_INDEX = os.environ.get("LICQEMU_PIP_INDEX", "https://pypi.org/simple")
TEST_DEPS = ["pytest==9.2.0", "hypothesis>=6.100,<7"]
#: the core tests: everything under tests/agent that does not start host subprocesses
#: (sys.executable is an arm64 binary here, which the host cannot execute without
#: binfmt_misc)
CORE_TESTS = ["tests/agent/test_smoke.py", "tests/agent/test_lifecycle.py",
              "tests/agent/test_refusals.py", "tests/agent/test_keys.py",
              "tests/agent/test_store_faults.py", "tests/agent/test_hostile.py",
              "tests/agent/test_state_machine.py", "tests/agent/test_fuzz.py"]
CORE_DESELECT = ["tests/agent/test_hostile.py::"
                 "test_hostile_cbor_resident_memory_in_a_fresh_process"]


def test_deps(cache: Path) -> Path:
    key = hashlib.sha256(" ".join(TEST_DEPS).encode()).hexdigest()[:12]
    dest = cache / f"testdeps-{key}"
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    wheels = cache / f"testdeps-{key}.wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--quiet",
                    "--disable-pip-version-check", "--index-url", PIP_INDEX, "--dest",
                    str(wheels), "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
                    "--python-version", "3.11", "--implementation", "cp", *TEST_DEPS],
                   check=True)
    for whl in sorted(wheels.glob("*.whl")):
        if not whl.name.endswith("-none-any.whl"):
            continue  # compiled extras are not needed; pytest and hypothesis are pure
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    shutil.rmtree(wheels)
    (dest / ".complete").write_text("\n".join(TEST_DEPS) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="user_mode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--licagent", action="store_true",
                    help="run licagent with the remaining arguments instead of pytest")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    args = [a for a in ns.args if a != "--"] if ns.args[:1] == ["--"] else ns.args
    cache = default_image_dir()
    rootfs = Path(load_manifest(cache)["rootfs"])
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise SystemExit("user_mode.py: qemu-aarch64 is missing (apt-get install qemu-user)")
    env = dict(os.environ)
    if ns.licagent:
        env["PYTHONPATH"] = str(REPO)
        cmd = [qemu, "-L", str(rootfs), str(rootfs / "usr/bin/python3"), "-c",
               "import sys; from apps.licagent.cli import main; sys.exit(main())", *args]
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(test_deps(cache)), str(REPO)])
        if not any((REPO / a.split("::")[0]).exists() for a in args if not a.startswith("-")):
            args = [*args, *CORE_TESTS, *(f"--deselect={t}" for t in CORE_DESELECT)]
        cmd = [qemu, "-L", str(rootfs), str(rootfs / "usr/bin/python3"), "-m", "pytest", *args]
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the host's own __pycache__ stays the host's
    return subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
