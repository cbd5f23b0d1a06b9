"""`make qemu-image`: an arm64 Debian bookworm guest running licagent, from Debian's packages.

Everything is built into a cache folder outside the repository
(``$LICQEMU_CACHE``, default ``~/.cache/bms-licensing/qemu``):

* ``base-KEY/`` — the slow part, keyed by the Debian package versions it is made
  of: ``debootstrap --foreign --arch=arm64 --variant=minbase`` with python3 and the
  agent's dependencies (every downloaded ``.deb`` unpacked with ``dpkg-deb -x``: no
  second stage, so no chroot and no binfmt_misc are needed), the cbor2 6.x aarch64
  wheel from PyPI (bookworm's python3-cbor2 is 5.4, without the decoder options the
  agent needs), the cloud-arm64 kernel and an initramfs made of the arm64
  ``busybox-static`` and the virtio modules the kernel builds as modules.
* ``root-KEY.img`` — an ext4 image (``mkfs.ext4 -d``, no loop mount) of that tree with
  this repository's ``agent/`` and ``hw/`` in ``/opt/licagent``, keyed by the base and
  by the sources, so editing the agent rebuilds only this image (seconds).
* ``image.json`` — what the ``qemu://`` backend boots: kernel, initrd, root image,
  the rootfs folder (for ``qemu-aarch64 -L``) and the versions.

A folder already built for the same key is reused. Run as root (apt-get, file
ownership in the image); ``--force`` rebuilds everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
MIRROR = os.environ.get("LICQEMU_MIRROR", "http://deb.debian.org/debian")
PIP_INDEX = os.environ.get("LICQEMU_PIP_INDEX", "https://pypi.org/simple")
#: Debian packages inside the guest, besides the minbase system
#: (tpm2-tools for the TPM key store, issue 16; tpm-udev named because debootstrap does not
#: resolve the virtual package the TSS libraries depend on)
INCLUDE = ["python3", "python3-serial", "python3-paho-mqtt", "tpm2-tools", "tpm-udev"]
#: aarch64 wheels from PyPI (with their dependencies: cffi, pycparser) for what Debian
#: bookworm has too old: python3-cbor2 5.4 lacks the decoder options the agent uses and
#: python3-cryptography 38 lacks public_bytes_raw; the same versions as the host's venv
WHEELS = ["cbor2==6.3.0", "cryptography==50.0.2"]
#: kernel modules the initramfs loads (with their dependencies, from modules.dep)
MODULES = ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
           "tpm_tis"]  # the TPM of `-device tpm-tis-device` (device tree tcg,tpm-tis-mmio)
#: bumped when the recipe changes in a way the package versions do not show
RECIPE = "4"
#: trimmed from the image: documentation, translations, the apt cache
TRIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
        "var/cache/apt/archives", "debootstrap", "usr/share/lintian"]


def log(msg: str) -> None:
    print(f"qemu-image: {msg}", flush=True)


def run(*argv: str | Path, capture: bool = False, must: bool = True, **kw: object) -> str:
    if capture:
        kw["stdout"] = subprocess.PIPE
    p = subprocess.run([str(a) for a in argv], check=False, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0 and must:
        raise SystemExit(f"qemu-image: {' '.join(map(str, argv))} failed (exit {p.returncode})")
    return p.stdout if capture else ""


def cache_dir() -> Path:
    env = os.environ.get("LICQEMU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bms-licensing" / "qemu"


# ---------------------------------------------------------------- inputs


def ensure_arm64_lists() -> None:
    foreign = run("dpkg", "--print-foreign-architectures", capture=True).split()
    if "arm64" not in foreign:
        log("dpkg --add-architecture arm64")
        run("dpkg", "--add-architecture", "arm64")
        run("apt-get", "update", "-q")
    elif not candidate("busybox-static:arm64"):
        run("apt-get", "update", "-q")


def candidate(pkg: str) -> str:
    out = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            v = line.split(":", 1)[1].strip()
            return "" if v == "(none)" else v
    return ""


def kernel_package() -> str:
    out = run("apt-cache", "depends", "linux-image-cloud-arm64:arm64", capture=True)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-6" in line:
            return line.split()[1].split(":")[0]
    raise SystemExit("qemu-image: no linux-image-6.*-cloud-arm64 in the apt lists")


def inputs() -> dict[str, str]:
    ensure_arm64_lists()
    kpkg = kernel_package()
    pkgs = [kpkg, "busybox-static", *INCLUDE, "libc6", "python3.11"]
    # architecture-dependent packages by their arm64 name, "all" ones by their plain name
    versions = {p: candidate(f"{p}:arm64") or candidate(p) for p in pkgs}
    missing = [p for p, v in versions.items() if not v]
    if missing:
        raise SystemExit(f"qemu-image: no arm64 candidate for {', '.join(missing)}")
    initramfs = hashlib.sha256((HERE / "initramfs-init").read_bytes()).hexdigest()[:12]
    return {"recipe": RECIPE, "suite": SUITE, "kernel_package": kpkg, "initramfs": initramfs,
            "wheels": " ".join(WHEELS), **{f"deb:{k}": v for k, v in versions.items()}}


def key_of(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- base


def build_base(base: Path, inp: dict[str, str]) -> None:
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rootfs = tmp / "rootfs"
    debs = tmp / "debs"
    debs.mkdir()
    t0 = time.monotonic()
    log(f"debootstrap --foreign --arch=arm64 {SUITE} (+ {', '.join(INCLUDE)})")
    run("debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
        f"--include={','.join(INCLUDE)}", SUITE, rootfs, MIRROR)
    archives = sorted((rootfs / "var/cache/apt/archives").glob("*.deb"))
    log(f"unpacking {len(archives)} packages (no second stage: no maintainer scripts run)")
    for deb in archives:
        run("dpkg-deb", "-x", deb, rootfs)
    # provenance: every package version in the guest
    (tmp / "packages.txt").write_text("".join(d.name + "\n" for d in archives))
    configure_rootfs(rootfs)

    log("apt-get download " + inp["kernel_package"] + ":arm64 busybox-static:arm64")
    run("apt-get", "download", "-q", f"{inp['kernel_package']}:arm64", "busybox-static:arm64",
        cwd=debs)
    kdir = tmp / "kernel"
    bdir = tmp / "busybox"
    run("dpkg-deb", "-x", next(debs.glob("linux-image-*.deb")), kdir)
    run("dpkg-deb", "-x", next(debs.glob("busybox-static_*.deb")), bdir)
    busybox = bdir / "bin/busybox"
    (rootfs / "opt/licagent").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "opt/licagent/busybox")

    log(f"pip download {' '.join(WHEELS)} (manylinux aarch64, cp311)")
    wheels = tmp / "wheels"
    run(sys.executable, "-m", "pip", "download", "--isolated", "--quiet", "--disable-pip-version-check", "--index-url",
        PIP_INDEX, "--dest", wheels, "--only-binary=:all:",
        "--platform", "manylinux_2_34_aarch64", "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
        "--python-version", "3.11", "--implementation", "cp", *WHEELS)
    site = rootfs / "usr/local/lib/python3.11/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        with (tmp / "packages.txt").open("a") as f:
            f.write(whl.name + "\n")

    kver = inp["kernel_package"].removeprefix("linux-image-")
    moddir = kdir / "lib/modules" / kver
    if not moddir.exists():
        moddir = kdir / "usr/lib/modules" / kver
    shutil.copy2(next((kdir / "boot").glob("vmlinuz-*")), tmp / "vmlinuz")
    make_initrd(tmp / "initrd.img", busybox, moddir, kver, tmp / "initrd")

    for rel in TRIM:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    log("precompiling Python modules (the same CPython 3.11 bytecode as the guest's)")
    run(sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", rootfs, "-p", "/",
        rootfs / "usr/lib/python3.11", rootfs / "usr/lib/python3/dist-packages", site,
        stdout=subprocess.DEVNULL, must=False)  # a few test files of the stdlib do not compile
    shutil.rmtree(kdir)
    shutil.rmtree(bdir)
    shutil.rmtree(debs)
    shutil.rmtree(wheels)
    (tmp / "inputs.json").write_text(json.dumps(inp, indent=1, sort_keys=True) + "\n")
    log(f"base built in {time.monotonic() - t0:.0f} s")
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)


def configure_rootfs(rootfs: Path) -> None:
    """What the skipped second stage and maintainer scripts would have done, minimally."""
    for name in ("proc", "sys", "dev", "run", "tmp"):
        p = rootfs / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir() and name == "dev":
            shutil.rmtree(p)
        p.mkdir(exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    etc = rootfs / "etc"
    share = rootfs / "usr/share/base-passwd"
    for name in ("passwd", "group"):
        if not (etc / name).exists() and (share / f"{name}.master").exists():
            shutil.copy2(share / f"{name}.master", etc / name)
    (etc / "hostname").write_text("as-p-qemu\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 as-p-qemu\n")
    (etc / "machine-id").write_text("6c6963656e73696e67617270363471ff\n")
    sh = rootfs / "usr/bin/sh"
    if not sh.exists():
        sh.symlink_to("dash")
    for d in ("var/lib/licagent", "usr/local/bin"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)


def module_closure(moddir: Path, names: list[str]) -> list[str]:
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko"): m for m in deps}
    order: list[str] = []

    def add(mod: str) -> None:
        if mod in order:
            return
        for d in reversed(deps[mod]):
            add(d)
        order.append(mod)

    for n in names:
        if n in by_name:
            add(by_name[n])
    return order


def make_initrd(out: Path, busybox: Path, moddir: Path, kver: str, work: Path) -> None:
    run("depmod", "-b", moddir.parents[2], kver)  # moddir is BASE/lib/modules/KVER
    order = module_closure(moddir, MODULES)
    log(f"initramfs: busybox + {', '.join(Path(m).name for m in order)}")
    shutil.rmtree(work, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        (work / d).mkdir(parents=True)
    shutil.copy2(busybox, work / "bin/busybox")
    for m in order:
        shutil.copy2(moddir / m, work / "modules" / Path(m).name)
    (work / "modules/order").write_text("".join(Path(m).name + "\n" for m in order))
    init = work / "init"
    shutil.copy2(HERE / "initramfs-init", init)
    init.chmod(0o755)
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    listing = ("\n".join([".", *files]) + "\n").encode()
    with out.open("wb") as f:
        cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                              input=listing, cwd=work, stdout=f, check=False)
    if cpio.returncode != 0:
        raise SystemExit("qemu-image: cpio failed")
    shutil.rmtree(work)


# ---------------------------------------------------------------- root image


#: what the guest runs: the device core, the links and licagent (not licadmin: that is the
#: technician's tool, on the laptop)
GUEST_PACKAGES = ("agent", "hw", "apps")
_NOT_IN_GUEST = ("__pycache__", "*.pyc", "licadmin", "licensing_client.py")


def source_files() -> list[Path]:
    files = [f for pkg in GUEST_PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))
             if not {"licadmin", "licensing_client.py"} & set(f.relative_to(REPO).parts)]
    files += [HERE / "guest-init", HERE / "build_image.py"]
    return [f for f in files if "__pycache__" not in f.parts]


def sources_key(base_key: str) -> str:
    h = hashlib.sha256(base_key.encode())
    for f in source_files():
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def install_agent(rootfs: Path) -> None:
    opt = rootfs / "opt/licagent"
    for pkg in GUEST_PACKAGES:
        shutil.rmtree(opt / pkg, ignore_errors=True)
        shutil.copytree(REPO / pkg, opt / pkg, ignore=shutil.ignore_patterns(*_NOT_IN_GUEST))
    shutil.copy2(HERE / "guest-init", opt / "init")
    (opt / "init").chmod(0o755)
    launcher = rootfs / "usr/local/bin/licagent"
    launcher.write_text("#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/opt/licagent')\n"
                        "from apps.licagent.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    run(sys.executable, "-m", "compileall", "-q", "-s", rootfs, "-p", "/",
        *(opt / pkg for pkg in GUEST_PACKAGES), stdout=subprocess.DEVNULL)


def build_root(base: Path, img: Path) -> None:
    rootfs = base / "rootfs"
    install_agent(rootfs)
    tmp = img.with_name(img.name + ".tmp")
    tmp.unlink(missing_ok=True)
    log(f"mkfs.ext4 -d {rootfs} {img.name}")
    run("mkfs.ext4", "-q", "-F", "-L", "licroot", "-E", "root_owner=0:0", "-d", rootfs,
        tmp, "1G")
    tmp.rename(img)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build_image.py", description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (LICQEMU_CACHE)")
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = ap.parse_args(argv)
    cache = (args.cache or cache_dir()).resolve()
    if cache == REPO or REPO in cache.parents:
        raise SystemExit("qemu-image: the cache must be outside the repository")
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    inp = inputs()
    bkey = key_of(inp)
    base = cache / f"base-{bkey}"
    if args.force or not (base / "inputs.json").exists():
        build_base(base, inp)
    else:
        log(f"reusing {base}")
    rkey = sources_key(bkey)
    img = cache / f"root-{rkey}.img"
    if args.force or not img.exists():
        build_root(base, img)
    else:
        log(f"reusing {img}")
    manifest = {
        "kernel": str(base / "vmlinuz"), "initrd": str(base / "initrd.img"),
        "root": str(img), "rootfs": str(base / "rootfs"), "base_key": bkey,
        "root_key": rkey, "inputs": inp,
    }
    (cache / "image.json.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
    (cache / "image.json.tmp").rename(cache / "image.json")
    for old in cache.iterdir():  # earlier builds
        if (old.name.startswith("root-") and old != img) or (
                old.name.startswith("base-") and old != base):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    log(f"ready: {cache / 'image.json'} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
