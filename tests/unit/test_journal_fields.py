"""Records reach journald as structured entries (the handler with an injected sender)."""

from __future__ import annotations

import logging
from typing import Any

from dsproxy.daemon import systemd


def _capture(monkeypatch: Any) -> tuple[logging.Logger, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(systemd, "_log_fields", {})
    handler = systemd.JournalFieldsHandler("dsproxy-worker", sender=lambda msg, **f: sent.append((msg, f)))
    log = logging.getLogger("dsproxy.test-journal")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, sent


def test_a_record_carries_priority_identifier_and_the_process_fields(monkeypatch: Any) -> None:
    log, sent = _capture(monkeypatch)
    generation = [7]
    systemd.set_log_fields(DSPROXY_ROLE="worker", DSPROXY_GENERATION=lambda: generation[0])
    log.warning("store %s is short of fds", "s1", extra={"DSPROXY_STORES": 3, "lowercase": "dropped"})
    generation[0] = 8
    log.info("later")
    (msg, fields), (_, later) = sent
    assert msg == "store s1 is short of fds"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "dsproxy-worker"
    assert (
        fields["DSPROXY_ROLE"] == "worker" and fields["DSPROXY_GENERATION"] == "7" and fields["DSPROXY_STORES"] == "3"
    )
    assert fields["LOGGER"] == "dsproxy.test-journal" and fields["CODE_FUNC"].startswith("test_")
    assert all(k.isupper() for k in fields), sorted(fields)  # journald drops lower-case names
    assert later["PRIORITY"] == "6" and later["DSPROXY_GENERATION"] == "8"  # callables are read per record


def test_a_field_that_fails_never_costs_the_record(monkeypatch: Any) -> None:
    log, sent = _capture(monkeypatch)
    systemd.set_log_fields(DSPROXY_GENERATION=lambda: 1 // 0, DSPROXY_NONE=lambda: None)
    log.error("still logged")
    ((msg, fields),) = sent
    assert msg == "still logged" and fields["PRIORITY"] == "3"
    assert "DSPROXY_GENERATION" not in fields and "DSPROXY_NONE" not in fields


def test_priorities_follow_syslog() -> None:
    levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    assert [systemd.journal_priority(level) for level in levels] == [7, 6, 4, 3, 2]
