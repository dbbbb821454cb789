"""
Review regression tests for mailhub.localproc (the pool, real reactor, real
children): a delivery asked for while no delivery process runs must be
handed to the replacement process as soon as it starts, not only when some
later delivery happens to arrive.
"""

from __future__ import annotations

import os
import signal

from conftest import in_reactor
from mailhub import localproc
from peers import wait_for
from test_localproc import DOMAIN, directory_args, envelope, gone, maildir_messages, queued


def test_delivery_queued_while_no_process_runs_goes_to_the_replacement(reactor, tmp_path):
    settings = localproc.settings_for(directory_args(tmp_path), "mx.example.test", True)
    p = localproc.LocalDeliveryProcesses(settings, 1, reactor)
    in_reactor(reactor, p.startService)
    try:
        wait_for(lambda: p.children[0] is not None and p.children[0].running, 20, "the delivery process")
        pid = in_reactor(reactor, lambda: p.children[0].transport.pid)
        os.kill(pid, signal.SIGKILL)
        # the slot is empty until the restart delay has passed
        wait_for(lambda: gone(pid) and p.children[0] is None, 20, "the process to be gone")
        path = queued(tmp_path)
        env, recipients = envelope("15NXRRRRRRRRRRRRR", [f"alice@{DOMAIN}"])
        [d] = in_reactor(reactor, lambda: [p.deliver(env, recipients, path)])  # the Deferred itself
        assert not d.called
        wait_for(lambda: p.children[0] is not None and p.children[0].running, 20, "the replacement process")
        # nothing else is delivered meanwhile: the waiting request alone must reach the new process
        outcomes = wait_for(lambda: d.called and d.result, 10, "the waiting delivery to be answered")
        assert [o.kind for o in outcomes] == ["delivered"]
        assert len(maildir_messages(tmp_path, "alice")) == 1
    finally:
        in_reactor(reactor, p.stopService)
