"""The witness's YAML config (`vipd witness --config FILE`), validated like a pair's
config (vipd/config.py: unknown keys are errors, every problem at once as
``FILE: key.path: message``), and the key rings of its clusters."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from vipd.config import _Model, load_model
from vipd.configtypes import ConfigPath, Endpoint, Name, PositiveDuration, Problems, SecretPath
from vipd.core.protocol import KeyRing
from vipd.core.witness import ClusterSpec
from vipd.errors import ConfigError
from vipd.keys import load_keys

DEFAULT_PORT = 5406


class WitnessCluster(_Model):
    key_file: SecretPath  # a path, or credential:NAME (vipd/credentials.py)
    nodes: list[Name]

    @field_validator("nodes")
    @classmethod
    def _unique_nodes(cls, nodes: list[str]) -> list[str]:
        if not nodes:
            raise ValueError("expected the cluster's node names, like [vm-a, vm-b]")
        first: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, node in enumerate(nodes):
            if node in first:
                problems.append(((i,), f"node {node!r} is listed twice (also nodes"
                                       f"[{first[node]}])"))
            first.setdefault(node, i)
        if problems:
            raise Problems(problems)
        return nodes


class WitnessMetricsConfig(_Model):
    listen: Endpoint | None = Endpoint.parse("127.0.0.1:9442")  # None: no HTTP endpoint
    web_config_file: ConfigPath | None = None  # TLS and basic auth (vipd/webconfig.py)


class WitnessConfig(_Model):
    name: Name  # this witness's node name in its replies; no cluster may use it for a node
    listen: Endpoint = Endpoint.parse(f"0.0.0.0:{DEFAULT_PORT}")
    # Requests whose send time differs more from our clock, and that do not echo a recent
    # reply of ours, are refused as stale (docs/protocol.md).
    max_clock_skew: PositiveDuration = 1.0
    metrics: WitnessMetricsConfig = Field(default_factory=WitnessMetricsConfig)
    clusters: dict[Name, WitnessCluster]

    @field_validator("clusters")
    @classmethod
    def _some_cluster(cls, clusters: dict[str, WitnessCluster]) -> dict[str, WitnessCluster]:
        if not clusters:
            raise ValueError("expected at least one cluster, like "
                             "{web: {key_file: /etc/vipd/web.key, nodes: [vm-a, vm-b]}}")
        return clusters

    @model_validator(mode="after")
    def _name_is_not_a_node(self) -> WitnessConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = [
            (("clusters", cluster, "nodes", i),
             f"{node!r} is this witness's own name (key 'name'); nodes and the witness "
             f"need distinct names")
            for cluster, spec in self.clusters.items()
            for i, node in enumerate(spec.nodes) if node == self.name]
        if problems:
            raise Problems(problems)
        return self


def load_witness_config(path: str | Path) -> WitnessConfig:
    """Read and validate the witness config. Raises ConfigError listing every problem."""
    return load_model(path, WitnessConfig)


def cluster_specs(config: WitnessConfig) -> dict[str, ClusterSpec]:
    """Each cluster's key ring (read from its key file now) and nodes. Raises ConfigError
    naming the key file of the first cluster whose keys cannot be loaded."""
    specs: dict[str, ClusterSpec] = {}
    for name, cluster in config.clusters.items():
        keys = load_keys(cluster.key_file)
        try:
            ring = KeyRing(keys)
        except ValueError as exc:  # load_keys already checks what KeyRing does
            raise ConfigError(str(cluster.key_file), [("", str(exc))]) from exc
        specs[name] = ClusterSpec(ring, frozenset(cluster.nodes))
    return specs
