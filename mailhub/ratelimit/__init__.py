"""
Rate limits: counters of events per key and time window, and the limits
built on them (docs/ratelimits.rst).

L{mailhub.ratelimit.counter}: the L{Counter} interface every limit is
counted through, and its in-memory implementation; L{mailhub.ratelimit.redisstore}:
the counter shared by several mailhub nodes through Redis;
L{mailhub.ratelimit.limits}: the configured limits (per client address,
per authenticated user, per API token, per destination domain), their
replies, log lines and metric events.
"""
