"""Fuzzing in the suite (issue 15, part 3): a short bounded run of every atheris target
and of schemathesis against the real API, each asserting 0 crashes; the corpus is real
captured traffic; the harnesses reach the decoder behind the MAC and would see a schema
mismatch; every crash ever found, as a fixed input (simulations/fuzz.py is the long run).

atheris runs libFuzzer in a child process (run_atheris), which may exit or abort as it
likes without touching the test process.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from simulations import fuzztargets
from simulations.fuzz import ATHERIS_TARGETS, run_atheris
from simulations.fuzzapi import SCHEMA, run_api
from simulations.fuzztargets import CORPUS, Lab, Violation, datagrams, reseal, target
from vipd.api import Api, Outcome
from vipd.audit import AuditLog
from vipd.core.election import CommandKind
from vipd.core.protocol import (
    Heartbeat,
    KeyRing,
    Kind,
    Reject,
    Rejected,
    State,
    decode,
    flag_of,
)
from vipd.tokens import load_tokens, new_token

KINDS = {"heartbeat": Kind.HEARTBEAT, "vote_request": Kind.VOTE_REQUEST,
         "vote_reply": Kind.VOTE_REPLY}
RUNS = 3000  # inputs per atheris target: about a second each here

# Inputs that once crashed a target, with what they found. The first was the harness's
# own bug: a send time near 2**64 pushed its "wall clock" out of the u64 a heartbeat can
# carry, and Session.seal (rightly) refused to sign it; the harness now reads the clock
# as a real one would.
FOUND = {
    "harness wall clock overflow (heartbeat)":
        ("heartbeat", "VklQRAEBAAEAAAABAAAAAay3ovVNv9PuAAAAAP////////////////////////////////"
                      "//////////////////////////////////////////////////AAAABBjujiY6Jx7hAAA"
                      "AAAAAAABkZAAA8hZLpT3/YA7VO83d"),
}


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab()


def seeds(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*.bin"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_corpus_is_authentic_captured_traffic(lab: Lab, kind: str) -> None:
    """Every seed decodes with the captured pair's key as its folder's kind: the seeds
    are what a real pair sent (simulations/fuzzcorpus.py), not made-up bytes."""
    files = seeds(kind)
    assert len(files) >= 5, files
    runs = 0
    for path in files:
        found = datagrams(path.read_bytes())
        assert len(found) >= (2 if path.name.startswith("seq-") else 1), path
        runs += len(found) > 1
        for datagram in found:
            hb = decode(datagram, lab.keys)
            assert hb.kind is KINDS[kind] and hb.cluster == lab.cluster, (path, hb)
    assert runs >= 2, f"no runs of consecutive datagrams among the {kind} seeds"


def test_resealing_reaches_the_decoder_behind_the_mac(lab: Lab) -> None:
    """A mutated field is refused by the MAC as it is, and decoded once re-sealed."""
    datagram = next(d for p in seeds("heartbeat") for d in datagrams(p.read_bytes()))
    mutated = datagram[:5] + bytes([State.MAINTENANCE]) + datagram[6:]
    with pytest.raises(Rejected) as refused:
        decode(mutated, lab.keys)
    assert refused.value.reason is Reject.BAD_MAC
    assert decode(reseal(mutated, lab.keys), lab.keys).state is State.MAINTENANCE
    unknown_state = reseal(datagram[:5] + b"\x63" + datagram[6:], lab.keys)
    with pytest.raises(Rejected) as malformed:
        decode(unknown_state, lab.keys)
    assert malformed.value.reason is Reject.MALFORMED


@pytest.mark.parametrize("name", ATHERIS_TARGETS)
def test_every_seed_passes_the_target(lab: Lab, name: str) -> None:
    run = target(name, lab)
    for kind in KINDS:
        for path in seeds(kind):
            run(path.read_bytes())


def test_the_round_trip_invariant_catches_a_lossy_decoder(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The targets' invariant would fail on a decoder that loses a byte under the MAC:
    here one that drops the flags it does not know."""
    datagram = datagrams(seeds("heartbeat")[0].read_bytes())[0]
    unknown_flag = reseal(datagram[:6] + b"\x80" + datagram[7:], lab.keys)
    run = target("heartbeat", lab)
    run(unknown_flag)  # the real decoder keeps every bit

    def lossy(data: bytes, keys: KeyRing) -> Heartbeat:
        hb = decode(data, keys)
        return dataclasses.replace(hb, flags=flag_of(hb.flags & 0xFF))

    monkeypatch.setattr(fuzztargets, "decode", lossy)
    with pytest.raises(Violation):
        run(unknown_flag)


