"""The Kubernetes deployment in deploy/: schema-valid, consistent, and safe.

Every core object is validated (strict: unknown fields are errors) against the Kubernetes
OpenAPI-derived JSON schemas bundled in the ``kubernetes-validate`` package, for the versions
in ``K8S_VERSIONS``; no network is used (``test_schema_validation_needs_no_network`` proves
it). CRD-backed kinds (VolumeSnapshotClass, VolumeSnapshot, KubeVirt's VirtualMachine) have no
schema there: their required fields are checked structurally below instead, and
``test_crd_kinds_have_no_core_schema`` makes sure nothing else escapes schema validation.

The rest pins the safety properties the deployment exists for: Bidirectional propagation only
on the kubelet and attach-state mounts of the privileged node plugin, host /dev mounted whole
(never a subPath, never Bidirectional), registration and socket paths that agree with the
driver name and the plugin's --endpoint, the managed IQN prefix, least-privilege RBAC, pinned
images, and command lines that the real ``blockyard`` parser accepts.
"""

from __future__ import annotations

import argparse
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from blockyard import tls
from blockyard.attach.initiator.api import ManagedPrefix
from blockyard.attach.state import DEFAULT_STATE_ROOT
from blockyard.cli.main import build_parser
from blockyard.server.manager import DEFAULT_IQN_PREFIX

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
DOCKERFILE = DEPLOY / "Dockerfile"

DRIVER = "block.blockyard.io"
NAMESPACE = "blockyard-system"
#: The Secret every StorageClass names for CHAP (docs/kubernetes.md says how to create it).
CHAP_SECRET = "blockyard-chap"
KUBELET_DIR = "/var/lib/kubelet"
BLOCKYARD_IMAGE = "ghcr.io/blockyard/blockyard"
#: Kubernetes releases whose schemas every core object must satisfy (both ship with
#: kubernetes-validate >= 1.37, see pyproject.toml).
K8S_VERSIONS = ("1.34", "1.37")
#: Kinds defined by CRDs, which kubernetes-validate has no schema for.
CRD_KINDS = frozenset({"VolumeSnapshotClass", "VolumeSnapshot", "VirtualMachine"})
#: Sidecar images and the versions documented in the manifests' header comments.
SIDECARS = {
    "csi-provisioner": "v6.4.0",
    "csi-attacher": "v4.13.0",
    "csi-resizer": "v2.3.0",
    "csi-snapshotter": "v8.7.0",
    "livenessprobe": "v2.20.0",
    "csi-node-driver-registrar": "v2.18.0",
}
#: The ``blockyard csi`` flags (the CSI entry point's documented command line), used while
#: the ``csi`` verb is not registered yet; once it is, the real parser is used instead.
CSI_FLAGS = {
    "--endpoint",
    "--mode",
    "--backend",
    "--node-id",
    "--kubelet-dir",
    "--managed-prefix",
    "--metrics-listen",
    "--state-dir",
}
CSI_REQUIRED_FLAGS = {"--endpoint", "--mode", "--backend", "--node-id"}


# --------------------------------------------------------------------------------------------
# Loading


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml") + sorted(
        EXAMPLES.glob("*.yaml")
    )


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, doc) for p in manifest_files() for doc in load_docs(p)]


