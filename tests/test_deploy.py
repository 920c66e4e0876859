"""The deployment kit: Kubernetes manifests valid against the schema, generated Envoy configs
that Envoy accepts and that match their generator, the image's install identical to CI's."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml

from walkrank.envoy import EnvoySettings, dump_config, find_envoy, main, render_config
from walkrank.errors import ConfigError
from walkrank.serving.config import load_server_config
from walkrank.tenants import load_tenants


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
generate = load_module(K8S / "generate.py")
# The oldest Kubernetes the manifests are written for (native gRPC probes are GA from 1.27)
# and the newest schema the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def manifests() -> list[tuple[str, dict]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            documents.append((f"{path.name}#{index}", document))
    return documents


def by_kind(kind: str, name: str) -> dict:
    [found] = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schema(version: str) -> None:
    documents = manifests()
    assert {d["kind"] for _, d in documents} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    # Store credentials are a Secret the operator creates, never a manifest in git.
    assert "Secret" not in {d["kind"] for _, d in documents}
    for where, document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_replicas_are_probed_over_grpc_health_and_run_as_non_root() -> None:
    pod = by_kind("Deployment", "walkrank")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--drain-seconds" in container["args"]
    headless = by_kind("Service", "walkrank-replicas")
    assert headless["spec"]["clusterIP"] == "None"


def test_the_tenants_config_map_loads_as_kubernetes_mounts_it(tmp_path: Path) -> None:
    data = by_kind("ConfigMap", "walkrank-tenants")["data"]
    # A ConfigMap volume: the files are symlinks through ..data into a timestamped directory.
    mount = tmp_path / "tenants"
    (mount / "..2026_01_01_00_00_00.1").mkdir(parents=True)
    for name, text in data.items():
        (mount / "..2026_01_01_00_00_00.1" / name).write_text(text)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to("..2026_01_01_00_00_00.1")
    loaded = load_tenants(mount)
    assert not loaded.errors, loaded.errors
    assert len(loaded.configs) == len(data)


def test_the_server_config_map_parses(tmp_path: Path) -> None:
    text = by_kind("ConfigMap", "walkrank-config")["data"]["walkrank.yaml"]
    (tmp_path / "walkrank.yaml").write_text(text)
    config = load_server_config(tmp_path / "walkrank.yaml")
    assert config.address == "0.0.0.0:50051"
    assert str(config.tenants_dir) == "/etc/walkrank/tenants"


def test_pods_keep_graphs_models_and_logs_in_the_object_store() -> None:
    """No shared volume: the store URIs in walkrank.yaml, local copies in an emptyDir at
    cache_dir, credentials from the Secret through the environment."""
    raw = yaml.safe_load(by_kind("ConfigMap", "walkrank-config")["data"]["walkrank.yaml"])
    assert all(raw[key].startswith("s3://") for key in ("graph", "models_dir", "logs_dir"))
    pod = by_kind("Deployment", "walkrank")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[raw["cache_dir"]]]
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    assert all(ref["name"] == "walkrank-s3" for ref in secrets.values())
    assert not any("AWS" in e["name"] and "value" in e for e in container["env"])


def test_generated_files_are_up_to_date() -> None:
    for path, render in generate.GENERATED.items():
        assert path.read_text() == render(), f"{path}: run .venv/bin/python deploy/k8s/generate.py"


@pytest.mark.parametrize(
    "settings", [generate.ONE_HOST, generate.IN_CLUSTER], ids=["one-host", "in-cluster"]
)
def test_envoy_accepts_the_generated_configs(settings: EnvoySettings, tmp_path: Path) -> None:
    try:
        envoy = find_envoy()
    except ConfigError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "envoy.yaml"
    path.write_text(dump_config(settings))
    result = subprocess.run(
        [
            str(envoy),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_envoy_config_keeps_admin_on_loopback_and_retries_safe_failures_only() -> None:
    config = render_config(generate.ONE_HOST)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert set(route["retry_policy"]["retry_on"].split(",")) == {
        "connect-failure",
        "refused-stream",
        "reset-before-request",
    }
    with pytest.raises(ConfigError, match="loopback"):
        render_config(
            EnvoySettings(listen="0.0.0.0:1", upstreams=("127.0.0.1:2",), admin="0.0.0.0:9901")
        )
    with pytest.raises(ConfigError, match="upstream"):
        render_config(EnvoySettings(listen="0.0.0.0:1", upstreams=()))


def test_envoy_command_line_names_a_bad_address(capsys) -> None:
    assert main(["--listen", "127.0.0.1:1", "--upstream", "nowhere"]) == 2
    assert "upstream: expected host:port, got 'nowhere'" in capsys.readouterr().err


def _pip_steps(lines: list[str]) -> list[str]:
    """The pip install commands, with the tool's path and --quiet taken out."""
    steps = []
    for line in lines:
        match = re.search(r"python -m pip install (.*)$", line.strip())
        if match:
            steps.append(" ".join(a for a in match.group(1).split() if a != "--quiet"))
    return steps


def test_the_image_installs_exactly_as_the_readme_setup_and_ci() -> None:
    makefile = (REPO / "Makefile").read_text().replace("$(LOCK)", "requirements.lock")
    dockerfile = (REPO / "Dockerfile").read_text()
    setup = _pip_steps(
        makefile.split("\n\n")[
            [i for i, block in enumerate(makefile.split("\n\n")) if block.startswith("$(STAMP):")][
                0
            ]
        ].splitlines()
    )
    image = _pip_steps([line for line in dockerfile.splitlines() if line.startswith("RUN ")])
    assert setup == ["-r requirements.lock", "--no-deps -e ./client -e . -e ./load_tests"]
    # The image serves: the client (the stubs) and the server, not the load-test kit.
    assert image == ["-r requirements.lock", "--no-deps -e ./client -e ."]
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert dockerfile.count("\nFROM ") + dockerfile.startswith("FROM ") >= 2  # multi-stage
