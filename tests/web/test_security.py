"""A public Space under attack: what an anonymous client on the open internet may and may not do.

Every case runs the app as main() launches it (tests.fakes.serving) on the fake engine;
docs/RELIABILITY.md tabulates them. The browser case (a reply that would make the visitor's
browser fetch another origin) is in tests/web/test_browser.py.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client

from engine import loading as loader_module
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.web.test_app import resolved
from tests.web.test_openai_attacks import CHAT
from tests.web.test_reliability import API_DEFAULTS, stream_raw, until
from web.config import AppConfig, parse_config
from web.guard.events import server_events
from web.guard.guards import LoginThrottle
from web.guard.limits import MAX_BODY_BYTES, MAX_JSON_VALUES, RateLimiter, json_values
from web.server import build_app

WAIT_S = 15
TOKEN = "correct horse battery staple"


def public(**fields) -> AppConfig:
    """A server reachable by others (as on a Space), rate limit off unless given."""
    from tests.fakes.serving import free_port

    return AppConfig(host="0.0.0.0", port=free_port(), **{"rate_limit": 0, **fields})


def event_index(web, name: str) -> int:
    return next(index for index, fn in web.demo.fns.items() if fn.name == name)


# ---- 1. uploads ---------------------------------------------------------------------------------


def test_uploads_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    with serve(FakeEngine()) as (url, web):
        files = [("files", (f"f{n}.bin", b"x" * 1000)) for n in range(50)]
        for route in ("gradio_api/upload", "upload", "gradio_api/upload?upload_id=abc"):
            response = httpx.post(url + route, files=files)
            assert response.status_code == 404, route
        assert httpx.get(url + "gradio_api/upload_progress?upload_id=abc").status_code == 404
        assert web.demo.delete_cache == (3600, 3600)  # and whatever the cache holds is cleaned
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


# ---- 3. reloading the model ---------------------------------------------------------------------


def test_on_a_public_server_without_a_token_no_visitor_can_load(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    with serve(engine, public()) as (url, web):
        load = {"data": ["4_25", 4096, "fp16", ""], "fn_index": event_index(web, "load_clicked")}
        for _ in range(10):
            answered = httpx.post(f"{url}gradio_api/run/predict", json=load, timeout=WAIT_S)
            assert answered.status_code == 200
            assert "Loading from this page is off" in answered.text
        assert web.panel.last_load is None and engine.loads == []
        assert engine.status.state == "ready"  # replies in flight were never ended


def test_on_a_public_server_only_the_admin_token_loads_and_guesses_are_slowed(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    with serve(engine, public(admin_token=TOKEN)) as (url, web):
        index = event_index(web, "load_clicked")

        def load(token: str) -> str:
            body = {"data": ["4_25", 4096, "fp16", token], "fn_index": index}
            return httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=WAIT_S).text

        for guess in range(LoginThrottle().max_failures):
            assert "not the one this server was started with" in load(f"guess {guess}")
        assert "Too many wrong admin tokens; try again in" in load(TOKEN)  # even the right one
        assert engine.loads == []
        web.logins._failures.clear()  # the wait is over
        load(TOKEN)
        web.panel.last_load.join(WAIT_S)
        assert [entry["max_seq_len"] for entry in engine.loads] == [4096]


def test_a_local_run_keeps_the_load_button_open():
    assert AppConfig().loading_open and not public().loading_open
    assert not parse_config([], {"SPACE_ID": "me/space"}).loading_open
    assert not AppConfig(on_space=True).loading_open


def test_an_admin_token_must_be_long_enough_to_guard_anything(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--admin-token", "short"], {})
    assert "at least 12 characters" in capsys.readouterr().err


# ---- 4. replies nobody reads --------------------------------------------------------------------


def test_replies_whose_stream_is_never_opened_are_not_run(monkeypatch):
    monkeypatch.setattr("web.gate.CONNECT_GRACE_S", 1.0)
    engine = FakeEngine(["tok "] * 200, chunk_delay_s=0.01)
    with serve(engine) as (url, web):
        posted = [
            httpx.post(f"{url}gradio_api/call/generate", json={"data": ["Hi", *API_DEFAULTS]})
            for _ in range(4)
        ]
        assert all(response.status_code == 200 for response in posted)
        session = uuid.uuid4().hex  # a queue join whose stream is never opened, too
        joined = httpx.post(
            f"{url}gradio_api/queue/join",
            json={
                "data": ["Hi", *API_DEFAULTS],
                "fn_index": event_index(web, "generate"),
                "session_hash": session,
            },
        )
        assert joined.status_code == 200
        queue = web.demo._queue
        assert until(lambda: not queue.event_ids_to_events, WAIT_S)  # all five have ended
        assert engine.calls == [] and web.admission.running == 0  # and none ran
        assert "event: complete" in stream_raw(url)  # a reader is served as before


def test_a_reply_waiting_for_the_gpu_is_dropped_when_its_client_goes():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], max_concurrency=1, gate=gate)
    with serve(engine) as (url, web):
        holder = Client(url, verbose=False).submit("Hold the GPU.", api_name="/generate")
        assert next(iter(holder)) == "a"
        quitter = Client(url, verbose=False).submit("Wait, then leave.", api_name="/generate")
        assert until(lambda: web.admission.waiting == 1, WAIT_S)
        # gradio_client learns the event's id only after the server has started it; a cancel
        # sent before then names no event and is lost (seen once on a loaded CI machine).
        assert until(lambda: quitter.communicator.event_id, WAIT_S)
        quitter.cancel()
        assert until(lambda: web.admission.waiting == 0, WAIT_S)
        gate.set()
        assert holder.result(WAIT_S) == "ab"
    assert len(engine.calls) == 1  # the one that left never reached the engine


# ---- 5. one client filling the queue ------------------------------------------------------------


def test_one_client_cannot_fill_the_queue_that_others_wait_in():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], max_concurrency=4, gate=gate)
    config = public(queue_size=32, proxy_hops=1)
    with serve(engine, config) as (url, web), ThreadPoolExecutor(40) as pool:
        try:
            flood = [pool.submit(stream_raw, url, f"flood {n}", "6.6.6.6") for n in range(36)]
            per_client = web.admission.per_client
            assert until(lambda: web.admission.waiting == per_client, WAIT_S)
            assert until(lambda: sum(job.done() for job in flood) == 36 - 4 - per_client, WAIT_S)
            refused = [job.result() for job in flood if job.done()]
            assert all("(the limit per client)" in text for text in refused)
            other = pool.submit(stream_raw, url, "someone else", "7.7.7.7")
            assert until(lambda: web.admission.waiting == per_client + 1, WAIT_S)
        finally:
            gate.set()
        assert "event: complete" in other.result(WAIT_S)
    assert len(engine.calls) == 4 + per_client + 1


# ---- 6. many GPU jobs ---------------------------------------------------------------------------


def test_more_than_forty_jobs_run_at_once_when_max_jobs_allows():
    gate = threading.Event()
    jobs = 44  # Gradio's default of 40 worker threads would cap this
    engine = FakeEngine(["a", "b"], max_concurrency=jobs, gate=gate)
    config = AppConfig(max_jobs=jobs, queue_size=8, rate_limit=0, proxy_hops=1)
    with serve(engine, config) as (url, web), ThreadPoolExecutor(jobs) as pool:
        assert web.launch_options()["max_threads"] >= jobs + 8
        try:
            streams = [pool.submit(stream_raw, url, f"{n}", f"10.9.0.{n}") for n in range(jobs)]
            assert until(lambda: len(engine.calls) == jobs, WAIT_S), len(engine.calls)
        finally:
            gate.set()
        assert all("event: complete" in stream.result(WAIT_S) for stream in streams)


# ---- 7. forged client addresses -----------------------------------------------------------------


def test_the_rate_limit_table_stays_bounded_under_forged_addresses():
    limiter = RateLimiter(30)
    limiter.check("real client")
    for n in range(3 * RateLimiter.MAX_CLIENTS):
        limiter.check(f"forged {n}")
    assert len(limiter) == RateLimiter.MAX_CLIENTS
    assert "real client" not in limiter._seen  # the least recently seen went first
    assert f"forged {3 * RateLimiter.MAX_CLIENTS - 1}" in limiter._seen


# ---- 8. logins ----------------------------------------------------------------------------------


def login(url: str, password: str, client: str = "5.5.5.5") -> httpx.Response:
    return httpx.post(
        f"{url}login",
        data={"username": "me", "password": password},
        headers={"x-forwarded-for": client},
    )


def test_failed_logins_are_slowed_per_client_address():
    config = AppConfig(auth="me:secret", rate_limit=0, proxy_hops=1)
    with serve(FakeEngine(), config) as (url, _):
        for n in range(5):
            assert login(url, f"guess {n}").status_code == 400
        throttled = login(url, "secret")  # even the right password waits now
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) > 0
        assert "Too many failed logins" in throttled.json()["detail"]
        assert login(url, "secret", client="8.8.8.8").status_code == 200  # others are not


def test_with_a_login_set_the_api_description_is_not_public():
    with serve(FakeEngine(), AppConfig(auth="me:secret", rate_limit=0)) as (url, _):
        assert httpx.get(f"{url}openapi.json").status_code == 404
        assert httpx.get(f"{url}docs").status_code == 404
        page = httpx.get(url).text
        assert '"auth_required":true' in page
        assert "window.gradio_api_info = null;" in page and "/generate" not in page
        assert httpx.get(f"{url}gradio_api/info").status_code == 401
        with httpx.Client() as browser:
            assert browser.post(
                f"{url}login", data={"username": "me", "password": "secret"}
            ).is_success
            assert "/generate" in browser.get(url).text  # once logged in, the page has it


# ---- 9. unknown events --------------------------------------------------------------------------


def test_unknown_events_get_a_404_and_leave_no_traceback_in_the_log(caplog, capfd):
    caplog.set_level(logging.INFO)
    with serve(FakeEngine()) as (url, _):
        for fn_index in (999, -1, "x", 10**30, [1], {"a": 1}, True):
            body = {"data": ["Hi"], "fn_index": fn_index, "session_hash": "s"}
            answered = httpx.post(f"{url}gradio_api/queue/join", json=body)
            assert answered.status_code == 404, fn_index
            assert "There is no event" in answered.json()["detail"]
        for _ in range(50):
            answered = httpx.post(f"{url}gradio_api/run/predict", json={"fn_index": 1234})
            assert answered.status_code == 404
        body = {"component_id": 99999, "fn_name": "x", "session_hash": "s", "data": None}
        answered = httpx.post(f"{url}gradio_api/component_server", json=body)
        assert answered.status_code == 404  # no component of this app has server functions
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged and "KeyError" not in logged


def test_calls_by_an_unknown_api_name_or_with_misfit_named_arguments_leave_no_traceback(
    caplog, capfd
):
    caplog.set_level(logging.INFO)
    engine = FakeEngine(["ok"])
    calls = [
        ("call/nosuch", {"data": []}, 404, "There is no API endpoint /nosuch in this app; it has "
         "/generate."),
        ("run/nosuch", {"data": []}, 404, "no API endpoint /nosuch"),
        ("api/nosuch", {"data": []}, 404, "no API endpoint /nosuch"),
        ("call/v2/nosuch", {"a": 1}, 404, "no API endpoint /nosuch"),
        ("call/v2/respond", {}, 404, "no API endpoint /respond"),  # the page's, not the API's
        ("call/v2/generate", {}, 400, "/generate needs the argument 'prompt'; its arguments are "
         "prompt, temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed."),
        ("call/v2/generate", {"prompt": "Hi", "bogus": 1}, 400, "has no argument 'bogus'"),
        ("call/v2/generate", ["Hi"], 400, "takes a JSON object of named arguments, not a list."),
    ]  # fmt: skip
    with serve(engine, public()) as (url, _):
        for path, body, status, why in calls:
            answered = httpx.post(f"{url}gradio_api/{path}", json=body, timeout=WAIT_S)
            assert answered.status_code == status and why in answered.json()["detail"], path
        assert engine.calls == []
        named = httpx.post(f"{url}gradio_api/call/v2/generate", json={"prompt": "Hi", "top_k": 5})
        assert named.status_code == 200  # a call with fitting named arguments is served
        stream = httpx.get(f"{url}gradio_api/call/generate/{named.json()['event_id']}")
        assert "event: complete" in stream.text and engine.calls[-1].settings.top_k == 5
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged and "KeyError" not in logged and "TypeError" not in logged


def test_streams_of_unknown_sessions_or_events_get_a_404_and_leave_no_traceback(caplog, capfd):
    caplog.set_level(logging.INFO)
    paths = [
        "gradio_api/queue/data?session_hash=nosuch",
        "gradio_api/call/generate/0123abcd",
        "gradio_api/call/v2/generate/0123abcd",
    ]
    with serve(FakeEngine()) as (url, _):
        for path in paths * 10:
            answered = httpx.get(f"{url}{path}", timeout=WAIT_S)
            assert answered.status_code == 404, path
            assert "No reply is waiting" in answered.json()["detail"]
        assert "event: complete" in stream_raw(url)  # a real one still streams
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged and "RuntimeError" not in logged


# ---- 10. memory -------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory (server and test clients together)."""
    with open("/proc/self/statm") as statm:
        return round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


