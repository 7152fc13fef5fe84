"""Backbone weights: resolving model.backbone.pretrained, loading it in build_model, and the list / check / fetch
commands (fetch against a local HTTP server with Range support)."""
import hashlib
import http.server
import logging
import re
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hlbench import weights
from hlbench.compose import compose
from hlbench.config_checks import ConfigError
from hlbench.models import build_model
from hlbench.models.resnet import ResNetV1c
from hlbench.weights import KnownFile, main, pretrained_name, require_pretrained, resolve_pretrained

R18, R50, R101 = "resnet18_v1c-b5776b93.pth", "resnet50_v1c-2cccc1ad.pth", "resnet101_v1c-e67eebb6.pth"
MODEL_CONFIGS = sorted((Path(weights.__file__).parent / "conf" / "model").glob("*.yaml"))


def _model(pretrained):
    return {"backbone": {"type": "resnet_v1c", "depth": 18, "pretrained": pretrained}}


def _publish(monkeypatch, name, data, prefix=None):
    """Register name with the checksum of data (or a given prefix): test bytes cannot match the real ones."""
    prefix = prefix or hashlib.sha256(data).hexdigest()[:8]
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, name, KnownFile(prefix, "test file", "https://publisher.invalid/"))


# --- resolution -------------------------------------------------------------------------------------------------

def test_a_name_is_looked_up_in_the_folder_and_a_path_is_used_as_is(tmp_path):
    (tmp_path / R18).write_bytes(b"x")
    assert resolve_pretrained(_model(R18), tmp_path) == tmp_path / R18
    assert resolve_pretrained(_model(R18), str(tmp_path)) == tmp_path / R18
    assert resolve_pretrained(_model(str(tmp_path / R18)), None) == tmp_path / R18
    assert resolve_pretrained(_model("none"), None) is None


def test_a_missing_file_is_one_line_with_the_folder_the_url_and_the_fetch_command(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_pretrained(_model(R101), tmp_path)
    message = str(err.value)
    assert "\n" not in message and R101 in message and str(tmp_path) in message
    assert f"https://download.openmmlab.com/pretrain/third_party/{R101}" in message
    assert f"python -m hlbench.weights fetch {R101} --dir {tmp_path}" in message
    assert "model.backbone.pretrained=none" in message


@pytest.mark.parametrize("weights_dir", [None, ""])
def test_no_folder_says_how_to_set_one(weights_dir):
    with pytest.raises(ConfigError, match="HLBENCH_WEIGHTS.*weights_dir=.*fetch.*pretrained=none") as err:
        resolve_pretrained(_model(R50), weights_dir)
    assert "\n" not in str(err.value)


def test_a_missing_path_and_an_unknown_name_are_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}/nowhere.pth: no such file")):
        resolve_pretrained(_model(str(tmp_path / "nowhere.pth")), None)
    with pytest.raises(ConfigError, match="mine.pth: not found in the weights folder .*not a known download"):
        resolve_pretrained(_model("mine.pth"), tmp_path)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_an_unset_value_is_an_error_not_random_init(value):
    with pytest.raises(ConfigError, match="expected a weights file name .*a path, or none"):
        resolve_pretrained(_model(value), None)
    with pytest.raises(ConfigError, match="model.backbone.pretrained"):
        resolve_pretrained({"backbone": {"type": "resnet_v1c"}}, None)


