"""
End to end: rate limits counted in a real redis-server (started here on
127.0.0.1).  The Redis counter's windows and costs; two real mailhub
daemons sharing one limit through it; Redis killed: a daemon with
redis_failure = "open" accepts, one with "closed" answers 451 4.3.0.
"""

from __future__ import annotations

import subprocess
import urllib.request

import pytest
from conftest import in_reactor, require_tool
from daemon import DOMAIN, Daemon, message, wait_for
from peers import free_port, wait_listening

from mailhub.ratelimit.counter import CounterUnavailable
from mailhub.ratelimit.redisstore import RedisCounter


class Redis:
    def __init__(self, binary: str, tmp_path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        wait_listening(self.port, self.proc, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis(tmp_path):
    r = Redis(require_tool("redis-server"), tmp_path)
    yield r
    r.kill()


def test_redis_counter(redis, reactor):
    counter = RedisCounter(redis.url, reactor, timeout=1.0)
    in_reactor(reactor, counter.startService)
    try:
        def hit(key: str, window: float, cost: int = 1) -> int:
            return in_reactor(reactor, counter.hit, key, window, cost)

        assert [hit("a", 60) for _ in range(3)] == [1, 2, 3]
        assert hit("a", 60, cost=4) == 7
        assert hit("b", 60) == 1
        # a short window ends by expiry, for every node at once
        assert hit("short", 0.2) == 1
        wait_for(lambda: hit("short", 0.2, cost=0) == 0, 5, "the window to end", interval=0.05)
        redis.kill()
        with pytest.raises(CounterUnavailable, match="redis: "):
            hit("a", 60)
    finally:
        in_reactor(reactor, counter.stopService)


def config(redis_url: str, failure: str, http: int) -> str:
    return f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
http = ["tcp:{http}:interface=127.0.0.1"]
trusted_networks = []

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice"]

[limits]
client_messages_per_min = 3
redis = "{redis_url}"
redis_timeout = 2
redis_failure = "{failure}"
"""


def mail_from(d: Daemon) -> tuple[int, bytes]:
    with d.smtp() as s:
        s.ehlo()
        code, reply = s.mail("sender@client.test")
        if code == 250:
            assert s.rcpt(f"alice@{DOMAIN}")[0] == 250
            assert s.data(message(f"alice@{DOMAIN}", "rl"))[0] == 250
        return code, reply


def test_two_daemons_share_a_limit_and_redis_dies(redis, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    http = free_port()
    a = Daemon(tmp_path / "a", config(redis.url, "open", free_port())).start()
    b = Daemon(tmp_path / "b", config(redis.url, "closed", http)).start()
    try:
        assert mail_from(a)[0] == 250
        assert mail_from(b)[0] == 250
        assert mail_from(a)[0] == 250
        # the fourth MAIL from 127.0.0.1 within the minute, on either node
        for d in (b, a):
            assert mail_from(d) == (
                450, b"4.7.1 Error: too many messages from your address (more than 3 per minute); try again later"
            )
        # the acceptor processes send their log events to the daemon: its log follows the replies
        wait_for(lambda: "NOQUEUE: rate limit: MAIL from [127.0.0.1]: 450 4.7.1" in b.log(), 10, "b's log line")
        wait_for(lambda: "limit=client_messages key=127.0.0.1 count=5" in a.log(), 10, "a's log line")
        redis.kill()
        assert mail_from(a)[0] == 250  # fails open
        code, reply = mail_from(b)  # fails closed
        assert (code, reply) == (451, b"4.3.0 Error: rate limit service unavailable; try again later")
        for d, how in ((a, "open"), (b, "closed")):
            wait_for(lambda d=d, how=how: f"failing {how} (limits.redis_failure)" in d.log(), 10, "the warning")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=20).read()
        assert b'mailhub_rate_limited_total{limit="client_messages"} 1.0' in metrics
        assert b'mailhub_rate_limited_total{limit="unavailable"} 1.0' in metrics
    finally:
        a.stop()
        b.stop()
