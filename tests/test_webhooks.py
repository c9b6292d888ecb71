"""common/webhooks.py against real local HTTP servers: what a raw endpoint and Discord receive, the log_level filter,
and that dead, hanging and failing servers neither slow the caller nor leak the auth token.

Every server is a ThreadingHTTPServer on 127.0.0.1 that records each request; nothing leaves the machine."""

import base64
import datetime
import email.parser
import email.policy
import io
import json
import statistics
import time

import pytest
from conftest import write_json
from PIL import Image

from common import webhooks
TOKEN = "s3cret-token-do-not-print"


def make_hooks(tmp_path, config, **kwargs):
    """Webhooks for `config` (an object or a list), printing into the returned list."""
    printed = []
    hooks = webhooks.Webhooks(write_json(tmp_path / "webhooks.json", config), print_fn=printed.append, **kwargs)
    return hooks, printed


def sample_image():
    """A small image whose pixels all differ, so a decoded copy that matches proves a lossless round trip."""
    image = Image.new("RGB", (7, 5))
    image.putdata([(x * 30, y * 50, (x + y) * 20) for y in range(5) for x in range(7)])
    return image


def same_image(png, image):
    decoded = Image.open(io.BytesIO(png))
    return decoded.format == "PNG" and decoded.size == image.size and list(decoded.getdata()) == list(image.getdata())


def parse_multipart(request):
    """{field name: email part} of a multipart/form-data request, read by the standard library's MIME parser."""
    head = f"Content-Type: {request['headers']['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request["body"])
    assert message.is_multipart()
    return {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}


# ---------------------------------------------------------------------------------------------------------------------
# What arrives


