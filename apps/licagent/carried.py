"""``licagent attach --carried`` and ``licagent answer-attach``: attaching a server to its
parent with a USB stick carried between them (issue 14 item 2; the files: agent.carried).

Layout on the stick, beside usbdrop://'s own folders (``<id>``: the child's device ID)::

    .licmailbox                     marker: this stick is a license mailbox (or ?always=1)
    attach/<id>/request.cbor        the child's signed attach request
    attach/<id>/answer.cbor         the parent's signed answer to it
    attach/<id>/return.cbor         the child's signed return of recalled grants, for the
                                    parent's next answer-attach

The stick is not trusted: every folder and file is opened relative to a descriptor already
checked and never through a symbolic link (agent.durable); a link, a FIFO or a folder on
another filesystem is refused with one line naming it (exit 8).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from agent import carried
from agent.durable import FileOps, atomic_write_at, ensure_dir, open_dir, read_regular
from agent.errors import EXIT_OK, LicensingError, MalformedError, UsageError
from agent.service import Agent

__all__ = ["answer_attach", "attach_carried", "stick_root"]

MARKER = ".licmailbox"
ATTACH = "attach"
REQUEST, ANSWER, RETURN = "request.cbor", "answer.cbor", "return.cbor"
#: child folders one answer-attach looks at (a stick is carried to one parent at a time)
MAX_CHILDREN_ON_STICK = 1000


def stick_root(text: str) -> tuple[Path, bool]:
    """The stick's folder from ``usbdrop:///PATH[?always=1]`` or a plain folder path, and
    whether the folder counts as a stick without its marker (``always=1``)."""
    if "://" not in text:
        return Path(os.path.normpath(os.path.abspath(text))), False
    from hw.backends.usbdrop import parse_options
    from hw.link import parse_url

    url = parse_url(text)
    if url.scheme != "usbdrop":
        raise UsageError(f"{text}: a carried stick is a usbdrop:// URL (usbdrop:///media/usb0) "
                         f"or a folder")
    opts = parse_options(url)
    return opts.root, opts.always


@contextlib.contextmanager
def _stick(root: Path, always: bool) -> Iterator[int]:
    """The stick's folder, held open; refused unless it is a license mailbox."""
    try:
        fd = open_dir(str(root), label=str(root))
    except FileNotFoundError as exc:
        raise UsageError(f"{root}: no such folder (is the stick mounted?)") from exc
    try:
        if not always:
            try:
                os.stat(MARKER, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError as exc:
                raise UsageError(f"{root} is not a license mailbox: it has no {MARKER} (touch "
                                 f"{root / MARKER} once at the office)") from exc
        yield fd
    finally:
        os.close(fd)


def _read(name: str, dir_fd: int, cap: int, label: str) -> bytes | None:
    try:
        data = read_regular(name, dir_fd, cap, label=label)
    except FileNotFoundError:
        return None
    if len(data) > cap:
        raise MalformedError(f"{label} is larger than {cap} bytes")
    return data


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def attach_carried(agent: Agent, parent: str, prog: str) -> int:
    """The child's side: apply the parent's answer if the stick carries one for this
    server's request, else write a new request. Prints what it did."""
    root, always = stick_root(parent)
    device_id = agent.state()[0].device_id
    ops = FileOps()
    with _stick(root, always) as fd:
        top = ensure_dir(ATTACH, fd, label=f"{root}/{ATTACH}")
        try:
            label = f"{root}/{ATTACH}/{device_id}"
            mine = ensure_dir(device_id, top, label=label)
            try:
                request = _read(REQUEST, mine, carried.REQUEST_MAX, f"{label}/{REQUEST}")
                answer = _read(ANSWER, mine, carried.ANSWER_MAX, f"{label}/{ANSWER}")
                if request is not None and answer is not None:
                    try:
                        pid, installed, refused, ret = agent.apply_attach_answer(
                            answer, request, parent)
                    except LicensingError as err:
                        err.args = (f"{err} ({label}/{ANSWER} is left as it was: remove it "
                                    f"and run again to write a new request)",)
                        raise
                    if ret is not None:  # for the parent's technician, at the next visit
                        atomic_write_at(ops, mine, RETURN, ret, label=f"{label}/{RETURN}")
                    _unlink(ANSWER, mine)
                    _unlink(REQUEST, mine)
                    print(f"attached to parent {pid} at {parent} (carried stick)")
                    print(f"inherited: {', '.join(installed) or 'nothing'}")
                    for line in refused:
                        print(f"refused: {line}")
                    if ret is not None:
                        print(f"returned: the signed return is on the stick for the parent "
                              f"({label}/{RETURN})")
                    return EXIT_OK
                if answer is not None:  # an answer without the request it names: stale
                    _unlink(ANSWER, mine)
                atomic_write_at(ops, mine, REQUEST, agent.attach_request(),
                                label=f"{label}/{REQUEST}")
                print(f"wrote the attach request to {label}/{REQUEST}")
                print(f"carry the stick to the parent server, run `{prog} answer-attach "
                      f"--state DIR --stick {root}` there, bring it back and run this "
                      f"command again")
                return EXIT_OK
            finally:
                os.close(mine)
        finally:
            os.close(top)


def answer_attach(agent: Agent, stick: str) -> int:
    """The parent's side: take each child's return, answer each child's request. One line
    per child; a refusal names the child and its reason and leaves the others answered.
    Returns 0, or the exit code of the last refusal."""
    root, always = stick_root(stick)
    ops = FileOps()
    code = EXIT_OK
    with _stick(root, always) as fd:
        try:
            top = open_dir(ATTACH, fd, label=f"{root}/{ATTACH}")
        except FileNotFoundError:
            print(f"no attach requests on {root}")
            return EXIT_OK
        try:
            names = sorted(n for n in os.listdir(top) if not n.startswith("."))
            answered = 0
            for name in names[:MAX_CHILDREN_ON_STICK]:
                label = f"{root}/{ATTACH}/{name}"
                try:
                    answered += _answer_one(agent, ops, top, name, label)
                except LicensingError as err:
                    print(f"refused {label}: {err.reason}: {err}")
                    code = err.exit_code
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT,):
                        raise
            print(f"answered {answered} attach request(s) on {root}")
        finally:
            os.close(top)
    return code


