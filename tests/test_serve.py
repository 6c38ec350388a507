"""`ped serve`: the JSON API agrees with `ped query`, new files are found without a restart, images are
served by catalogue id only (path traversal in every form), strings stay text, the token is checked on
every request, and 200 searches from 20 concurrent clients all succeed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from pedcli.cli import app as cli_app
from pedcli.engine.search import gallery as gallery_mod
from pedcli.engine.search.query import query_gallery
from pedcli.errors import PedError
from pedcli.serve.app import create_app
from pedcli.serve.probe import load, start_server, stop_server
from pedcli.serve.server import check_listen, is_local, page_url
from pedcli.serve.service import SearchService, catalogue_id

QUERY = "w3 w5 w7 w2"
HTML_NAME = "<img src=x onerror=alert(1)>.png"


def write_gallery(out: Path, n: int, seed: int = 0) -> list[Path]:
    """n random 64×32 PNG images, every second one in a subfolder."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        path = out / ("sub" if i % 2 else "") / f"img{seed}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


@pytest.fixture()
def gallery(tmp_path: Path) -> Path:
    gal = tmp_path / "gallery"
    write_gallery(gal, 7)
    return gal


@pytest.fixture()
def service(trained_run: Path, gallery: Path) -> SearchService:
    svc = SearchService(trained_run, gallery)
    svc.sync()
    return svc


def client(service: SearchService, token: str | None = None):
    return TestClient(create_app(service, token))


