#!/usr/bin/env python3
"""Local transactions with proton's own API (`Container.declare_transaction`), as its
tx_send/tx_recv examples use them.

Usage: proton_tx.py <amqp-url> <queue> produce|consume|empty

produce: in one transaction sends c0..c4 and commits; in a second sends a0..a2 and
         aborts. Prints `ok: committed 5, aborted 3`.
consume: receives five messages and accepts them in a transaction, aborts it; receives
         the same five again (redelivered, delivery-count raised), accepts them in a
         second transaction and commits. Checks they are c0..c4 (nothing of the aborted
         send). Prints `ok: rolled back 5, redelivered 5, committed 5`.
empty:   sends a plain `sentinel` and checks it is the first and only message received.
         Prints `ok: empty`.

Exits 1 with the reason otherwise. Every wait is bounded (TIMEOUT).
"""

import sys

try:
    from proton import Message
    from proton.handlers import MessagingHandler, TransactionHandler
    from proton.reactor import Container
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT = 20
COMMITTED = ["c%d" % i for i in range(5)]
ABORTED = ["a%d" % i for i in range(3)]


class Failed(Exception):
    pass


class Base(MessagingHandler, TransactionHandler):
    def __init__(self, url, queue, **kw):
        super().__init__(**kw)
        self.url, self.queue = url, queue
        self.result = None
        self.error = None

    def finish(self, event, result=None, error=None):
        self.result, self.error = result, error
        event.connection.close()

    def on_start(self, event):
        self.timer = event.container.schedule(TIMEOUT, self)
        self.conn = event.container.connect(self.url)
        self.setup(event)

    def on_timer_task(self, event):
        self.error = "timed out in state %s" % getattr(self, "state", "?")
        self.conn.close()

    def on_connection_closed(self, event):
        self.timer.cancel()
        # Done: without this the reactor idles up to its select timeout (~3 s) first.
        event.container.stop()

    def on_transaction_declare_failed(self, event):
        self.finish(event, error="declare failed: %s" % event.delivery.remote.condition)

    def on_transaction_commit_failed(self, event):
        self.finish(event, error="commit failed: %s" % event.delivery.remote.condition)


class Produce(Base):
    def setup(self, event):
        self.sender = event.container.create_sender(self.conn, self.queue)
        self.state = "declare-commit"
        event.container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        batch = COMMITTED if self.state == "declare-commit" else ABORTED
        for body in batch:
            event.transaction.send(self.sender, Message(body=body, durable=True))
        if self.state == "declare-commit":
            self.state = "commit"
            event.transaction.commit()
        else:
            self.state = "abort"
            event.transaction.abort()

    def on_transaction_committed(self, event):
        self.state = "declare-abort"
        event.container.declare_transaction(self.conn, handler=self)

    def on_transaction_aborted(self, event):
        self.finish(event, result="ok: committed %d, aborted %d" % (len(COMMITTED), len(ABORTED)))


class Consume(Base):
    def __init__(self, url, queue):
        # Outcomes are the transaction's, never automatic.
        super().__init__(url, queue, auto_accept=False, prefetch=0)
        self.got = []
        self.round = 0  # 0: to abort, 1: to commit

    def setup(self, event):
        self.receiver = event.container.create_receiver(self.conn, self.queue)
        self.state = "declare"
        event.container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        self.transaction = event.transaction
        self.got = []
        self.state = "receive-%d" % self.round
        self.receiver.flow(len(COMMITTED))

    def on_message(self, event):
        body, count = event.message.body, event.message.delivery_count
        if self.round == 1 and count < 1:
            self.finish(event, error="%s redelivered with delivery-count %d" % (body, count))
            return
        self.got.append(body)
        self.transaction.accept(event.delivery)
        if len(self.got) < len(COMMITTED):
            return
        if sorted(self.got) != COMMITTED:
            self.finish(event, error="round %d got %r" % (self.round, self.got))
        elif self.round == 0:
            self.state = "abort"
            self.transaction.abort()
        else:
            self.state = "commit"
            self.transaction.commit()

    def on_transaction_aborted(self, event):
        self.round = 1
        self.state = "declare-again"
        event.container.declare_transaction(self.conn, handler=self)

    def on_transaction_committed(self, event):
        n = len(COMMITTED)
        self.finish(event, result="ok: rolled back %d, redelivered %d, committed %d" % (n, n, n))


class Empty(Base):
    def __init__(self, url, queue):
        super().__init__(url, queue, prefetch=10)

    def setup(self, event):
        self.state = "sentinel"
        self.receiver = event.container.create_receiver(self.conn, self.queue)
        sender = event.container.create_sender(self.conn, self.queue)
        sender.send(Message(body="sentinel"))

    def on_message(self, event):
        body = event.message.body
        if body != "sentinel":
            self.finish(event, error="queue not empty: got %r first" % body)
        else:
            self.finish(event, result="ok: empty")


def main():
    url, queue, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    handler = {"produce": Produce, "consume": Consume, "empty": Empty}[phase](url, queue)
    Container(handler).run()
    if handler.error or not handler.result:
        sys.stderr.write("FAIL: %s\n" % (handler.error or "no result"))
        sys.exit(1)
    print(handler.result)


if __name__ == "__main__":
    main()
