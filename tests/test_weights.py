"""`edgeres weights list | fetch | import`: published files into the cache, each checked against the sha256 prefix
its name carries; a file that fails is one line, exit 1, and nothing (not even a partial file) in the cache. Fetch is
served by a local http.server on 127.0.0.1 (a mirror, as --url or $EDGERES_WEIGHTS_URL)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading

import pytest
from click.testing import CliRunner

from edgeres import pretrained
from edgeres.cli import main

GOOD = b"published weights, the real ones"


def _name(arch: str, body: bytes) -> str:
    return f"{arch}-{hashlib.sha256(body).hexdigest()[:8]}.pth"


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A mirror serving `tiny` (its name carries its hash) and `bad` (its name carries another hash), an empty cache,
    and PUBLISHED knowing both."""
    served = tmp_path / "mirror"
    served.mkdir()
    good_name = _name("tiny", GOOD)
    (served / good_name).write_bytes(GOOD)
    bad_name = "bad-00000000.pth"
    assert not hashlib.sha256(b"tampered").hexdigest().startswith("00000000")
    (served / bad_name).write_bytes(b"tampered")
    monkeypatch.setitem(pretrained.PUBLISHED, "tiny", good_name)
    monkeypatch.setitem(pretrained.PUBLISHED, "bad", bad_name)
    monkeypatch.setitem(pretrained.PUBLISHED, "gone", "gone-12345678.pth")
    monkeypatch.setenv("EDGERES_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(pretrained.URL_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "cache", good_name
    server.shutdown()
    server.server_close()


def _one_line_error(r, *parts: str) -> None:
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]) and "Traceback" not in r.output, r.stderr
    err = errors[0]
    for p in parts:
        assert p in err, err


def test_fetch_from_a_mirror_checks_the_hash(mirror, monkeypatch):
    url, cache, good_name = mirror
    r = CliRunner().invoke(main, ["weights", "fetch", "tiny", "--url", url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(cache / good_name) and (cache / good_name).read_bytes() == GOOD
    r = CliRunner().invoke(main, ["weights", "fetch", "bad", "--url", url])
    _one_line_error(r, "does not start with 00000000")
    assert sorted(p.name for p in cache.iterdir()) == [good_name], "no bad file, no temporary file left"
    monkeypatch.setenv(pretrained.URL_ENV, url)   # the mirror from the environment; the file's own URL works too
    r = CliRunner().invoke(main, ["weights", "fetch", "bad"])
    _one_line_error(r, "does not start with 00000000")
    (cache / good_name).unlink()
    r = CliRunner().invoke(main, ["weights", "fetch", "tiny", "--url", url + good_name, "-q"])
    assert r.exit_code == 0 and (cache / good_name).read_bytes() == GOOD
    r = CliRunner().invoke(main, ["weights", "fetch", "gone"])
    _one_line_error(r, "weights fetch gone: cannot download (File not found)", "gone-12345678.pth")
    r = CliRunner().invoke(main, ["weights", "fetch", "resnet-18"])
    _one_line_error(r, "did you mean resnet18?")
    assert sorted(p.name for p in cache.iterdir()) == [good_name]


def test_a_damaged_cached_file_is_replaced_by_fetch(mirror):
    url, cache, good_name = mirror
    cache.mkdir()
    (cache / good_name).write_bytes(b"half a downlo")
    assert pretrained.available_offline("tiny") == cache / good_name
    assert pretrained.available_offline("tiny", verify=True) is None
    assert pretrained.fetch("tiny", url=url) == cache / good_name and (cache / good_name).read_bytes() == GOOD
    assert pretrained.available_offline("tiny", verify=True) == cache / good_name


def test_import_checks_the_hash_before_copying(mirror, tmp_path):
    _, cache, good_name = mirror
    downloaded = tmp_path / "Downloads" / "weights (1).pth"   # renamed by a browser: the hash says which file it is
    downloaded.parent.mkdir()
    downloaded.write_bytes(GOOD)
    r = CliRunner().invoke(main, ["weights", "import", "--from", str(downloaded)])
    assert r.exit_code == 0, r.output
    assert (cache / good_name).read_bytes() == GOOD and str(cache / good_name) in r.stdout
    other = tmp_path / "other.pth"
    other.write_bytes(b"some other file")
    r = CliRunner().invoke(main, ["weights", "import", "--from", str(other)])
    _one_line_error(r, "its sha256 starts with", "nothing was copied")
    r = CliRunner().invoke(main, ["weights", "import", "--from", str(downloaded), "--arch", "bad"])
    _one_line_error(r, "not 00000000 (bad-00000000.pth)")
    r = CliRunner().invoke(main, ["weights", "import", "--from", str(tmp_path / "Downloads")])
    _one_line_error(r, "is a folder, not a file")
    r = CliRunner().invoke(main, ["weights", "import", "--from", str(tmp_path / "nope.pth")])
    _one_line_error(r, "weights file not found")
    assert sorted(p.name for p in cache.iterdir()) == [good_name]


def test_list_says_what_is_cached_and_offline_availability(mirror, tmp_path):
    url, cache, good_name = mirror
    assert pretrained.available_offline("tiny") is None and pretrained.available_offline("vgg16") is None
    pretrained.fetch("tiny", url=url)
    r = CliRunner().invoke(main, ["weights", "list", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = {row["arch"]: row for row in out["weights"]}
    assert out["cache"] == str(cache)
    assert rows["tiny"]["cached"] == str(cache / good_name) and rows["bad"]["cached"] is None
    assert rows["resnet18"]["sha256_prefix"] == "f37072fd" and rows["resnet18"]["file"] == "resnet18-f37072fd.pth"
    text = CliRunner().invoke(main, ["weights", "list"]).stdout
    assert f"cached: {cache / good_name}" in text and "resnet18-f37072fd.pth" in text
    assert pretrained.available_offline("tiny") == cache / good_name
    hub = tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"   # torchvision's own cache counts too
    hub.mkdir(parents=True)
    (hub / "resnet34-b627a593.pth").write_bytes(b"x")
    assert pretrained.available_offline("resnet34") == hub / "resnet34-b627a593.pth"