def test_run_config_resolution_and_name(hydra_ctx, tmp_path, monkeypatch):
    (tmp_path / R101).write_bytes(b"x")
    monkeypatch.setenv("HLBENCH_WEIGHTS", str(tmp_path))
    cfg = compose(["experiment=fullsup/pspnet_r101", "hl.enabled=true"])
    assert require_pretrained(cfg) == tmp_path / R101 and pretrained_name(cfg) == R101
    cfg = compose(["experiment=fullsup/pspnet_r101", "hl.enabled=true",
                                       f"weights_dir={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="other"):
        require_pretrained(cfg)
    cfg = compose(["experiment=fullsup/pspnet_r101", "hl.enabled=true",
                                       f"model.backbone.pretrained={tmp_path / R101}"])
    assert require_pretrained(cfg) == tmp_path / R101 and pretrained_name(cfg) == R101
    for overrides in (["experiment=smoke/pspnet_r18_tiny"], ["experiment=fullsup/pspnet_r101", "profile=smoke"],
                      ["model=pspnet_r101", "model.backbone.pretrained=none"]):
        cfg = compose(overrides)  # profile=smoke: the family's tiny model, trained from scratch
        assert require_pretrained(cfg) is None and pretrained_name(cfg) == "none"


def test_model_configs_name_the_reference_file_of_their_depth():
    for path in MODEL_CONFIGS:
        backbone = OmegaConf.load(path).backbone
        if backbone.get("width_mult", 1.0) < 1:  # the CPU smoke model: no ImageNet file has its shapes
            assert backbone.pretrained == "none", path
        elif backbone.type == "bisenetv2":  # the authors' config trains it from scratch, and says so
            assert backbone.pretrained == "none", path
        elif backbone.type == "resnet_v1s":  # the semi-supervised references' own deep-stem ResNet-101 file
            assert backbone.pretrained == "resnet101.pth" and backbone.depth == 101, path
        else:
            assert backbone.pretrained in weights.KNOWN_WEIGHTS, path
            if backbone.type == "resnet_v1c":
                assert backbone.pretrained.startswith(f"resnet{backbone.depth}_v1c-"), path


def test_a_file_without_a_direct_link_points_to_its_page(tmp_path, capsys):
    with pytest.raises(ConfigError, match="by hand from https://drive.google.com/"):
        weights.resolve_pretrained({"backbone": {"pretrained": "resnet101.pth"}}, tmp_path)
    assert main(["fetch", "resnet101.pth", "--dir", str(tmp_path)]) != 0
    assert "no direct download" in capsys.readouterr().err and not (tmp_path / "resnet101.pth").exists()
    (tmp_path / "resnet101.pth").write_bytes(b"weights")
    assert weights.resolve_pretrained({"backbone": {"pretrained": "resnet101.pth"}}, tmp_path) == \
        tmp_path / "resnet101.pth"


# --- build_model ------------------------------------------------------------------------------------------------

def test_build_model_loads_the_named_file_from_the_weights_dir(hydra_ctx, tmp_path, caplog):
    cfg = compose(["model=pspnet_r18", "model.backbone.width_mult=0.25"])
    torch.manual_seed(1)
    source = ResNetV1c(18, width_mult=0.25)
    # Test-made bytes under the real name: its sha256 prefix is wrong, which the loader does not check.
    torch.save(source.state_dict(), tmp_path / R18)
    with caplog.at_level(logging.INFO, logger="hlbench.models.pretrained"):
        model = build_model(cfg.model, num_classes=3, weights_dir=tmp_path)
    assert f"tensors from {tmp_path / R18}" in caplog.text
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    with pytest.raises(ConfigError, match=f"{R18}: no weights folder is set"):
        build_model(cfg.model, num_classes=3)


# --- list and check ---------------------------------------------------------------------------------------------

def test_list_shows_each_suites_files_with_url_and_checksum(capsys):
    assert main(["list", "--suite", "losses"]) == 0
    out = capsys.readouterr().out
    for name in (R18, R50, R101):
        assert f"{name}  sha256 {name[-12:-4]}...  https://download.openmmlab.com/pretrain/third_party/{name}" in out
    assert main(["list"]) == 0
    assert "smoke:\n  none (from scratch)" in capsys.readouterr().out


def test_check_reports_missing_and_bad_files(tmp_path, monkeypatch, capsys):
    good = b"resnet-18 test bytes"
    (tmp_path / R18).write_bytes(good)
    _publish(monkeypatch, R18, good)
    (tmp_path / R50).write_bytes(b"not the published file")
    (tmp_path / (R101 + ".part")).write_bytes(b"half")
    assert main(["check", "--dir", str(tmp_path), "--suite", "losses"]) == 1
    out = capsys.readouterr()
    assert f"{tmp_path / R18}: ok" in out.out
    assert f"{tmp_path / R50}: BAD: sha256 " in out.out and "does not start with 2cccc1ad" in out.out
    assert f"{tmp_path / R101}: MISSING (partial download {R101}.part: 4 bytes" in out.out
    assert "2 file(s) missing or bad" in out.err

    for name in (R50, R101):
        (tmp_path / name).write_bytes(name.encode())
        _publish(monkeypatch, name, name.encode())
    monkeypatch.setenv("HLBENCH_WEIGHTS", str(tmp_path))
    assert main(["check", "--suite", "losses"]) == 0


def test_check_without_a_folder_or_with_an_unknown_suite_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HLBENCH_WEIGHTS", raising=False)
    assert main(["check"]) == 2
    assert main(["check", "--dir", str(tmp_path), "--suite", "nosuch"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "no weights folder; pass --dir" in err[0] and "--suite nosuch" in err[1] and "fullsup" in err[1]


# --- fetch ------------------------------------------------------------------------------------------------------

DATA = bytes(range(256)) * 40  # 10 KiB: several reads, small enough for a test
NAME = "tiny_v1c-0000aaaa.pth"


@pytest.fixture
def server(monkeypatch):
    """A mirror on 127.0.0.1 serving {path: bytes} with Range support; yields (base URL, files, request headers)."""
    files, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(dict(self.headers))
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
            if "Range" in self.headers and start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/mirror/", files, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _fetch(folder, base_url, *names):
    return main(["fetch", *names, "--dir", str(folder), "--base-url", base_url])


def test_fetch_downloads_verifies_and_renames(tmp_path, monkeypatch, server, capsys):
    base_url, files, requests = server
    files[f"/mirror/{NAME}"] = DATA
    _publish(monkeypatch, NAME, DATA)
    folder = tmp_path / "weights"  # created by fetch
    assert _fetch(folder, base_url, NAME) == 0
    assert (folder / NAME).read_bytes() == DATA and not (folder / f"{NAME}.part").exists()
    assert "Range" not in requests[0]

    assert _fetch(folder, base_url, NAME) == 0  # already there: checked, not downloaded again
    assert len(requests) == 1 and "already there, checksum ok" in capsys.readouterr().out


def test_fetch_resumes_a_partial_download_with_a_range_request(tmp_path, monkeypatch, server):
    base_url, files, requests = server
    files[f"/mirror/{NAME}"] = DATA
    _publish(monkeypatch, NAME, DATA)
    half = len(DATA) // 2
    (tmp_path / f"{NAME}.part").write_bytes(DATA[:half])
    assert _fetch(tmp_path, base_url, NAME) == 0
    assert requests[-1]["Range"] == f"bytes={half}-"
    assert (tmp_path / NAME).read_bytes() == DATA and not (tmp_path / f"{NAME}.part").exists()


def test_fetch_of_an_already_complete_part_file_verifies_it(tmp_path, monkeypatch, server):
    base_url, files, requests = server
    files[f"/mirror/{NAME}"] = DATA
    _publish(monkeypatch, NAME, DATA)
    (tmp_path / f"{NAME}.part").write_bytes(DATA)  # the server answers 416: nothing left to send
    assert _fetch(tmp_path, base_url, NAME) == 0
    assert requests[-1]["Range"] == f"bytes={len(DATA)}-" and (tmp_path / NAME).read_bytes() == DATA


def test_fetch_with_a_wrong_checksum_leaves_the_name_absent(tmp_path, monkeypatch, server, capsys):
    base_url, files, _ = server
    files[f"/mirror/{NAME}"] = DATA
    _publish(monkeypatch, NAME, DATA, prefix="0000aaaa")
    assert _fetch(tmp_path, base_url, NAME) == 1
    err = capsys.readouterr().err
    assert f"{base_url}{NAME}" in err and "does not start with 0000aaaa" in err
    assert f"{tmp_path / NAME} stays absent" in err
    assert not (tmp_path / NAME).exists() and not (tmp_path / f"{NAME}.part").exists()


def test_fetch_never_overwrites_an_existing_file(tmp_path, monkeypatch, server, capsys):
    base_url, files, requests = server
    files[f"/mirror/{NAME}"] = DATA
    _publish(monkeypatch, NAME, DATA)
    (tmp_path / NAME).write_bytes(b"someone's own file")
    assert _fetch(tmp_path, base_url, NAME) == 1
    assert (tmp_path / NAME).read_bytes() == b"someone's own file" and not requests
    assert "already exists but sha256" in capsys.readouterr().err


def test_fetch_errors_name_the_url_or_file(tmp_path, monkeypatch, server, capsys):
    base_url, _, _ = server
    _publish(monkeypatch, NAME, DATA)
    assert _fetch(tmp_path, base_url, NAME, "unknown.pth") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert f"fetch {base_url}{NAME}: HTTP 404" in err[0] and f"expected the file {NAME}" in err[0]
    assert "fetch unknown.pth: not a known file; known: " in err[1] and R101 in err[1]
    assert not (tmp_path / NAME).exists()
