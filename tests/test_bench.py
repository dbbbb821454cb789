"""
The benchmark harness's pure parts (bench/run.py): smtp-source's command
line and output, statistics, scenario selection, the generated mailhub and
Postfix configurations, the table.  No server is started and nothing is
timed; the real runs are `python bench/run.py --quick`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("mailhub_bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# smtp-source


def test_counter_output_parsed_to_last_number():
    assert bench.parse_counter("1\r2\r3\r4\r5\r\n") == 5
    assert bench.parse_counter("1\r2\r10\r") == 10
    assert bench.parse_counter("") == 0


def test_errors_are_smtp_source_lines():
    stderr = "something else\nsmtp-source: fatal: connect to 127.0.0.1:1: Connection refused\n"
    assert bench.parse_errors(stderr) == ["smtp-source: fatal: connect to 127.0.0.1:1: Connection refused"]


def test_smtp_source_args_new_connection_per_message_with_helo():
    s = bench.Scenario("x", sessions=20, messages=5000, size=4096)
    args = bench.smtp_source_args(s, 2525, "/usr/sbin/smtp-source")
    assert args == [
        "/usr/sbin/smtp-source", "-c", "-s", "20", "-m", "5000", "-l", "4096",
        "-M", "client.bench.example", "-f", "from@bench.example", "-t", "user@bench.example",
        "127.0.0.1:2525",
    ]  # fmt: skip
    # no -d (reuse the connection), no -o (skip HELO), no -L (LMTP)
    assert not {"-d", "-o", "-L"} & set(args)


def test_smtp_source_args_recipients():
    s = bench.Scenario("x", messages=10, recipients=5)
    args = bench.smtp_source_args(s, 1, "smtp-source")
    assert args[args.index("-r") + 1] == "5"
    assert bench.recipient_users(5) == ["user", "2user", "3user", "4user", "5user"]
    assert bench.recipient_users(1) == ["user"]


# statistics


def test_percentile_nearest_rank():
    values = [float(i) for i in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(list(reversed(values)), 100) == 100.0
    assert bench.percentile([7.0], 99) == 7.0
    assert math.isnan(bench.percentile([], 50))
    # with 20 samples p99 is the largest
    assert bench.percentile([float(i) for i in range(20)], 99) == 19.0


def test_median_of_runs_per_metric_and_ok_of_all():
    runs = [
        {"ok": True, "accepted_per_s": 100.0, "p50_ms": 5.0, "errors": []},
        {"ok": True, "accepted_per_s": 300.0, "p50_ms": 7.0, "errors": []},
        {"ok": False, "accepted_per_s": 200.0, "errors": ["x"]},
    ]
    m = bench.median_of_runs(runs)
    assert m["accepted_per_s"] == 200.0
    assert m["p50_ms"] == 6.0  # median of the runs that measured it
    assert m["ok"] is False
    assert bench.median_of_runs([])["ok"] is False


def test_ratio():
    assert bench.ratio(300.0, 200.0) == 1.5
    assert bench.ratio(1.0, 0.0) is None
    assert bench.ratio(None, 2.0) is None
    assert bench.ratio(1.0, math.nan) is None


# scenarios


def test_full_scenarios_are_the_issues():
    by = {s.name: s for s in bench.select_scenarios(None, quick=False)}
    assert by["backlog"].backlog == 100_000 and by["backlog"].kind == "backlog"
    assert (by["backlog"].probes, by["backlog"].sessions, by["backlog"].messages) == (50, 1, 500)
    assert bench.select_scenarios(["backlog"], quick=True)[0].backlog == 10_000
    assert (by["1x4KB"].sessions, by["1x4KB"].messages, by["1x4KB"].size) == (1, 2000, 4096)
    assert (by["20x4KB"].sessions, by["20x4KB"].messages, by["20x4KB"].size) == (20, 5000, 4096)
    assert (by["20x1MB"].sessions, by["20x1MB"].messages, by["20x1MB"].size) == (20, 200, 1024 * 1024)
    assert (by["5rcpt"].sessions, by["5rcpt"].messages, by["5rcpt"].recipients) == (1, 1000, 5)
    assert by["idle1000"].idle == 1000 and by["idle1000"].kind == "idle"
    assert by["100MB"].big == 100 * 1024 * 1024 and by["100MB"].kind == "big"


def test_select_scenarios_by_name_and_unknown():
    chosen = bench.select_scenarios(["20x4kb", "100MB"], quick=True)
    assert [s.name for s in chosen] == ["20x4KB", "100MB"]
    assert chosen[0].messages < 5000  # quick counts
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        bench.select_scenarios(["nope"], quick=False)


def test_parse_args():
    a = bench.parse_args(["--quick", "--runs", "1", "--scenarios", "1x4KB,5rcpt", "--targets", "mailhub"])
    assert [s.name for s in a.scenario_list] == ["1x4KB", "5rcpt"]
    assert a.targets == ["mailhub"] and a.runs == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--targets", "exim"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--runs", "0"])


# configuration


def test_mailhub_config_is_valid_for_mailhub(tmp_path):
    text = bench.mailhub_config(2526)
    data = tomllib.loads(text)
    assert data["server"]["smtp"] == ["tcp:2526:interface=127.0.0.1"]
    assert data["spool"]["fsync"] is True  # default durability
    assert data["local"]["domains"] == ["bench.example"]
    from mailhub.config import load_config

    conf = tmp_path / "mailhub.toml"
    conf.write_text(text)
    c = load_config(str(conf), {})
    assert c.server.max_message_size >= 100 * 1024 * 1024 + 1000
    assert c.server.max_connections >= 1000 and c.server.max_connections_per_ip >= 1000
    assert c.spool.path == str(tmp_path / "spool")
    assert c.local.mailboxes == str(tmp_path / "mailboxes")


def test_postfix_main_cf_stays_in_base_and_on_loopback():
    text = bench.postfix_main_cf("/tmp/b", 65534, 65534)
    params = dict(
        (k.strip(), v.strip()) for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line)
    )
    assert params["inet_interfaces"] == "127.0.0.1"
    assert params["queue_directory"] == "/tmp/b/queue"
    assert params["data_directory"] == "/tmp/b/data"
    assert params["virtual_mailbox_base"] == "/tmp/b/mail"
    assert params["virtual_mailbox_maps"] == "texthash:/tmp/b/etc/vmailbox"
    assert params["virtual_mailbox_domains"] == "bench.example"
    assert params["mail_owner"] == "postfix"
    assert int(params["message_size_limit"]) > 100 * 1024 * 1024
    assert params["virtual_uid_maps"] == "static:65534"


def test_postfix_master_cf_smtpd_on_loopback_port_only():
    text = bench.postfix_master_cf(2527)
    inet = [line for line in text.splitlines() if " inet " in line]
    assert inet == ["127.0.0.1:2527 inet n - n - 2000 smtpd"]
    assert "virtual   unix" in text
    # no service is chrooted (the queue is a temporary directory)
    for line in text.splitlines()[1:]:
        assert line.split()[4] == "n", line


def test_vmailbox_and_maildirs(tmp_path):
    assert bench.postfix_vmailbox(["user", "probe"]) == (
        "user@bench.example bench.example/user/\nprobe@bench.example bench.example/probe/\n"
    )
    new = bench.make_maildirs(str(tmp_path), ["user", "2user"])
    assert new["user"] == str(tmp_path / "bench.example" / "user" / "new")
    for u in ("user", "2user"):
        assert sorted(os.listdir(tmp_path / "bench.example" / u)) == ["cur", "new", "tmp"]


# table


def test_table_has_ratio_column_and_marks_failures():
    scenarios = bench.select_scenarios(["20x4KB", "idle1000"], quick=True)
    medians = {
        "20x4KB": {
            "mailhub": {"ok": True, "accepted_per_s": 750.0, "p50_ms": 2.0},
            "postfix": {"ok": True, "accepted_per_s": 500.0, "p50_ms": 4.0},
        },
        "idle1000": {"mailhub": {"ok": False}, "postfix": {"ok": True, "per_conn_kb": 1000.0}},
    }
    out = bench.format_table(scenarios, medians, ["mailhub", "postfix"])
    lines = out.splitlines()
    assert lines[0].split() == ["scenario", "metric", "mailhub", "postfix", "mailhub/postfix"]
    accepted = next(line for line in lines if "accepted msg/s" in line)
    assert accepted.split()[-3:] == ["750", "500", "1.50"]
    p50 = next(line for line in lines if "p50 transaction ms" in line and "idle" not in line)
    assert p50.split()[-3:] == ["2.0", "4.0", "0.50"]
    idle = next(line for line in lines if "memory per idle connection" in line)
    assert "- (FAILED)" in idle and idle.split()[-1] == "-"


def test_proc_readers_on_this_process():
    me = os.getpid()
    assert bench.proc_kb(me, "VmRSS") > 0
    assert bench.proc_kb(2**22 + 12345, "VmRSS") == 0  # no such process
    assert me in bench.children_of(os.getppid())


# backlog


def test_backlog_filler_writes_deferred_envelopes_the_spool_reads(tmp_path):
    from mailhub.envelope import PENDING
    from mailhub.queue.spool import Spool

    now = 1_700_000_000.0
    ids = bench.fill_backlog(str(tmp_path / "spool"), 25, 4096, now=now)
    assert len(ids) == len(set(ids)) == 25
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    assert spool.queue_ids() == sorted(ids) == ids  # oldest first = filling order
    for n, qid in enumerate(ids):
        env = spool.load(qid)
        assert env.queue_id == qid and env.sender == "from@bench.example"
        assert env.attempts == 1 and env.next_attempt == now + 86400 and env.arrival == now - 3600
        assert not env.held and not env.done
        [r] = env.recipients
        assert r.address == f"rcpt{n}@deferred.example" and r.state == PENDING
        assert (r.attempts, r.last_code, r.last_status) == (1, 451, "4.4.1")
        assert r.last_text.startswith("connect to mx.deferred.example")
        # one queue file, no separate envelope file (the envelope has not changed since the commit)
        assert os.path.isfile(spool.message_path(qid))
        assert not os.path.exists(spool.envelope_path(qid))
        with spool.open_message(qid) as f:
            data = f.read()
            assert f.length == len(data)
        assert 4096 - 80 <= len(data) <= 4096
        assert f"Message-ID: <backlog.{n}@bench.example>\r\n".encode() in data
        assert b"\n." not in data  # nothing to dot-stuff
    # what the daemon's recovery would queue: all of them, nothing moved away
    assert sorted(e.queue_id for e in spool.recover()) == ids
    assert os.listdir(tmp_path / "spool" / "corrupt") == []
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    assert os.listdir(tmp_path / "spool" / "envelopes") == []
    assert not os.path.exists(tmp_path / "spool" / "new")  # nothing in the first layout
    assert sorted(os.listdir(tmp_path / "spool" / "queue")) == ids
    assert bench.still_queued(str(tmp_path / "spool"), ids + ["15NXMVXZ3KR9JFRSC"]) == 25
    spool.remove(ids[0])
    assert bench.still_queued(str(tmp_path / "spool"), ids) == 24
    assert bench.still_queued(str(tmp_path / "nowhere"), ids) == -1


def test_backlog_is_never_local():
    conf = tomllib.loads(bench.mailhub_config(1))
    assert bench.BACKLOG_DOMAIN not in conf["local"]["domains"]


def test_queue_loaded_pattern_matches_the_schedulers_line():
    import inspect

    from mailhub.queue import scheduler

    source = inspect.getsource(scheduler.Scheduler.startService)
    assert '"scheduler: {count} message(s) in the queue"' in source
    line = "2026-11-28T17:43:49+0000 [mailhub.queue.scheduler#info] scheduler: 100000 message(s) in the queue"
    m = bench.QUEUE_LOADED.search(line)
    assert m and m.group(1) == "100000"
    assert bench.QUEUE_LOADED.search("scheduler: 1 message in the queue") is None


def test_log_watcher_notes_the_first_matching_line(tmp_path):
    log = tmp_path / "mailhub.log"
    w = bench.LogWatcher(str(log), bench.QUEUE_LOADED, interval=0.001)
    assert not w.feed("x [mailhub.tap#info] listening\n", 1.0) and w.matched_at is None
    assert w.feed("a\nb scheduler: 7 message(s) in the queue\n", 2.5)
    assert w.matched_at == 2.5 and w.match.group(1) == "7"
    # as a thread, on a file that appears and grows, with a split line
    w = bench.LogWatcher(str(log), bench.QUEUE_LOADED, interval=0.001)
    w.start()
    with open(log, "w") as f:
        f.write("first line\nscheduler: 12 mess")
        f.flush()
        assert w.wait(0.05) is None
        f.write("age(s) in the queue\n")
    assert w.wait(10) is not None and w.match.group(1) == "12"
    w.stop()


def test_backlog_table_rows_and_postfix_not_applicable():
    [s] = bench.select_scenarios(["backlog"], quick=False)
    medians = {
        "backlog": {
            "mailhub": {
                "ok": True, "startup_s": 4.321, "loaded_s": 4.2, "new_p99_ms": 12.34,
                "accepted_per_s": 180.4, "peak_rss_mb": 300.0,
            },
            "postfix": bench.medians_or_na([]),
        }
    }  # fmt: skip
    out = bench.format_table([s], medians, ["mailhub", "postfix"])
    lines = out.splitlines()
    assert lines[2].startswith("backlog (100000 deferred queued; 50 new + 1 sess x 500 msg)")
    labels = [label for _k, label, _f in bench.METRICS["backlog"]]
    assert labels == [
        "startup s", "queue loaded s", "new message 250 -> Maildir p99 ms",
        "accepted msg/s (with backlog)", "peak RSS MB",
    ]  # fmt: skip
    assert len(lines) == 2 + 5
    cells = [line.split()[-3:] for line in lines[2:]]
    assert cells == [
        ["4.32", "n/a", "-"], ["4.20", "n/a", "-"], ["12.3", "n/a", "-"], ["180", "n/a", "-"], ["300.0", "n/a", "-"],
    ]  # fmt: skip
    for line, label in zip(lines[2:], labels, strict=True):
        assert label in line


def test_unsupported_only_postfix_backlog():
    for s in bench.select_scenarios(None, quick=False):
        assert bench.unsupported(s, "mailhub") is None
        assert (bench.unsupported(s, "postfix") is not None) == (s.name == "backlog")
    assert bench.medians_or_na([]) == {"na": True}
    assert bench.medians_or_na([{"ok": True, "x": 1.0}]) == {"x": 1.0, "ok": True}


def test_wait_for_port_waits_on_a_connection_for_a_late_greeting():
    """mailhub binds before its spool recovery and greets after it."""
    import socket
    import threading
    import time

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        port = srv.getsockname()[1]
        greeted = []

        def late():
            conn, _ = srv.accept()
            time.sleep(1.2)  # longer than one recv timeout of the waiter
            greeted.append(time.monotonic())
            conn.sendall(b"220 mx ESMTP\r\n")
            assert conn.recv(100) == b"QUIT\r\n"
            conn.close()

        t = threading.Thread(target=late, daemon=True)
        t.start()
        bench.wait_for_port(port, 10, lambda: True)
        back = time.monotonic()
        t.join(5)
        assert greeted and 0 <= back - greeted[0] < 0.5
    with pytest.raises(RuntimeError, match="server exited"):
        bench.wait_for_port(port, 5, lambda: False)


def test_tree_cpu_counts_this_process_and_grows():
    before = bench.tree_cpu_s([os.getpid()])
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = bench.tree_cpu_s([os.getpid(), 999999999])  # a pid that does not exist counts nothing
    assert after - before >= 0.03


def test_history_switch(tmp_path):
    from mailhub.config import load_config

    assert bench.parse_args([]).history == "on" and bench.parse_args(["--history", "off"]).history == "off"
    with pytest.raises(SystemExit):
        bench.parse_args(["--history", "maybe"])
    for on in (True, False):
        conf = tmp_path / f"{on}.toml"
        conf.write_text(bench.mailhub_config(2526, overrides=() if on else ("history.enabled=false",)))
        assert load_config(str(conf), {}).history.enabled is on


# configuration overrides, the relay scenario, per-run ratios, process kinds


def test_mailhub_set_overrides_and_variants_reach_the_configuration():
    text = bench.mailhub_config(1, overrides=["spool.sync=syncfs", "server.max_connections=7", 'relay.tls="may"'])
    data = tomllib.loads(text)
    assert data["spool"]["sync"] == "syncfs" and data["spool"]["fsync"] is True
    assert data["server"]["max_connections"] == 7
    assert data["relay"]["tls"] == "may"
    assert bench.parse_override("a.b.c=[1, 2]") == ("a.b", "c", [1, 2])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        bench.parse_override("sync=syncfs")
    assert bench.TARGETS["mailhub-syncfs"] == ('spool.sync="syncfs"',)
    a = bench.parse_args(["--targets", "mailhub,mailhub-syncfs,postfix", "--mailhub-set", "server.processes=2"])
    assert a.targets == ["mailhub", "mailhub-syncfs", "postfix"] and a.mailhub_set == ["server.processes=2"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--mailhub-set", "nokey"])


def test_relay_scenario_routes_both_servers_to_the_sink(tmp_path):
    [s] = bench.select_scenarios(["relay"], quick=False)
    assert (s.kind, s.sessions, s.messages, s.size) == ("relay", 20, 5000, 4096)
    args = bench.smtp_source_args(s, 2525, "smtp-source")
    assert args[args.index("-t") + 1] == "user@remote.example"
    data = tomllib.loads(bench.mailhub_config(2525, relay_port=3535))
    assert data["relay"] == {"tls": "none", "routes": {"remote.example": "[127.0.0.1]:3535"}}
    from mailhub.config import load_config

    conf = tmp_path / "mailhub.toml"
    conf.write_text(bench.mailhub_config(2525, relay_port=3535))
    c = load_config(str(conf), {})
    assert "remote.example" in c.relay.routes and c.relay.tls == "none"
    assert bench.postfix_transport(3535) == "remote.example smtp:[127.0.0.1]:3535\n"
    assert "transport_maps = texthash:/b/etc/transport" in bench.postfix_main_cf("/b", 1, 1)
    assert bench.parse_sink_counter("sess=0 quit=0 mesg=1\rsess=1 quit=1 mesg=12\r") == 12
    assert bench.parse_sink_counter("") is None


def test_per_run_ratios_pair_runs_and_skip_failures():
    mine = [{"ok": True, "x": 2.0}, {"ok": True, "x": 3.0}, {"ok": False, "x": 100.0}, {"ok": True, "x": 1.0}]
    theirs = [{"ok": True, "x": 1.0}, {"ok": True, "x": 2.0}, {"ok": True, "x": 1.0}, {"ok": True, "x": 1.0}]
    r = bench.per_run_ratios(mine, theirs)["x"]
    assert r["runs"] == [2.0, 1.5, 1.0]
    assert (r["median"], r["min"], r["max"]) == (1.5, 1.0, 2.0)
    scenarios = bench.select_scenarios(["20x4KB"], quick=True)
    medians = {
        "20x4KB": {
            "mailhub": {"ok": True, "accepted_per_s": 750.0, "cpu_ms_per_msg": 2.0, "cpu_ms_per_msg.main": 1.5},
            "postfix": {"ok": True, "accepted_per_s": 500.0, "cpu_ms_per_msg": 3.0, "cpu_ms_per_msg.smtpd": 0.5},
        }
    }
    ratios = {"20x4KB": {"mailhub": {"accepted_per_s": {"median": 1.4, "min": 1.2, "max": 1.6}}}}
    out = bench.format_table(scenarios, medians, ["mailhub", "postfix"], ratios).splitlines()
    accepted = next(line for line in out if "accepted msg/s" in line)
    assert accepted.split()[-4:] == ["750", "500", "1.40", "(1.20-1.60)"]
    main = next(line for line in out if "CPU ms per message: main" in line)
    assert main.split()[-3:] == ["1.50", "-", "-"]
    assert any("CPU ms per message: smtpd" in line for line in out)


def test_sampler_counts_cpu_by_kind_from_the_mark():
    sampler = bench.MemorySampler(lambda: [os.getpid()], kind=lambda pid, comm: "me")
    sampler.mark()
    t = time.process_time()
    while time.process_time() - t < 0.1:
        pass
    by_kind = sampler.cpu_ms_by_kind()
    assert set(by_kind) == {"me"} and by_kind["me"] >= 50
    assert sampler.max_growth_kb()[0] in (0, os.getpid())
    assert bench.mailhub_kind(os.getpid(), os.getpid()) == "main"
    assert bench.mailhub_kind(os.getpid(), -1) == "acceptor"  # pytest's cmdline names no delivery process


def test_instruction_counts_add_up_part_one_dumps_by_process_kind(tmp_path):
    spec = importlib.util.spec_from_file_location("mailhub_bench_instructions", os.path.join(ROOT, "bench", "instructions.py"))
    instructions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(instructions)
    files = {
        "callgrind.10.1": ("python -m twisted --log-file=x mailhub --config /t/mailhub.toml", 4_000_000),
        "callgrind.10": ("python -m twisted --log-file=x mailhub --config /t/mailhub.toml", 0),
        "callgrind.10.2": ("python -m twisted --log-file=x mailhub --config /t/mailhub.toml", 9_000_000),  # shutdown
        "callgrind.11.1": ("python -c from mailhub.delivery.localchild import main", 1_000_000),
        "callgrind.12.1": ("python -c from mailhub.delivery.localchild import main", 500_000),
    }
    for name, (cmd, ir) in files.items():
        (tmp_path / name).write_text(f"# callgrind format\ncmd:  {cmd}\nevents: Ir\nsummary: 0\n\n\ntotals: {ir}\n")
    assert instructions.count(str(tmp_path)) == {"main": 4_000_000, "delivery": 1_500_000}
    assert instructions.kind_of("/sbin/ldconfig -p") == "other"
