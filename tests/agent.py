"""Child process for multi-process tests: a Registry driven by JSON lines on stdin.

argv: base_dir, JSON of Registry keyword arguments.  Each command line is answered with one JSON
line: ``{"ok": ...}`` or ``{"error": "<type>", "message": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import dsproxy
from dsproxy.ipc import shm


def main() -> None:
    base = sys.argv[1]
    args = json.loads(sys.argv[2])
    reg = dsproxy.Registry(base_dir=base, **args)
    handles: dict[int, dsproxy.Handle] = {}
    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "pid": os.getpid(), "degraded": reg.degraded})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "lookup":
                h = reg.lookup(msg["name"], dsproxy.Operation[msg.get("op", "READ")])
                handles[id(h)] = h
                reply({"ok": id(h), "generation": reg.loaded_generation})
            elif cmd == "release":
                handles.pop(msg["handle"]).release()
                reply({"ok": True})
            elif cmd == "active":
                reply({"ok": reg.active_operations(msg["name"])})
            elif cmd == "refresh":
                reply({"ok": reg.refresh(), "generation": reg.loaded_generation})
            elif cmd == "state":
                reply(
                    {
                        "ok": {
                            "generation": reg.generation,
                            "loaded": reg.loaded_generation,
                            "reloads": reg.reloads,
                            "instances": sorted(reg.instances),
                            "degraded": reg.degraded,
                            "config_error": reg.config_error,
                        }
                    }
                )
            elif cmd == "poll":  # refresh in a loop for `seconds` (what a daemon worker's loop does)
                deadline = time.monotonic() + msg["seconds"]
                while time.monotonic() < deadline:
                    reg.refresh()
                    time.sleep(0.005)
                reply({"ok": True})
            elif cmd == "hold_writer_lock":  # enter the writers' critical section and stay there
                seg = shm.Segment.open(reg.paths.run_dir, create=False)
                with seg.writer_lock():
                    reply({"ok": "holding"})
                    time.sleep(3600)
            elif cmd == "exit":
                reply({"ok": True})
                break
            else:
                reply({"error": "UnknownCommand", "message": cmd})
        except dsproxy.DatastoreError as err:
            reply({"error": type(err).__name__, "message": str(err), "status": err.status})
        except Exception as err:  # report, keep serving
            reply({"error": type(err).__name__, "message": str(err), "trace": traceback.format_exc()})
    reg.close()


if __name__ == "__main__":
    main()
