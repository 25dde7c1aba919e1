#!/usr/bin/env python3
"""Runs one of Proton's python examples against a broker on another port.

Usage: run.py <port> <example.py> [example arguments...]

The examples connect to `localhost:5672` (hard-coded in some, the default of `-a` in the
others); this executes the example's source with that text replaced by
`127.0.0.1:<port>`, so the example files stay exactly as Proton ships them.
"""

import os
import sys

port, path = sys.argv[1], sys.argv[2]
with open(path) as f:
    source = f.read()
if "localhost:5672" not in source:
    sys.stderr.write("%s does not name localhost:5672: nothing to redirect\n" % path)
    sys.exit(2)
sys.argv = [path] + sys.argv[3:]
# As when run directly: the example's own folder first on the path (db_common.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
exec(compile(source.replace("localhost:5672", "127.0.0.1:" + port), path, "exec"),
     {"__name__": "__main__", "__file__": path})
