"""TLS and basic auth for the endpoints Prometheus scrapes (a node's /metrics, the
witness's /metrics and /healthz), configured with the web config file of the Prometheus
exporter-toolkit (`metrics.web_config_file`), so that the scrape config that works for
node_exporter works for vipd unchanged: `scheme: https`, `tls_config`, `basic_auth`.

Supported keys: ``tls_server_config`` (cert_file, key_file, client_auth_type
NoClientCert | VerifyClientCertIfGiven | RequireAndVerifyClientCert, client_ca_file,
min_version, max_version, prefer_server_cipher_suites), ``basic_auth_users`` (bcrypt
hashes) and ``http_server_config: {http2: false}``. The rest of the format is refused with
a reason, never ignored: an operator who wrote ``client_allowed_sans`` or ``rate_limit``
relies on it. The file is read at start, again at every reload (SIGHUP: renewed
certificates, changed users; `WebListener`), and by check-config and install-check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from aiohttp import web
from pydantic import AfterValidator, field_validator, model_validator

from vipd import credentials
from vipd.config import _Model, load_model
from vipd.configtypes import ConfigPath, Endpoint, Problems, SecretPath, StrictBool
from vipd.errors import ConfigError, VipdError
from vipd.keys import read_private_file

log = logging.getLogger(__name__)

HASH_HINT = "make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n'"
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
# A bcrypt hash (cost 10) of a random password nobody knows: an unknown user costs the
# same bcrypt run as a known one, so response times do not tell which users exist.
_DECOY_HASH = b"$2b$10$6M2K0r.EyD4ENKD6TN.N0OMlCkFtOuXhpugflej78e/g1/MC426ie"
CACHE_LIMIT = 256  # successful credentials remembered; the cache starts over when full


def _check_hash(value: str) -> str:
    match = _BCRYPT_RE.fullmatch(value)
    if match is None:  # never echo it: a password pasted here instead of its hash
        raise ValueError(f"expected a bcrypt hash ($2y$10$ and 53 more characters, "
                         f"{HASH_HINT}), got {len(value)} characters that are not one")
    if not 4 <= int(match.group(1)) <= 31:
        raise ValueError(f"bcrypt cost must be 4..31, got {int(match.group(1))}")
    return value


BcryptHash = Annotated[str, AfterValidator(_check_hash)]


class _Refusing(_Model):
    """Keys of the exporter-toolkit format that vipd does not implement: each is
    accepted by the model only to be refused with its reason."""

    REFUSED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [(k, why) for k, why in cls.REFUSED.items() if k in data]
            if given:
                raise Problems([((key,), f"not supported by vipd: {why}")
                                for key, why in given])
        return data


class TlsServerConfig(_Refusing):
    REFUSED: ClassVar[dict[str, str]] = {
        k: f"inline PEM; put it in a file and use {k}_file" for k in ("cert", "key", "client_ca")
    } | {
        "client_allowed_sans": "accept every certificate client_ca_file signed, or give "
                               "the scrapers a CA of their own",
        "cipher_suites": "Go cipher suite names; vipd uses OpenSSL's defaults (remove it, "
                         "or raise min_version to TLS13)",
        "curve_preferences": "Go curve names; vipd uses OpenSSL's defaults (remove it)",
    }

    cert_file: ConfigPath
    key_file: SecretPath  # a path, or credential:NAME (vipd/credentials.py)
    client_auth_type: Literal["NoClientCert", "VerifyClientCertIfGiven",
                              "RequireAndVerifyClientCert", "RequestClientCert",
                              "RequireAnyClientCert"] = "NoClientCert"
    client_ca_file: ConfigPath | None = None
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"
    prefer_server_cipher_suites: StrictBool = True

    @field_validator("client_auth_type")
    @classmethod
    def _verifiable(cls, value: str) -> str:
        if value not in CLIENT_AUTH:  # Python's ssl cannot take a certificate unverified
            raise ValueError(f"{value} (a client certificate that is not verified) is not "
                             "supported by vipd; use RequireAndVerifyClientCert with "
                             "client_ca_file")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TlsServerConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        verifies = self.client_auth_type != "NoClientCert"
        if verifies and self.client_ca_file is None:
            problems.append((("client_ca_file",), f"client_auth_type {self.client_auth_type} "
                             "needs the CA that signed the scrapers' certificates"))
        if not verifies and self.client_ca_file is not None:
            problems.append((("client_auth_type",), "client_ca_file is given, so expected "
                             "RequireAndVerifyClientCert (or VerifyClientCertIfGiven), got "
                             "NoClientCert"))
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            problems.append((("max_version",), f"{self.max_version} is below min_version "
                             f"{self.min_version}"))
        if problems:
            raise Problems(problems)
        return self


class HttpServerConfig(_Refusing):
    REFUSED: ClassVar[dict[str, str]] = {
        "headers": "extra response headers (a scrape needs none); remove it"}

    http2: StrictBool = False

    @field_validator("http2")
    @classmethod
    def _http1(cls, value: bool) -> bool:
        if value:
            raise ValueError("vipd serves HTTP/1.1 only (Prometheus scrapes it just as "
                             "well); set http2: false or remove it")
        return value


class WebConfig(_Refusing):
    REFUSED: ClassVar[dict[str, str]] = {
        "rate_limit": "a scrape every few seconds needs none; remove it"}

    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig | None = None
    basic_auth_users: dict[str, BcryptHash] | None = None  # empty: no basic auth

    @field_validator("basic_auth_users")
    @classmethod
    def _no_colon(cls, users: dict[str, str] | None) -> dict[str, str] | None:
        bad: list[tuple[tuple[str | int, ...], str]] = [
            ((user,), "a user name cannot contain ':' (basic auth splits there)")
            for user in users or {} if ":" in user]
        if bad:
            raise Problems(bad)
        return users


# --- TLS ------------------------------------------------------------------------------

def server_tls_context(cert: Path, key: Path, client_ca: Path | None = None,
                       verify: ssl.VerifyMode = ssl.CERT_NONE,
                       min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                       max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
                       ) -> ssl.SSLContext:
    """A server context; the control API's and the scraped endpoints' (raises OSError or
    ssl.SSLError, which the callers word)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version, ctx.maximum_version = min_version, max_version
    ctx.load_cert_chain(cert, credentials.locate(key))  # the key may be credential:NAME
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = verify
    return ctx


