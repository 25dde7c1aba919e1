#!/usr/bin/env python3
"""Interop check between python-qpid-proton and an Entrepot broker.

Usage: proton_interop.py <amqp-url> <queue> [count]

Sends `count` messages (default 1000) with every settable property, typed
application-properties and varying bodies, waiting for each `accepted`; then
receives them back on a raw receiver that reads each delivery's bytes with
`link.recv(delivery.pending)` and checks:

* every decoded field equals what was sent, in order;
* the bare message (properties, application-properties, body, footer) and the
  message annotations are byte-identical to proton's `Message.encode()` of the
  sent message; the header may differ only in `delivery-count`.

Exits 0 on success, 1 with a description on stderr on the first mismatch, 2 on
a connection or link error. Every wait is bounded by a timeout.
"""

import sys
import uuid

try:
    from proton import Delivery, Message, symbol, ulong, int32, timestamp
    from proton.handlers import MessagingHandler
    from proton.reactor import Container
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT_SECS = float(__import__("os").environ.get("INTEROP_TIMEOUT", "60"))

# Section descriptor codes (AMQP 1.0, 3.2).
HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
BODY_CODES = (0x75, 0x76, 0x77)
FOOTER = 0x78


def fail(msg):
    sys.stderr.write("MISMATCH: %s\n" % msg)
    sys.exit(1)


def make_message(i):
    """The i-th message: ids, properties and body type vary with i."""
    m = Message()
    m.durable = True
    m.priority = i % 10
    ids = [
        "msg-%d" % i,
        ulong(i),
        uuid.UUID(int=i + 1),
        ("bin-%d" % i).encode(),
    ]
    m.id = ids[i % len(ids)]
    m.correlation_id = ids[(i + 1) % len(ids)]
    m.user_id = b"interop-user"
    m.address = "queue-target"
    m.subject = "subject %d \u00e9\u4e2d" % i
    m.reply_to = "reply-%d" % (i % 7)
    m.content_type = symbol("application/x-test-%d" % (i % 3))
    m.content_encoding = symbol("identity")
    m.creation_time = 1_700_000_000.0 + i  # seconds, proton keeps ms precision
    m.group_id = "group-%d" % (i % 4)
    m.group_sequence = i
    m.reply_to_group_id = "rgroup"
    m.annotations = {symbol("x-opt-interop"): "annotation %d" % i}
    m.properties = {
        "str": "value %d" % i,
        "long": i * 1_000_003 - 7,
        "int32": int32(-i),
        "double": i / 3.0,
        "bool": i % 2 == 0,
        "binary": bytes((i + k) % 256 for k in range(i % 50)),
        "uuid": uuid.UUID(int=(i * 7919) << 64 | i),
        "empty": "",
    }
    kind = i % 6
    if kind == 0:
        m.body = "text body %d " % i + "x" * (i % 300)
    elif kind == 1:
        m.body = bytes((i * k) % 256 for k in range(i % 2000))
    elif kind == 2:
        m.body = {"n": i, "s": "map body", "nested": [1, 2.5, "three"]}
    elif kind == 3:
        m.body = ["list", i, True, None, 1.25]
    elif kind == 4:
        m.body = i * 12345
    else:
        # A body larger than one default frame would be with small frames.
        m.body = "large %d " % i + "L" * 70_000
    return m


def skip_value(buf, pos):
    """Position just past the AMQP-encoded value starting at `pos`."""
    code = buf[pos]
    pos += 1
    if code == 0x00:  # described: descriptor then value
        return skip_value(buf, skip_value(buf, pos))
    width = {
        0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16,
    }.get(code >> 4)
    if width is not None:
        return pos + width
    size_width = {0xA: 1, 0xB: 4, 0xC: 1, 0xD: 4, 0xE: 1, 0xF: 4}[code >> 4]
    size = int.from_bytes(buf[pos:pos + size_width], "big")
    return pos + size_width + size


def sections(buf):
    """Splits an encoded message into [(descriptor code, section bytes)]."""
    out = []
    pos = 0
    while pos < len(buf):
        if buf[pos] != 0x00 or buf[pos + 1] != 0x53:
            fail("section at offset %d does not start with a small-ulong descriptor: %r"
                 % (pos, buf[pos:pos + 4]))
        end = skip_value(buf, pos)
        out.append((buf[pos + 2], bytes(buf[pos:end])))
        pos = end
    if pos != len(buf):
        fail("sections overrun the message: %d != %d" % (pos, len(buf)))
    return out


def compare_bytes(i, sent, got):
    s = sections(sent)
    g = sections(got)
    strict = lambda secs: [(c, b) for c, b in secs if c not in (HEADER, DELIVERY_ANNOTATIONS)]
    if strict(s) != strict(g):
        for (cs, bs), (cg, bg) in zip(strict(s), strict(g)):
            if (cs, bs) != (cg, bg):
                fail("message %d: section 0x%02x sent %r, received section 0x%02x %r"
                     % (i, cs, bs[:120], cg, bg[:120]))
        fail("message %d: sections sent %s, received %s"
             % (i, [hex(c) for c, _ in s], [hex(c) for c, _ in g]))


