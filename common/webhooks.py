"""Training notifications to HTTP webhooks: a raw JSON endpoint of your own, or a Discord channel.

The config is a JSON file holding one webhook object or a list of them:

    [
        {"webhook_type": "discord", "webhook_url": "https://discord.com/api/webhooks/ID/SECRET",
         "message_prefix": "[dog-lora] "},
        {"webhook_type": "raw", "callback_url": "https://example.com/hooks/training",
         "auth_token": "TOKEN", "log_level": "error"}
    ]

    webhook_type    "raw" (JSON POST to callback_url) or "discord" (message with attachments to webhook_url)
    message_prefix  put before every message (optional)
    auth_token      raw only: sent as "Authorization: Bearer TOKEN"; never printed (optional)
    log_level       debug | info | warning | error (default info): events below it are not sent; every event is
                    info except "error"

A raw webhook receives {"type", "title", "message", "data": {"step", ...}, "images": [base64 PNG], "timestamp"}.

Use:
    hooks = load_webhooks(args.webhook_config)     # None when no file is given
    hooks.send("checkpoint_saved", "saved step 500", step=500, path=folder)
    hooks.send("validation_image", "a dog on the beach", step=500, images=[image])
    hooks.close()                                  # at the end: waits (bounded) for what is still queued

`send` only queues the message: one background thread delivers it, retries with back-off, and never raises,
so a slow or dead server cannot slow down or stop training. The first failure of each webhook is printed once;
`close` prints how many messages were lost.
"""

import base64
import datetime
import io
import json
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

EVENTS = {  # event -> the title a person reads
    "training_started": "Training started",
    "checkpoint_saved": "Checkpoint saved",
    "validation_image": "Validation image",
    "preview_image": "Preview image",
    "training_finished": "Training finished",
    "error": "Error",
}
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
KEYS = {"raw": {"callback_url"}, "discord": {"webhook_url"}}  # the required URL key of each type
OPTIONAL = {"raw": {"message_prefix", "auth_token", "log_level"}, "discord": {"message_prefix", "log_level"}}
QUEUE_SIZE = 256
DISCORD_MAX_CHARS = 2000  # Discord rejects longer message content
DISCORD_MAX_FILES = 10  # ... and more attachments than this
USER_AGENT = "dreambooth-webhooks/1.0"  # Discord's firewall refuses urllib's default "Python-urllib/3.x"


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_hook(entry, where):
    """One validated webhook (a dict with type, url, prefix, token, level) from one config entry."""
    if not isinstance(entry, dict):
        raise SystemExit(f'{where}: each webhook is a JSON object like {{"webhook_type": "raw", "callback_url": '
                         f'"https://..."}}')
    kind = entry.get("webhook_type")
    if kind not in KEYS:
        raise SystemExit(f"{where}: 'webhook_type' must be \"raw\" or \"discord\", got {kind!r}")
    allowed = {"webhook_type"} | KEYS[kind] | OPTIONAL[kind]
    for key in entry:
        if key not in allowed:
            why = "; Discord carries its secret in webhook_url" if key == "auth_token" else ""
            raise SystemExit(f"{where}: unknown key '{key}' for a {kind} webhook{why}; "
                             f"allowed keys: {', '.join(sorted(allowed))}")
    for key in sorted(allowed):  # values are never shown here: one of them may be the token
        if key in entry and not isinstance(entry[key], str):
            raise SystemExit(f"{where}: '{key}' must be a string, got {type(entry[key]).__name__}")
    (url_key,) = KEYS[kind]
    url = entry.get(url_key)
    if url is None:
        raise SystemExit(f"{where}: a {kind} webhook needs '{url_key}': the http(s) URL to POST to")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SystemExit(f"{where}: '{url_key}' must be an http:// or https:// URL, got {url!r}")
    level = entry.get("log_level", "info")
    if level not in LEVELS:
        raise SystemExit(f"{where}: 'log_level' must be one of {', '.join(LEVELS)}; got {level!r}")
    return {"type": kind, "url": url, "prefix": entry.get("message_prefix", ""), "token": entry.get("auth_token"),
            "level": LEVELS[level], "warned": False,
            # how warnings name it: no path or user:password@, which may hold secrets (Discord's path does)
            "shown": f"{kind} {parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."}


def raw_request(hook, note, text, pngs):
    """A JSON POST of one note (`text`: its message with the hook's prefix), its pictures as base64 PNGs."""
    body = {"type": note.event, "title": EVENTS[note.event], "message": text, "data": {"step": note.step, **note.data},
            "images": [base64.b64encode(png).decode("ascii") for png in pngs], "timestamp": note.timestamp}
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if hook["token"]:
        headers["Authorization"] = f"Bearer {hook['token']}"
    return urllib.request.Request(hook["url"], json.dumps(body, default=str).encode(), headers, method="POST")


def discord_request(hook, text, pngs):
    """multipart/form-data: the message as `payload_json`, then each PNG as files[i]."""
    boundary = uuid.uuid4().hex
    payload = json.dumps({"content": text[:DISCORD_MAX_CHARS]}).encode()
    parts = [(b'name="payload_json"', b"application/json", payload)]
    parts += [(f'name="files[{i}]"; filename="image{i}.png"'.encode(), b"image/png", png)
              for i, png in enumerate(pngs[:DISCORD_MAX_FILES])]
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; %s\r\nContent-Type: %s\r\n\r\n%s\r\n"
                    % (boundary.encode(), disposition, ctype, content) for disposition, ctype, content in parts)
    body += b"--%s--\r\n" % boundary.encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "User-Agent": USER_AGENT}
    return urllib.request.Request(hook["url"], body, headers, method="POST")


