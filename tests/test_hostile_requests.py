"""Hostile queries and requests at the serving side, over real sockets: the cases the other serving tests leave out.

tests/test_serving.py, tests/test_rest_front_end.py, tests/test_tf_serving_conformance.py and
tests/test_serving_unit.py cover malformed JSON, bodies over the limit, wrong input names / dtypes / ranks,
unknown models, versions and signatures.  This file adds what the real query path does with empty,
whitespace-only, 1 MB, non-UTF-8, emoji, Arabic and combining-mark queries, batches that are empty or 100k
rows, bytes that are no PredictRequest, hostile query strings on the search page's route, and the
`clicklens query` client given text it cannot send or a model that is not a retrieval model.

One `clicklens serve` process (module-scoped) serves the small demo export (tests/conftest.py's chain) with
the default serving limits (serving.max_request_bytes 4 MiB, serving.max_batch), so a 1 MB query reaches the
model.  It runs in a subprocess, so a request that crashes or pins the server cannot take the test process
with it, and each server test checks that the server still answers afterwards.  The process is killed at the end:
a request the server is still computing must not hold up the run.
"""

import base64
import http.client
import json
import time
import urllib.parse

import grpc
import numpy as np
import pytest

import tensorflow as tf  # (tests/conftest.py imports clicklens.compat first)
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from clicklens import servables as S
from tests.conftest import DEMO_CONFIG
from tests.serve_process import ServeProcess

RPC_SECONDS = 60.0
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
MB = 1 << 20
LONG_NAME = 100_000  # characters: far under serving.max_request_bytes, far over any sane error message
UNKNOWN_DTYPE = 9999  # not a tensorflow.DataType; proto3 enums keep unknown values, so a client can send it


@pytest.fixture(scope="module")
def server(demo_exported):
    # 15-45 s: a fresh process imports TF, loads four models and replays their warmup requests.
    server = ServeProcess(demo_exported)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def k(small_config):
    return small_config.export.k


@pytest.fixture(scope="module")
def max_batch(small_config):
    return small_config.serving.max_batch


def _bytes(query) -> bytes:
    return query if isinstance(query, bytes) else query.encode("utf-8")


def _text_request(model, queries, signature=S.TEXT_SIGNATURE, input_name=S.QUERY, version=None, label=None):
    """A PredictRequest of `queries` (a list: a batch; anything else: a scalar) as one string tensor."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.SetInParent()  # (version 0 must still name a version)
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    values = [_bytes(q) for q in queries] if isinstance(queries, list) else _bytes(queries)
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(values, dtype=tf.string))
    return request


def _outputs(response):
    return {name: tf.make_ndarray(value) for name, value in response.outputs.items()}


def _predict(server, request):
    return _outputs(server.predictions.Predict(request, timeout=RPC_SECONDS))


def _rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=RPC_SECONDS)
    return info.value


def _assert_answered(ids, scores, rows: int, k: int) -> None:
    """rows ranked top-k lists with finite scores."""
    ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
    assert ids.shape == (rows, k) and scores.shape == (rows, k), (ids.shape, scores.shape)
    assert np.isfinite(scores).all(), scores
    assert all(np.all(np.diff(row) <= 1e-6) for row in scores), "scores must be ranked"


def _assert_serving(server) -> None:
    """The process is alive and answers an ordinary query."""
    assert server.process.poll() is None, "the server died:\n" + server.tail()
    out = _predict(server, _text_request(S.RETRIEVAL_SCANN, ["red circle"]))
    assert out[S.IMAGE_IDS].shape[0] == 1


def _http(server, method: str, path: str, body: bytes = None):
    """One request on its own connection: (status, content type, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=RPC_SECONDS)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def _rest_predict(server, model: str, payload) -> tuple:
    """POST :predict with `payload` as UTF-8 JSON (non-ASCII written as is, as browsers send it)."""
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    status, _, reply = _http(server, "POST", f"/v1/models/{model}:predict", body)
    return status, json.loads(reply)


def _error(payload) -> str:
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"], payload
    return payload["error"]


# ---------------------------------------------------------------------------
# Queries in any script, empty or blank, non-UTF-8, 1 MB.

NON_LATIN = {
    "emoji": "🔴🟦😀",
    "emoji ZWJ sequence": "👩\u200d👩\u200d👧\u200d👦",
    "Arabic": "مربع أحمر",
    "Arabic between RTL marks": "\u200fدائرة زرقاء\u200f",
    "Chinese, no spaces": "红色圆形",
    "combining marks only": "\u0301\u0316\u0302",
    "a letter with 50 marks": "e" + "\u0301" * 50,
    "Hangul jamo": "\u1100\u1161\u11a8",
    "full-width Latin": "ＲＥＤ ＣＩＲＣＬＥ",
}


