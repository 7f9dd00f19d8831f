"""vipd.webconfig: the exporter-toolkit web config (parsing, refusals, file checks), the
basic-auth decisions and their cache, check-config and install-check on it. The TLS and
auth of a live endpoint, scraped by a real Prometheus: tests/integration/test_metrics_tls.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from support.pki import Pki, make_pki
from vipd.cli import main
from vipd.config import load_config, load_model
from vipd.configtypes import Endpoint
from vipd.errors import ConfigError
from vipd.installcheck import FAIL, OK, WARN, check_metrics
from vipd.keys import generate_key_line
from vipd.webconfig import (
    CACHE_LIMIT,
    BasicAuth,
    WebConfig,
    basic_credentials,
    bcrypt_verify,
    load_web_config,
    plain_beyond_loopback,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "web-config.yml"
EXAMPLE_PASSWORD = b"scrape-example-password"  # documented in the example's comment
HASH = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()  # cost 4: fast tests


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, data: dict[str, Any], name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **extra}


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    assert info.value.file == str(path)
    return info.value.problems


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- parsing ---------------------------------------------------------------------------

def test_the_example_parses_and_its_documented_password_matches_its_hash() -> None:
    config = load_model(EXAMPLE, WebConfig)
    assert config.tls_server_config is not None
    assert config.tls_server_config.client_auth_type == "RequireAndVerifyClientCert"
    assert config.basic_auth_users is not None
    (hashed,) = config.basic_auth_users.values()
    assert bcrypt_verify(EXAMPLE_PASSWORD, hashed.encode())
    assert not bcrypt_verify(b"scrape-example-passwore", hashed.encode())


def test_a_full_config_makes_a_verifying_context_and_users(tmp_path: Path, pki: Pki) -> None:
    path = write(tmp_path, {
        "tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                 client_ca_file=str(pki.ca), min_version="TLS13"),
        "basic_auth_users": {"prometheus": HASH},
        "http_server_config": {"http2": False}})
    web = load_web_config(path)
    assert web.ssl_context is not None
    assert web.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert web.ssl_context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert web.auth is not None and set(web.auth.users) == {b"prometheus"}
    assert web.describe() == "TLS (RequireAndVerifyClientCert), basic auth (1 user)"


def test_verify_if_given_is_optional_and_no_client_cert_verifies_nothing(
        tmp_path: Path, pki: Pki) -> None:
    optional = load_web_config(write(tmp_path, {"tls_server_config": tls(
        pki, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(pki.ca))}))
    assert optional.ssl_context is not None
    assert optional.ssl_context.verify_mode is ssl.CERT_OPTIONAL
    plain = load_web_config(write(tmp_path, {"tls_server_config": tls(pki)}))
    assert plain.ssl_context is not None and plain.ssl_context.verify_mode is ssl.CERT_NONE
    assert plain.auth is None and plain.describe() == "TLS"


def test_relative_paths_are_next_to_the_web_config(tmp_path: Path, pki: Pki) -> None:
    here = tmp_path / "etc"
    here.mkdir()
    for src in (pki.server_cert, pki.server_key):
        (here / src.name).write_bytes(src.read_bytes())
        (here / src.name).chmod(0o600)
    web = load_web_config(write(here, {"tls_server_config": {
        "cert_file": pki.server_cert.name, "key_file": pki.server_key.name}}))
    assert web.config.tls_server_config is not None
    assert web.config.tls_server_config.cert_file == here / pki.server_cert.name


def test_empty_users_mean_no_basic_auth(tmp_path: Path) -> None:
    assert load_web_config(write(tmp_path, {"basic_auth_users": {}})).auth is None


@pytest.mark.parametrize(("data", "where", "expected"), [
    ({"tls_config": {}}, "tls_config", "unknown key; did you mean 'tls_server_config'?"),
    ({"tls_server_config": {"cert_file": "/x.pem"}}, "tls_server_config.key_file",
     "missing required key"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k",
                            "client_auth_type": "RequireAnyClientCert"}},
     "tls_server_config.client_auth_type", "RequireAnyClientCert (a client certificate that "
     "is not verified) is not supported by vipd; use RequireAndVerifyClientCert"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k",
                            "client_auth_type": "RequireAndVerifyClientCert"}},
     "tls_server_config.client_ca_file", "needs the CA that signed the scrapers'"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k", "client_ca_file": "/ca"}},
     "tls_server_config.client_auth_type", "client_ca_file is given, so expected "
     "RequireAndVerifyClientCert"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k", "client_auth_type": "Yes"}},
     "tls_server_config.client_auth_type", "must be 'NoClientCert', "),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k", "min_version": "TLS13",
                            "max_version": "TLS12"}},
     "tls_server_config.max_version", "TLS12 is below min_version TLS13"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k", "min_version": "TLS1.2"}},
     "tls_server_config.min_version", "must be 'TLS10', 'TLS11', 'TLS12' or 'TLS13'"),
    ({"tls_server_config": {"cert": "PEM", "key_file": "/k"}}, "tls_server_config.cert",
     "not supported by vipd: inline PEM; put it in a file and use cert_file"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k",
                            "client_allowed_sans": ["prom"]}},
     "tls_server_config.client_allowed_sans", "not supported by vipd"),
    ({"tls_server_config": {"cert_file": "/c", "key_file": "/k",
                            "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
     "tls_server_config.cipher_suites", "not supported by vipd: Go cipher suite names"),
    ({"http_server_config": {"headers": {"X-Frame-Options": "deny"}}},
     "http_server_config.headers", "not supported by vipd"),
    ({"http_server_config": {"http2": True}}, "http_server_config.http2",
     "vipd serves HTTP/1.1 only"),
    ({"rate_limit": {"interval": "1s", "burst": 20}}, "rate_limit", "not supported by vipd"),
    ({"basic_auth_users": {"alice": "hunter2"}}, "basic_auth_users.alice",
     "expected a bcrypt hash ($2y$10$ and 53 more characters"),
    ({"basic_auth_users": {"alice": "$2y$99$" + HASH[7:]}}, "basic_auth_users.alice",
     "bcrypt cost must be 4..31, got 99"),
    ({"basic_auth_users": {"a:b": HASH}}, "basic_auth_users.a:b", "cannot contain ':'"),
    ({"basic_auth_users": ["alice"]}, "basic_auth_users", "expected a mapping of keys, got a list"),
])
def test_every_problem_names_the_key_path(tmp_path: Path, data: dict[str, Any], where: str,
                                          expected: str) -> None:
    found = problems(write(tmp_path, data))
    assert any(path == where and expected in msg for path, msg in found), found


def test_a_password_in_place_of_a_hash_is_never_echoed(tmp_path: Path) -> None:
    found = problems(write(tmp_path, {"basic_auth_users": {"alice": "hunter2-secret"}}))
    assert found and all("hunter2" not in msg for _, msg in found), found


def test_a_missing_web_config_file_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path / "none.yml") == [
        ("", "cannot read config file: No such file or directory")]


def test_a_key_readable_by_others_is_refused(tmp_path: Path, pki: Pki) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o644)
    found = problems(write(tmp_path, {"tls_server_config": {
        "cert_file": str(pki.server_cert), "key_file": str(key)}}))
    assert found == [("tls_server_config.key_file",
                      f"{key}: mode 0644 gives access to group/others; run chmod 600 {key}")]


def test_a_missing_certificate_and_a_mismatched_key_are_named(tmp_path: Path,
                                                              pki: Pki) -> None:
    missing = tmp_path / "none.pem"
    assert problems(write(tmp_path, {"tls_server_config": tls(pki, cert_file=str(missing))})) \
        == [("tls_server_config.cert_file", f"{missing}: no such file")]
    (where, msg), = problems(write(tmp_path, {"tls_server_config": tls(
        pki, key_file=str(pki.client_key))}))
    assert where == "tls_server_config"
    assert msg.startswith(f"cannot load the certificate, key and CA ({pki.server_cert}, "
                          f"{pki.client_key}): "), msg
    unreadable = tmp_path / "dir.key"
    unreadable.mkdir(mode=0o700)
    (where, msg), = problems(write(tmp_path, {"tls_server_config": tls(
        pki, key_file=str(unreadable))}))
    assert (where, msg) == ("tls_server_config.key_file",
                            f"{unreadable}: cannot read TLS key file: Is a directory")


# --- basic auth ----------------------------------------------------------------------

class CountingVerify:
    """bcrypt's verdict, with every call counted (the cost the cache saves)."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls.append(hashed)
        return bcrypt_verify(password, hashed)