def test_raw_webhook_receives_json_with_images_and_token(tmp_path, serve):
    server = serve()
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": server.url + "/hook",
                                           "message_prefix": "[dog] ", "auth_token": TOKEN})
    image = sample_image()
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    hooks.send("checkpoint_saved", "saved step 500", step=500, images=[image], path="out/checkpoint-500")
    hooks.close(timeout=5)

    assert printed == []
    (request,) = server.requests
    assert (request["method"], request["path"]) == ("POST", "/hook")
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    body = json.loads(request["body"])
    assert set(body) == {"type", "title", "message", "data", "images", "timestamp"}
    assert (body["type"], body["title"], body["message"]) == ("checkpoint_saved", "Checkpoint saved",
                                                              "[dog] saved step 500")
    assert body["data"] == {"step": 500, "path": "out/checkpoint-500"}
    stamp = datetime.datetime.fromisoformat(body["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert before <= stamp <= datetime.datetime.now(datetime.timezone.utc)
    (encoded,) = body["images"]
    assert same_image(base64.b64decode(encoded), image)


def test_discord_webhook_receives_multipart_with_payload_and_files(tmp_path, serve):
    server = serve()
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "discord", "webhook_url": server.url + "/api/webhooks/1/x",
                                           "message_prefix": "[dog] "})
    first, second = sample_image(), sample_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    hooks.send("validation_image", "a dog on the beach", step=100, images=[first, second])
    hooks.send("training_finished", "x" * 3000)  # Discord's limit is 2000 characters
    hooks.close(timeout=5)

    assert printed == []
    with_images, long_text = server.requests
    assert with_images["path"] == "/api/webhooks/1/x"
    assert with_images["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    parts = parse_multipart(with_images)
    assert list(parts) == ["payload_json", "files[0]", "files[1]"]
    assert json.loads(parts["payload_json"].get_content()) == {"content": "[dog] a dog on the beach"}
    for i, image in enumerate([first, second]):
        part = parts[f"files[{i}]"]
        assert (part.get_filename(), part.get_content_type()) == (f"image{i}.png", "image/png")
        assert same_image(part.get_content(), image)
    parts = parse_multipart(long_text)
    assert list(parts) == ["payload_json"]
    assert json.loads(parts["payload_json"].get_content())["content"] == "[dog] " + "x" * 1994


def test_list_config_sends_to_both_and_log_level_error_gets_only_errors(tmp_path, serve):
    server = serve()
    hooks, printed = make_hooks(tmp_path, [
        {"webhook_type": "raw", "callback_url": server.url + "/raw-all"},
        {"webhook_type": "discord", "webhook_url": server.url + "/discord-all", "log_level": "debug"},
        {"webhook_type": "raw", "callback_url": server.url + "/raw-errors", "log_level": "error"},
    ])
    hooks.send("training_started", "starting", step=0)
    hooks.send("error", "out of memory", step=7)
    hooks.close(timeout=5)

    assert printed == []
    paths = sorted(request["path"] for request in server.requests)
    assert paths == ["/discord-all", "/discord-all", "/raw-all", "/raw-all", "/raw-errors"]
    (errors_only,) = [json.loads(r["body"]) for r in server.requests if r["path"] == "/raw-errors"]
    assert (errors_only["type"], errors_only["title"], errors_only["data"]) == ("error", "Error", {"step": 7})


def test_load_webhooks_without_a_path_is_none(tmp_path, serve):
    assert webhooks.load_webhooks(None) is None and webhooks.load_webhooks("") is None
    server = serve()
    hooks = webhooks.load_webhooks(write_json(tmp_path / "w.json", {"webhook_type": "raw", "callback_url": server.url}))
    hooks.send("training_started", "go")
    hooks.close(timeout=5)
    hooks.close(timeout=5)  # a second close does nothing
    assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Servers that fail: the caller never waits, one warning per webhook, a count at close, never the token


def timed_sends(hooks, count, **kwargs):
    """The median and the slowest of `count` send() calls, in seconds.

    The tests bound both: the median well under any network wait (a send that waited on the server would take the
    request's timeout), the slowest under the first message's back-off (a send that retried in the caller would take
    it), each with room for a scheduler or garbage-collector pause on a busy machine.
    """
    times = []
    for i in range(count):
        start = time.perf_counter()
        hooks.send("preview_image", f"preview {i}", step=i, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def assert_no_token(printed, capsys):
    captured = capsys.readouterr()
    assert TOKEN not in "\n".join(printed) + captured.out + captured.err


def test_dead_server_costs_the_caller_nothing(tmp_path, dead_url, capsys):
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": dead_url, "auth_token": TOKEN},
                                retries=2, backoff=0.5)  # a send that retried in the caller would take 1.5 s
    median, slowest = timed_sends(hooks, 20, images=[sample_image()])
    assert median < 0.05 and slowest < 1.0
    start = time.monotonic()
    hooks.close(timeout=10)
    assert time.monotonic() - start < 3

    warning, summary = printed
    assert warning.startswith(f"warning: webhook raw http://127.0.0.1:{dead_url.split(':')[2].split('/')[0]}/...: ")
    assert "refused" in warning.lower()
    assert summary == "webhooks: 20 of 20 messages could not be delivered"
    assert_no_token(printed, capsys)


def test_hanging_server_is_abandoned_at_the_close_deadline(tmp_path, serve, capsys):
    server = serve(hang=True)
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": server.url, "auth_token": TOKEN},
                                timeout=0.2, retries=1, backoff=0.01)
    median, slowest = timed_sends(hooks, 5)  # a send that waited would take the 0.2 s timeout
    assert median < 0.05 and slowest < 1.0
    start = time.monotonic()
    hooks.close(timeout=1)
    assert time.monotonic() - start < 1.5
    assert printed[-1] == "webhooks: 5 of 5 messages could not be delivered"
    assert all("timed out" in line for line in printed[:-1]) and len(printed) <= 2
    assert_no_token(printed, capsys)


def test_failing_server_is_retried_then_warned_once(tmp_path, serve, capsys):
    server = serve(status=500)
    config = write_json(tmp_path / "w.json", {"webhook_type": "raw", "callback_url": server.url, "auth_token": TOKEN})
    hooks = webhooks.Webhooks(config, retries=2, backoff=0.01)  # the default print_fn: print, seen by capsys
    hooks.send("error", f"token is {TOKEN}", step=3)
    deadline = time.monotonic() + 5
    while len(server.requests) < 3 and time.monotonic() < deadline:  # retries happen while the run goes on
        time.sleep(0.01)
    hooks.close(timeout=5)
    assert len(server.requests) == 1 + 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"warning: webhook raw {server.url}/...: HTTP 500 Internal Server Error; "
                     "further failures are counted, not printed",
                     "webhooks: 1 of 1 messages could not be delivered"]

    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": server.url}, retries=0)
    hooks.send("error", "first")
    hooks.send("error", "second")
    hooks.close(timeout=5)
    assert len(server.requests) == 3 + 2  # retries=0: one attempt each
    assert len(printed) == 2 and printed[1] == "webhooks: 2 of 2 messages could not be delivered"