def test_queries_in_any_script_are_answered_alike_over_grpc_and_rest(server, k):
    queries = list(NON_LATIN.values())
    grpc_out = _predict(server, _text_request(S.RETRIEVAL_BRUTEFORCE, queries))
    _assert_answered(grpc_out[S.IMAGE_IDS], grpc_out[S.SCORES], len(queries), k)
    scann = _predict(server, _text_request(S.RETRIEVAL_SCANN, queries))
    _assert_answered(scann[S.IMAGE_IDS], scann[S.SCORES], len(queries), k)
    status, body = _rest_predict(server, S.RETRIEVAL_BRUTEFORCE, {"instances": queries})
    assert status == 200, body
    rows = body["predictions"]
    assert [row[S.IMAGE_IDS] for row in rows] == [[i.decode() for i in r] for r in grpc_out[S.IMAGE_IDS]]
    np.testing.assert_allclose([row[S.SCORES] for row in rows], grpc_out[S.SCORES], atol=1e-5)
    _assert_serving(server)


BLANK = ["", " ", "\t\n", "\u3000", "\u00a0", "\u200b"]  # all normalise to the empty query


def test_empty_and_blank_queries_are_answered_or_refused_never_an_internal_error(server, k):
    """The server runs the model on an empty query (the search page refuses it before sending); whichever it
    does, every blank query gets the same answer as "", and nothing else breaks."""
    try:
        out = _predict(server, _text_request(S.RETRIEVAL_BRUTEFORCE, BLANK))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    else:
        _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], len(BLANK), k)
        assert all((row == out[S.IMAGE_IDS][0]).all() for row in out[S.IMAGE_IDS]), out[S.IMAGE_IDS]
    status, body = _rest_predict(server, S.RETRIEVAL_SCANN, {"instances": BLANK})
    assert status in (200, 400), body
    if status == 400:
        _error(body)
    _assert_serving(server)


NOT_UTF8 = {
    "lone continuation byte": b"\x80",
    "0xff": b"red \xff circle",
    "truncated sequence": b"\xe7\xba",
    "overlong slash": b"\xc0\xaf",
    "encoded surrogate": b"\xed\xa0\x80",
    "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    "latin-1 text": "café rouge".encode("latin-1"),
}


@pytest.mark.parametrize("query", list(NOT_UTF8.values()), ids=list(NOT_UTF8))
def test_query_bytes_that_are_not_utf8_are_answered_or_refused_never_an_internal_error(server, k, query):
    """A DT_STRING tensor carries bytes: a gRPC client (or REST through {"b64": ...}) can send any."""
    for model in (S.RETRIEVAL_SCANN, S.QUERY_ENCODER):
        try:
            out = _predict(server, _text_request(model, [query]))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, err.code(), err.details())
        else:
            if model == S.RETRIEVAL_SCANN:
                _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], 1, k)
            else:
                assert np.isfinite(out[S.EMBEDDING]).all()
    b64 = {"b64": base64.b64encode(query).decode("ascii")}
    status, body = _rest_predict(server, S.RETRIEVAL_BRUTEFORCE, {"instances": [{S.QUERY: b64}]})
    assert status in (200, 400), body
    if status == 400:
        _error(body)
    _assert_serving(server)


@pytest.mark.parametrize("word", ["red ", "红"], ids=["latin", "chinese"])
def test_a_1mb_query_within_the_request_limit_is_answered_as_its_first_tokens(server, k, word):
    """A query of 1 MiB (under serving.max_request_bytes) is tokenized and cut to model.max_query_tokens:
    it gets the same top-k as its first 16 repetitions, over gRPC and REST."""
    huge = word * (MB // len(word.encode("utf-8")))
    assert MB - 4 <= len(huge.encode("utf-8")) <= MB
    short = word * 16
    out = _predict(server, _text_request(S.RETRIEVAL_BRUTEFORCE, [huge, short]))
    _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], 2, k)
    assert (out[S.IMAGE_IDS][0] == out[S.IMAGE_IDS][1]).all()
    status, body = _rest_predict(server, S.RETRIEVAL_BRUTEFORCE, {"instances": [huge]})
    assert status == 200, str(body)[:300]
    assert body["predictions"][0][S.IMAGE_IDS] == [i.decode() for i in out[S.IMAGE_IDS][1]]
    _assert_serving(server)


# ---------------------------------------------------------------------------
# Shapes, names and bytes a client should not send.


