#!/usr/bin/env python3
"""The anonymous relay and the broker's open, as python-qpid-proton sees them.

Usage: proton_relay.py <amqp-url> <user> <password> <to>=<outcome> ...

Connects as <user> (SASL PLAIN; '-' for anonymous), checks that the broker's open offers
ANONYMOUS-RELAY and SHARED-SUBS and names its product and version, then sends, through
ONE sender with no target address (proton's anonymous sender, as server.py and every
qpid-jms anonymous producer use), one message per <to>=<outcome> argument, in order:
<to> is the message's `to` ('' for none) and <outcome> is `accepted` or the condition
of the expected `rejected` outcome (e.g. amqp:not-found). The same sender carries every
message: a refused one does not end the link. Then (unless `--no-receive` is among the
arguments), for every accepted <to>, a receiver on it gets exactly the messages sent there.

Prints `ok: ...` and exits 0, or exits 1 with the reason. Every wait is bounded.
"""

import sys

try:
    from proton import Disposition, Message, symbol
    from proton.utils import BlockingConnection
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT = 10


def fail(msg):
    sys.stderr.write("FAIL: %s\n" % msg)
    sys.exit(1)


def main():
    url, user, password = sys.argv[1], sys.argv[2], sys.argv[3]
    receive = "--no-receive" not in sys.argv[4:]
    checks = [a.split("=", 1) for a in sys.argv[4:] if a != "--no-receive"]
    if user == "-":
        conn = BlockingConnection(url, timeout=TIMEOUT)
    else:
        conn = BlockingConnection(url, timeout=TIMEOUT, user=user, password=password,
                                  allowed_mechs="PLAIN", allow_insecure_mechs=True)
    c = conn.conn
    offered = [str(s) for s in (c.remote_offered_capabilities or [])]
    for cap in ("ANONYMOUS-RELAY", "SHARED-SUBS"):
        if cap not in offered:
            fail("the broker's open does not offer %s: %r" % (cap, offered))
    props = c.remote_properties or {}
    if props.get(symbol("product")) != "entrepot" or not props.get(symbol("version")):
        fail("the broker's open names no product/version: %r" % (props,))

    sender = conn.create_sender(None)  # no target address: the anonymous relay
    sent = {}
    for i, (to, expected) in enumerate(checks):
        m = Message(body="relay-%d" % i)
        if to:
            m.address = to
        # A non-empty error_states that never matches: get the delivery back to look at.
        d = sender.send(m, timeout=TIMEOUT, error_states=[Disposition.MODIFIED])
        if expected == "accepted":
            if d.remote_state != Disposition.ACCEPTED:
                fail("message to %r: expected accepted, got state %s (%s)"
                     % (to, d.remote_state, d.remote.condition))
            sent.setdefault(to, []).append(m.body)
        else:
            cond = d.remote.condition
            if d.remote_state != Disposition.REJECTED or cond is None or cond.name != expected:
                fail("message to %r: expected rejected %s, got state %s (%s)"
                     % (to, expected, d.remote_state, cond))
    sender.close()

    for to, bodies in (sent.items() if receive else []):
        r = conn.create_receiver(to, credit=len(bodies) + 5)
        got = []
        for _ in bodies:
            got.append(r.receive(timeout=TIMEOUT).body)
            r.accept()
        if got != bodies:
            fail("receiver on %r got %r, expected %r" % (to, got, bodies))
        r.close()
    conn.close()
    print("ok: anonymous relay routed %d messages by `to`, refused %d one by one"
          % (sum(len(b) for b in sent.values()), sum(1 for _, e in checks if e != "accepted")))


if __name__ == "__main__":
    main()
