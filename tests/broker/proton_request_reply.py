#!/usr/bin/env python3
"""Request/reply with a temporary reply queue, as proton's client/server examples do.

Usage: proton_request_reply.py <amqp-url> <requests-queue> <count>

The client attaches a receiver with a *dynamic* source and takes the address the
broker's attach names as its reply-to; it sends <count> requests to <requests-queue>.
The server receives each and answers through ONE anonymous sender (the relay), to the
request's reply-to, with the request's correlation-id. The client gets every answer in
order. Once the client closes its dynamic receiver, the temporary queue is gone: a reply
sent to it is rejected with amqp:not-found.

Prints `ok: <reply-to>` and exits 0, or exits 1 with the reason. Every wait is bounded.
"""

import sys

try:
    from proton import Disposition, Message
    from proton.utils import BlockingConnection
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT = 10


def fail(msg):
    sys.stderr.write("FAIL: %s\n" % msg)
    sys.exit(1)


def main():
    url, requests, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conn = BlockingConnection(url, timeout=TIMEOUT)
    server_in = conn.create_receiver(requests, credit=count)
    relay = conn.create_sender(None)

    replies = conn.create_receiver(None, dynamic=True, credit=count)
    reply_to = replies.link.remote_source.address
    if not reply_to:
        fail("the broker named no address for the dynamic source")
    client_out = conn.create_sender(requests)
    for i in range(count):
        client_out.send(Message(body="request-%d" % i, reply_to=reply_to, correlation_id=i),
                        timeout=TIMEOUT)

    for _ in range(count):
        req = server_in.receive(timeout=TIMEOUT)
        server_in.accept()
        relay.send(Message(address=req.reply_to, body=req.body.upper(),
                           correlation_id=req.correlation_id), timeout=TIMEOUT)

    for i in range(count):
        rep = replies.receive(timeout=TIMEOUT)
        replies.accept()
        if rep.body != "REQUEST-%d" % i or rep.correlation_id != i:
            fail("reply %d: got %r (correlation %r)" % (i, rep.body, rep.correlation_id))

    replies.close()
    d = relay.send(Message(address=reply_to, body="late"), timeout=TIMEOUT,
                   error_states=[Disposition.MODIFIED])
    cond = d.remote.condition
    if d.remote_state != Disposition.REJECTED or cond is None or cond.name != "amqp:not-found":
        fail("a reply to the closed temporary queue: state %s (%s)" % (d.remote_state, cond))
    conn.close()
    print("ok: %s" % reply_to)


if __name__ == "__main__":
    main()