def test_empty_scalar_and_huge_batches_are_invalid_argument_over_grpc(server, k, max_batch):
    cases = {
        "empty batch": ([], "empty batch"),
        "a scalar": ("red", "expects shape"),
        "100k rows": (["red"] * 100_000, f"serving.max_batch={max_batch}"),
        "max_batch + 1 rows": (["red"] * (max_batch + 1), f"serving.max_batch={max_batch}"),
    }
    for case, (queries, message) in cases.items():
        err = _rpc_error(server.predictions.Predict, _text_request(S.RETRIEVAL_SCANN, queries))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), (case, err.details())
    out = _predict(server, _text_request(S.RETRIEVAL_BRUTEFORCE, ["red"] * max_batch))  # the limit itself is fine
    _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], max_batch, k)
    _assert_serving(server)


def test_empty_scalar_and_huge_batches_are_400_over_rest(server, max_batch):
    cases = {
        "100k instances": ({"instances": ["red"] * 100_000}, f"serving.max_batch={max_batch}"),
        "empty columns": ({"inputs": []}, "empty batch"),
        "a scalar column": ({"inputs": "red"}, "expects shape"),
        "a scalar b64 column": ({"inputs": {"b64": "cmVk"}}, "expects shape"),
    }
    for case, (payload, message) in cases.items():
        status, body = _rest_predict(server, S.RETRIEVAL_SCANN, payload)
        assert status == 400 and message in _error(body), (case, status, body)
    _assert_serving(server)


def test_unknown_and_odd_versions_models_labels_and_outputs_get_clear_codes(server, k):
    not_found = grpc.StatusCode.NOT_FOUND
    cases = [
        ("version 0", _text_request(S.RETRIEVAL_SCANN, ["red"], version=0), not_found, "Specific(retrieval_scann, 0)"),
        ("version -1", _text_request(S.RETRIEVAL_SCANN, ["red"], version=-1), not_found, "-1"),
        ("version int64 max", _text_request(S.RETRIEVAL_SCANN, ["red"], version=2 ** 63 - 1), not_found,
         str(2 ** 63 - 1)),
        ("empty model name", _text_request("", ["red"]), not_found, "Servable not found"),
        ("Chinese model name", _text_request("模型", ["red"]), not_found, "Latest(模型)"),
        ("unknown label", _text_request(S.RETRIEVAL_SCANN, ["red"], label="nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: nope"),
    ]
    unknown_output = _text_request(S.RETRIEVAL_SCANN, ["red"])
    unknown_output.output_filter.append("nope")
    cases.append(("unknown output", unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "nope"))
    for case, request, code, message in cases:
        err = _rpc_error(server.predictions.Predict, request)
        assert err.code() == code and message in err.details(), (case, err.code(), err.details())
    # No signature name is the default signature, as in TF Serving.
    out = _predict(server, _text_request(S.RETRIEVAL_SCANN, ["red"], signature=""))
    _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], 1, k)
    _assert_serving(server)


def _raw_predict(server, data: bytes):
    """Predict with `data` sent as the request bytes, whatever they are."""
    call = server.channel.unary_unary(PREDICT_METHOD, request_serializer=None,
                                      response_deserializer=predict_pb2.PredictResponse.FromString)
    return call(data, timeout=RPC_SECONDS)


def test_bytes_that_are_not_a_predict_request_are_invalid_argument(server):
    valid = _text_request(S.RETRIEVAL_SCANN, ["red"]).SerializeToString()
    spec = b"\x0a\x02\xff\xfe"  # ModelSpec{name: the bytes ff fe}: a proto3 string must be UTF-8
    for case, data in {"garbage": b"\xff\xff\xff\xff\xff", "truncated": valid[:-1],
                       "a length past the end": b"\x0a\x10abc"}.items():
        with pytest.raises(grpc.RpcError) as info:
            _raw_predict(server, data)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
        assert "malformed PredictRequest" in err.details(), (case, err.details())
    with pytest.raises(grpc.RpcError) as info:
        _raw_predict(server, b"\x0a" + bytes([len(spec)]) + spec)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
        (info.value.code(), info.value.details())
    with pytest.raises(grpc.RpcError) as info:
        _raw_predict(server, b"")  # an empty PredictRequest: no model name
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, (info.value.code(), info.value.details())
    _assert_serving(server)


@pytest.mark.parametrize("input_name", [S.QUERY, "not_an_input"])
def test_a_dtype_outside_the_enum_is_invalid_argument(server, input_name):
    request = _text_request(S.RETRIEVAL_SCANN, ["red"], input_name=input_name)
    request.inputs[input_name].dtype = UNKNOWN_DTYPE
    err = _rpc_error(server.predictions.Predict, request)
    try:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    finally:
        _assert_serving(server)


