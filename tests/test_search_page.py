"""The search page in real headless Chromium, and the /images/<id> route's path checks.

The browser tests serve the small demo export (tests/conftest.py's chain) with
`clicklens serve`'s ModelServer in this process on free ports, and drive
Debian's /usr/bin/chromium through Playwright (`make test` installs both; the
browser is never downloaded).  The upload-limit test needs no models: a REST
server with a small serving.max_request_bytes and an empty registry.
"""

import base64
import dataclasses
import http.client
import json
import logging
import os
import pathlib
import shutil
import threading
import urllib.parse
import urllib.request

import pytest

from clicklens import servables
from clicklens.config import ServingConfig
from serving.catalog_images import CatalogImages, ImageRequestError, image_id_from_path
from serving.rest import build_rest_server

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODELS = servables.RETRIEVAL_MODELS
SCANN, BRUTEFORCE = servables.RETRIEVAL_SCANN, servables.RETRIEVAL_BRUTEFORCE
PNG_1X1 = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
# The two text queries the browser types / loads: colour is what the small demo model learns first.
TEXT_QUERIES = ("red", "红色")


# ---------------------------------------------------------------------------
# GET /images/<id>: only catalog images, by id.


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """A REST server with only the /images route wired (no models), over a small catalog in a tmp folder."""
    tmp_path = tmp_path_factory.mktemp("catalog")
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "a.png").write_bytes(PNG_1X1)
    (raw / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_bytes(PNG_1X1)  # a real image outside the catalog
    catalog = raw / "catalog.jsonl"
    catalog.write_text("\n".join(json.dumps(e) for e in [
        {"image_id": "img_a", "uri": "images/a.png"},
        {"image_id": "img_text", "uri": "images/notes.txt"},  # a catalog line pointing at a non-image
        {"image_id": "img_gone", "uri": "images/missing.png"},
        {"image_id": "feat_only", "features": [0.1, 0.2]},
        {"image_id": "img_fifo", "uri": "images/fifo.png"},  # a FIFO: opening it for reading would block
        {"image_id": "img_outside", "uri": "../secret.png"},  # a real image outside the catalog's folder
        {"image_id": "img_passwd", "uri": "/etc/passwd"},
    ]) + "\n")
    os.mkfifo(raw / "images" / "fifo.png")
    config = ServingConfig(host="127.0.0.1", http_port=0, max_request_bytes=1 << 20, max_batch=8)
    server = build_rest_server(None, config, images=CatalogImages(str(catalog)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, tmp_path
    server.shutdown()
    server.server_close()


def _get(port: int, raw_path: str):
    """GET with the path sent exactly as given (no client-side normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", raw_path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def test_image_route_serves_catalog_images_by_id(image_server):
    port, _ = image_server
    status, content_type, body = _get(port, "/images/img_a")
    assert (status, content_type, body) == (200, "image/png", PNG_1X1)
    assert _get(port, "/images/img_a?size=thumb")[0] == 200
    assert _get(port, "/images/nope")[0] == 404
    assert _get(port, "/images/img_gone")[0] == 404  # listed, but its file is missing
    assert _get(port, "/images/feat_only")[0] == 404  # features only: nothing to show
    status, _, body = _get(port, "/images/img_text")  # listed, but not an image: never served
    assert status == 404 and b"not an image" not in body


def test_image_route_refuses_fifos_and_files_outside_the_catalog_without_naming_paths(image_server):
    port, root = image_server
    for image_id in ("img_fifo", "img_outside", "img_passwd", "img_gone", "img_text"):
        status, content_type, body = _get(port, "/images/" + image_id)  # the client's timeout is 10 s
        assert (status, content_type) == (404, "application/json"), image_id
        assert image_id in body.decode() and str(root) not in body.decode() and "/etc" not in body.decode()
        assert b"root:" not in body and body != PNG_1X1


def test_files_outside_the_catalog_are_served_only_when_allowed(image_server):
    _, root = image_server
    catalog = str(root / "raw" / "catalog.jsonl")
    assert CatalogImages(catalog, allow_outside_uris=True).read("img_outside") == (PNG_1X1, "image/png")
    with pytest.raises(ImageRequestError):
        CatalogImages(catalog).read("img_outside")


@pytest.mark.parametrize("path", [
    "/images/../secret.png",
    "/images/../../../../etc/passwd",
    "/images/..",
    "/images/..%2F..%2Fsecret.png",
    "/images/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/images/%2e%2e%2fsecret.png",
    "/images/%252e%252e%252fsecret.png",  # double-encoded
    "/images//etc/passwd",
    "/images/%2Fetc%2Fpasswd",
    "/images/..\\secret.png",
    "/images/C:%5Cwindows%5Cwin.ini",
    "/images/img_a%00.png",
    "/images/%ff%fe",
])
def test_image_route_refuses_paths(image_server, path):
    port, _ = image_server
    status, content_type, body = _get(port, path)
    assert status in (400, 404), (path, status)
    assert content_type == "application/json" and body != PNG_1X1


def test_image_route_refuses_absolute_paths_of_real_images(image_server):
    port, root = image_server
    for target in (root / "secret.png", root / "raw" / "images" / "a.png"):
        for path in ("/images/" + str(target), "/images/" + urllib.parse.quote(str(target), safe="")):
            status, _, body = _get(port, path)
            assert status == 400 and body != PNG_1X1, path


def test_image_ids_are_never_paths():
    for good in ("img_00017", "猫-1", "a.b", "sku:42"):
        assert image_id_from_path("/images/" + urllib.parse.quote(good)) == good
    for bad in ("/images/", "/images/a/b", "/images/..", "/images/%2e%2e", "/images/a%2Fb", "/images/gs:%2F%2Fb"):
        with pytest.raises(ImageRequestError) as err:
            image_id_from_path(bad)
        assert err.value.status == 400


def test_serve_takes_thumbnails_from_the_catalog_the_pipeline_reads(tmp_path):
    """pipeline.catalog outside the work directory: `clicklens serve` looks ids up there, not in W/raw."""
    from clicklens.config import Config
    from clicklens.workdir import Workdir
    from serving.server import build_server

    (tmp_path / "shop" / "images").mkdir(parents=True)
    (tmp_path / "shop" / "images" / "a.png").write_bytes(PNG_1X1)
    (tmp_path / "shop" / "catalog.jsonl").write_text(json.dumps({"image_id": "img_a", "uri": "images/a.png"}) + "\n")
    (tmp_path / "W" / "export").mkdir(parents=True)
    (tmp_path / "W" / "export" / "models.config").write_text("model_config_list {\n}\n")  # no models needed
    config = Config()
    config = dataclasses.replace(
        config, pipeline=dataclasses.replace(config.pipeline, catalog=str(tmp_path / "shop" / "catalog.jsonl")),
        serving=dataclasses.replace(config.serving, host="127.0.0.1", grpc_port=0, http_port=0))
    server = build_server(config, Workdir(str(tmp_path / "W")))
    server.start()
    try:
        status, content_type, body = _get(server.http_port, "/images/img_a")
        assert (status, content_type, body) == (200, "image/png", PNG_1X1)
    finally:
        server.stop(grace=1.0)


# ---------------------------------------------------------------------------
# The page in Chromium, against the served demo export.


@pytest.fixture(scope="module")
def page_server(demo_exported, small_config):
    """`clicklens serve` in this process on free ports: (base URL, workdir)."""
    from serving.server import ModelServer

    serving = dataclasses.replace(small_config.serving, host="127.0.0.1", grpc_port=0, http_port=0)
    server = ModelServer(serving, demo_exported.models_config, catalog_path=demo_exported.catalog)
    server.start()
    yield f"http://127.0.0.1:{server.http_port}", demo_exported
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian chromium driven by Playwright (make test installs both)."""
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test` installs requirements-test.txt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, page_server):
    """A fresh page; fails the test if it requests anything outside the server's origin."""
    base, _ = page_server
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    foreign = []
    page.on("request", lambda r: None if r.url.startswith((base + "/", "data:", "blob:")) else foreign.append(r.url))
    yield page
    context.close()
    assert not foreign, f"the page requested external resources: {foreign}"


def _rest(base: str, path: str, body=None):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _api_top_k(base: str, model: str, instance: dict, signature: str):
    answer = _rest(base, f"/v1/models/{model}:predict", {"signature_name": signature, "instances": [instance]})
    return answer["predictions"][0][servables.IMAGE_IDS]


def _text_top_k(base: str, model: str, text: str):
    return _api_top_k(base, model, {servables.QUERY: text}, servables.TEXT_SIGNATURE)


def _image_top_k(base: str, model: str, image_b64: str):
    return _api_top_k(base, model, {servables.IMAGE_BYTES: {"b64": image_b64}}, servables.IMAGE_SIGNATURE)


def _served_version(base: str, model: str) -> int:
    status = _rest(base, f"/v1/models/{model}")["model_version_status"]
    return max(int(v["version"]) for v in status if v["state"] == "AVAILABLE")


def _wait_for_search(page, states=("done",)):
    # Wait for an expected settled state, not merely "not loading": right after an action the page
    # may still show the previous search's state for a moment before it switches to "loading".
    try:
        page.wait_for_function(f"{json.dumps(list(states))}.includes(document.body.dataset.state)")
    except Exception:
        pass  # the assertion below reports the state the page is in
    page.wait_for_function("!['loading', 'idle'].includes(document.body.dataset.state)")
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")
    state = page.evaluate("document.body.dataset.state")
    assert state in states, (state, page.inner_text("#message"), page.inner_text("#results"))


def _panels(page):
    """Per model panel: shown ids, image naturalWidths, version and latency attributes."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.panel')].map(p => [
        p.dataset.model, {
          ids: [...p.querySelectorAll('.hit')].map(h => h.dataset.imageId),
          widths: [...p.querySelectorAll('.hit img')].map(i => i.naturalWidth),
          version: p.querySelector('.model-info').dataset.version,
          latency: p.querySelector('.model-info').dataset.latencyMs,
          title: p.querySelector('h2').textContent,
        }]))""")


def _ground_truth(workdir):
    with open(workdir.ground_truth, encoding="utf-8") as f:
        return {row["query"]: set(row["relevant_image_ids"]) for row in map(json.loads, f)}


def _corpus_size(workdir) -> int:
    with open(os.path.join(workdir.export, "report.json")) as f:
        return json.load(f)["corpus_size"]


def _check_panel(panel, expected_ids, version):
    assert panel["ids"] == expected_ids  # what the page shows is what the REST API answers
    assert len(panel["widths"]) == len(expected_ids) and all(w > 0 for w in panel["widths"]), panel
    assert panel["version"] == str(version)
    assert float(panel["latency"]) > 0


def test_search_page_in_chromium(page, page_server, tmp_path):  # ~15 s with the browser, after the chain
    base, workdir = page_server
    truth, corpus = _ground_truth(workdir), _corpus_size(workdir)
    versions = {m: _served_version(base, m) for m in MODELS}
    precisions, chance = [], []

    # Type a query; the grid shows the top-k of the REST API, every thumbnail loads.
    page.goto(base + "/")
    page.fill("#q", TEXT_QUERIES[0])
    page.press("#q", "Enter")
    _wait_for_search(page)
    assert urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query) == {"q": [TEXT_QUERIES[0]]}
    expected = _text_top_k(base, SCANN, TEXT_QUERIES[0])
    shown = _panels(page)
    assert list(shown) == [SCANN] and len(expected) == min(10, corpus)
    _check_panel(shown[SCANN], expected, versions[SCANN])
    assert f"version {versions[SCANN]}" in page.inner_text(".panel .model-info")

    # A shared link with a Chinese query reproduces the search, the box shows the text.
    page.goto(base + "/?q=" + urllib.parse.quote(TEXT_QUERIES[1]))
    _wait_for_search(page)
    assert page.input_value("#q") == TEXT_QUERIES[1]
    expected_zh = _text_top_k(base, SCANN, TEXT_QUERIES[1])
    _check_panel(_panels(page)[SCANN], expected_zh, versions[SCANN])

    # Relevance per the demo ground truth: the shown top results beat chance (|relevant| / corpus).
    for query, ids in zip(TEXT_QUERIES, (expected, expected_zh)):
        relevant = truth[query]
        precisions.append(sum(i in relevant for i in ids) / len(ids))
        chance.append(len(relevant) / corpus)
    logger.info("precision@k of %s: %s (chance %s)", TEXT_QUERIES, precisions, chance)
    assert sum(precisions) / 2 > 2 * sum(chance) / 2, (precisions, chance)

    # Compare both models side by side.
    page.check("input[value=both]")
    page.wait_for_function("document.querySelectorAll('.panel .grid').length === 2")
    _wait_for_search(page)
    assert "model=both" in page.url
    shown = _panels(page)
    assert list(shown) == list(MODELS)
    for model in MODELS:
        _check_panel(shown[model], _text_top_k(base, model, TEXT_QUERIES[1]), versions[model])
    page.screenshot(path=str(tmp_path / "compare_text.png"), full_page=True)

    # Click a result: search by that image (by_image), in both models.
    clicked = shown[SCANN]["ids"][2]
    page.click(f".panel[data-model={SCANN}] .hit[data-image-id='{clicked}']")
    page.wait_for_function(f"location.search.includes('image={clicked}')")
    _wait_for_search(page)
    assert page.is_visible("#query-image") and page.inner_text("#query-image-label") == clicked
    assert page.evaluate("document.getElementById('query-thumb').naturalWidth") > 0
    with open(os.path.join(workdir.raw, "images", f"{clicked}.png"), "rb") as f:
        image_b64 = base64.b64encode(f.read()).decode()
    shown = _panels(page)
    for model in MODELS:
        by_image = _image_top_k(base, model, image_b64)
        _check_panel(shown[model], by_image, versions[model])
        assert clicked in shown[model]["ids"], f"{model}: an image should retrieve itself"
    screenshot = tmp_path / "search_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    logger.info("screenshot: %s", screenshot)
    print(f"search page screenshots: {tmp_path}")

    # Reload keeps the by-image search; Back returns to the text search.
    page.reload()
    _wait_for_search(page)
    assert _panels(page)[SCANN]["ids"] == shown[SCANN]["ids"]
    page.go_back()
    _wait_for_search(page)
    assert page.input_value("#q") == TEXT_QUERIES[1] and not page.is_visible("#query-image")


def test_search_page_upload_and_messages(page, page_server, tmp_path):
    base, workdir = page_server

    # Upload an image file: by_image search, the image retrieves itself.
    image_id = _text_top_k(base, BRUTEFORCE, "blue")[0]
    upload = pathlib.Path(workdir.raw) / "images" / f"{image_id}.png"
    page.goto(base + f"/?model={BRUTEFORCE}")
    page.set_input_files("#upload", str(upload))
    _wait_for_search(page)
    assert image_id in _panels(page)[BRUTEFORCE]["ids"]
    assert page.inner_text("#query-image-label") == upload.name

    # Empty query: a message, no request.
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    page.wait_for_function("document.body.dataset.state === 'empty-query'")
    assert "Type a query" in page.inner_text("#message") and not _panels(page)

    # A file that is not an image: the server's error, shown clearly.
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    page.set_input_files("#upload", str(junk))
    _wait_for_search(page, states=("error",))
    assert "The server answered 400" in page.inner_text("#results")

    # An image id that is a path, or unknown: refused with the reason.
    for bad in ("../../etc/passwd", "no_such_image"):
        page.goto(base + "/?image=" + urllib.parse.quote(bad, safe=""))
        _wait_for_search(page, states=("error",))
        message = page.inner_text("#message")
        assert message.startswith(f"Cannot search by image {bad}") and not _panels(page), message


def test_search_page_at_phone_width(chromium, page_server, tmp_path):
    base, _ = page_server
    context = chromium.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(base + "/?q=" + urllib.parse.quote("蓝色 正方形") + "&model=both")
        _wait_for_search(page)
        assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
        boxes = page.evaluate("[...document.querySelectorAll('.panel')].map(p => p.getBoundingClientRect().width)")
        assert len(boxes) == 2 and all(w <= 390 for w in boxes)
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=False)
    finally:
        context.close()


# ---------------------------------------------------------------------------
# The page takes its limits from the server (GET /clicklens/page.json), no models needed.

SMALL_REQUEST_BYTES = 1 << 16  # far below the 4 MiB default, so a fixed limit in the page could not pass


@pytest.fixture(scope="module")
def small_limit_server():
    """A REST server with serving.max_request_bytes=SMALL_REQUEST_BYTES and no models: its base URL."""
    from serving.model_registry import ModelRegistry

    config = ServingConfig(host="127.0.0.1", http_port=0, max_request_bytes=SMALL_REQUEST_BYTES, max_batch=8)
    server = build_rest_server(ModelRegistry([]), config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_search_page_upload_limit_is_the_servers(chromium, small_limit_server, tmp_path):
    base = small_limit_server
    limit = servables.max_upload_bytes(SMALL_REQUEST_BYTES)
    assert _rest(base, "/clicklens/page.json")["max_upload_bytes"] == limit
    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    api_requests = []
    page.on("request", lambda r: api_requests.append(r.url) if "/v1/" in r.url else None)
    try:
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('message').textContent.startsWith('Search by text')")

        # One byte over the server's limit: refused in the page, nothing sent.
        too_large = tmp_path / "too_large.png"
        too_large.write_bytes(PNG_1X1 + b"\0" * (limit + 1 - len(PNG_1X1)))
        page.set_input_files("#upload", str(too_large))
        page.wait_for_function("document.body.dataset.state === 'error'")
        message = page.inner_text("#message")
        assert "too_large.png is too large" in message and f"the limit is {limit // 1024} KiB" in message, message
        assert not api_requests

        # Exactly the limit: sent (this server has no models, so it answers 404).
        at_limit = tmp_path / "at_limit.png"
        at_limit.write_bytes(PNG_1X1 + b"\0" * (limit - len(PNG_1X1)))
        page.set_input_files("#upload", str(at_limit))
        page.wait_for_function("document.querySelectorAll('.panel .panel-message.error').length > 0")
        assert api_requests and "too large" not in page.inner_text("#message")
        assert "The server answered 404" in page.inner_text("#results")
    finally:
        context.close()