def tls_context(tls: TlsServerConfig, file: str) -> ssl.SSLContext:
    """The context of a web config's tls_server_config; a private key that group or
    others may read is refused, as vipd's other secrets are."""
    where = "tls_server_config"
    try:
        read_private_file(tls.key_file, "TLS key file")
    except ConfigError as exc:
        raise ConfigError(file, [(f"{where}.key_file", "; ".join(exc.lines()))]) from exc
    for key in ("cert_file", "client_ca_file"):
        path = getattr(tls, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(file, [(f"{where}.{key}", f"{path}: no such file")])
    try:
        ctx = server_tls_context(tls.cert_file, tls.key_file, tls.client_ca_file,
                                 CLIENT_AUTH[tls.client_auth_type],
                                 TLS_VERSIONS[tls.min_version], TLS_VERSIONS[tls.max_version])
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (tls.cert_file, tls.key_file, tls.client_ca_file)
                          if p is not None)
        raise ConfigError(file, [(where, f"cannot load the certificate, key and CA "
                                         f"({files}): {exc}")]) from exc
    if not tls.prefer_server_cipher_suites:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


# --- basic auth -----------------------------------------------------------------------

def basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) of an ``Authorization: Basic`` header; None when absent or
    malformed (both answered 401)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def bcrypt_verify(password: bytes, hashed: bytes) -> bool:
    import bcrypt  # only a node with basic_auth_users pays the import

    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # over bcrypt's 72 bytes: no hash of ours can match it
        return False