def test_memory_stays_flat_across_rounds_of_streams(monkeypatch):
    monkeypatch.setattr("web.guard.sessions.SWEEP_EVERY_S", 0.2)
    engine = FakeEngine(["a", "b", "c"])
    config = AppConfig(queue_size=8, max_jobs=4, rate_limit=0, proxy_hops=1)
    with serve(engine, config) as (url, web), ThreadPoolExecutor(8) as pool:
        capacity = web.launch_options()["state_session_capacity"]

        def round_of(streams: int) -> None:
            engine.calls.clear()  # the fake's own record of calls is not the server's memory
            clients = [f"10.8.{n % 50}.1" for n in range(streams)]
            texts = list(pool.map(stream_raw, [url] * streams, map(str, range(streams)), clients))
            assert all("event: complete" in text for text in texts)

        tracemalloc.start()
        # CPython's table of interned strings was allocated before tracemalloc started, so when
        # it is next reallocated, the whole new table (3.8 MB here) counts and the old one it
        # frees does not. Strings interned and then freed use up its slots, and under pytest
        # every event does that (Gradio's failed `import matplotlib` passes through pytest's
        # assertion-rewriting import hook, which interns a path), so that one-off reallocation
        # lands in some round or other. Interning throwaway strings forces it here, before the
        # first measurement; a later reallocation frees a traced table of the same size.
        for n in range(1 << 20):
            sys.intern(f"warm-up {n}")
        round_of(capacity + 50)  # fills Gradio's session table to its bound
        gc.collect()
        sizes, rss = [], []
        for _ in range(5):
            round_of(100)
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
            rss.append(rss_mb())
        tracemalloc.stop()
    growth = sizes[-1] - sizes[0]
    print(f"after each round of 100 streams: traced {sizes} bytes; RSS {rss} MB")
    # Before: 85 KB of page state per session, and Gradio's message tables, kept for good.
    assert growth < 250_000, f"{growth:,} bytes more after 400 more streams ({sizes})"