def test_full_queue_drops_with_one_notice(tmp_path, serve):
    server = serve(hang=True)
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": server.url}, timeout=0.5)
    median, slowest = timed_sends(hooks, webhooks.QUEUE_SIZE + 50)  # a send that waited would take 0.5 s
    assert median < 0.05 and slowest < 1.0
    hooks.close(timeout=0.2)
    notices = [line for line in printed if "dropping" in line]
    assert len(notices) == 1
    assert printed[-1] == f"webhooks: {webhooks.QUEUE_SIZE + 50} of {webhooks.QUEUE_SIZE + 50} messages could not " \
                          "be delivered"


# ---------------------------------------------------------------------------------------------------------------------
# Bad configs: a SystemExit that names the file, the entry and the fix, and never the token


@pytest.mark.parametrize("config, expected", [
    ({"webhook_type": "raw", "callback_url": "http://x", "colour": "red"}, "unknown key 'colour'"),
    ({"webhook_type": "raw", "webhook_url": "http://x"}, "unknown key 'webhook_url' for a raw webhook"),
    ({"webhook_type": "raw"}, "a raw webhook needs 'callback_url'"),
    ({"webhook_type": "slack", "callback_url": "http://x"}, "'webhook_type' must be \"raw\" or \"discord\""),
    ({"webhook_type": "raw", "callback_url": "http://x", "log_level": "loud"},
     "'log_level' must be one of debug, info, warning, error; got 'loud'"),
    ({"webhook_type": "raw", "callback_url": 5}, "'callback_url' must be a string, got int"),
    ({"webhook_type": "discord", "webhook_url": "http://x", "auth_token": TOKEN}, "unknown key 'auth_token'"),
    ({"webhook_type": "raw", "callback_url": f"ftp://host/?key={TOKEN}", "auth_token": TOKEN},
     "'callback_url' must be an http:// or https:// URL, got 'ftp://host/?key=***'"),
    ([], "the list holds no webhooks"),
])
def test_bad_config_names_file_and_problem(tmp_path, config, expected):
    path = write_json(tmp_path / "hooks.json", config)
    with pytest.raises(SystemExit) as info:
        webhooks.Webhooks(path)
    message = str(info.value)
    assert message.startswith(path) and expected in message and TOKEN not in message


def test_bad_entry_in_a_list_is_named_by_index(tmp_path):
    path = write_json(tmp_path / "hooks.json", [{"webhook_type": "raw", "callback_url": "http://x"},
                                                {"webhook_type": "raw", "callback_url": "http://x", "auth_token": 1,
                                                 "secret": TOKEN}])
    with pytest.raises(SystemExit, match=r"hooks\.json, entry 1: unknown key 'secret'"):
        webhooks.Webhooks(path)


@pytest.mark.parametrize("text, expected", [('{"webhook_type": "raw",', "not valid JSON (line 1"),
                                            (None, "cannot read the webhook config")])
def test_unreadable_config(tmp_path, text, expected):
    path = tmp_path / "hooks.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as info:
        webhooks.Webhooks(str(path))
    assert str(info.value).startswith(str(path)) and expected in str(info.value)


def test_at_close_what_is_left_gets_one_attempt_without_back_off(tmp_path, serve):
    server = serve(status=500)
    hooks, printed = make_hooks(tmp_path, {"webhook_type": "raw", "callback_url": server.url}, retries=3,
                                backoff=10.0)  # back-off alone would take 70 s per message
    for i in range(4):
        hooks.send("checkpoint_saved", f"message {i}", step=i)
    start = time.monotonic()
    hooks.close(timeout=20)
    assert time.monotonic() - start < 3
    assert len(server.requests) == 4  # each message tried once
    assert printed[-1] == "webhooks: 4 of 4 messages could not be delivered"
