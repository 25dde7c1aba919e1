#!/usr/bin/env python3
"""Queue browsing with proton's own `Copy()` option (a JMS QueueBrowser's link).

Usage: proton_browse.py <amqp-url> <queue>

Sends ten messages; a browser (distribution-mode copy) sees all ten, in order, each
pre-settled by the broker; a second browser with a selector sees only its matches;
then a plain consumer still receives all ten, in order: browsing removed nothing.

Prints `ok: ...` and exits 0, or exits 1 with the reason. Every wait is bounded.
"""

import sys

try:
    from proton import Message
    from proton.reactor import Copy, Selector
    from proton.utils import BlockingConnection
except ImportError as e:  # the Rust test turns this into a failure, not a skip
    sys.stderr.write("python-qpid-proton is not importable: %s\n" % e)
    sys.exit(3)

TIMEOUT = 10


def fail(msg):
    sys.stderr.write("FAIL: %s\n" % msg)
    sys.exit(1)


def take(receiver, n, settle):
    got = []
    for _ in range(n):
        m = receiver.receive(timeout=TIMEOUT)
        got.append(m.body)
        if settle:
            receiver.accept()
    return got


def nothing_more(receiver):
    try:
        receiver.receive(timeout=1)
    except Exception:  # Timeout: nothing more came
        return True
    return False


def main():
    url, queue = sys.argv[1], sys.argv[2]
    conn = BlockingConnection(url, timeout=TIMEOUT)
    sender = conn.create_sender(queue)
    for i in range(10):
        sender.send(Message(body="m-%d" % i, properties={"i": i}), timeout=TIMEOUT)
    expected = ["m-%d" % i for i in range(10)]

    browser = conn.create_receiver(queue, credit=4, options=Copy())
    # The broker sends the copies pre-settled: there is nothing to accept.
    seen = take(browser, 10, settle=False)
    if seen != expected:
        fail("browser saw %r" % seen)
    if not nothing_more(browser):
        fail("the browser saw more than the queue held")
    browser.close()

    picky = conn.create_receiver(queue, credit=10, options=[Copy(), Selector("i >= 7")])
    seen = take(picky, 3, settle=False)
    if seen != ["m-7", "m-8", "m-9"] or not nothing_more(picky):
        fail("selecting browser saw %r" % seen)
    picky.close()

    consumer = conn.create_receiver(queue, credit=10)
    got = take(consumer, 10, settle=True)
    if got != expected:
        fail("after browsing the consumer got %r" % got)
    if not nothing_more(consumer):
        fail("the consumer got more than was sent")
    conn.close()
    print("ok: browsed 10 and 3, consumed 10")


if __name__ == "__main__":
    main()
