#!/usr/bin/env python3
"""What a proton transactional client sees where transactions are refused.

Usage: proton_tx_refused.py <amqp-url>

Declares a transaction with proton's own API (`Container.declare_transaction`, as
tx_send.py does); the broker must refuse the coordinator link with an error condition and
a description. Prints `ok: <condition>: <description>` and exits 0; exits 1 if the
transaction is declared, nothing is refused, or it takes longer than TIMEOUT.
"""

import sys

try:
    from proton.handlers import MessagingHandler, TransactionHandler
    from proton.reactor import Container
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT = 10


class Declare(MessagingHandler, TransactionHandler):
    def __init__(self, url):
        super().__init__()
        self.url = url
        self.result = None
        self.error = "no answer"

    def on_start(self, event):
        self.timer = event.container.schedule(TIMEOUT, self)
        self.conn = event.container.connect(self.url)
        event.container.declare_transaction(self.conn, handler=self)

    def on_transaction_declared(self, event):
        self.error = "the transaction was declared"
        self.conn.close()

    def on_transaction_declare_failed(self, event):
        self.error = "declare failed without a link refusal: %s" % event.delivery.remote.condition
        self.conn.close()

    def on_link_error(self, event):
        cond = event.link.remote_condition
        if cond is not None:
            self.result = "%s: %s" % (cond.name, cond.description)
            self.error = None
        self.conn.close()

    def on_timer_task(self, event):
        self.error = "timed out"
        self.conn.close()

    def on_connection_closed(self, event):
        self.timer.cancel()
        event.container.stop()


def main():
    handler = Declare(sys.argv[1])
    Container(handler).run()
    if handler.error or not handler.result:
        sys.stderr.write("FAIL: %s\n" % (handler.error or "no result"))
        sys.exit(1)
    print("ok: %s" % handler.result)


if __name__ == "__main__":
    main()