def _answer_one(agent: Agent, ops: FileOps, top: int, name: str, label: str) -> int:
    child = open_dir(name, top, label=label)
    try:
        ret = _read(RETURN, child, 16 * 1024, f"{label}/{RETURN}")
        if ret is not None:
            feats = agent.accept_return(ret)
            _unlink(RETURN, child)
            print(f"return from {name[:12]}…: {', '.join(feats) or 'nothing'}")
        request = _read(REQUEST, child, carried.REQUEST_MAX, f"{label}/{REQUEST}")
        if request is None:
            return 0
        req, _info = carried.read_request(request)
        if req.child_id != name:
            raise MalformedError(f"the request in {label} is device {req.child_id[:12]}…'s, "
                                 f"not the folder's")
        answer, issued = agent.answer_attach(request)
        atomic_write_at(ops, child, ANSWER, answer, label=f"{label}/{ANSWER}")
        granted = sorted({f for f in _features(issued.event)})
        print(f"answered {name[:12]}…: granted {', '.join(granted) or 'nothing'}"
              + (f"; recalled {', '.join(issued.recalled)}" if issued.recalled else "")
              + "".join(f"; refused {r}" for r in issued.refused))
        return 1
    finally:
        os.close(child)


def _features(event: dict[str, object]) -> list[str]:
    grants = event.get("grants", [])
    return [str(g["feature"]) for g in grants if isinstance(g, dict)] if isinstance(
        grants, list) else []
