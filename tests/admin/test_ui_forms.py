"""``licadmin ui``'s form parsing (issue 19): uploaded files arrive byte for byte, whatever
they hold (CR, LF, NUL, bytes that look like headers), and any body is either a form or a
one-line refusal, never an exception of its own."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from apps.licadmin.ui import parse_multipart
from hw.httpjson import HttpRefusal
from tests.support.uisite import BOUNDARY
from tests.support.uisite import multipart_body as _body

EXAMPLES = int(os.environ.get("UI_FORM_EXAMPLES", "150"))
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
tricky = st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b"--", b"\r\n\r\n",
                                   b"Content-Type: text/plain\r\n", b"\xff\xfe", b"=?utf-8?",
                                   b"\xa2ah"]) | st.binary(max_size=40), max_size=30
                  ).map(b"".join)


@settings(max_examples=EXAMPLES, deadline=None)
@given(files=st.lists(tricky, min_size=1, max_size=4), csrf=st.text(
    alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_files_arrive_byte_for_byte(files: list[bytes], csrf: str) -> None:
    named = [("file", f"{k:064x}.resp", data) for k, data in enumerate(files)
             if BOUNDARY.encode() not in data]
    fields, got = parse_multipart(CTYPE, _body([("csrf", csrf)], named))
    assert fields == {"csrf": [csrf]}
    assert got == named


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=st.binary(max_size=400) | tricky, ctype=st.sampled_from(
    [CTYPE, "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; "
     "boundary=\"x\r\nX-Evil: 1\"", f"multipart/form-data; boundary={BOUNDARY}; charset=\xff"]))
def test_any_body_is_a_form_or_a_refusal(body: bytes, ctype: str) -> None:
    try:
        fields, files = parse_multipart(ctype, body)
    except HttpRefusal as r:
        assert (r.status, r.code) == (400, 2)
        return
    assert all(isinstance(v, str) for vs in fields.values() for v in vs)
    assert all(isinstance(d, bytes) for _n, _f, d in files)
