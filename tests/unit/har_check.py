"""HAR 1.2 structure check: every field the spec requires, with its type.

Used by the unit tests of agent/har and by the real-capture tests; it follows
http://www.softwareishard.com/blog/har-12-spec/ (required fields only, plus the
types of the optional ones tlscap writes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def _fields(obj: Any, where: str, spec: dict[str, type | tuple[type, ...]]) -> None:
    assert isinstance(obj, dict), f"{where}: not an object"
    for name, kind in spec.items():
        assert name in obj, f"{where}: missing required {name!r}"
        value = obj[name]
        assert isinstance(value, kind) and not (
            isinstance(value, bool) and kind in (int, float, (int, float))
        ), f"{where}.{name}: {type(value).__name__}, want {kind}"


def _pairs(items: list, where: str) -> None:
    for i, item in enumerate(items):
        _fields(item, f"{where}[{i}]", {"name": str, "value": str})


NUM = (int, float)


def check_har(har: dict) -> list[dict]:
    """Assert `har` is structurally valid HAR 1.2; return its entries."""
    _fields(har, "har", {"log": dict})
    log = har["log"]
    _fields(log, "log", {"version": str, "creator": dict, "entries": list})
    assert log["version"] == "1.2"
    _fields(log["creator"], "log.creator", {"name": str, "version": str})
    for i, e in enumerate(log["entries"]):
        w = f"entries[{i}]"
        _fields(e, w, {"startedDateTime": str, "time": NUM, "request": dict,
                       "response": dict, "cache": dict, "timings": dict})  # fmt: skip
        datetime.fromisoformat(e["startedDateTime"])  # ISO 8601 with offset
        assert datetime.fromisoformat(e["startedDateTime"]).tzinfo is not None
        req, resp = e["request"], e["response"]
        _fields(req, f"{w}.request", {"method": str, "url": str, "httpVersion": str,
                                      "cookies": list, "headers": list, "queryString": list,
                                      "headersSize": int, "bodySize": int})  # fmt: skip
        _pairs(req["headers"], f"{w}.request.headers")
        _pairs(req["queryString"], f"{w}.request.queryString")
        _pairs(req["cookies"], f"{w}.request.cookies")
        if "postData" in req:
            _fields(req["postData"], f"{w}.request.postData", {"mimeType": str})
            assert isinstance(req["postData"].get("text", ""), str)
            _pairs(req["postData"].get("params", []), f"{w}.request.postData.params")
        _fields(resp, f"{w}.response", {"status": int, "statusText": str, "httpVersion": str,
                                        "cookies": list, "headers": list, "content": dict,
                                        "redirectURL": str, "headersSize": int,
                                        "bodySize": int})  # fmt: skip
        _pairs(resp["headers"], f"{w}.response.headers")
        _fields(resp["content"], f"{w}.response.content", {"size": int, "mimeType": str})
        if "text" in resp["content"]:
            assert isinstance(resp["content"]["text"], str)
        assert resp["content"].get("encoding", "base64") == "base64"
        t = e["timings"]
        _fields(t, f"{w}.timings", {"send": NUM, "wait": NUM, "receive": NUM})
        for k in ("send", "wait", "receive"):
            assert t[k] >= 0, f"{w}.timings.{k} negative"
        for k in ("blocked", "dns", "connect", "ssl"):
            assert t.get(k, -1) >= -1
        assert abs(e["time"] - sum(v for v in t.values() if v > 0)) < 0.01
        for k in ("serverIPAddress", "connection", "comment"):
            assert isinstance(e.get(k, ""), str)
    return log["entries"]