@pytest.mark.parametrize("value", [None, "", "Bearer abc", "Basic !!!", "Basic " +
                                   base64.b64encode(b"no-colon").decode(), "Basic"])
def test_malformed_headers_carry_no_credentials(value: str | None) -> None:
    assert basic_credentials(value) is None


def test_the_password_may_contain_colons() -> None:
    assert basic_credentials(header("prom", "a:b:c")) == (b"prom", b"a:b:c")
    assert basic_credentials(header("prom", "")) == (b"prom", b"")


@pytest.mark.asyncio
async def test_a_verified_scraper_pays_bcrypt_once() -> None:
    verify = CountingVerify()
    auth = BasicAuth({"prom": HASH}, verify)
    for _ in range(5):
        assert await auth.allows(header("prom", "right"))
    assert len(verify.calls) == 1


@pytest.mark.asyncio
async def test_wrong_passwords_are_refused_every_time_and_never_cached() -> None:
    verify = CountingVerify()
    auth = BasicAuth({"prom": HASH}, verify)
    assert await auth.allows(header("prom", "right"))
    for password in ("wrong", "wrong", "right ", "Right", ""):
        assert not await auth.allows(header("prom", password)), password
    assert len(verify.calls) == 6  # the cached success does not vouch for others
    assert not await auth.allows(header("PROM", "right"))


@pytest.mark.asyncio
async def test_an_unknown_user_costs_a_bcrypt_run_like_a_known_one() -> None:
    verify = CountingVerify()
    auth = BasicAuth({"prom": HASH}, verify)
    assert not await auth.allows(header("mallory", "right"))
    assert len(verify.calls) == 1 and verify.calls[0] != HASH.encode()  # the decoy hash


