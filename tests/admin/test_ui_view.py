"""One page, one view of the job (licadmin ui): a screen's body and the page's frame (the
progress bar and its refresh) are built from one snapshot of the running job, so a job that
ends while a page is being built cannot give a finished frame around a running body (a page
with neither a refresh nor its Done line) or the reverse. A real job thread, really ended in
the middle of the page."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.errors import UsageError
from apps.licadmin.ui_flow import Job, Site
from apps.licadmin.ui_pages import layout

WAIT = 60.0  # a hang guard, never asserted as a time


def _frame(site: Site) -> str:
    return layout("Servers", "<p>body</p>", "/servers", None, site.shown_job(), "csrf")


def test_a_job_ending_while_a_page_is_built_stays_running_on_that_page(tmp_path: Path) -> None:
    site = Site([], None, None, tmp_path)
    started, release = threading.Event(), threading.Event()

    def work(job: Job) -> None:
        job.total, job.done = 3, 1
        job.lines.append("first server read")
        started.set()
        release.wait(WAIT)
        job.done = 3
        job.lines.append("all read")

    site.start("reading the servers", work)
    assert started.wait(WAIT)
    with site.one_view():
        assert site.busy()
        release.set()
        assert site.wait(WAIT)  # the job has really ended (read live)...
        # ...and the page being built still shows the one state it started from
        assert site.busy()
        shown = site.shown_job()
        assert shown is not None and shown.running and shown.done == 1
        assert shown.lines == ["first server read"]
        assert 'id="progress"' in _frame(site) and "1 of 3 server(s) done" in _frame(site)
    assert not site.busy()  # outside a page: the job as it is
    with site.one_view():
        assert not site.busy() and 'id="progress"' not in _frame(site)
        shown = site.shown_job()
        assert shown is not None and shown.lines == ["first server read", "all read"]


def test_a_job_started_by_a_page_is_running_on_that_page(tmp_path: Path) -> None:
    site = Site([], None, None, tmp_path)
    release = threading.Event()
    with site.one_view():
        assert not site.busy()
        site.start("reading the servers", lambda _job: release.wait(WAIT) and None)
        assert site.busy() and 'id="progress"' in _frame(site)
    release.set()
    assert site.wait(WAIT)


def test_a_second_job_is_refused_even_from_a_page_that_saw_none(tmp_path: Path) -> None:
    """The page's snapshot never lets a second job start: the lock checks the live job."""
    site = Site([], None, None, tmp_path)
    release = threading.Event()
    with site.one_view():  # this page saw no job
        other = threading.Thread(target=site.start,
                                 args=("reading the servers", lambda _j: release.wait(WAIT)))
        other.start()
        other.join(WAIT)
        assert not site.busy()  # the page still shows none...
        with pytest.raises(UsageError, match="still running"):
            site.start("send", lambda _j: None)  # ...but a second job is refused
    release.set()
    assert site.wait(WAIT)
