"""`featurebank ui`: a small labelling page that is a client of the gRPC service.

Why a client and not a second door into the bank: labels set on the page go
through SetLabels like every other write (the server stays the single writer),
and the page works against any server the user can reach, with the same tokens
and TLS. Flask serves one static page (plain HTML and JavaScript, no build step)
and a small JSON API that forwards to the server; every gRPC error becomes a JSON
error with the server's message and a matching HTTP status. On a server of many banks
every API call names its bank in a `bank` query parameter (the page's bank choice; none =
the server's default bank), so one page serves them all.

The quality view acts on the findings of `Quality` through the server's own writes:
relabel (SetLabels), move out of a split (SetSplits), delete (Delete) and keep
(KeepFinding, remembered in the bank so the next pass does not list it again).
"""

from __future__ import annotations

import html
from importlib import resources
from typing import TYPE_CHECKING, Any

import grpc

from featurebank.core.errors import FailedPrecondition, FeaturebankError, InvalidInput

if TYPE_CHECKING:
    from flask import Flask, Response
    from werkzeug.serving import BaseWSGIServer

    from featurebank.server.client import FeatureBankClient

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
MAX_UPLOAD = 16 << 20
STATIC = ("page.html", "page.js", "quality.js", "page.css")


def _static(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def create_app(client: FeatureBankClient) -> Flask:
    """The page and its JSON API over one connected client."""
    try:
        from flask import Flask, jsonify, request
    except ImportError:
        raise FailedPrecondition(
            "featurebank ui needs Flask: pip install 'featurebank[ui]'"
        ) from None
    from google.protobuf.json_format import MessageToDict

    from featurebank.server.client import RemoteError

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    types = {"html": "text/html; charset=utf-8", "js": "text/javascript", "css": "text/css"}

    def as_dict(message: Any) -> dict[str, Any]:
        out: dict[str, Any] = MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return out

    def body() -> dict[str, Any]:
        # JSON only: a cross-site form cannot send it without the browser asking first
        if not request.is_json:
            raise InvalidInput("send a JSON body (Content-Type: application/json)")
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InvalidInput("the JSON body must be an object")
        return data

    def bank() -> FeatureBankClient:
        """The client for the bank this request names (`?bank=`; none = the default bank)."""
        return client.for_bank(request.args.get("bank", ""))

    def number(name: str, default: int) -> int:
        raw = request.args.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be a whole number, got {raw!r}") from None

    def real(name: str) -> float:
        raw = request.args.get(name)
        if raw is None or raw == "":
            return 0.0
        try:
            return float(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be a number, got {raw!r}") from None

    def strings(data: dict[str, Any], name: str) -> list[str]:
        values = data.get(name)
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise InvalidInput(f'{name} must be a list of strings, e.g. {{"{name}": ["a.png"]}}')
        return values

    @app.errorhandler(FeaturebankError)
    def featurebank_error(e: FeaturebankError) -> tuple[Response, int]:
        status = HTTP_STATUS.get(e.code, 502) if isinstance(e, RemoteError) else 400
        message = e.details if isinstance(e, RemoteError) else str(e)
        return jsonify(error=message, code=e.grpc_code), status

    @app.get("/")
    def page() -> Response:
        return app.response_class(_static("page.html"), mimetype=types["html"])

    @app.get("/static/<name>")
    def static_file(name: str) -> Response | tuple[str, int]:
        if name not in STATIC:
            return "not found", 404
        return app.response_class(_static(name), mimetype=types[name.rsplit(".", 1)[1]])

    @app.get("/api/banks")
    def banks() -> Response:
        listed = client.banks()  # the banks this page's token reaches, opening none
        return jsonify(
            default=next((b.name for b in listed if b.is_default), ""),
            banks=[{"name": b.name, "state": b.state, "aliases": list(b.aliases)} for b in listed],
        )

    @app.get("/api/info")
    def info() -> Response:
        r = bank().info()
        return jsonify(
            bank=r.bank, count=r.count, labelled=r.labelled, labels=list(r.labels),
            store_generation=r.store_generation, index_generation=r.index.generation,
            head_generation=r.head.generation, head_stale=r.head.stale,
        )

    @app.post("/api/search")
    def search() -> Response:
        k = number("k", 12)
        upload = request.files.get("image")
        key = request.form.get("key") or None
        if (upload is None) == (key is None):
            raise InvalidInput("give an image file or a key")
        image = upload.read() if upload is not None else None
        if upload is not None and not image:
            raise InvalidInput("the uploaded image is empty")
        where = request.form.get("filter", "")  # only items passing it are shown and vote
        found = bank().search(image, key=key, k=k, filter=where)
        guess = bank().classify(image, key=key, top_n=3, filter=where)
        return jsonify(
            neighbors=[as_dict(n) for n in found.neighbors],
            labels=[as_dict(x) for x in guess.labels],
        )

    @app.get("/api/thumb")
    def thumb() -> Response | tuple[str, int]:
        key = request.args.get("key", "")
        data = bank().thumbnails([key]).get(key)
        if data is None:
            return "no thumbnail", 404
        response = app.response_class(data, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "max-age=3600"
        return response

    @app.get("/api/suggest")
    def suggest() -> Response:
        r = bank().suggest(
            n=number("n", 50), strategy=request.args.get("strategy", "margin"),
            label=request.args.get("label") or None,
        )
        return jsonify(as_dict(r))

    @app.get("/api/audit")
    def audit() -> Response:
        return jsonify(as_dict(bank().audit(n=number("n", 50))))

    @app.post("/api/labels")
    def set_labels() -> Response:
        labels = body().get("labels")
        if not isinstance(labels, dict) or not labels:
            raise InvalidInput('labels must be an object {"key": "label" or null}')
        mapping = {str(k): (None if v in (None, "") else str(v)) for k, v in labels.items()}
        return jsonify(as_dict(bank().set_labels(mapping)))

    @app.get("/api/quality")
    def quality() -> Response:
        return jsonify(as_dict(bank().quality(precision=real("precision"), n=number("n", 0))))

    @app.post("/api/splits")
    def set_splits() -> Response:
        splits = body().get("splits")
        if not isinstance(splits, dict) or not splits or not all(
            isinstance(v, str) for v in splits.values()
        ):
            raise InvalidInput('splits must be an object {"key": "train" | "val" | "test" | "none"}')
        return jsonify(as_dict(bank().set_splits({str(k): v for k, v in splits.items()})))

    @app.post("/api/delete")
    def delete() -> Response:
        return jsonify(as_dict(bank().delete(strings(body(), "keys"))))

    @app.post("/api/keep")
    def keep() -> Response:
        data = body()
        return jsonify(as_dict(bank().keep_finding(str(data.get("kind", "")), strings(data, "keys"))))

    @app.post("/api/rebuild")
    def rebuild() -> Response:
        retrain = bool(body().get("retrain_head", False))
        return jsonify(as_dict(bank().rebuild_index(retrain_head=retrain)))

    @app.get("/api/operation/<op_id>")
    def operation(op_id: str) -> Response:
        return jsonify(as_dict(bank().get_operation(op_id)))

    @app.get("/report")
    def report() -> Response | tuple[str, int]:
        try:
            r = bank().report()
        except RemoteError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            return f"<p>{html.escape(e.details)}</p>", 404
        return app.response_class(r.html, mimetype=types["html"])

    return app


def make_ui_server(
    client: FeatureBankClient, host: str = "127.0.0.1", port: int = 8080
) -> BaseWSGIServer:
    """A threaded HTTP server for the page (port 0 picks a free one); call serve_forever()."""
    from werkzeug.serving import make_server

    client.info()  # fail now, with the server's message, if it cannot be reached
    return make_server(host, port, create_app(client), threaded=True)