@dataclass
class Note:
    """One event on its way to the webhooks."""

    event: str
    message: str
    step: int
    data: dict
    images: list
    timestamp: str


class Webhooks:
    """The webhooks of one config file and the background thread that delivers to them."""

    def __init__(self, config_path, print_fn=print, timeout=10.0, retries=3, backoff=1.0):
        try:
            with open(config_path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except OSError as err:
            raise SystemExit(f"{config_path}: cannot read the webhook config ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise SystemExit(f"{config_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") \
                from None
        entries = raw if isinstance(raw, list) else [raw]
        if not entries:
            raise SystemExit(f"{config_path}: the list holds no webhooks; remove the file or add one")
        # Every token in the file, so that no message printed from here on (even about a broken entry) shows one.
        self.tokens = [entry["auth_token"] for entry in entries
                       if isinstance(entry, dict) and isinstance(entry.get("auth_token"), str) and entry["auth_token"]]
        self.hooks = []
        for i, entry in enumerate(entries):
            where = f"{config_path}, entry {i}" if isinstance(raw, list) else str(config_path)
            try:
                self.hooks.append(parse_hook(entry, where))
            except SystemExit as err:
                raise SystemExit(self.sanitise(str(err))) from None
        self.print_fn, self.timeout, self.retries, self.backoff = print_fn, timeout, retries, backoff
        self.queue = queue.Queue(QUEUE_SIZE)
        self.stop = threading.Event()
        self.closing = threading.Event()  # set by close(): what is left gets one attempt each, no back-off
        self.closed = self.dropped_notice = False
        self.total = self.delivered = 0  # deliveries (message x webhook) asked for, and those that arrived
        self.worker = threading.Thread(target=self.work, name="webhooks", daemon=True)
        self.worker.start()

    def sanitise(self, text):
        for token in self.tokens:
            text = text.replace(token, "***")
        return text

    def send(self, event, message, step=None, images=(), **data):
        """Queue one event for every webhook whose log_level lets it through; returns at once."""
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}; use one of {', '.join(EVENTS)}")
        level = LEVELS["error" if event == "error" else "info"]
        hooks = [hook for hook in self.hooks if level >= hook["level"]]
        if self.closed or not hooks:
            return
        self.total += len(hooks)
        timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        # Copies, so the caller may reuse its images; the slow PNG encoding happens on the worker thread.
        job = (hooks, Note(event, message, step, data, [image.copy() for image in images], timestamp))
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            if not self.dropped_notice:
                self.dropped_notice = True
                self.print_fn(f"warning: webhooks: {QUEUE_SIZE} messages are waiting; dropping new ones until "
                              "they are delivered")

    def work(self):
        while not self.stop.is_set():
            job = self.queue.get()
            if job is not None:  # None only wakes the thread up at close
                self.deliver(*job)
            self.queue.task_done()

    def deliver(self, hooks, note):
        problem = None
        try:
            pngs = [png_bytes(image) for image in note.images]
        except Exception as err:  # a broken image loses this message, not the thread
            problem = f"cannot encode an image as PNG: {err}"
        for hook in hooks:
            if self.stop.is_set():
                return
            text = hook["prefix"] + str(note.message)
            if problem:
                error = problem
            else:
                # A webhook that just failed every retry is taken to be down: one attempt per message until it
                # answers again, so a dead server does not pile up back-off waits.
                retries = 0 if hook.get("down") else self.retries
                request = raw_request(hook, note, text, pngs) if hook["type"] == "raw" \
                    else discord_request(hook, text, pngs)
                error = self.post(request, retries)
                hook["down"] = error is not None
            if error is None:
                self.delivered += 1
            elif not hook["warned"] and not self.stop.is_set():
                hook["warned"] = True
                self.print_fn(self.sanitise(f"warning: webhook {hook['shown']}: {error}; "
                                            "further failures are counted, not printed"))

    def post(self, request, retries):
        """None once the server accepted the request, else why the last of 1 + retries attempts failed."""
        error = None
        for attempt in range(max(retries, 0) + 1):
            if attempt and self.closing.wait(self.backoff * 2 ** (attempt - 1)):
                return error  # close() began: no more back-off
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()  # urlopen raises HTTPError for any status >= 400
                return None
            except urllib.error.HTTPError as err:
                err.close()
                error = f"HTTP {err.code} {err.reason}"
            except Exception as err:
                error = str(getattr(err, "reason", None) or err) or type(err).__name__
        return error

    def close(self, timeout=30.0):
        """Wait up to `timeout` seconds for the queue to drain, stop the thread, and say how much was lost."""
        if self.closed:
            return
        self.closed = True
        self.closing.set()
        deadline = time.monotonic() + timeout
        with self.queue.all_tasks_done:  # queue.join() with a deadline
            while self.queue.unfinished_tasks and time.monotonic() < deadline:
                self.queue.all_tasks_done.wait(deadline - time.monotonic())
        self.stop.set()  # ends back-off waits; a request in flight ends within its own timeout, in the background
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass  # the worker is busy, and sees `stop` when it finishes
        self.worker.join(max(0.0, deadline - time.monotonic()))
        lost = self.total - self.delivered
        if lost:
            self.print_fn(f"webhooks: {lost} of {self.total} messages could not be delivered")


def load_webhooks(path, print_fn=print):
    """The webhooks of a config file, or None when no file is given."""
    return Webhooks(path, print_fn) if path else None


def notify(hooks, event, message, **data):
    """hooks.send(...) where there are webhooks (the main process of a run with --webhook_config); else nothing."""
    if hooks is not None:
        hooks.send(event, message, **data)
