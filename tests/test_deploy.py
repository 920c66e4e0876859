"""The deployment kit: Kubernetes manifests valid against the schema, generated Envoy configs
that Envoy accepts and that match their generator, the image's install identical to CI's."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml

from walkrank.envoy import (
    EnvoySettings,
    active_admission,
    dump_config,
    find_envoy,
    main,
    render_config,
    render_dynamic,
    tenant_cluster,
)
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
    mount = tmp_path / "tenants"
    mount_config_map(mount, data, "2026_01_01_00_00_00.1")
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


def mount_config_map(mount: Path, data: dict[str, str], stamp: str) -> None:
    """Lay out or update a ConfigMap volume as the kubelet does: the files in a new timestamped
    directory, the `..data` link renamed onto the old one (the atomic swap a watcher sees),
    each file a symlink through `..data`."""
    (mount / f"..{stamp}").mkdir(parents=True)
    for name, text in data.items():
        (mount / f"..{stamp}" / name).write_text(text)
    (mount / "..data_tmp").symlink_to(f"..{stamp}")
    (mount / "..data_tmp").rename(mount / "..data")
    for name in data:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(Path("..data") / name)


def envoy_or_skip() -> Path:
    """The Envoy binary, or skip the test where none is installed or it does not run."""
    try:
        binary = find_envoy()
    except ConfigError as exc:
        pytest.skip(str(exc))
    if subprocess.run([str(binary), "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"{binary} does not run on this machine")
    return binary


def test_envoy_accepts_the_one_host_config(tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(dump_config(generate.ONE_HOST))
    result = subprocess.run(
        [str(envoy_or_skip()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_envoy_in_the_cluster_admits_each_tenant_and_follows_its_config_map(
    tmp_path: Path,
) -> None:
    """The generated ConfigMap, mounted as Kubernetes mounts it, runs in the real Envoy (only
    the pod's paths and ports changed to this machine's): every tenant has its cluster at its
    quota, and an updated ConfigMap changes a quota without a restart."""
    binary = envoy_or_skip()
    data = by_kind("ConfigMap", "walkrank-envoy")["data"]
    assert set(data) == {"envoy.yaml", "cds.yaml", "rds.yaml"}
    mount, admin = tmp_path / "etc-envoy", f"127.0.0.1:{free_port()}"
    bootstrap = yaml.safe_load(data["envoy.yaml"].replace("/etc/envoy", str(mount)))
    for section in (bootstrap["admin"], *bootstrap["static_resources"]["listeners"]):
        section["address"]["socket_address"] |= {"address": "127.0.0.1", "port_value": 0}
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = int(admin.split(":")[1])
    bootstrap["static_resources"]["clusters"][-1]["load_assignment"]["endpoints"][0][
        "lb_endpoints"
    ][0]["endpoint"]["address"]["socket_address"]["port_value"] = int(admin.split(":")[1])
    mount_config_map(mount, {**data, "envoy.yaml": yaml.safe_dump(bootstrap)}, "1")
    expected = {tenant_cluster(t): q for t, q in generate.IN_CLUSTER.tenant_quotas}
    assert expected[tenant_cluster("email")] == 4 * generate.MAX_REPLICAS
    log = (tmp_path / "envoy.log").open("w")
    command = [str(binary), "-c", str(mount / "envoy.yaml"), "--disable-hot-restart"]
    envoy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: active_admission(admin)[0] == expected, envoy, tmp_path)
        changed = dataclasses.replace(
            generate.IN_CLUSTER,
            tenant_quotas=tuple(
                (t, 1 if t == "email" else q) for t, q in generate.IN_CLUSTER.tenant_quotas
            ),
        )
        update = {
            name: yaml.safe_dump(document, sort_keys=False)
            for name, document in render_dynamic(changed).items()
        }
        mount_config_map(mount, {**data, "envoy.yaml": yaml.safe_dump(bootstrap), **update}, "2")
        wait_for(
            lambda: active_admission(admin)[0] == expected | {tenant_cluster("email"): 1},
            envoy,
            tmp_path,
        )
        assert envoy.poll() is None  # the same Envoy
    finally:
        envoy.terminate()
        envoy.wait(30)
        log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], envoy: subprocess.Popen, where: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and envoy.poll() is None:
        try:
            if condition():
                return
        except OSError:
            pass  # not answering yet
        time.sleep(0.1)
    pytest.fail(f"envoy (status {envoy.poll()}): {(where / 'envoy.log').read_text()[-2000:]}")


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