def plain(v):
    """Proton decodes a Data body as a memoryview; compare it as bytes."""
    return bytes(v) if isinstance(v, memoryview) else v


def compare_fields(i, sent, got):
    fields = [
        "id", "correlation_id", "user_id", "address", "subject", "reply_to",
        "content_type", "content_encoding", "creation_time", "group_id",
        "group_sequence", "reply_to_group_id", "durable", "priority", "ttl",
        "first_acquirer", "annotations", "properties", "body",
    ]
    for f in fields:
        a, b = plain(getattr(sent, f)), plain(getattr(got, f))
        if a != b or type(a) is not type(b):
            fail("message %d: field %s sent %r (%s), received %r (%s)"
                 % (i, f, a, type(a).__name__, b, type(b).__name__))
    if got.delivery_count != 0:
        fail("message %d: delivery-count %d on a first delivery" % (i, got.delivery_count))


class Send(MessagingHandler):
    def __init__(self, url, queue, messages):
        super().__init__(prefetch=0)
        self.url, self.queue, self.messages = url, queue, messages
        self.encoded = []
        self.next = 0
        self.accepted = 0
        self.error = None

    def on_start(self, event):
        self.timer = event.container.schedule(TIMEOUT_SECS, self)
        conn = event.container.connect(self.url, reconnect=False)
        event.container.create_sender(conn, self.queue)

    def on_timer_task(self, event):
        self.error = "send timed out: %d sent, %d accepted" % (self.next, self.accepted)
        event.container.stop()

    def on_sendable(self, event):
        sender = event.sender
        while sender.credit > 0 and self.next < len(self.messages):
            data = self.messages[self.next].encode()
            self.encoded.append(data)
            sender.delivery(str(self.next))
            sender.stream(data)
            sender.advance()
            self.next += 1

    def on_accepted(self, event):
        self.accepted += 1
        if self.accepted == len(self.messages):
            self.timer.cancel()
            event.connection.close()

    def on_rejected(self, event):
        self.error = "message rejected: %s" % event.delivery.remote.condition
        event.connection.close()

    def on_released(self, event):
        self.error = "message released"
        event.connection.close()

    def on_transport_error(self, event):
        self.error = "transport error: %s" % event.transport.condition
        self.timer.cancel()

    def on_link_error(self, event):
        self.error = "link error: %s" % event.link.remote_condition
        event.connection.close()


class RawReceive(MessagingHandler):
    """Receives raw delivery bytes; the message is decoded here, not by proton's helper."""

    def __init__(self, url, queue, count):
        super().__init__(prefetch=200, auto_accept=False)
        # Replace proton's IncomingMessageHandler: it would consume the bytes first.
        self.handlers = [h for h in self.handlers
                         if type(h).__name__ != "IncomingMessageHandler"]
        self.url, self.queue, self.count = url, queue, count
        self.raw = []
        self.error = None

    def on_start(self, event):
        self.timer = event.container.schedule(TIMEOUT_SECS, self)
        conn = event.container.connect(self.url, reconnect=False)
        event.container.create_receiver(conn, self.queue)

    def on_timer_task(self, event):
        self.error = "receive timed out after %d of %d" % (len(self.raw), self.count)
        event.container.stop()

    def on_delivery(self, event):
        dlv = event.delivery
        if not dlv.link.is_receiver or not dlv.readable or dlv.partial:
            return
        self.raw.append(dlv.link.recv(dlv.pending))
        dlv.link.advance()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
        if len(self.raw) == self.count:
            self.timer.cancel()
            event.connection.close()

    def on_transport_error(self, event):
        self.error = "transport error: %s" % event.transport.condition
        self.timer.cancel()

    def on_link_error(self, event):
        self.error = "link error: %s" % event.link.remote_condition
        event.connection.close()


def main():
    url, queue = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    messages = [make_message(i) for i in range(count)]

    send = Send(url, queue, messages)
    Container(send).run()
    if send.error or send.accepted != count:
        sys.stderr.write("send failed: %s (accepted %d of %d)\n"
                         % (send.error, send.accepted, count))
        sys.exit(2)

    recv = RawReceive(url, queue, count)
    Container(recv).run()
    if recv.error or len(recv.raw) != count:
        sys.stderr.write("receive failed: %s (received %d of %d)\n"
                         % (recv.error, len(recv.raw), count))
        sys.exit(2)

    for i, (sent, raw) in enumerate(zip(messages, recv.raw)):
        got = Message()
        got.decode(raw)
        compare_fields(i, sent, got)
        compare_bytes(i, send.encoded[i], raw)
    print("ok: %d messages round-tripped field- and byte-identical" % count)


if __name__ == "__main__":
    main()