def _long_name_request(field: str):
    long = "x" * LONG_NAME
    if field == "model":
        return _text_request(long, ["red"])
    if field == "signature":
        return _text_request(S.RETRIEVAL_SCANN, ["red"], signature=long)
    if field == "label":
        return _text_request(S.RETRIEVAL_SCANN, ["red"], label=long)
    return _text_request(S.RETRIEVAL_SCANN, ["red"], input_name=long)


@pytest.mark.parametrize("field, code", [
    ("model", grpc.StatusCode.NOT_FOUND),
    ("signature", grpc.StatusCode.FAILED_PRECONDITION),
    ("label", grpc.StatusCode.INVALID_ARGUMENT),
    ("input", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_a_100kb_name_gets_its_status_code_with_a_short_message(server, field, code):
    with grpc.insecure_channel(server.address) as channel:  # its own channel: a transport error stays here
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        err = _rpc_error(stub.Predict, _long_name_request(field))
    try:
        details = err.details() or ""
        assert err.code() == code and len(details) < 2000, (err.code(), len(details), details[:200])
    finally:
        _assert_serving(server)


# ---------------------------------------------------------------------------
# The search page's route: the query string of a page address never reaches a model.


def test_the_search_page_is_served_whatever_its_query_string(server):
    for query in ("%FF%FE", urllib.parse.quote("👩\u200d👩\u200d👧 مربع 红色"), "q=%00", "%E0%80%AF"):
        status, content_type, body = _http(server, "GET", f"/?q={query}")
        assert status == 200 and content_type.startswith("text/html") and body, (query, status)
    status, content_type, body = _http(server, "GET", "/?q=" + "x" * 70_000)  # over http.server's 64 KiB line
    assert status == 414 and content_type == "application/json", (status, content_type)
    _error(json.loads(body))
    _assert_serving(server)


# ---------------------------------------------------------------------------
# The client: `clicklens query`.


def _cli(argv) -> int:
    """cli.main(argv); an exception escaping it (a traceback for the user) fails the test."""
    from clicklens import cli

    try:
        return cli.main(argv)
    except Exception as err:
        raise AssertionError(f"clicklens {argv[0]} raised {type(err).__name__}: {err}") from err


def test_query_cli_in_arabic_and_emoji(server, capsys, k):
    for text in ("مربع أحمر", "🔴"):
        assert _cli(["query", text, "--server", server.address, "--model", S.RETRIEVAL_BRUTEFORCE,
                     "--config", DEMO_CONFIG]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith(f"{S.RETRIEVAL_BRUTEFORCE} v") and repr(text) in lines[0], lines[0]
        assert len(lines) == 1 + k, lines


def test_query_cli_refuses_text_that_is_not_unicode_with_a_clear_error(server, capsys):
    code = _cli(["query", "red\udcff", "--server", server.address, "--config", DEMO_CONFIG])
    err = capsys.readouterr().err
    assert code == 2 and "clicklens: error: query: the text is not valid UTF-8 (character 4 of 4" in err, err


def test_query_cli_refuses_a_blank_query(server, capsys):
    for text in BLANK:
        assert _cli(["query", text, "--server", server.address, "--config", DEMO_CONFIG]) == 2
        assert "empty once normalised" in capsys.readouterr().err


def test_query_cli_names_a_model_without_retrieval_outputs(server, capsys):
    code = _cli(["query", "red", "--server", server.address, "--model", S.QUERY_ENCODER, "--config", DEMO_CONFIG])
    err = capsys.readouterr().err
    assert code == 2 and f"{S.QUERY_ENCODER} answered without image_ids and scores" in err, err


# ---------------------------------------------------------------------------
# Last in the file: if the server is pinned, nothing after it waits (the fixture kills the process).


def test_a_1mb_query_of_combining_marks_is_answered_as_fast_as_one_of_ordered_marks(server, k):
    ordered = "a" + "\u0301" * (MB // 2)  # 1 MiB, already in canonical order: linear
    alternating = "a" + "\u0301\u0316" * (MB // 4)  # 1 MiB, every U+0316 must move before every U+0301
    start = time.monotonic()
    out = _predict(server, _text_request(S.RETRIEVAL_BRUTEFORCE, [ordered]))
    _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], 1, k)
    budget = min(15.0, max(5.0, 20 * (time.monotonic() - start)))
    start = time.monotonic()
    try:
        out = _outputs(server.predictions.Predict(_text_request(S.RETRIEVAL_BRUTEFORCE, [alternating]),
                                                  timeout=budget))
        failure = None
    except grpc.RpcError as err:
        failure = f"{err.code().name} after {time.monotonic() - start:.1f} s (budget {budget:.1f} s)"
    _assert_serving(server)  # the other worker threads still answer
    assert failure is None, failure
    _assert_answered(out[S.IMAGE_IDS], out[S.SCORES], 1, k)