# ---- the API ------------------------------------------------------------------------------------------
def test_search_has_the_fields_and_ranking_of_ped_query(service, trained_run, gallery) -> None:
    with client(service) as c:
        r = c.get("/api/search", params={"q": QUERY, "top": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    data = r.json()
    expected = query_gallery(trained_run, gallery, [QUERY], top=5)
    assert data["method"] == "baseline" and data["gallery_size"] == 7 and data["format"] == 1
    (q,) = data["queries"]
    assert q["query"] == QUERY and q["phrases"] == expected.results[0].phrases
    got = [(r["rank"], r["path"], r["score"]) for r in q["results"]]
    want = [(m.rank, str(m.path.resolve()), m.score) for m in expected.results[0].matches]
    assert got == want
    for res in q["results"]:
        rel = Path(res["path"]).relative_to(gallery.resolve()).as_posix()
        assert res["name"] == rel and res["id"] == catalogue_id(rel)
        assert set(res["view"]) == {"grid", "selected", "label", "phrases"}


def test_min_score_cuts_and_an_empty_answer_is_not_an_error(service) -> None:
    with client(service) as c:
        full = c.get("/api/search", params={"q": QUERY, "top": 7}).json()["queries"][0]["results"]
        cut = full[2]["score"]
        kept = c.get("/api/search", params={"q": QUERY, "top": 7, "min_score": cut}).json()
        none = c.get("/api/search", params={"q": QUERY, "min_score": full[0]["score"] + 1})
    assert [r["id"] for r in kept["queries"][0]["results"]] == [r["id"] for r in full if r["score"] >= cut]
    assert none.status_code == 200 and none.json()["queries"][0]["results"] == []


def test_bad_parameters_are_clear_errors(service) -> None:
    with client(service) as c:
        for params, message in [
            ({"q": QUERY, "top": "many"}, "top must be a whole number"),
            ({"q": QUERY, "top": 0}, "top must be between"),
            ({"q": QUERY, "min_score": "high"}, "min_score must be a number"),
            ({"q": "   "}, "no query"),
            ({"q": "qqqq zzzz"}, "vocabulary"),
        ]:
            r = c.get("/api/search", params=params)
            assert r.status_code == 400 and message in r.json()["error"], (params, r.text)


def test_similar_ranks_by_cosine_and_leaves_the_image_out(service) -> None:
    with client(service) as c:
        first = c.get("/api/search", params={"q": QUERY, "top": 1}).json()["queries"][0]["results"][0]
        r = c.get(f"/api/similar/{first['id']}", params={"top": 10})
        missing = c.get(f"/api/similar/{'0' * 16}")
    assert r.status_code == 200 and missing.status_code == 404
    data = r.json()
    results = data["queries"][0]["results"]
    assert data["similar_to"] == first["id"] and len(results) == 6  # the 6 other images
    assert first["id"] not in {x["id"] for x in results}
    feats = service.sync().features
    base = np.asarray(feats.features["global"], dtype=np.float32)
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    k0 = feats.paths.index(Path(first["path"]))
    for x in results:
        k = feats.paths.index(Path(x["path"]))
        assert x["score"] == pytest.approx(float(unit[feats.rows[k0]] @ unit[feats.rows[k]]), abs=1e-3)
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)


def test_new_files_are_found_on_the_next_search(service, gallery) -> None:
    with client(service) as c:
        before = c.get("/api/search", params={"q": QUERY, "top": 50}).json()
        (new,) = write_gallery(gallery / "later", 1, seed=5)
        after = c.get("/api/search", params={"q": QUERY, "top": 50}).json()
        info = c.get("/api/info").json()
    assert before["gallery_size"] == 7 and after["gallery_size"] == 8 and info["gallery_size"] == 8
    assert after["embedded"] == 1
    assert catalogue_id(new.relative_to(gallery).as_posix()) in {
        r["id"] for r in after["queries"][0]["results"]
    }


def test_a_search_of_an_unchanged_gallery_reuses_the_catalogue(service, gallery, monkeypatch) -> None:
    """The per-search sync of an unchanged gallery neither opens the gallery cache's catalogue nor
    rebuilds the id catalogue; a new file does both."""
    opened: list[Path] = []
    real = gallery_mod._open_catalog
    monkeypatch.setattr(gallery_mod, "_open_catalog", lambda r: opened.append(r) or real(r))
    first = service.sync()
    with client(service) as c:
        assert c.get("/api/search", params={"q": QUERY}).status_code == 200
    assert service.sync() is first and opened == []
    write_gallery(gallery / "later", 1, seed=6)
    assert service.sync() is not first and opened and len(service.sync().ids) == 8


def test_the_page_waits_for_the_first_sync(trained_run, gallery) -> None:
    svc = SearchService(trained_run, gallery)  # not synced yet
    with client(svc) as c:
        r = c.get("/api/search", params={"q": QUERY})
        info = c.get("/api/info").json()
    assert r.status_code == 503 and "indexed" in r.json()["error"]
    assert info["sync"]["synced"] is False and info["method"] == "baseline"
    seen: list[tuple[int, int]] = []
    svc.sync(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and svc.info()["sync"] == {
        "running": False,
        "done": 7,
        "total": 7,
        "error": "",
        "synced": True,
    }


def test_an_empty_gallery_answers_with_nothing(trained_run, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    svc = SearchService(trained_run, tmp_path / "empty")
    svc.sync()
    with client(svc) as c:
        r = c.get("/api/search", params={"q": QUERY})
    assert r.status_code == 200 and r.json()["gallery_size"] == 0 and r.json()["queries"][0]["results"] == []


# ---- safety -------------------------------------------------------------------------------------------
def test_images_only_by_catalogue_id(service, gallery, tmp_path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET-BYTES")
    inside = next(gallery.rglob("*.png"))
    attempts = [
        "/image/../secret.png",
        "/image/..%2fsecret.png",
        "/image/%2e%2e%2fsecret.png",
        "/image/%252e%252e%252fsecret.png",
        f"/image/{secret}",
        f"/image/{str(secret).replace('/', '%2f')}",
        f"/image/{inside.relative_to(gallery).as_posix()}",
        f"/image/{inside.name}",
        "/static/../secret.png",
        "/static/%2e%2e/service.py",
        "/static/..%2f..%2fcli.py",
        f"/static/{secret}",
        "/image/" + "0" * 16,
        "/image/" + catalogue_id("../secret.png"),
    ]
    with client(service) as c:
        for url in attempts:
            r = c.get(url)
            assert r.status_code == 404 and b"SECRET" not in r.content and b"import" not in r.content, url
        good = c.get(f"/image/{catalogue_id(inside.relative_to(gallery).as_posix())}")
    assert good.status_code == 200 and good.content[:2] == b"\xff\xd8"  # a JPEG thumbnail


def test_html_in_queries_and_file_names_stays_text(service, gallery) -> None:
    write_gallery(gallery, 1, seed=9)[0].rename(gallery / HTML_NAME)
    query = "<script>alert('x')</script> w3 w5"
    with client(service) as c:
        r = c.get("/api/search", params={"q": query, "top": 20})
        page = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["queries"][0]["query"] == query
    assert HTML_NAME in {x["name"] for x in data["queries"][0]["results"]}
    # the page is a fixed file: nothing from a request or a file name is ever put into it by the server
    assert page.status_code == 200 and "alert" not in page.text and "<script src=" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    script = (Path(create_app.__code__.co_filename).parent / "static" / "app.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script


def test_the_token_is_checked_on_every_request(service) -> None:
    secret = "s3cret-token"
    item = service.search(QUERY, top=1)["queries"][0]["results"][0]
    urls = ["/", "/api/info", f"/api/search?q={QUERY}", f"/api/similar/{item['id']}", f"/image/{item['id']}"]
    with client(service, token=secret) as c:
        for url in urls:
            assert c.get(url).status_code == 401, url
            sep = "&" if "?" in url else "?"
            assert c.get(f"{url}{sep}token=wrong").status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
            assert c.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200, url
        c.cookies.clear()
        first = c.get(f"/?token={secret}")  # the URL `ped serve` prints
        assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
        for url in urls:  # the page's own requests carry the cookie
            assert c.get(url).status_code == 200, url


def test_a_non_local_host_needs_a_token(trained_run, gallery) -> None:
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost") and is_local("127.0.0.2")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("example.org")
    with pytest.raises(PedError, match="token is required"):
        check_listen("0.0.0.0", None)
    check_listen("0.0.0.0", "x")
    check_listen("127.0.0.1", None)
    assert page_url("0.0.0.0", 8001, "a b") == "http://127.0.0.1:8001/?token=a%20b"
    args = ["serve", "--gallery", str(gallery), "--run", str(trained_run), "--host", "0.0.0.0"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2 and "token is required" in " ".join(result.output.split())
    assert "Traceback" not in result.output


# ---- a real server ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_200_searches_from_20_clients_all_succeed(trained_run, gallery) -> None:
    proc, url = start_server(trained_run, gallery)
    try:
        answers = load(url, ["w3 w5", "w7 w2 w9", "w4", "w11 w3", "w6 w8 w10"], searches=200, clients=20)
    finally:
        log = stop_server(proc)
    assert len(answers) == 200 and all(ok for ok, _ in answers), log
    assert "indexed 7 image(s)" in log and "http://127.0.0.1:" in log