def test_a_chat_history_a_session_sent_is_not_kept_once_its_event_is_over():
    text = "def f(x):\n    return x\n" * 90  # 2 KB of code a message, 500 messages: 1 MB
    history = [
        {"role": ("user", "assistant")[n % 2], "content": [{"type": "text", "text": text}]}
        for n in range(500)
    ]
    with serve(FakeEngine(), public()) as (url, web):
        index = event_index(web, "add_user_message")
        fn = web.demo.fns[index]

        def sessions_sending_it(count: int, name: str) -> int:
            for n in range(count):
                answer = run_event(url, fn, index, ["Hi", history, None], f"{name}{n}")
                assert '"success":true' in answer
            time.sleep(0.5)  # Gradio's statistics of the events are computed after them
            gc.collect()
            return tracemalloc.get_traced_memory()[0]

        sessions_sending_it(2, "warm-up")  # Gradio's first statistics import pandas
        tracemalloc.start()
        try:
            before = sessions_sending_it(2, "first")
            after = sessions_sending_it(6, "then")
        finally:
            tracemalloc.stop()
        assert len(web.demo.state_holder.session_data) >= 10  # the sessions are still there
    per_session = (after - before) / 6
    print(f"each session that sent a 1 MB history keeps {per_session / 1e3:,.0f} KB")
    assert per_session < 256 * 1024  # Gradio kept each history: ~1.4 MB a session


