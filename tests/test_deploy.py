"""The manifests under deploy/ are valid Kubernetes objects, offline.

* Every manifest file, and everything each kustomization renders to, is checked
  with kubernetes-validate (strict: unknown fields are errors) against the newest
  Kubernetes version it knows.
* NixImage objects have no schema there: the examples are checked against the
  CRD's own openAPIV3Schema (jsonschema) and CEL rules (cel-python), and against
  the registry's parser, which must agree with the schema.
* Kustomizations are rendered with `kubectl kustomize` when kubectl is installed.
* The pieces fit: names, labels, ports, permissions, and settings the registry
  accepts.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from nixery.config import load
from nixery.declarations import InvalidDeclaration, parse_declaration
from nixery.declarations.parsing import GROUP
from nixery.declarations.parsing import VERSION as API_VERSION
from nixery.http import health
from nixery.k8s.client import PLURAL
from nixery.k8s.watch import _STATUS_FIELDS as STATUS_FIELDS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
VERSION = latest_version()
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "components", "patches", "images", "labels", "namespace",
    "configMapGenerator", "secretGenerator", "generatorOptions", "replicas", "namePrefix", "nameSuffix",
}
KUSTOMIZE_DIRS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
OVERLAYS = sorted((DEPLOY / "overlays").iterdir())


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def is_nix_image(document: dict[str, Any]) -> bool:
    return document.get("kind") == "NixImage"


def strict_validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, VERSION, strict=True)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (for kustomize)")


def crd() -> dict[str, Any]:
    (document,) = documents(DEPLOY / "base" / "crd.yaml")
    return document


def crd_schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


# ---- every file, strictly -----------------------------------------------


def test_a_current_kubernetes_version_is_used() -> None:
    major, minor = (int(n) for n in VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates_strictly(path: Path) -> None:
    found = documents(path)
    assert found, f"{path} holds no objects"
    for document in found:
        if is_nix_image(document):
            continue  # no built-in schema: checked against the CRD below
        strict_validate(document)


def test_strict_validation_is_not_vacuous() -> None:
    (deployment,) = documents(DEPLOY / "replicated" / "deployment.yaml")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        strict_validate(broken)
    wrong = copy.deepcopy(crd())
    wrong["spec"]["versions"][0]["subresources"] = {"status": {}, "stats": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        strict_validate(wrong)


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_files(directory: Path) -> None:
    (kustomization,) = documents(directory / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= KUSTOMIZATION_KEYS, set(kustomization) - KUSTOMIZATION_KEYS
    for resource in kustomization.get("resources", []):
        target = directory / resource
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{directory}: {resource} is missing"
    for image in kustomization.get("images", []):
        assert image["name"] == "REGISTRY/nixery"


def test_every_manifest_is_used_by_a_kustomization() -> None:
    used = set()
    for directory in KUSTOMIZE_DIRS:
        (kustomization,) = documents(directory / "kustomization.yaml")
        used |= {(directory / r).resolve() for r in kustomization.get("resources", [])}
    unused = [p for p in manifest_files() if p.resolve() not in used and p.parent.name != "examples"]
    assert unused == []


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_rendered_kustomization_validates_strictly(directory: Path) -> None:
    rendered = kustomize(directory)
    kinds = {d["kind"] for d in rendered}
    assert {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} <= kinds
    for document in rendered:
        strict_validate(document)


# ---- how the pieces fit --------------------------------------------------


def rendered_or_files(directory: Path, layers: list[Path]) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        return kustomize(directory)
    return [d for layer in layers for p in sorted(layer.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in documents(p)]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_workloads_fit_together(overlay: Path) -> None:
    layers = [DEPLOY / "base", DEPLOY / "replicated", overlay] if overlay.name != "node-local" else [
        DEPLOY / "base", overlay]
    objects = rendered_or_files(overlay, layers)
    workloads = by_kind(objects, "Deployment") + by_kind(objects, "DaemonSet")
    assert len(workloads) == 1
    (workload,) = workloads
    pod = workload["spec"]["template"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (account,) = by_kind(objects, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "REGISTRY/nixery:0.1.0"
    assert all(c["image"] == container["image"] for c in pod["spec"].get("initContainers", []))
    assert container["command"] == ["nixery", "serve"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/v2/"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # fails while storage is unreachable
    assert container["readinessProbe"]["timeoutSeconds"] > health.ANSWER_WITHIN
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    nix = volumes[mounts["/nix"]]
    if workload["kind"] == "DaemonSet":
        assert nix["hostPath"]["type"] == "DirectoryOrCreate" and pod["spec"]["hostNetwork"] is True
        assert {"name": "NIXERY_HOST", "value": "127.0.0.1"} in container["env"]
        assert not by_kind(objects, "Service")
    else:
        assert "emptyDir" in nix
        (service,) = by_kind(objects, "Service")
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        port_names = {p["name"] for p in container["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
        assert workload["spec"]["replicas"] >= 2
        # Behind a Service: serve on while its endpoints drop the pod, and be given the time for it.
        given = {e["name"]: e["value"] for e in container["env"]}
        for config_map in by_kind(objects, "ConfigMap"):
            given.update(config_map.get("data") or {})
        timing = ("NIXERY_SHUTDOWN_DELAY", "NIXERY_SHUTDOWN_GRACE")
        settings = load({name: given[name] for name in timing if name in given})
        assert settings.shutdown_delay >= 3
        # The registry exits within the delay, the grace and 2 s (docs/deployment.md): never killed before.
        assert pod["spec"]["terminationGracePeriodSeconds"] >= settings.shutdown_delay + settings.shutdown_grace + 2
        env_from = [e.get("configMapRef", e.get("secretRef"))["name"] for e in container["envFrom"]]
        assert {"nixery-config", "nixery-storage"} <= set(env_from)
    # the seed script the init container runs is in the ConfigMap it mounts
    (init,) = pod["spec"]["initContainers"]
    script = Path(init["command"][1])
    mount = next(m for m in init["volumeMounts"] if script.is_relative_to(m["mountPath"]))
    config_map = volumes[mount["name"]]["configMap"]["name"]
    (seed,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == config_map]
    compile(seed["data"][script.name], script.name, "exec")


def test_rbac_grants_what_the_watch_uses() -> None:
    objects = documents(DEPLOY / "base" / "rbac.yaml")
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    role = next(o for o in by_kind(objects, "ClusterRole") if o["metadata"]["name"] == binding["roleRef"]["name"])
    granted = {(resource, verb) for rule in role["rules"] if rule["apiGroups"] == [GROUP]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {(PLURAL, "list"), (PLURAL, "watch"), (f"{PLURAL}/status", "patch")} <= granted
    assert not any(verb in ("create", "delete", "update") for _, verb in granted)
    (account,) = documents(DEPLOY / "base" / "serviceaccount.yaml")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]


def test_crd_matches_what_the_registry_watches() -> None:
    document = crd()
    spec = document["spec"]
    assert spec["group"] == GROUP and spec["names"]["plural"] == PLURAL
    assert spec["names"]["kind"] == "NixImage" and spec["scope"] == "Cluster"
    assert document["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    (version,) = spec["versions"]
    assert version["name"] == API_VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    status = crd_schema()["properties"]["status"]["properties"]
    assert {"digest", "error", "phase", "observedGeneration"} <= set(status)
    assert set(STATUS_FIELDS) <= set(status)  # everything the registry writes has a place
    data = crd_schema()["properties"]["data"]
    assert data["required"] == ["tag", "contents"]


@pytest.mark.parametrize("overlay", ["s3", "gcs"])
def test_config_maps_hold_settings_the_registry_accepts(overlay: str, tmp_path: Path) -> None:
    env: dict[str, str] = {}
    for path in (DEPLOY / "base" / "configmap.yaml", DEPLOY / "overlays" / overlay / "storage.yaml",
                 DEPLOY / "overlays" / overlay / "secret.example.yaml"):
        for document in documents(path):
            if document["kind"] == "ConfigMap" or (document["kind"] == "Secret" and "GOOGLE" not in str(document)):
                env.update(document.get("data") or document.get("stringData") or {})
    kubeconfig = tmp_path / "kubeconfig"  # stands in for the pod's service account
    kubeconfig.write_text("{}")
    settings = load({**env, "KUBECONFIG": str(kubeconfig)})
    assert settings.host == "0.0.0.0" and settings.port == 8080
    assert settings.storage_backend == overlay and settings.k8s_watch and settings.prebuild
    assert settings.channel == "nixos-unstable"


# ---- NixImage examples against the CRD ----------------------------------


def nix_image_examples() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in documents(p) if is_nix_image(d)]


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def cel_rules() -> list[tuple[list[str], str, str]]:
    """(path from the root, rule, message) for every x-kubernetes-validations rule."""
    found = []

    def walk(schema: dict[str, Any], path: list[str]) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            found.append((path, rule["rule"], rule["message"]))
        for name, child in (schema.get("properties") or {}).items():
            walk(child, [*path, name])

    walk(crd_schema(), [])
    return found


def cel_errors(document: dict[str, Any]) -> list[str]:
    celpy = pytest.importorskip("celpy")
    environment = celpy.Environment()
    errors = []
    for path, rule, message in cel_rules():
        value: Any = document
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if value is None:
            continue
        program = environment.program(environment.compile(rule))
        try:
            passed = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:  # a rule that fails on a value rejects it, as the API server does
            passed = False
        if isinstance(passed, celpy.CELEvalError) or not passed:
            errors.append(message)
    return errors


def test_examples_exist_and_follow_the_seed() -> None:
    examples = nix_image_examples()
    assert examples
    seed = next(e for e in examples if e["metadata"]["name"] == "curl-and-jq")
    assert seed["data"] == {"tag": "v1", "contents": ["curl", "jq", "bash"]}


@pytest.mark.parametrize("example", nix_image_examples(), ids=lambda e: e["metadata"]["name"])
def test_examples_validate_against_the_crd_schema(example: dict[str, Any]) -> None:
    assert schema_errors(example) == []
    assert cel_errors(example) == []
    declaration = parse_declaration(example, origin="example")
    assert declaration.name == example["metadata"]["name"]


def _image(**data: Any) -> dict[str, Any]:
    return {"apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImage", "metadata": {"name": "x"},
            "data": {"tag": "v1", "contents": ["hello"], **data}}


SCHEMA_CASES = {
    "valid": _image(),
    "valid-arm": _image(arch="arm64", contents=["shell", "tools.jqlite", "g++"], tag="release-2024.01_x"),
    "slash-in-tag": _image(tag="release/2024"),  # a git branch's name, but no client could pull it
    "valid-platforms": _image(arch=["amd64", "arm64"]),
    "valid-one-platform-list": _image(arch=["arm64"]),
    "valid-config": _image(
        user="app", workingDir="/srv/app", env=["A=1", "B_2=x=y"], entrypoint=["/bin/app", "--serve"],
        cmd=["--port", "8080"], exposedPorts=[8080, "53/udp", "9000/sctp", "65535"],
        labels={"org.opencontainers.image.source": "https://example.com"},
    ),
    "empty-arch-list": _image(arch=[]),
    "bad-arch-in-list": _image(arch=["amd64", "x86_64"]),
    "nested-arch-list": _image(arch=[["amd64"]]),
    "number-arch": _image(arch=64),
    "root-user": _image(user="root"),
    "bad-user": _image(user="App"),
    "long-user": _image(user="a" * 33),
    "relative-working-dir": _image(workingDir="srv"),
    "bad-env": _image(env=["NOEQUALS"]),
    "env-not-list": _image(env="A=1"),
    "empty-env": _image(env=[]),
    "entrypoint-string": _image(entrypoint="/bin/sh -c"),
    "empty-cmd": _image(cmd=[]),
    "cmd-number": _image(cmd=["echo", 1]),
    "port-zero": _image(exposedPorts=[0]),
    "port-too-high": _image(exposedPorts=["65536"]),
    "port-leading-zero": _image(exposedPorts=["080"]),
    "port-protocol": _image(exposedPorts=["80/http"]),
    "label-number": _image(labels={"a": 1}),
    "label-reserved": _image(labels={"org.nixos.nixery.packages": "x"}),
    "empty-labels": _image(labels={}),
    "missing-tag": {**_image(), "data": {"contents": ["hello"]}},
    "missing-contents": {**_image(), "data": {"tag": "v1"}},
    "missing-data": {k: v for k, v in _image().items() if k != "data"},
    "empty-contents": _image(contents=[]),
    "bad-package": _image(contents=["hello world"]),
    "dotdot-package": _image(contents=["a..b"]),
    "slash-package": _image(contents=["a/b"]),
    "arm64-package": _image(contents=["arm64", "hello"]),
    "bad-arch": _image(arch="x86_64"),
    "bad-tag": _image(tag="-v1"),
    "dotdot-tag": _image(tag="a..b"),
    "lock-tag": _image(tag="v1.lock"),
    "long-tag": _image(tag="t" * 129),
    "too-many": _image(contents=[f"p{n}" for n in range(101)]),
    "arm64-name": {**_image(), "metadata": {"name": "arm64"}},
    "long-name": {**_image(), "metadata": {"name": "n" * 129}},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_and_registry_agree(case: str) -> None:
    """What the API server would accept (schema and CEL rules), the registry serves, and the other way round."""
    document = SCHEMA_CASES[case]
    accepted_by_api = not schema_errors(document) and not cel_errors(document)
    try:
        parse_declaration(document, origin="case")
        accepted_by_registry = True
    except InvalidDeclaration:
        accepted_by_registry = False
    assert accepted_by_api == accepted_by_registry == case.startswith("valid")


@needs_kubectl
def test_image_is_overridable_with_kustomize_images(tmp_path: Path) -> None:
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "s3", overlay)],
        "images": [{"name": "REGISTRY/nixery", "newName": "registry.example.com/nixery", "newTag": "1.2.3"}],
    }))
    (deployment,) = by_kind(kustomize(overlay), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {"registry.example.com/nixery:1.2.3"}
