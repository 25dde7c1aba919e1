#!/usr/bin/env python3
"""A python-qpid-proton durable topic subscriber against an Entrepot broker.

Usage: proton_durable.py <amqp-url> <topic>

The subscriber has a fixed container-id and link name, a durable source
(durability unsettled-state = Terminus.DELIVERIES, expiry-policy never) and the
`topic` capability. A second connection publishes (durable messages, each
waited for until accepted).

1. Attach, publish a0..a4, receive all five, accept a0..a3 and leave a4
   unsettled; DETACH the link (`link.detach()`, closed=false), wait for the
   broker's detach, then disconnect.
2. Publish b0..b9 while no subscriber is attached.
3. Reconnect with the same container-id, reattach with the same link name:
   a4 (left unsettled) comes back first, then b0..b9 in order, and nothing else.
4. CLOSE the link (`link.close()`, closed=true), which deletes the subscription;
   publish c0..c4.
5. Reattach with the same name: none of a*/b*/c* is delivered (the new
   subscription starts with what is published next); d0, published now, is.

Exits 0 printing "ok: ..." on success, 1 with a description on stderr on the
first mismatch, 2 on a connection or link error, 3 if proton is not importable.
Every wait is bounded by a timeout.
"""

import sys

try:
    from proton import Data, Endpoint, Message, Terminus
    from proton.handlers import MessagingHandler
    from proton.reactor import ReceiverOption
    from proton import ProtonException, Timeout
    from proton.utils import BlockingConnection
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT_SECS = 10.0
# How long "nothing more is delivered" is watched for.
QUIET_SECS = 1.0
CONTAINER_ID = "proton-durable-subscriber"
LINK_NAME = "proton-audit"


def fail(msg):
    sys.stderr.write("MISMATCH: %s\n" % msg)
    sys.exit(1)


class DurableTopicSource(ReceiverOption):
    """Durable source (unsettled-state), never expires, `topic` capability."""

    def apply(self, receiver):
        receiver.source.durability = Terminus.DELIVERIES
        receiver.source.expiry_policy = Terminus.EXPIRE_NEVER
        caps = receiver.source.capabilities
        caps.put_array(False, Data.SYMBOL)
        caps.enter()
        caps.put_symbol("topic")
        caps.exit()


class DetachWatcher(MessagingHandler):
    """Takes over a link's events to notice the broker's detach reply."""

    def __init__(self):
        super().__init__(prefetch=0)
        self.detached = False
        self.closed = False

    def on_link_remote_detach(self, event):
        self.detached = True

    def on_link_remote_close(self, event):
        self.closed = True


class Publisher:
    def __init__(self, url, topic):
        self.conn = BlockingConnection(url, timeout=TIMEOUT_SECS,
                                       container_id="proton-durable-publisher")
        self.sender = self.conn.create_sender(topic, name="proton-publisher")

    def publish(self, prefix, n):
        for i in range(n):
            # BlockingSender.send waits for the outcome and raises unless accepted.
            self.sender.send(Message(body="%s%d" % (prefix, i), durable=True))

    def close(self):
        self.conn.close()


def subscribe(url, topic):
    conn = BlockingConnection(url, timeout=TIMEOUT_SECS, container_id=CONTAINER_ID)
    receiver = conn.create_receiver(topic, name=LINK_NAME, credit=50,
                                    options=DurableTopicSource())
    remote = receiver.link.remote_source
    if remote.durability != Terminus.DELIVERIES or remote.expiry_policy != Terminus.EXPIRE_NEVER:
        fail("broker answered with source durability %d, expiry policy %d"
             % (remote.durability, remote.expiry_policy))
    return conn, receiver


def receive(receiver, expected, accept=True):
    got = []
    for want in expected:
        try:
            msg = receiver.receive(timeout=TIMEOUT_SECS)
        except Timeout:
            fail("expected %r, timed out after receiving %r" % (want, got))
        got.append(msg.body)
        if msg.body != want:
            fail("expected %s in order, got %s" % (expected, got))
        if accept:
            receiver.accept()
    return got


def nothing_more(receiver, what):
    try:
        msg = receiver.receive(timeout=QUIET_SECS)
    except Timeout:
        return
    fail("%s: expected no message, got %r" % (what, msg.body))


def names(prefix, n):
    return ["%s%d" % (prefix, i) for i in range(n)]


def wait_for(conn, watcher, attribute, what):
    try:
        conn.wait(lambda: getattr(watcher, attribute), timeout=TIMEOUT_SECS, msg=what)
    except Timeout:
        fail("%s: the broker did not answer within %ss" % (what, TIMEOUT_SECS))


def run(url, topic):
    pub = Publisher(url, topic)

    # 1. Receive some, leave one unsettled, detach (closed=false).
    conn, receiver = subscribe(url, topic)
    pub.publish("a", 5)
    receive(receiver, names("a", 4))
    receive(receiver, ["a4"], accept=False)
    watcher = DetachWatcher()
    receiver.link.handler = watcher
    receiver.link.detach()
    wait_for(conn, watcher, "detached", "detach")
    if watcher.closed:
        fail("the broker answered detach(closed=false) with a close")
    conn.close()

    # 2. Published while detached.
    pub.publish("b", 10)

    # 3. Reattach: the unsettled one first, then everything published meanwhile.
    conn, receiver = subscribe(url, topic)
    receive(receiver, ["a4"] + names("b", 10))
    nothing_more(receiver, "after the backlog")

    # 4. Close the link: the subscription is deleted.
    watcher = DetachWatcher()
    receiver.link.handler = watcher
    receiver.link.close()
    wait_for(conn, watcher, "closed", "close")
    pub.publish("c", 5)

    # 5. Reattach: a fresh subscription, nothing old.
    receiver = conn.create_receiver(topic, name=LINK_NAME, credit=50,
                                    options=DurableTopicSource())
    nothing_more(receiver, "after the subscription was closed")
    pub.publish("d", 1)
    receive(receiver, ["d0"])
    nothing_more(receiver, "after d0")
    # Clean up: closing deletes the fresh subscription too.
    receiver.close()
    conn.close()
    pub.close()
    print("ok: detach kept 11 messages in order, close deleted the subscription")


def main():
    url, topic = sys.argv[1], sys.argv[2]
    try:
        run(url, topic)
    except ProtonException as e:  # Timeout, LinkDetached, SendException, ...
        sys.stderr.write("connection or link error: %r\n" % e)
        sys.exit(2)


if __name__ == "__main__":
    main()
