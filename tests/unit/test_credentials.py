"""Secrets as systemd credentials (vipd/credentials.py): the config accepts
`credential:NAME`, the daemon reads it from $CREDENTIALS_DIRECTORY, check-config and
install-check tell encrypted from plaintext at rest, and a pair runs from secrets that
`systemd-creds` encrypted, with no plaintext copy on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.daemons import Pair
from vipd import credentials
from vipd.cli import main
from vipd.config import load_config
from vipd.errors import ConfigError
from vipd.installcheck import OK, WARN, check_secret
from vipd.keys import generate_key_line, load_keys
from vipd.tokens import load_tokens


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The credstores systemd searches, moved into tmp_path; no $CREDENTIALS_DIRECTORY."""
    encrypted, plain = tmp_path / "credstore.encrypted", tmp_path / "credstore"
    encrypted.mkdir()
    plain.mkdir()
    monkeypatch.setattr(credentials, "ENCRYPTED_STORES", (encrypted,))
    monkeypatch.setattr(credentials, "PLAIN_STORES", (plain,))
    monkeypatch.delenv(credentials.ENV, raising=False)
    return encrypted, plain


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o400)  # as systemd leaves it in $CREDENTIALS_DIRECTORY
    return path


def test_a_path_is_itself_and_a_credential_comes_from_the_units_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert credentials.locate("/etc/vipd/web.key") == Path("/etc/vipd/web.key")
    monkeypatch.setenv(credentials.ENV, str(tmp_path))
    private(tmp_path / "web.key", generate_key_line(3) + "\n")
    assert credentials.locate("credential:web.key") == tmp_path / "web.key"
    assert list(load_keys("credential:web.key")) == [3]
    with pytest.raises(ConfigError) as err:
        load_keys("credential:other.key")
    assert "LoadCredentialEncrypted=other.key" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_outside_the_unit_a_plain_credstore_is_read_an_encrypted_one_is_named(
        stores: tuple[Path, Path]) -> None:
    encrypted, plain = stores
    private(plain / "web.key", generate_key_line(4) + "\n")
    assert list(load_keys("credential:web.key")) == [4]
    (encrypted / "web.tokens").write_bytes(b"\0opaque")
    with pytest.raises(ConfigError, match=r"encrypted at rest in .*web\.tokens"):
        load_tokens("credential:web.tokens")
    with pytest.raises(ConfigError, match="systemd-creds encrypt --name=nope"):
        load_keys("credential:nope")
    assert credentials.encrypted_at_rest("credential:web.tokens")
    assert not credentials.encrypted_at_rest("credential:web.key")


def config_doc(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"node": "a", "cluster": "web", "interface": "eth0",
            "vips": ["198.51.100.10/24"],
            "heartbeat": {"bind": "198.51.100.1:5405", "peers": ["198.51.100.2:5405"]},
            "auth": {"key_file": "credential:web.key"}, **extra}


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_config_keeps_a_credential_unresolved_and_checks_its_name(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config_doc(tmp_path)))
    assert cfg.key_file == Path("credential:web.key")  # not made relative to the file
    bad = config_doc(tmp_path)
    bad["auth"] = {"key_file": "credential:../../etc/shadow"}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad))
    assert "auth.key_file" in str(err.value) and "no /" in str(err.value)