class BasicAuth:
    """The users of ``basic_auth_users``. bcrypt is slow on purpose (~70 ms at cost 10),
    so, as in the exporter-toolkit, a verified (user, hash, password) is remembered: a
    scraper pays bcrypt once, not every 15 s. The cache holds keyed digests (HMAC with a
    key of this process), never passwords. Failures are not remembered; their bcrypt runs
    one at a time in a thread, so guessing costs at most one core and never stalls the
    event loop that sends heartbeats."""

    def __init__(self, users: Mapping[str, str],
                 verify: Callable[[bytes, bytes], bool] = bcrypt_verify) -> None:
        self.users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        self.verify = verify
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._one_at_a_time = asyncio.Lock()

    def _digest(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        # user has no ':' and a bcrypt hash no newline: the message is unambiguous
        return hmac.new(self._key, hashed + b"\n" + user + b":" + password,
                        hashlib.sha256).digest()

    async def allows(self, header: str | None) -> bool:
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        known = self.users.get(user)
        hashed = known if known is not None else _DECOY_HASH
        digest = self._digest(user, hashed, password)
        # A set lookup by a keyed digest: its timing tells nothing about the password.
        if known is not None and digest in self._verified:
            return True
        async with self._one_at_a_time:
            matched = await asyncio.to_thread(self.verify, password, hashed)
        if not (matched and known is not None):
            return False
        if len(self._verified) >= CACHE_LIMIT:
            self._verified.clear()
        self._verified.add(digest)
        return True


# --- the HTTP endpoints -----------------------------------------------------------------

@dataclass(frozen=True)
class WebSecurity:
    """A web config made ready to serve: the TLS context and the users."""

    file: Path
    config: WebConfig
    ssl_context: ssl.SSLContext | None
    auth: BasicAuth | None

    def describe(self) -> str:
        parts = []
        if self.config.tls_server_config is not None:
            tls = self.config.tls_server_config
            parts.append("TLS" + ("" if tls.client_auth_type == "NoClientCert" else
                                  f" ({tls.client_auth_type})"))
        if self.auth is not None:
            parts.append(f"basic auth ({len(self.auth.users)} "
                         f"{'user' if len(self.auth.users) == 1 else 'users'})")
        return ", ".join(parts) or "no TLS, no basic auth"


def load_web_config(path: Path) -> WebSecurity:
    """Parse and check a web config file (ConfigError naming the file and key path):
    the model, the key's mode, the certificate, key and CA loaded into a context."""
    config = load_model(path, WebConfig)
    if config.basic_auth_users:
        try:
            import bcrypt  # noqa: F401
        except ImportError as exc:
            raise ConfigError(str(path), [("basic_auth_users", "needs the bcrypt module: "
                                           "pip install bcrypt (Debian: python3-bcrypt)")]) \
                from exc
    tls = config.tls_server_config
    ctx = tls_context(tls, str(path)) if tls is not None else None
    auth = BasicAuth(config.basic_auth_users) if config.basic_auth_users else None
    return WebSecurity(path, config, ctx, auth)


def plain_beyond_loopback(listen: Endpoint, tls: bool) -> bool:
    """Whether this listener would send readable HTTP to other hosts."""
    return not listen.host.is_loopback and not tls


def plain_warning(key: str, listen: Endpoint) -> str:
    return (f"{key} {listen} serves plain HTTP beyond loopback: anyone who reaches it "
            f"reads it; set {key.rsplit('.', 1)[0]}.web_config_file with "
            "tls_server_config and basic_auth_users (docs/metrics.md)")


class Listener:
    """A TCP listener whose TLS settings a reload may replace: the new settings get a new
    listening socket beside the old one (SO_REUSEPORT) before the old one closes, so no
    client finds the port shut; connections already open finish on the old settings."""

    def __init__(self, runner: web.AppRunner, listen: Endpoint, key: str) -> None:
        self.runner, self.listen, self.key = runner, listen, key
        self.site: web.TCPSite | None = None
        self.tls = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    async def serve(self, ssl_context: ssl.SSLContext | None) -> None:
        """Listen with ``ssl_context`` (None: plain HTTP); raises VipdError naming the
        key and address, the old socket (if any) still serving, when it cannot."""
        site = web.TCPSite(self.runner, str(self.listen.host), self.listen.port,
                           ssl_context=ssl_context, reuse_address=True, reuse_port=True)
        try:
            await site.start()
        except OSError as exc:
            raise VipdError(f"cannot listen on {self.key} {self.listen}: "
                            f"{exc.strerror or exc}") from exc
        old, self.site, self.tls = self.site, site, ssl_context is not None
        if old is not None:
            await old.stop()


class WebListener(Listener):
    """An endpoint behind a web config, which a reload (SIGHUP) reads again, as the
    exporter-toolkit re-reads its file: new users count from the next request, new TLS
    settings (a renewed certificate, another client CA, TLS on or off) from a new socket."""

    def __init__(self, runner: web.AppRunner, listen: Endpoint, key: str,
                 security: WebSecurity | None) -> None:
        super().__init__(runner, listen, key)
        self.security = security

    async def apply(self, security: WebSecurity) -> None:
        """Serve with ``security`` (a reload's new reading of the same file); raises
        VipdError, the old settings still served, when the new socket cannot listen."""
        assert self.security is not None, "a listener without a web config has none to reload"
        await self.serve(security.ssl_context)
        self.security = security
        log.info("%s on %s://%s: web config reloaded (%s)", self.key, self.scheme,
                 self.listen, security.describe())
        if plain_beyond_loopback(self.listen, self.tls):
            log.warning("%s", plain_warning(self.key, self.listen))


def _middleware(current: Callable[[], WebSecurity | None]
                ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Basic auth by the users of the web config served now (``current()``)."""
    @web.middleware
    async def authenticate(request: web.Request, handler: Callable[
            [web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        security = current()
        auth = security.auth if security is not None else None
        if auth is None or await auth.allows(request.headers.get("Authorization")):
            return await handler(request)
        return web.Response(status=401, text="401 Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="vipd"'})
    return authenticate


async def start_http(app: web.Application, listen: Endpoint, web_config_file: Path | None,
                     key: str, shutdown_timeout: float) -> WebListener:
    """Serve ``app`` on ``listen`` behind the web config (if any); ``key`` is the config
    key of the listener, for messages (``metrics.listen``)."""
    security = load_web_config(web_config_file) if web_config_file is not None else None
    if security is not None:  # always, so that a reload may add users
        app.middlewares.append(_middleware(lambda: served.security))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    served = WebListener(runner, listen, key, security)
    ssl_context = security.ssl_context if security is not None else None
    await runner.setup()
    try:
        await served.serve(ssl_context)
    except VipdError:
        await runner.cleanup()
        raise
    if plain_beyond_loopback(listen, ssl_context is not None):
        log.warning("%s", plain_warning(key, listen))
    log.info("%s on %s://%s (%s)", key, served.scheme, listen,
             security.describe() if security is not None else "no web_config_file")
    return served