def test_a_finished_session_is_forgotten_only_after_two_sweeps():
    from web.guard.sessions import SessionSweeper

    web = build_app(FakeEngine())
    queue = web.demo._queue
    queue.pending_event_ids_session.update({"done": {"e1"}, "reading": {"e2"}})
    queue.pending_messages_per_session["done"] = object()
    streaming = {"reading"}
    sweeper = SessionSweeper(web.demo, lambda keys: bool(streaming & set(keys)))
    assert sweeper.sweep() == 0  # a late reader still finds its messages
    assert sweeper.sweep() == 1
    assert "done" not in queue.pending_event_ids_session
    assert "done" not in queue.pending_messages_per_session
    assert "reading" in queue.pending_event_ids_session  # its stream is open


# ---- 11. bodies that cost far more than their bytes ---------------------------------------------


def test_gradios_deep_links_which_write_a_sessions_state_to_disk_are_404():
    with serve(FakeEngine(), public()) as (url, _):
        for path in ("gradio_api/deep_link?session_hash=abc", "deep_link"):
            assert httpx.get(f"{url}{path}").status_code == 404


@pytest.mark.parametrize("route", ["gradio_api/run/predict", "gradio_api/queue/join", CHAT])
def test_a_body_of_a_million_tiny_values_is_refused_before_anything_parses_it(route):
    many = "[" + "{}," * 1_000_000 + "{}]"  # 3 MB that json.loads would make 1 GB of objects
    body = (
        '{"fn_index": 0, "session_hash": "s", "model": "m", '
        f'"messages": [{{"role": "user", "content": "hi"}}], "data": [{many}]}}'
    )
    with serve(FakeEngine(), public()) as (url, _):
        tracemalloc.start()
        try:
            answer = httpx.post(
                f"{url}{route}", content=body, headers={"content-type": "application/json"}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert answer.status_code == 413
    assert "holds about 2,000,0" in answer.text and "the limit is 100,000" in answer.text
    assert peak < 64 * 2**20  # the body and its copies, no parsed objects


def test_a_login_form_is_read_no_further_than_sixteen_kilobytes():
    config = AppConfig(auth="me:secret", rate_limit=0, proxy_hops=1)
    with serve(FakeEngine(), config) as (url, _):
        padded = httpx.post(
            f"{url}login",
            data={"username": "me", "password": "secret"},
            files={"blob": ("blob", b"x" * 2**20)},  # a file part would be spooled to disk
        )
        assert padded.status_code == 413
        assert "the limit is 16 KB. Send only a name and a password." in padded.text
        assert login(url, "secret").status_code == 200  # a plain login still works


def test_a_client_cannot_hide_behind_a_second_forwarded_for_line():
    config = public(rate_limit=5, proxy_hops=1)
    with serve(FakeEngine(), config) as (url, _):
        statuses = []
        for n in range(8):  # its own line first, the proxy's line (the same address) last
            headers = [("x-forwarded-for", f"10.9.0.{n}"), ("x-forwarded-for", "7.7.7.7")]
            statuses.append(
                httpx.post(
                    f"{url}{CHAT}",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers=httpx.Headers(headers),
                ).status_code
            )
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3


TRICKY = ['"', "\\", ",", "{", "[", "]", "}", ":", "a", "é", " "]


def random_json(rng, depth: int = 0):
    """A random JSON value whose strings are full of what a counter might mistake for structure."""
    kind = rng.choice(["str", "num", "lit"] + ["list", "dict"] * (depth < 4))
    if kind == "str":
        return "".join(rng.choice(TRICKY) for _ in range(rng.randrange(12)))
    if kind == "num":
        return rng.choice([0, -1, 2.5, 10**20])
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {
        random_json(rng, 4) if rng.random() < 0.5 else "k": random_json(rng, depth + 1)
        for _ in range(rng.randrange(5))
    }


def values_in(value) -> int:
    if isinstance(value, list):
        return 1 + sum(values_in(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(values_in(item) for item in value.values())
    return 1


def test_a_json_bodys_values_are_never_undercounted_and_text_inside_strings_never_counts():
    import json
    import random

    rng = random.Random(20261207)
    for _ in range(2000):
        doc = random_json(rng)
        assert json_values(json.dumps(doc).encode()) >= values_in(doc), doc
    text = 'for (a, b) in {"x": [1, 2]}: print("\\", a, b)\n' * 40  # code, commas and braces
    history = [{"role": "user", "content": text}, {"role": "assistant", "content": text}] * 3000
    body = json.dumps({"data": [history]}).encode()  # 6,000 messages, 13 MB: under the byte limit
    assert 10 * 10**6 < len(body) < MAX_BODY_BYTES and json_values(body) < MAX_JSON_VALUES


# ---- 12. event data that does not fit the event -------------------------------------------------


def run_event(url: str, fn, index: int, data, session: str) -> str:
    """Call one of the page's events as the page does; what came back (its stream if queued)."""
    body = {"fn_index": index, "data": data, "session_hash": session, "trigger_id": None}
    if not fn.queue:
        return httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=WAIT_S).text
    joined = httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=WAIT_S)
    assert joined.status_code == 200, joined.text
    return httpx.get(f"{url}gradio_api/queue/data?session_hash={session}", timeout=WAIT_S).text


SLIDERS = [0.2, 0.95, 50, 1.0, 0.0, 256]  # respond's sampling sliders, all in range
MISFITS = [
    ("add_user_message", ["Hi"], "The event 'add_user_message' takes a list of 3 input values; "
     "1 came."),
    ("add_user_message", [12.5, [], None], "Input 1 of the event 'add_user_message' (Message to "
     "the model) must be text, not a number."),
    ("add_user_message", ["Hi", [{"role": "user", "content": "x"}] * 20_000, None], "Input 2 of "
     "the event 'add_user_message' (Chat) is not a chat history in the chat's format (20,000 "
     "problems; at 0.content: Input should be a valid list)."),
    ("respond", [[], "", "", "hot", *SLIDERS[1:], ""], "Input 4 of the event 'respond' "
     "(Temperature) must be a number, not 'hot'."),
    ("respond", [[], "", "", 1e9, *SLIDERS[1:], ""], "(Temperature) must be from 0 to 2, not "
     "1e+09."),
    ("respond", [[], 7, "", *SLIDERS, ""], "Input 2 of the event 'respond' (System text) must "
     "be text, not a number."),
    ("refresh", ["9_9", 4096, "fp16"], "must be one of ['auto', '3_5', '4_25', '5_0', '6_5', "
     "'8_0'], not '9_9'."),
    ("retry_history", [{"role": "user"}], "Input 1 of the event 'retry_history' (Chat) must be a "
     "chat history (a list of messages), not an object."),
    ("generate", ["Hi"], "The event 'generate' takes a list of 8 input values; 1 came."),
]  # fmt: skip


def test_event_data_that_does_not_fit_its_inputs_is_named_in_one_line_and_never_logged(
    caplog, capfd
):
    caplog.set_level(logging.INFO)
    engine = FakeEngine(["ok"])
    with serve(engine, public()) as (url, web):
        for event, data, why in MISFITS:
            index = event_index(web, event)
            answer = run_event(url, web.demo.fns[index], index, data, uuid.uuid4().hex)
            assert why in answer, (why, answer[-500:])
    assert engine.calls == []
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged and "validation error" not in logged


def test_random_data_for_any_event_never_logs_a_traceback_and_the_chat_still_answers(caplog, capfd):
    import random

    caplog.set_level(logging.INFO)
    rng = random.Random(20261208)
    with serve(FakeEngine(["ok"]), public()) as (url, web):
        events = [(index, web.demo.fns[index]) for index in sorted(server_events(web.demo))]
        for n in range(150):
            index, fn = rng.choice(events)
            count = max(0, len(fn.inputs) + rng.choice([-1, 0, 0, 0, 1]))
            data = [random_json(rng) for _ in range(count)]
            run_event(url, fn, index, data, f"fuzz{n}")
        assert "event: complete" in stream_raw(url)
    logged = caplog.text + "".join(capfd.readouterr())
    assert "Traceback" not in logged, logged[-3000:]