@pytest.mark.parametrize("name", sorted(FOUND))
def test_inputs_that_once_crashed_run_clean(lab: Lab, name: str) -> None:
    which, data = FOUND[name]
    target(which, lab)(base64.b64decode(data))


@pytest.mark.parametrize("name", ATHERIS_TARGETS)
def test_atheris_bounded_run_finds_no_crash(name: str, tmp_path: Path) -> None:
    result = run_atheris(name, runs=RUNS, findings=tmp_path, timeout=90)
    assert result.crashes == 0 and result.exit_code == 0, (
        f"{name}: {result.crash_files}\n{result.output_tail}")
    assert result.inputs >= RUNS, result
    assert result.cov > 50 and result.ft > result.cov, result  # coverage feedback works


def test_schemathesis_bounded_run_finds_no_failure() -> None:
    result = run_api(examples=8, derandomize=True)
    assert result.failures == 0 and result.server_errors == 0, result.failure_details
    assert result.operations == 6 and result.requests >= 300, result
    # with and without tokens, bodies valid and not: every answer the API has
    assert {"200", "400", "401", "403"} <= set(result.status_codes), result.status_codes


def test_schemathesis_sees_a_response_that_does_not_match_the_schema(
        tmp_path: Path) -> None:
    """The harness's checks work: with a schema that says a status term is a string,
    the real status documents fail."""
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["components"]["schemas"]["Status"]["properties"]["term"] = {"type": "string"}
    wrong = tmp_path / "openapi.yaml"
    wrong.write_text(yaml.safe_dump(schema))
    result = run_api(examples=3, derandomize=True, schema_path=wrong)
    assert result.failures > 0, result
    assert any("term" in detail for detail in result.failure_details), result.failure_details


class _Controller:
    """The API's Controller, recording what a move was asked with."""

    def __init__(self) -> None:
        self.commands: list[tuple[CommandKind, bool, int | None, str]] = []

    async def status(self) -> dict[str, Any]:
        return {}

    async def command(self, kind: CommandKind, force: bool, expected_term: int | None,
                      target: str = "") -> Outcome:
        self.commands.append((kind, force, expected_term, target))
        return Outcome(True, "done", "ACTIVE", 3)

    def ready(self) -> bool:
        return True


@pytest.mark.asyncio
async def test_null_expected_term_and_target_mean_absent_in_schema_and_server(
        tmp_path: Path) -> None:
    """Found by schemathesis (ST201, {"expected_term": null} accepted): the server takes
    null as "no check" / "no target", as the audit line writes an absent expected_term;
    the schema said integer / string only. The schema now says nullable, and this pins
    both sides."""
    bodies = yaml.safe_load(SCHEMA.read_text())["components"]["schemas"]
    for body, field in [("MoveBody", "expected_term"), ("SwitchoverBody", "expected_term"),
                        ("SwitchoverBody", "to"), ("MaintenanceBody", "expected_term")]:
        assert bodies[body]["properties"][field].get("nullable") is True, (body, field)
    token, line = new_token("alice", "operate")
    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    tokens.chmod(0o600)
    controller = _Controller()
    api = Api(controller, load_tokens(tokens), AuditLog(tmp_path / "audit.jsonl"))
    async with TestClient(TestServer(api.app(), host="127.0.0.1")) as client:
        auth = {"Authorization": f"Bearer {token}"}
        for path, body in [("/v1/promote", {"expected_term": None}),
                           ("/v1/switchover", {"expected_term": None, "to": None}),
                           ("/v1/maintenance", {"enabled": True, "expected_term": None})]:
            resp = await client.post(path, json=body, headers=auth)
            assert resp.status == 200, (path, await resp.text())
    assert [(c[2], c[3]) for c in controller.commands] == [(None, "")] * 3


def test_no_crash_file_left_in_the_corpus() -> None:
    """libFuzzer writes new inputs to the first corpus folder: run_atheris gives it a
    temporary one, so the committed seeds stay the captured ones."""
    names = [p.name for p in CORPUS.rglob("*") if p.is_file()]
    assert not [n for n in names if n.startswith(("crash-", "leak-", "timeout-"))], names
    assert all(n.endswith(".bin") or n == "lab.json" for n in names), names
