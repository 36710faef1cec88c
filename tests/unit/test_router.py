"""The request router on its own: no socket, no loop, a few microseconds a case.

What is asserted is what a client would see from a server using it: which handler answers, the
``{param}`` values it gets (percent-decoded), and the 404/405/400 answers with their messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import pytest

from dsproxy.daemon.http import HTTPError, Reply, Request, Router, data_reply

BASE = "/api2/json"


def request(method: str, path: str) -> Request:
    return Request(cast(Any, None), method, path, "", {})


def answering(name: str) -> Callable[[Request], Reply]:
    def handler(req: Request) -> Reply:
        return data_reply({"handler": name, **req.params})

    return handler


def who(router: Router, method: str, path: str) -> tuple[str, dict[str, str]]:
    """The name of the handler that answers ``METHOD path``, and the params it was given."""
    req = request(method, path)
    reply = router.resolve(req)(req)
    assert isinstance(reply, Reply)
    name: str = json.loads(reply.body)["data"]["handler"]
    return name, req.params


def refused(router: Router, method: str, path: str) -> HTTPError:
    with pytest.raises(HTTPError) as err:
        router.resolve(request(method, path))
    return err.value


@pytest.fixture
def router() -> Router:
    r = Router()
    r.add("GET", f"{BASE}/ping", answering("ping"))
    r.add("GET", f"{BASE}/admin/datastore", answering("list"))
    r.add("GET", f"{BASE}/admin/datastore/{{store}}/status", answering("status"))
    r.add("POST", f"{BASE}/admin/datastore/{{store}}/operation", answering("take"))
    r.add("DELETE", f"{BASE}/admin/datastore/{{store}}/operation", answering("drop"))
    r.add("POST", f"{BASE}/config/datastore", answering("create"))
    r.add("GET", f"{BASE}/config/datastore/{{name}}", answering("show"))
    r.add("PUT", f"{BASE}/config/datastore/{{name}}", answering("update"))
    r.add("GET", f"{BASE}/config/datastore/all", answering("static-all"))
    r.add("GET", "/a/{x}/b/{y}", answering("two"))
    return r


def test_a_static_route_answers_its_method(router: Router) -> None:
    assert who(router, "GET", f"{BASE}/ping") == ("ping", {})
    assert who(router, "GET", f"{BASE}/admin/datastore") == ("list", {})
    assert who(router, "POST", f"{BASE}/config/datastore") == ("create", {})


def test_a_dynamic_route_hands_over_its_segments(router: Router) -> None:
    assert who(router, "GET", f"{BASE}/admin/datastore/store1/status") == ("status", {"store": "store1"})
    assert who(router, "GET", "/a/1/b/2") == ("two", {"x": "1", "y": "2"})


def test_methods_of_one_pattern_go_to_their_own_handlers(router: Router) -> None:
    path = f"{BASE}/admin/datastore/s1/operation"
    assert who(router, "POST", path) == ("take", {"store": "s1"})
    assert who(router, "DELETE", path) == ("drop", {"store": "s1"})
    assert who(router, "PUT", f"{BASE}/config/datastore/s1") == ("update", {"name": "s1"})
    assert who(router, "GET", f"{BASE}/config/datastore/s1") == ("show", {"name": "s1"})


def test_a_static_route_wins_over_a_pattern_it_also_fits(router: Router) -> None:
    assert who(router, "GET", f"{BASE}/config/datastore/all") == ("static-all", {})
    assert who(router, "GET", f"{BASE}/config/datastore/alls") == ("show", {"name": "alls"})


def test_head_is_answered_by_get(router: Router) -> None:
    assert who(router, "HEAD", f"{BASE}/ping")[0] == "ping"
    assert who(router, "HEAD", f"{BASE}/admin/datastore/s1/status")[0] == "status"
    assert refused(router, "HEAD", f"{BASE}/admin/datastore/s1/operation").status == 405


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/nope",
        f"{BASE}/admin/datastore/s1",  # a pattern's prefix
        f"{BASE}/admin/datastore/s1/status/more",  # a pattern and more
        f"{BASE}/admin/datastore/s1/statuses",
        "/a/1/c/2",
        "/",
    ],
)
def test_an_unknown_path_is_404_naming_it(router: Router, path: str) -> None:
    err = refused(router, "GET", path)
    assert (err.status, err.message) == (404, f"no such route: {path}")


def test_a_404_message_does_not_repeat_a_huge_path(router: Router) -> None:
    err = refused(router, "GET", "/x" * 5000)
    assert err.status == 404 and len(err.message) < 250


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", f"{BASE}/ping"),
        ("POST", f"{BASE}/admin/datastore"),
        ("PUT", f"{BASE}/admin/datastore/s1/status"),
        ("GET", f"{BASE}/admin/datastore/s1/operation"),
        ("PATCH", f"{BASE}/config/datastore/s1"),
    ],
)
def test_a_known_path_with_another_method_is_405(router: Router, method: str, path: str) -> None:
    err = refused(router, method, path)
    assert (err.status, err.message) == (405, f"method {method} not allowed on {path}")


@pytest.mark.parametrize(
    ("segment", "value"),
    [
        ("%41bc", "Abc"),
        ("caf%C3%A9", "café"),
        ("caf%c3%a9", "café"),
        ("a%20b", "a b"),
        ("50%25", "50%"),
        ("store.1-x_y", "store.1-x_y"),  # nothing to decode
    ],
)
def test_a_segment_is_percent_decoded(router: Router, segment: str, value: str) -> None:
    assert who(router, "GET", f"{BASE}/config/datastore/{segment}") == ("show", {"name": value})


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        ("%ff", "is not UTF-8 after percent-decoding"),
        ("%zz", "invalid percent escape"),
        ("ab%2", "invalid percent escape"),
        ("%00", "control character"),
        ("a%0ab", "control character"),
        ("a%7fb", "control character"),
        ("a%2fb", "invalid path component"),  # an encoded slash never becomes a second segment
        ("%2e%2e", "invalid path component"),
        ("%2e", "invalid path component"),
        ("..", "invalid path component"),
        ("", "invalid path component"),
    ],
)
def test_a_bad_segment_is_400_naming_it(router: Router, segment: str, message: str) -> None:
    err = refused(router, "GET", f"/a/{segment}/b/ok")
    assert err.status == 400
    assert message in err.message and f"'{segment}'" in err.message


def test_a_static_path_is_matched_as_sent_not_decoded(router: Router) -> None:
    assert refused(router, "GET", f"{BASE}/p%69ng").status == 404


# -- streamed bodies ----------------------------------------------------------------------------------


def test_a_stream_route_is_found_by_method_and_pattern_with_its_params() -> None:
    started: list[str] = []
    r = Router()
    path = f"{BASE}/admin/datastore/{{store}}/operation"
    r.add("POST", path, answering("whole"))
    r.add_stream("POST", path, lambda req: started.append(req.params["store"]), answering("finish"))

    req = request("POST", f"{BASE}/admin/datastore/st%C3%B6re/operation")
    route = r.resolve_stream(req)
    assert route is not None and req.params == {"store": "störe"}
    route.start(req)
    assert started == ["störe"]
    reply = route.finish(req)
    assert isinstance(reply, Reply) and json.loads(reply.body)["data"]["handler"] == "finish"
    # the same request sent whole goes to the ordinary route
    assert who(r, "POST", f"{BASE}/admin/datastore/s1/operation") == ("whole", {"store": "s1"})


def test_a_request_no_stream_route_fits_is_not_streamed() -> None:
    r = Router()
    r.add_stream("POST", "/s/{x}/op", lambda req: None, answering("finish"))
    assert r.resolve_stream(request("PUT", "/s/1/op")) is None
    assert r.resolve_stream(request("POST", "/s/1/other")) is None
    assert r.resolve_stream(request("POST", "/s/1/op/more")) is None


def test_a_stream_route_refuses_a_bad_segment_with_400() -> None:
    r = Router()
    r.add_stream("POST", "/s/{x}/op", lambda req: None, answering("finish"))
    with pytest.raises(HTTPError) as err:
        r.resolve_stream(request("POST", "/s/%ff/op"))
    assert err.value.status == 400 and "not UTF-8" in err.value.message
