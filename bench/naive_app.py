"""The naive receiver: check the Shopify signature, send the SMS inline, then answer.

    BENCH_SHOPIFY_SECRET=... BENCH_FAKE_URL=http://... gunicorn -w 2 'bench.naive_app:app'

What a first webhook-to-SMS script does: the platform waits for the provider on every delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re

import requests
from flask import Flask, abort, request

from bench.fake_provider import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER

app = Flask(__name__)
SECRET = os.environ["BENCH_SHOPIFY_SECRET"].encode()
MESSAGES = f"{os.environ['BENCH_FAKE_URL']}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
_session: requests.Session | None = None  # one per worker process, made after the fork


def session() -> requests.Session:
    global _session
    if _session is None:
        _session = requests.Session()
        _session.auth = (ACCOUNT_SID, AUTH_TOKEN)
    return _session


@app.post("/webhooks/shopify")
def shopify():
    body = request.get_data()
    given = request.headers.get("X-Shopify-Hmac-Sha256", "").encode()
    expected = base64.b64encode(hmac.new(SECRET, body, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, given):
        abort(401)
    order = json.loads(body)
    form = {
        "To": re.sub(r"[^\d+]", "", order["phone"]),
        "From": FROM_NUMBER,
        "Body": f"Thanks! We got your order {order['name']}.",
    }
    resp = session().post(MESSAGES, data=form, timeout=10)
    return ("", 200) if resp.status_code == 201 else ("", 502)


@app.get("/healthz")
def healthz():
    return "ok"