@pytest.mark.asyncio
async def test_no_header_costs_nothing() -> None:
    verify = CountingVerify()
    auth = BasicAuth({"prom": HASH}, verify)
    assert not await auth.allows(None)
    assert not await auth.allows("Bearer x")
    assert verify.calls == []


@pytest.mark.asyncio
async def test_the_cache_is_bounded_and_starts_over() -> None:
    auth = BasicAuth({"prom": HASH}, lambda password, hashed: True)
    for i in range(CACHE_LIMIT + 5):
        assert await auth.allows(header("prom", f"pw{i}"))
        assert len(auth._verified) <= CACHE_LIMIT
    assert len(auth._verified) == 5


@pytest.mark.asyncio
async def test_bcrypt_runs_off_the_event_loop() -> None:
    """A real cost-12 check (~300 ms) while a ticker runs: the loop keeps ticking."""
    slow = bcrypt.hashpw(b"right", bcrypt.gensalt(12)).decode()
    auth = BasicAuth({"prom": slow})
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        assert await auth.allows(header("prom", "right"))
    finally:
        ticker.cancel()
    assert ticks >= 5, ticks


def test_htpasswd_style_2y_hashes_and_overlong_passwords() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    assert bcrypt_verify(b"pw", b"$2y$" + hashed[4:])
    assert not bcrypt_verify(b"x" * 100, hashed)  # bcrypt's 72-byte limit: refused, no raise


# --- the plain-HTTP warning, check-config, install-check --------------------------------

def test_plain_http_is_flagged_only_beyond_loopback() -> None:
    assert not plain_beyond_loopback(Endpoint.parse("127.0.0.1:9441"), tls=False)
    assert not plain_beyond_loopback(Endpoint.parse("[::1]:9441"), tls=False)
    assert plain_beyond_loopback(Endpoint.parse("0.0.0.0:9441"), tls=False)
    assert plain_beyond_loopback(Endpoint.parse("198.51.100.1:9441"), tls=False)
    assert not plain_beyond_loopback(Endpoint.parse("0.0.0.0:9441"), tls=True)


def pair_config(tmp_path: Path, metrics: dict[str, Any]) -> Path:
    key = tmp_path / "web.key"
    key.write_text(generate_key_line(1) + "\n")
    key.chmod(0o600)
    return write(tmp_path, {
        "node": "a", "cluster": "web", "interface": "lo", "vips": ["198.51.100.10/32"],
        "priority": 150, "fence": "none", "api": {"listen": None},
        "heartbeat": {"bind": "127.0.0.1:5405", "peers": ["127.0.0.2:5405"]},
        "auth": {"key_file": str(key)}, "metrics": metrics}, "pair.yaml")


def test_check_config_validates_the_web_config(tmp_path: Path, pki: Pki,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    web = write(tmp_path, {"tls_server_config": tls(pki), "basic_auth_users": {"p": HASH}})
    path = pair_config(tmp_path, {"listen": "127.0.0.1:9441", "web_config_file": "web.yml"})
    assert load_config(path).metrics.web_config_file == web  # relative to the pair config
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().err == ""
    web.write_text(yaml.safe_dump({"basic_auth_users": {"p": "not-a-hash"}}))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{web}: basic_auth_users.p: expected a bcrypt hash"), err
    web.unlink()
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"{web}: cannot read config file: No such file or " \
                                      "directory\n"


def test_install_check_reports_plain_http_beyond_loopback_and_the_web_config(
        tmp_path: Path, pki: Pki) -> None:
    def findings(metrics: dict[str, Any]) -> list[tuple[str, str]]:
        cfg = load_config(pair_config(tmp_path, metrics))
        return [(f.level, f.detail) for f in check_metrics(cfg, None) if f.check == "metrics"]

    assert findings({"listen": "127.0.0.1:9441"}) == [
        (OK, "127.0.0.1:9441: plain HTTP on loopback")]
    ((level, detail),) = findings({"listen": "0.0.0.0:9441"})
    assert level == WARN
    assert detail.startswith("metrics.listen 0.0.0.0:9441 serves plain HTTP beyond "
                             "loopback"), detail
    assert "metrics.web_config_file with tls_server_config" in detail
    write(tmp_path, {"tls_server_config": tls(pki), "basic_auth_users": {"p": HASH}})
    assert findings({"listen": "0.0.0.0:9441", "web_config_file": "web.yml"}) == [
        (OK, "0.0.0.0:9441: TLS, basic auth (1 user)")]
    write(tmp_path, {"basic_auth_users": {"p": HASH}})  # basic auth without TLS
    assert findings({"listen": "0.0.0.0:9441", "web_config_file": "web.yml"})[0][0] == WARN
    os.chmod(pki.server_key, 0o640)
    try:
        write(tmp_path, {"tls_server_config": tls(pki)})
        ((level, detail),) = findings({"listen": "0.0.0.0:9441", "web_config_file": "web.yml"})
    finally:
        os.chmod(pki.server_key, 0o600)
    assert level == FAIL and "tls_server_config.key_file" in detail, detail