def deploy_objects() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/` creates (examples excluded)."""
    return [doc for p in sorted(DEPLOY.glob("*.yaml")) for doc in load_docs(p) if "kind" in doc]


def example_objects() -> list[dict[str, Any]]:
    return [doc for p in sorted(EXAMPLES.glob("*.yaml")) for doc in load_docs(p)]


def obj_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def find(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pool = deploy_objects() if objects is None else objects
    hits = [o for o in pool if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Pod":
        return workload["spec"]
    return workload["spec"]["template"]["spec"]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in {"Pod", "Deployment", "DaemonSet", "StatefulSet"}:
            yield f"{o['kind']}/{o['metadata']['name']}", pod_spec(o)


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [c for c in containers(spec) if c["name"] == name]
    assert len(hits) == 1, f"no single container {name!r}"
    return hits[0]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def has_flag(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(hits) == 1, f"no single volume {name!r}"
    return hits[0]


def mount_for(c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount of container ``c`` whose mountPath holds ``path`` (deepest wins)."""
    target = PurePosixPath(path)
    best: dict[str, Any] | None = None
    for m in c.get("volumeMounts", []):
        mp = PurePosixPath(m["mountPath"])
        if (target == mp or mp in target.parents) and (
            best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = m
    assert best is not None, f"{c['name']}: nothing is mounted over {path}"
    return best


def resolve(spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume name, path inside that volume) of ``path`` as container ``c`` sees it."""
    m = mount_for(c, path)
    assert not m.get("subPath"), f"{c['name']}: {m['mountPath']} uses a subPath"
    rel = PurePosixPath(path).relative_to(PurePosixPath(m["mountPath"]))
    return m["name"], str(rel)


def unix_path(endpoint: str) -> str:
    assert endpoint.startswith("unix:///"), f"endpoint {endpoint!r} is not unix:///PATH"
    return endpoint[len("unix://") :]


def expand_env(arg: str, c: dict[str, Any]) -> str:
    """Replace ``$(VAR)`` like kubelet does; every referenced variable must be defined."""
    defined = {e["name"] for e in c.get("env", [])}

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in defined, f"{c['name']}: $({m.group(1)}) is not defined in env"
        return "10.0.0.7" if m.group(1).endswith("_IP") else f"value-of-{m.group(1).lower()}"

    return re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", sub, arg)


def controller_spec() -> dict[str, Any]:
    return pod_spec(find("Deployment", "blockyard-csi-controller"))


def node_spec() -> dict[str, Any]:
    return pod_spec(find("DaemonSet", "blockyard-csi-node"))


def server_spec() -> dict[str, Any]:
    return pod_spec(find("DaemonSet", "blockyard-volume-server"))


def master_spec() -> dict[str, Any]:
    return pod_spec(find("StatefulSet", "blockyard-master"))


def image_name(image: str) -> str:
    return image.split("@", 1)[0].rsplit(":", 1)[0]


def image_tag(image: str) -> str:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


# --------------------------------------------------------------------------------------------
# Parsing and schema validation


def test_every_manifest_parses_into_named_objects() -> None:
    files = manifest_files()
    names = {p.name for p in files}
    assert {
        "namespace.yaml",
        "csidriver.yaml",
        "rbac.yaml",
        "volume-server.yaml",
        "controller.yaml",
        "node.yaml",
        "storageclasses.yaml",
        "volumesnapshotclass.yaml",
        "ext4-pvc-pod.yaml",
        "block-pvc-pod.yaml",
        "kubevirt-vm-rwx-block.yaml",
        "snapshot-restore.yaml",
    } <= names
    seen: set[tuple[str, str, str]] = set()
    for fname, doc in all_objects():
        assert isinstance(doc.get("apiVersion"), str), fname
        assert isinstance(doc.get("kind"), str), fname
        assert doc["metadata"]["name"], fname
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in seen, f"{fname}: duplicate {key}"
        seen.add(key)
    assert len(seen) >= 30


def test_kustomization_lists_every_deploy_file() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk
    assert not any(r.startswith("examples") for r in kust["resources"])
    images = {i["name"]: i for i in kust["images"]}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images[BLOCKYARD_IMAGE]["newTag"] == version


def test_validated_kubernetes_versions_ship_with_kubernetes_validate() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(K8S_VERSIONS) <= shipped


CORE_OBJECTS = [item for item in all_objects() if item[1]["kind"] not in CRD_KINDS]


@pytest.mark.parametrize("item", CORE_OBJECTS, ids=[obj_id(i) for i in CORE_OBJECTS])
def test_core_object_validates_against_kubernetes_schemas(
    item: tuple[str, dict[str, Any]],
) -> None:
    _, doc = item
    for version in K8S_VERSIONS:
        # Raises ValidationError (unknown field in strict mode, wrong type, missing required
        # field) or SchemaNotFoundError (a kind this Kubernetes version does not serve).
        assert kubernetes_validate.validate(doc, version, strict=True) == version


def test_strict_validation_rejects_what_it_should() -> None:
    """The validator is not a rubber stamp: typos and missing fields fail."""
    ds = find("DaemonSet", "blockyard-csi-node")
    assert kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)

    typo = yaml.safe_load(yaml.safe_dump(ds))
    m = mount_for(container(pod_spec(typo), "blockyard-csi"), KUBELET_DIR)
    m["mountPropogation"] = m.pop("mountPropagation")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)

    nameless = yaml.safe_load(yaml.safe_dump(ds))
    del pod_spec(nameless)["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(nameless, K8S_VERSIONS[0], strict=True)


def test_crd_kinds_have_no_core_schema() -> None:
    kinds = {doc["kind"] for _, doc in all_objects()}
    assert kinds & CRD_KINDS == CRD_KINDS, "every CRD kind is exercised by some manifest"
    for _, doc in all_objects():
        if doc["kind"] in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_schema_validation_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("schema validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for _, doc in CORE_OBJECTS[:5]:
        assert kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------------------
# CRD-backed kinds, checked structurally


def test_volumesnapshotclass_structure() -> None:
    vsc = find("VolumeSnapshotClass", "blockyard-snapshot")
    assert vsc["apiVersion"] == "snapshot.storage.k8s.io/v1"
    assert vsc["driver"] == DRIVER
    assert vsc["deletionPolicy"] in {"Delete", "Retain"}
    assert "namespace" not in vsc["metadata"], "VolumeSnapshotClass is cluster-scoped"
    assert set(vsc) <= {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}


def test_volumesnapshot_and_restore_structure() -> None:
    examples = example_objects()
    snaps = [o for o in examples if o["kind"] == "VolumeSnapshot"]
    assert snaps
    classes = {
        o["metadata"]["name"] for o in deploy_objects() if o["kind"] == "VolumeSnapshotClass"
    }
    pvcs = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for o in examples
        if o["kind"] == "PersistentVolumeClaim"
    }
    for snap in snaps:
        assert snap["apiVersion"] == "snapshot.storage.k8s.io/v1"
        ns = snap["metadata"]["namespace"]
        source = snap["spec"]["source"]
        # Exactly one of the two source fields (the CRD's oneOf).
        assert len(set(source) & {"persistentVolumeClaimName", "volumeSnapshotContentName"}) == 1
        assert set(source) <= {"persistentVolumeClaimName", "volumeSnapshotContentName"}
        assert snap["spec"]["volumeSnapshotClassName"] in classes
        assert (ns, source["persistentVolumeClaimName"]) in pvcs
        restored = [
            p
            for p in pvcs.values()
            if p["spec"].get("dataSource", {}).get("name") == snap["metadata"]["name"]
        ]
        assert restored, "a claim is restored from the snapshot"
        for pvc in restored:
            ds = pvc["spec"]["dataSource"]
            assert ds["kind"] == "VolumeSnapshot"
            assert ds["apiGroup"] == "snapshot.storage.k8s.io"
            source_pvc = pvcs[(ns, source["persistentVolumeClaimName"])]
            assert pvc["spec"]["storageClassName"] == source_pvc["spec"]["storageClassName"]
            assert pvc["spec"]["volumeMode"] == source_pvc["spec"]["volumeMode"]


def test_kubevirt_vm_structure_allows_live_migration() -> None:
    examples = example_objects()
    vm = find("VirtualMachine", "blockyard-vm", examples)
    assert vm["apiVersion"] == "kubevirt.io/v1"
    spec = vm["spec"]
    assert spec.get("runStrategy") in {"Always", "RerunOnFailure", "Manual", "Halted"}
    assert "running" not in spec, "runStrategy and the deprecated running are exclusive"
    tmpl = spec["template"]["spec"]
    assert tmpl["evictionStrategy"] == "LiveMigrate"
    disks = {d["name"]: d for d in tmpl["domain"]["devices"]["disks"]}
    volumes = {v["name"]: v for v in tmpl["volumes"]}
    assert set(disks) == set(volumes), "every disk has a volume and every volume a disk"
    # Pod networking that KubeVirt can migrate: masquerade, not bridge.
    for iface in tmpl["domain"]["devices"]["interfaces"]:
        assert "masquerade" in iface
    assert {n["name"] for n in tmpl["networks"]} == {
        i["name"] for i in tmpl["domain"]["devices"]["interfaces"]
    }
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    ]
    assert claims
    for claim in claims:
        pvc = find("PersistentVolumeClaim", claim, examples)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["spec"]["volumeMode"] == "Block"
        assert pvc["spec"]["storageClassName"] == "blockyard-block"
    for v in volumes.values():
        if "containerDisk" in v:
            assert image_tag(v["containerDisk"]["image"]) not in {"", "latest"}


# --------------------------------------------------------------------------------------------
# CSIDriver, StorageClasses, examples


def test_csidriver_fields() -> None:
    spec = find("CSIDriver", DRIVER)["spec"]
    assert spec["attachRequired"] is True
    assert spec["podInfoOnMount"] is False
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["fsGroupPolicy"] == "File"
    assert spec["requiresRepublish"] is False
    assert spec["storageCapacity"] is False


def test_storage_classes() -> None:
    classes = {o["metadata"]["name"]: o for o in deploy_objects() if o["kind"] == "StorageClass"}
    assert set(classes) == {"blockyard-ext4", "blockyard-xfs", "blockyard-block"}
    fstypes = {"blockyard-ext4": "ext4", "blockyard-xfs": "xfs", "blockyard-block": None}
    for name, sc in classes.items():
        assert sc["provisioner"] == DRIVER
        assert sc["allowVolumeExpansion"] is True
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["reclaimPolicy"] == "Delete"
        params = sc.get("parameters", {})
        # external-provisioner refuses a class with both the prefixed and the legacy key.
        assert not ("fsType" in params and "csi.storage.k8s.io/fstype" in params)
        assert params.get("csi.storage.k8s.io/fstype", params.get("fsType")) == fstypes[name]


def test_storage_class_parameters_are_accepted_by_the_driver() -> None:
    """What the provisioner passes to CreateVolume is what the driver's own check accepts.

    external-provisioner removes the csi.storage.k8s.io/ keys of a class (fstype goes into
    the volume capability) and, with --extra-create-metadata, adds PVC/PV name keys."""
    params_mod = pytest.importorskip("blockyard.csi.params")
    provisioner = container(controller_spec(), "csi-provisioner")
    extra = {}
    if has_flag(provisioner["args"], "--extra-create-metadata"):
        extra = {
            "csi.storage.k8s.io/pvc/name": "claim",
            "csi.storage.k8s.io/pvc/namespace": "default",
            "csi.storage.k8s.io/pv/name": "pvc-1234",
        }
    backend = flag(container(controller_spec(), "blockyard-csi")["args"], "--backend") or ""
    replicated = backend.startswith("master://")
    for sc in (o for o in deploy_objects() if o["kind"] == "StorageClass"):
        params = {
            k: v
            for k, v in sc.get("parameters", {}).items()
            if not k.startswith("csi.storage.k8s.io/")
        }
        params_mod.parse_parameters("parameters", {**params, **extra}, replicated=replicated)
    # CreateSnapshot takes no parameters: none from the class, none from the sidecar.
    snapshotter = container(controller_spec(), "csi-snapshotter")
    assert not has_flag(snapshotter["args"], "--extra-create-metadata")
    for vsc in (o for o in deploy_objects() if o["kind"] == "VolumeSnapshotClass"):
        assert not vsc.get("parameters")


def test_examples_use_blockyard_classes_and_claims_exist() -> None:
    examples = example_objects()
    classes = {o["metadata"]["name"] for o in deploy_objects() if o["kind"] == "StorageClass"}
    claims = {o["metadata"]["name"]: o for o in examples if o["kind"] == "PersistentVolumeClaim"}
    assert claims
    for pvc in claims.values():
        assert pvc["spec"]["storageClassName"] in classes
    for where, spec in pod_specs(examples):
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
    ext4_pod = pod_spec(find("Pod", "blockyard-ext4-writer", examples))
    ext4_claim = volume(ext4_pod, "data")["persistentVolumeClaim"]["claimName"]
    assert claims[ext4_claim]["spec"]["storageClassName"] == "blockyard-ext4"
    assert ext4_pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    block_pod = pod_spec(find("Pod", "blockyard-block-user", examples))
    dev = block_pod["containers"][0]["volumeDevices"][0]
    assert "volumeMounts" not in block_pod["containers"][0]
    block_claim = volume(block_pod, dev["name"])["persistentVolumeClaim"]["claimName"]
    assert claims[block_claim]["spec"]["volumeMode"] == "Block"


# --------------------------------------------------------------------------------------------
# Node plugin safety


def test_node_plugin_kubelet_mount_is_bidirectional() -> None:
    spec = node_spec()
    plugin = container(spec, "blockyard-csi")
    assert plugin["securityContext"]["privileged"] is True
    m = mount_for(plugin, KUBELET_DIR)
    assert m["mountPath"] == KUBELET_DIR
    assert m["mountPropagation"] == "Bidirectional"
    assert volume(spec, m["name"])["hostPath"]["path"] == KUBELET_DIR
    assert flag(plugin["args"], "--kubelet-dir") == KUBELET_DIR


def test_bidirectional_propagation_only_in_privileged_node_plugin() -> None:
    for where, spec in pod_specs(deploy_objects() + example_objects()):
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    assert c.get("securityContext", {}).get("privileged") is True, where
                    assert where == "DaemonSet/blockyard-csi-node" and c["name"] == "blockyard-csi"
                    assert m["mountPath"] in {KUBELET_DIR, "/run/blockyard"}


def test_host_dev_is_never_mounted_by_subpath_or_bidirectionally() -> None:
    dev_seen = False
    for where, spec in pod_specs(deploy_objects() + example_objects()):
        host_paths = {
            v["name"]: v["hostPath"]["path"].rstrip("/") or "/"
            for v in spec.get("volumes", [])
            if "hostPath" in v
        }
        for name, path in host_paths.items():
            # Only /dev itself: never a device node or a subdirectory of it.
            assert not path.startswith("/dev/"), f"{where}: hostPath {path} ({name})"
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                if host_paths.get(m["name"]) == "/dev":
                    dev_seen = True
                    assert not m.get("subPath") and not m.get("subPathExpr"), where
                    assert m["mountPath"] == "/dev", where
                    assert m.get("mountPropagation", "None") == "None", where
                if PurePosixPath(m["mountPath"]) == PurePosixPath("/dev") or m[
                    "mountPath"
                ].startswith("/dev/"):
                    assert host_paths.get(m["name"]) == "/dev", f"{where}: {m}"
    assert dev_seen, "the node plugin mounts the host's /dev"


def test_node_host_mounts() -> None:
    spec = node_spec()
    plugin = container(spec, "blockyard-csi")

    def host(path: str) -> tuple[str, dict[str, Any]]:
        m = mount_for(plugin, path)
        assert m["mountPath"] == path
        return volume(spec, m["name"])["hostPath"]["path"], m

    assert host("/dev")[0] == "/dev"
    assert host("/sys")[0] == "/sys"
    path, m = host("/run/blockyard")
    assert path == "/run/blockyard"
    assert not m.get("readOnly")
    for ro in ("/etc/iscsi", "/lib/modules"):
        path, m = host(ro)
        assert path == ro
        assert m["readOnly"] is True
    # The attach layer's state root lives on the host, so a new container adopts the daemons.
    vol, rel = resolve(spec, plugin, DEFAULT_STATE_ROOT)
    assert volume(spec, vol)["hostPath"]["path"] == "/run/blockyard"
    assert rel == "attach"


def test_node_daemonset_scheduling_and_update() -> None:
    ds = find("DaemonSet", "blockyard-csi-node")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in spec["tolerations"]


def test_node_yaml_states_the_attach_daemon_requirement() -> None:
    text = (DEPLOY / "node.yaml").read_text()
    comments = " ".join(
        line.strip().lstrip("#").strip()
        for line in text.splitlines()
        if line.strip().startswith("#")
    )
    assert "a requirement the CSI node service must implement" in comments
    assert "cgroup" in comments
    assert "MUST start attach daemons outside this container's cgroup" in comments
    assert "systemd-run" in comments
    assert "nsenter" in comments


def test_host_network_ports_do_not_collide() -> None:
    for where, spec in pod_specs(deploy_objects()):
        if not spec.get("hostNetwork"):
            continue
        ports: list[int] = []
        for c in containers(spec):
            ports += [p["containerPort"] for p in c.get("ports", [])]
            for arg in c.get("args", []):
                m = re.match(r"--(?:health-port|http-endpoint|metrics-listen)=.*?:?(\d+)$", arg)
                if m:
                    ports.append(int(m.group(1)))
        declared = {
            p for c in containers(spec) for p in (q["containerPort"] for q in c.get("ports", []))
        }
        # Every listening port is declared once, and no two containers claim the same one.
        assert set(ports) == declared, where
        assert len(declared) == sum(len(c.get("ports", [])) for c in containers(spec)), where


# --------------------------------------------------------------------------------------------
# Sockets, registration and the plugin command lines


def test_registrar_path_matches_driver_name_and_plugin_socket() -> None:
    spec = node_spec()
    plugin = container(spec, "blockyard-csi")
    registrar = container(spec, "node-driver-registrar")
    reg_path = flag(registrar["args"], "--kubelet-registration-path")
    assert reg_path == f"{KUBELET_DIR}/plugins/{DRIVER}/csi.sock"
    # The plugin's socket, seen from the host, is exactly the registered path.
    vol, rel = resolve(spec, plugin, unix_path(flag(plugin["args"], "--endpoint") or ""))
    host_dir = volume(spec, vol)["hostPath"]["path"]
    assert str(PurePosixPath(host_dir) / rel) == reg_path
    # kubelet's plugin registration directory.
    reg_vol, _ = resolve(spec, registrar, "/registration/x")
    assert volume(spec, reg_vol)["hostPath"]["path"] == f"{KUBELET_DIR}/plugins_registry"


@pytest.mark.parametrize(
    "kind,name", [("Deployment", "blockyard-csi-controller"), ("DaemonSet", "blockyard-csi-node")]
)
def test_sidecar_csi_address_is_the_plugin_endpoint(kind: str, name: str) -> None:
    spec = pod_spec(find(kind, name))
    plugin = container(spec, "blockyard-csi")
    target = resolve(spec, plugin, unix_path(flag(plugin["args"], "--endpoint") or ""))
    sidecars = [c for c in spec["containers"] if c["name"] != "blockyard-csi"]
    assert sidecars
    for c in sidecars:
        address = flag(c["args"], "--csi-address")
        assert address is not None, c["name"]
        assert resolve(spec, c, address) == target, c["name"]


def parse_blockyard(args: list[str], c: dict[str, Any]) -> argparse.Namespace:
    expanded = [expand_env(a, c) for a in args]
    return build_parser().parse_args(expanded)


def csi_verb_registered() -> bool:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "csi" in sub.choices


def check_csi_args(c: dict[str, Any]) -> None:
    """The real parser and the real configuration check accept the plugin's command line
    (falls back to the documented flag set while ``blockyard csi`` is not in this build)."""
    args = c["args"]
    assert args[0] == "csi"
    if csi_verb_registered():
        ns = parse_blockyard(args, c)
        assert ns.verb == "csi"
        server = pytest.importorskip("blockyard.csi.server")
        config = server.build_config(
            endpoint=ns.endpoint,
            mode=ns.mode,
            node_id=ns.node_id,
            backend=ns.backend,
            state_dir=ns.state_dir,
            kubelet_dir=ns.kubelet_dir,
            managed_prefix=ns.managed_prefix,
            metrics_listen=ns.metrics_listen,
            topology=ns.topology,
            backend_security=tls.from_args(ns),
        )
        assert config.mode.value == flag(args, "--mode")
        return
    given = {a.split("=", 1)[0] for a in args[1:]}
    assert all(a.startswith("--") for a in args[1:]), args
    assert given <= CSI_FLAGS, given - CSI_FLAGS
    assert given >= CSI_REQUIRED_FLAGS


def test_controller_plugin_command_line() -> None:
    spec = controller_spec()
    plugin = container(spec, "blockyard-csi")
    assert image_name(plugin["image"]) == BLOCKYARD_IMAGE
    check_csi_args(plugin)
    assert flag(plugin["args"], "--mode") == "controller"
    assert not has_flag(plugin["args"], "--managed-prefix")
    backend = flag(plugin["args"], "--backend")
    svc = find("Service", "blockyard-master")
    port = svc["spec"]["ports"][0]["port"]
    assert backend == f"master://blockyard-master.{NAMESPACE}.svc:{port}"
    # The volume servers are dialed by node address and share one certificate.
    assert flag(plugin["args"], "--tls-server-name") == f"blockyard-api.{NAMESPACE}.svc"


def test_node_plugin_command_line_and_managed_prefix() -> None:
    plugin = container(node_spec(), "blockyard-csi")
    assert image_name(plugin["image"]) == BLOCKYARD_IMAGE
    check_csi_args(plugin)
    args = plugin["args"]
    assert flag(args, "--mode") == "node"
    assert flag(args, "--node-id") == "$(NODE_NAME)"
    node_name = next(e for e in plugin["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    prefix = flag(args, "--managed-prefix")
    assert prefix == "iqn.2026-11.io.blockyard"
    ManagedPrefix(prefix)  # the attach layer's own validation accepts it
    # ...and it covers the IQNs the volume server exports.
    server = container(server_spec(), "volume-server")
    served_prefix = flag(server["args"], "--iqn-prefix") or DEFAULT_IQN_PREFIX
    assert ManagedPrefix(prefix).owns(f"{served_prefix}:pvc-1234")


def test_volume_server_command_line_parses_with_the_real_cli() -> None:
    server = container(server_spec(), "volume-server")
    ns = parse_blockyard(server["args"], server)
    assert ns.verb == "serve"
    assert ns.data_dir == "/var/lib/blockyard"
    assert ns.iscsi_listen == ["10.0.0.7:3260"]
    assert ns.api_listen == "10.0.0.7:7400"
    assert ns.shutdown_timeout == 30


# --------------------------------------------------------------------------------------------
# Mutual TLS on the management API


def tls_secret(spec: dict[str, Any], c: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The Secret the container's --tls-* files come from, and which key each flag reads."""
    ns = parse_blockyard(c["args"], c)
    security = tls.from_args(ns)
    assert security.tls is not None, f"{c['name']}: no --tls-cert/--tls-key/--tls-ca"
    assert not security.insecure, f"{c['name']}: --insecure in a deployed manifest"
    secrets, keys = set(), {}
    files = security.tls
    for flag_name, path in (
        ("--tls-cert", files.cert_path),
        ("--tls-key", files.key_path),
        ("--tls-ca", files.ca_path),
    ):
        vol_name, key = resolve(spec, c, path)
        assert mount_for(c, path).get("readOnly") is True, f"{c['name']}: {path} is writable"
        source = volume(spec, vol_name)
        assert "secret" in source, f"{c['name']}: {path} is not from a Secret"
        assert not source["secret"].get("optional"), "TLS must not silently go missing"
        secrets.add(source["secret"]["secretName"])
        keys[flag_name] = key
    assert len(secrets) == 1, f"{c['name']}: TLS files from several Secrets {secrets}"
    # cert-manager's Certificate and `kubectl create secret tls` (+ ca.crt) use these keys.
    assert keys == {"--tls-cert": "tls.crt", "--tls-key": "tls.key", "--tls-ca": "ca.crt"}
    return secrets.pop(), keys


def test_management_api_requires_mutual_tls() -> None:
    spec = server_spec()
    server = container(spec, "volume-server")
    server_secret, _ = tls_secret(spec, server)
    ns = parse_blockyard(server["args"], server)
    # The real listen rule accepts it on the node address (it refuses plaintext there).
    tls.check_listen(ns.api_listen, "10.0.0.7", tls.from_args(ns), api="the management API")
    # Only the owner (root) reads the server's key.
    assert volume(spec, "api-tls")["secret"]["defaultMode"] == 0o400

    cspec = controller_spec()
    plugin = container(cspec, "blockyard-csi")
    client_secret, _ = tls_secret(cspec, plugin)
    # The plugin runs as 65532 and reads its key through fsGroup: group-readable, no more.
    assert cspec["securityContext"]["fsGroup"] == cspec["securityContext"]["runAsUser"]
    assert volume(cspec, "backend-tls")["secret"]["defaultMode"] == 0o440
    # Two identities, so the server's key never sits in the controller pod.
    assert server_secret != client_secret
    # The master serves its API and dials the same management API (placing copies, setting
    # roles): a third identity, the same rule (the real CLI parses its flags; a deployed
    # master never serves or dials in plaintext).
    mspec = master_spec()
    master = container(mspec, "master")
    master_secret, _ = tls_secret(mspec, master)
    assert master_secret not in (server_secret, client_secret)
    assert mspec["securityContext"]["fsGroup"] == mspec["securityContext"]["runAsUser"]
    assert volume(mspec, "master-tls")["secret"]["defaultMode"] == 0o440
    assert flag(master["args"], "--tls-server-name") == f"blockyard-api.{NAMESPACE}.svc"
    mns = parse_blockyard(master["args"], master)
    tls.check_listen(mns.listen, "10.0.0.8", tls.from_args(mns), api="the master API")
    # The controller dials that master with its certificate too, never in plaintext.
    assert not has_flag(plugin["args"], "--master-insecure")
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    backend = flag(plugin["args"], "--backend") or ""
    for word in (server_secret, client_secret, master_secret, backend.rpartition(":")[0]):
        assert word in doc, f"docs/kubernetes.md does not mention {word}"


# --------------------------------------------------------------------------------------------
# Volume server


def test_volume_server_workload() -> None:
    ds = find("DaemonSet", "blockyard-volume-server")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"blockyard.io/volume-server": "true"}
    server = container(spec, "volume-server")
    ns = parse_blockyard(server["args"], server)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= 35
    assert grace >= ns.shutdown_timeout + 5, "SIGKILL must not cut the graceful flush short"
    m = mount_for(server, ns.data_dir)
    assert volume(spec, m["name"])["hostPath"]["path"] == "/var/lib/blockyard"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"iscsi": 3260, "api": 7400, "replication": 7500}
    assert ns.replication_listen == "10.0.0.7:7500"
    svc = find("Service", "blockyard-master")
    assert ns.master == f"blockyard-master.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
    probe = server["readinessProbe"]
    assert "tcpSocket" in probe or "grpc" in probe
    assert (probe.get("tcpSocket") or probe["grpc"])["port"] in {"api", 7400}
    sc = server["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert spec["automountServiceAccountToken"] is False


def test_master_service_selects_the_master_and_its_store_persists() -> None:
    svc = find("Service", "blockyard-master")
    sts = find("StatefulSet", "blockyard-master")
    assert sts["spec"]["replicas"] == 1  # SQLite: one master
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == "blockyard-master"
    master = container(pod_spec(sts), "master")
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": 9333, "targetPort": "grpc", "protocol": "TCP"}
    ]
    ns = parse_blockyard(master["args"], master)
    assert ns.verb == "master"
    assert ns.listen == "10.0.0.7:9333"
    store = ns.store.removeprefix("sqlite://")
    assert ns.store.startswith("sqlite:///")
    [claim] = sts["spec"]["volumeClaimTemplates"]
    m = mount_for(master, store)
    assert m["name"] == claim["metadata"]["name"]
    # Never a blockyard class: the master must not depend on the volumes it places.
    assert "storageClassName" not in claim["spec"]
    assert master_spec()["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------------------------
# Controller


def test_controller_deployment_and_sidecars() -> None:
    dep = find("Deployment", "blockyard-csi-controller")
    assert dep["spec"]["replicas"] == 1
    spec = pod_spec(dep)
    assert spec["serviceAccountName"] == "blockyard-controller"
    by_image = {image_name(c["image"]).rsplit("/", 1)[-1]: c for c in spec["containers"]}
    assert set(by_image) == {
        "blockyard",
        "csi-provisioner",
        "csi-attacher",
        "csi-resizer",
        "csi-snapshotter",
        "livenessprobe",
    }
    for name in ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"):
        args = by_image[name]["args"]
        assert has_flag(args, "--leader-election"), name
        timeout = flag(args, "--timeout")
        assert timeout is not None and re.fullmatch(r"\d+s", timeout), name
    # The driver reports a topology segment; the provisioner turns it into PV node affinity.
    assert flag(by_image["csi-provisioner"]["args"], "--feature-gates") == "Topology=true"
    assert flag(by_image["csi-resizer"]["args"], "--handle-volume-inuse-error") == "false"
    socket_vol = volume(spec, "socket-dir")
    assert socket_vol["emptyDir"] == {}
    # The plugin's liveness probe is served by the livenessprobe sidecar's health port.
    plugin = container(spec, "blockyard-csi")
    health_port = int(flag(by_image["livenessprobe"]["args"], "--health-port") or 0)
    named = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert named[plugin["livenessProbe"]["httpGet"]["port"]] == health_port
    # Nothing in the controller pod runs as root but the init container that hands the
    # state directory to the pod's uid.
    uid = spec["securityContext"]["runAsUser"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert uid != 0
    for c in spec["containers"]:
        assert c.get("securityContext", {}).get("runAsUser", uid) == uid, c["name"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["chown", f"{uid}:{uid}", "/var/lib/blockyard-csi"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


def test_controller_state_survives_restarts_and_is_never_shared() -> None:
    dep = find("Deployment", "blockyard-csi-controller")
    spec = pod_spec(dep)
    plugin = container(spec, "blockyard-csi")
    state_dir = flag(plugin["args"], "--state-dir")
    assert state_dir == "/var/lib/blockyard-csi"
    vol, _ = resolve(spec, plugin, state_dir)
    host = volume(spec, vol)["hostPath"]["path"]
    assert host == state_dir
    # Not inside the volume server's data directory (it would look like a stray volume).
    server = container(server_spec(), "volume-server")
    data_dir = PurePosixPath(flag(server["args"], "--data-dir") or "")
    assert data_dir not in PurePosixPath(host).parents
    assert PurePosixPath(host) != data_dir
    # The state file is read once at start: never two controllers on it at once, and always
    # on the node whose disk holds it.
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["nodeSelector"] == server_spec()["nodeSelector"]


# --------------------------------------------------------------------------------------------
# RBAC


def rules_bound_to(sa: str) -> list[dict[str, Any]]:
    objs = deploy_objects()
    roles = {
        (o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in {"Role", "ClusterRole"}
    }
    rules: list[dict[str, Any]] = []
    for b in objs:
        if b["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
            for s in b["subjects"]
        ):
            continue
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"])]
        rules += role["rules"]
    return rules


def permissions(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }


def test_controller_service_account_has_no_wildcards_and_one_secret() -> None:
    rules = rules_bound_to("blockyard-controller")
    assert rules
    for r in rules:
        assert "*" not in r["verbs"]
        assert "*" not in r["resources"]
        assert "*" not in r["apiGroups"]
        assert "nonResourceURLs" not in r
    perms = permissions(rules)
    # Secrets: only csi-attacher's get of the CHAP Secret, by name, in our namespace.
    secret_rules = [r for r in rules if "secrets" in r["resources"]]
    assert secret_rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [CHAP_SECRET],
            "verbs": ["get"],
        }
    ]
    role = find("Role", "blockyard-external-attacher-chap")
    assert role["metadata"]["namespace"] == NAMESPACE and role["rules"] == secret_rules
    for cr in (o for o in deploy_objects() if o["kind"] == "ClusterRole"):
        assert not {p for p in permissions(cr["rules"]) if p[1] == "secrets"}
    assert not {p for p in perms if p[2] in {"escalate", "bind", "impersonate", "deletecollection"}}


def test_storage_classes_require_chap_from_one_secret() -> None:
    """CHAP on every class: the same Secret configures the target (controller-publish) and
    logs the node in (node-stage), so the two can never disagree."""
    for sc in (o for o in deploy_objects() if o["kind"] == "StorageClass"):
        params = sc["parameters"]
        for stage in ("controller-publish", "node-stage"):
            assert params[f"csi.storage.k8s.io/{stage}-secret-name"] == CHAP_SECRET
            assert params[f"csi.storage.k8s.io/{stage}-secret-namespace"] == NAMESPACE


EXPECTED_RULES = {
    "blockyard-external-provisioner": {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {"get", "list"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch"},
    },
    "blockyard-external-attacher": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("storage.k8s.io", "volumeattachments"): {"get", "list", "watch", "patch"},
        ("storage.k8s.io", "volumeattachments/status"): {"patch"},
    },
    "blockyard-external-resizer": {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        ("", "events"): {"create", "patch"},
        ("storage.k8s.io", "volumeattributesclasses"): {"get", "list", "watch"},
    },
    "blockyard-external-snapshotter": {
        ("snapshot.storage.k8s.io", "volumesnapshotclasses"): {"get", "list", "watch"},
        ("snapshot.storage.k8s.io", "volumesnapshotcontents"): {
            "get",
            "list",
            "watch",
            "update",
            "patch",
        },
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): {"update", "patch"},
        ("", "events"): {"create", "patch"},
    },
}


@pytest.mark.parametrize("role", sorted(EXPECTED_RULES))
def test_sidecar_cluster_role_is_exactly_what_the_sidecar_needs(role: str) -> None:
    cr = find("ClusterRole", role)
    got: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in permissions(cr["rules"]):
        got.setdefault((group, resource), set()).add(verb)
    assert got == EXPECTED_RULES[role]
    binding = find("ClusterRoleBinding", role)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "blockyard-controller", "namespace": NAMESPACE}
    ]


def test_leader_election_is_a_namespaced_lease_role() -> None:
    role = find("Role", "blockyard-controller-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert permissions(role["rules"]) == {
        ("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")
    }
    binding = find("RoleBinding", "blockyard-controller-leader-election")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # Leases are granted nowhere cluster-wide.
    for cr in (o for o in deploy_objects() if o["kind"] == "ClusterRole"):
        assert not {p for p in permissions(cr["rules"]) if p[1] == "leases"}


def test_node_and_server_service_accounts_have_no_permissions() -> None:
    for sa in ("blockyard-node", "blockyard-volume-server"):
        assert rules_bound_to(sa) == []
        assert find("ServiceAccount", sa)["automountServiceAccountToken"] is False
    assert node_spec()["serviceAccountName"] == "blockyard-node"
    assert server_spec()["serviceAccountName"] == "blockyard-volume-server"


# --------------------------------------------------------------------------------------------
# Images, resources, privileges


def test_images_are_pinned() -> None:
    images: list[str] = []
    for where, spec in pod_specs(deploy_objects() + example_objects()):
        for c in containers(spec):
            image = c["image"]
            images.append(image)
            tag = image_tag(image)
            assert tag, f"{where}/{c['name']}: {image} has no tag"
            assert tag != "latest", f"{where}/{c['name']}: {image}"
            assert "@sha256:" in image or re.search(r"\d", tag), f"{where}: {image}"
            if where.startswith(("Deployment", "DaemonSet", "StatefulSet")):
                assert c["imagePullPolicy"] == "IfNotPresent", where
    assert len(images) >= 10


def test_sidecar_versions_match_the_documented_ones() -> None:
    header = (DEPLOY / "controller.yaml").read_text() + (DEPLOY / "node.yaml").read_text()
    seen: set[str] = set()
    for _, spec in pod_specs(deploy_objects()):
        for c in containers(spec):
            name = image_name(c["image"])
            if name == BLOCKYARD_IMAGE:
                continue
            assert name.startswith("registry.k8s.io/sig-storage/"), name
            short = name.rsplit("/", 1)[-1]
            assert image_tag(c["image"]) == SIDECARS[short], c["image"]
            # The comment that justifies the version names the same one.
            assert re.search(rf"#\s+{re.escape(short)}\s+{re.escape(SIDECARS[short])}\b", header)
            seen.add(short)
    assert seen == set(SIDECARS)


def test_blockyard_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for _, spec in pod_specs(deploy_objects()):
        for c in containers(spec):
            if image_name(c["image"]) == BLOCKYARD_IMAGE:
                assert image_tag(c["image"]) == version


def test_every_deploy_container_has_requests_and_a_memory_limit() -> None:
    for where, spec in pod_specs(deploy_objects()):
        for c in containers(spec):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), f"{where}/{c['name']}"
            assert "memory" in res["limits"], f"{where}/{c['name']}"


def test_only_the_node_plugin_is_privileged() -> None:
    privileged = []
    for where, spec in pod_specs(deploy_objects() + example_objects()):
        for c in containers(spec):
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                privileged.append((where, c["name"]))
            else:
                assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
    assert privileged == [("DaemonSet/blockyard-csi-node", "blockyard-csi")]
    for where, spec in pod_specs(deploy_objects()):
        if spec.get("hostPID") or spec.get("hostIPC"):
            assert where == "DaemonSet/blockyard-csi-node"
        assert not spec.get("hostIPC")


def test_namespace_admits_the_privileged_node_plugin() -> None:
    ns = find("Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for o in deploy_objects():
        if o["kind"] in {
            "Deployment",
            "DaemonSet",
            "StatefulSet",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
        }:
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# Dockerfile and docs


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for w, rest in ins
        if w == "ARG" and "=" in rest
    }
    froms = [rest.split()[0] for w, rest in ins if w == "FROM"]
    assert froms
    for base in froms:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"debian:12(\.\d+)?-slim(@sha256:[0-9a-f]{64})?", base), base
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    for pkg in (
        "open-iscsi",
        "multipath-tools",
        "e2fsprogs",
        "xfsprogs",
        "util-linux",
        "fuse3",
        "kmod",
    ):
        assert re.search(rf"\b{re.escape(pkg)}\b", runs), pkg
    assert "python3 -m venv /opt/blockyard" in runs
    assert ("ENTRYPOINT", '["blockyard"]') in ins
    assert not [w for w, _ in ins if w in {"HEALTHCHECK", "USER"}]
    text = DOCKERFILE.read_text()
    assert "No USER instruction" in text, "the reason the image runs as root is written down"
    # The build context is only what the build needs (not .venv, .git or tests).
    ignore_file = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    assert {p for p in patterns if p.startswith("!")} == {"!pyproject.toml", "!README.md", "!src/"}


def test_docs_cover_deploy_and_examples() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "kubectl apply -k deploy" in doc
    for p in EXAMPLES.glob("*.yaml"):
        assert f"deploy/examples/{p.name}" in doc, p.name
    for word in ("open-iscsi", "multipath", "FUSE", "loop", "blockyard.io/volume-server=true"):
        assert word in doc, word
    # How to create the CHAP Secret the StorageClasses name, with the keys the driver reads.
    params = pytest.importorskip("blockyard.csi.params")
    for word in (
        f"create secret generic {CHAP_SECRET}",
        params.SECRET_CHAP_USER,
        params.SECRET_CHAP_PASSWORD,
        params.SECRET_MUTUAL_USER,
        params.SECRET_MUTUAL_PASSWORD,
        "csi.storage.k8s.io/node-stage-secret-name",
        "csi.storage.k8s.io/controller-publish-secret-name",
    ):
        assert word in doc, word