def test_check_config_accepts_an_encrypted_credential_and_says_so(
        tmp_path: Path, stores: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    encrypted, _ = stores
    (encrypted / "web.key").write_bytes(b"opaque")
    path = write(tmp_path, config_doc(tmp_path))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "keys in a credential" in out
    assert f"credential web.key: encrypted at rest in {encrypted / 'web.key'}" in out
    (encrypted / "web.key").unlink()
    assert main(["check-config", str(path)]) == 2
    assert "credential web.key" in capsys.readouterr().err


def test_install_check_tells_encrypted_from_plaintext_at_rest(
        tmp_path: Path, stores: tuple[Path, Path]) -> None:
    encrypted, plain = stores
    (encrypted / "web.key").write_bytes(b"opaque")
    found = check_secret(Path("credential:web.key"), "key file", None, load_keys)
    assert [(f.level, f.detail) for f in found] == [
        (OK, f"credential web.key: encrypted at rest in {encrypted / 'web.key'}")]
    private(plain / "web.tokens", "alice operate " + "ab" * 32 + "\n")
    found = check_secret(Path("credential:web.tokens"), "tokens file", None,
                         lambda p: None)
    assert any(f.level == WARN and "plaintext at rest in" in f.detail for f in found)
    found = check_secret(Path("credential:gone.key"), "key file", None, load_keys)
    assert [f.level for f in found] == ["FAIL"]
    assert "systemd-creds encrypt --name=gone.key" in found[0].detail
    key = private(tmp_path / "web.key", generate_key_line(1) + "\n")
    found = check_secret(key, "key file", None, load_keys)
    assert found[-1].level == WARN and f"{key} is plaintext at rest" in found[-1].detail


def _systemd_creds() -> str:
    tool = shutil.which("systemd-creds")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-creds is missing: .ci/run must install systemd")
        pytest.skip("systemd-creds not installed")
    return tool


@pytest.mark.asyncio
async def test_a_pair_runs_from_encrypted_credentials_only(
        pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The heartbeat key and the tokens encrypted with systemd-creds (a host key of the
    test's own, never the machine's), the plaintext gone; what systemd would decrypt
    into the unit's $CREDENTIALS_DIRECTORY is all either daemon reads."""
    tool = _systemd_creds()
    env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(tmp_path / "host.secret")}
    store = tmp_path / "credstore.encrypted"
    store.mkdir()
    plaintext = {"web.key": pair.key_file.read_text(),
                 "web.tokens": "alice operate " + "cd" * 32 + "\n"}
    for name, text in plaintext.items():
        clear = tmp_path / f"clear-{name}"
        clear.write_text(text)
        subprocess.run([tool, "encrypt", "--with-key=host", f"--name={name}", str(clear),
                        str(store / name)], env=env, check=True, capture_output=True)
        clear.unlink()
        assert text.encode() not in (store / name).read_bytes()
    pair.key_file.unlink()
    # What LoadCredentialEncrypted= does at the unit's start: decrypt into a private
    # directory on a memory file system.
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    creds = shm / f"vipd-test-creds-{os.getpid()}"
    creds.mkdir(mode=0o700)
    try:
        for name in plaintext:
            subprocess.run([tool, "decrypt", f"--name={name}", str(store / name),
                            str(creds / name)], env=env, check=True, capture_output=True)
            (creds / name).chmod(0o400)
        monkeypatch.setenv(credentials.ENV, str(creds))
        for node in pair.nodes:
            node.settings["auth"] = {"key_file": "credential:web.key"}
            node.settings["api"] = {"listen": None, "tokens_file": "credential:web.tokens"}
        pair.start()
        await pair.settled()
        # check-config inside the unit reads both, as the daemon does at start
        pair.a.write()
        assert main(["check-config", str(pair.a.config_path)]) == 0
        assert ", 1 key," in capsys.readouterr().out
        secrets_on_disk = [p for p in tmp_path.rglob("*") if p.is_file()
                           and any(t.encode() in p.read_bytes() for t in plaintext.values())]
        assert secrets_on_disk == []
        # a wrong name is refused by systemd-creds itself (the name is authenticated)
        wrong = subprocess.run([tool, "decrypt", "--name=other", str(store / "web.key"), "-"],
                               env=env, capture_output=True)
        assert wrong.returncode != 0
    finally:
        shutil.rmtree(creds)


def test_a_tls_key_as_a_credential_loads_and_a_missing_one_is_an_os_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's and the scraped endpoints' TLS keys go through the same lookup; a
    missing credential is an OSError, which their callers already word."""
    from support.pki import make_ca, make_leaf
    from vipd.webconfig import server_tls_context

    make_ca(tmp_path, "ca")
    make_leaf(tmp_path, "server", "ca", "subjectAltName=IP:127.0.0.1\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (tmp_path / "server.key").rename(creds / "api.key")
    monkeypatch.setenv(credentials.ENV, str(creds))
    ctx = server_tls_context(tmp_path / "server.pem", Path("credential:api.key"))
    assert ctx.minimum_version.name == "TLSv1_2"
    with pytest.raises(OSError, match=r"LoadCredentialEncrypted=gone\.key"):
        server_tls_context(tmp_path / "server.pem", Path("credential:gone.key"))


@pytest.mark.asyncio
async def test_the_aws_mover_takes_its_credentials_file_from_a_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's chain reads the shared credentials file systemd decrypted; nothing
    else is asked (no environment keys, instance metadata disabled)."""
    pytest.importorskip("aiobotocore")
    from vipd.movers.aws import AwsMover

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    creds = tmp_path / "creds"
    creds.mkdir()
    private(creds / "aws", "[default]\naws_access_key_id = AKIAFROMCREDENTIAL01\n"
                           "aws_secret_access_key = " + "s" * 40 + "\n")
    monkeypatch.setenv(credentials.ENV, str(creds))
    mover = AwsMover(region="eu-west-1", eni="eni-0123456789abcdef0", cluster="web",
                     node="a", vips=["198.51.100.10/32"], secondary_ips=True,
                     elastic_ips=[], route_tables=[],
                     credentials_file=Path("credential:aws"))
    found = await mover.session().get_credentials()
    assert found is not None and found.access_key == "AKIAFROMCREDENTIAL01"
    cfg_doc = config_doc(tmp_path, movers=["netlink", {"aws": {
        "region": "eu-west-1", "eni": "eni-0123456789abcdef0",
        "credentials_file": "credential:aws"}}])
    private(creds / "web.key", generate_key_line(1) + "\n")
    assert main(["check-config", str(write(tmp_path, cfg_doc))]) == 0
