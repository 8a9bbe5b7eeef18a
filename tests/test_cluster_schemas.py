"""The cluster files against the tools' own schemas, offline.

- KubeRay manifests: the ``openAPIV3Schema`` of KubeRay v1.7.0's CRDs (vendored with their license under
  ``tests/vendor/kuberay-v1.7.0``), made strict: every object that lists its properties and does not set
  ``x-kubernetes-preserve-unknown-fields`` rejects unknown fields, as ``kubectl apply`` (server-side field validation)
  does. The CRDs' CEL rules (``x-kubernetes-validations``) and the operator's own checks are not run by jsonschema:
  the few this project relies on are written out in ``operator_rules`` with the Go function they mirror.
- Kubernetes built-ins (CronJob, ConfigMap, ServiceAccount, RBAC): small strict schemas of their API fields, written
  here from the Kubernetes API reference; the CronJob's pod template is checked against the core/v1 PodTemplateSpec
  schema that KubeRay's CRD embeds (the same generated Kubernetes schema).
- ``cluster/aws.yaml``: Ray's launcher schema and config preparation (``prepare_config``, ``validate_config``,
  ``bootstrap_aws`` against a moto-mocked AWS), each node_config against botocore's RunInstances input shape.
- ``cluster/runtime_env.yaml``: ``ray.runtime_env.RuntimeEnv``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = Path(__file__).resolve().parent / "vendor" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Node types the manifests name (nodeSelector node.kubernetes.io/instance-type): (vCPU, GiB), from the EC2 docs.
NODE_CAPACITY = {"m6i.2xlarge": (8, 32), "m6i.4xlarge": (16, 64), "g5.12xlarge": (48, 192)}
INSTANCE_TYPE = "node.kubernetes.io/instance-type"
# AWS's public SSM parameters of the Deep Learning Base OSS NVIDIA Driver GPU AMIs (driver >= 580 since late 2025).
DLAMI_PARAMETER = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-"


# ---------------------------------------------------------------------------------------------------------- schemas
def strict(schema):
    """A copy of an OpenAPI v3 schema in which objects listing properties reject any other field."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) if key in ("items", "anyOf", "allOf", "oneOf", "not") else value
           for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    return out


OBJECT_META = {  # metav1.ObjectMeta, the fields a manifest may set (the CRDs only say `type: object`)
    "type": "object", "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
}


@functools.cache
def crd_schema(kind: str) -> dict:
    (crd,) = [doc for doc in yaml.load_all((KUBERAY / CRD_FILES[kind]).read_text(), Loader=Loader) if doc]
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


@functools.cache
def pod_template_schema() -> dict:
    """core/v1 PodTemplateSpec as generated into KubeRay v1.7.0's RayCluster CRD (its head group template)."""
    spec = crd_schema("RayCluster")["properties"]["spec"]
    return dict(spec["properties"]["headGroupSpec"]["properties"]["template"], required=["spec"])


def obj(properties: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


INT, STR, BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}


@functools.cache
def builtin_schemas() -> dict:
    """(apiVersion, kind) -> strict schema of the Kubernetes built-ins in cluster/ (fields: the API reference)."""
    job_spec = obj({  # batch/v1 JobSpec, all its fields; the ones this project sets are typed
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": {"type": "integer", "minimum": 0},
        "backoffLimitPerIndex": INT, "completionMode": STR, "completions": INT, "managedBy": STR,
        "manualSelector": BOOL, "maxFailedIndexes": INT, "parallelism": INT, "podFailurePolicy": {"type": "object"},
        "podReplacementPolicy": STR, "selector": {"type": "object"}, "successPolicy": {"type": "object"},
        "suspend": BOOL, "template": pod_template_schema(),
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    }, required=["template"])
    cron_spec = obj({  # batch/v1 CronJobSpec
        "schedule": STR, "timeZone": STR, "startingDeadlineSeconds": {"type": "integer", "minimum": 0},
        "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]}, "suspend": BOOL,
        "successfulJobsHistoryLimit": {"type": "integer", "minimum": 0},
        "failedJobsHistoryLimit": {"type": "integer", "minimum": 0},
        "jobTemplate": obj({"metadata": OBJECT_META, "spec": job_spec}, required=["spec"]),
    }, required=["schedule", "jobTemplate"])
    subject = obj({"kind": {"enum": ["ServiceAccount", "User", "Group"]}, "name": STR, "namespace": STR,
                   "apiGroup": STR}, required=["kind", "name"])
    rule = obj({"apiGroups": {"type": "array", "items": STR}, "resources": {"type": "array", "items": STR},
                "resourceNames": {"type": "array", "items": STR}, "verbs": {"type": "array", "items": STR},
                "nonResourceURLs": {"type": "array", "items": STR}}, required=["verbs"])

    def kind(api: str, name: str, **fields) -> dict:
        return obj({"apiVersion": {"const": api}, "kind": {"const": name}, "metadata": OBJECT_META, **fields},
                   required=["apiVersion", "kind", "metadata"])

    return {
        ("batch/v1", "CronJob"): kind("batch/v1", "CronJob", spec=cron_spec),
        ("v1", "ConfigMap"): kind("v1", "ConfigMap", data={"type": "object", "additionalProperties": STR},
                                  immutable=BOOL),
        ("v1", "ServiceAccount"): kind("v1", "ServiceAccount", automountServiceAccountToken=BOOL,
                                       imagePullSecrets={"type": "array", "items": obj({"name": STR})},
                                       secrets={"type": "array"}),
        ("rbac.authorization.k8s.io/v1", "Role"): kind("rbac.authorization.k8s.io/v1", "Role",
                                                       rules={"type": "array", "items": rule}),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): kind(
            "rbac.authorization.k8s.io/v1", "RoleBinding", subjects={"type": "array", "items": subject},
            roleRef=obj({"apiGroup": STR, "kind": STR, "name": STR}, required=["apiGroup", "kind", "name"])),
    }


def schema_for(doc: dict) -> dict:
    if doc.get("apiVersion") == "ray.io/v1":
        return crd_schema(doc["kind"])
    return builtin_schemas()[(doc["apiVersion"], doc["kind"])]


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(schema_for({"apiVersion": api_version, "kind": kind}))


def validate(doc: dict) -> None:
    validator(doc["apiVersion"], doc["kind"]).validate(doc)


# --------------------------------------------------------------------------------------------------------- documents
def manifests() -> list[tuple[str, dict]]:
    """(where, document) for every KubeRay/Kubernetes document, plus the RayJob inside the CronJob's ConfigMap."""
    found = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            found.append((f"{path.name}#{i}:{doc['kind']}", doc))
            for key, text in (doc.get("data") or {}).items() if doc["kind"] == "ConfigMap" else ():
                found += [(f"{path.name}:{key}:{inner['kind']}", inner) for inner in yaml.safe_load_all(text) if inner]
    return found


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in manifests() if doc["kind"] == kind]


def rayjob_specs() -> list[tuple[str, dict]]:
    return ([(where, doc["spec"]) for where, doc in of_kind("RayJob")]
            + [(where, doc["spec"]["jobTemplate"]) for where, doc in of_kind("RayCronJob")])


def ray_pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod that runs the Ray image: heads, worker groups, RayJob submitters."""
    clusters = [(where, doc["spec"]) for where, doc in of_kind("RayCluster")]
    clusters += [(where, spec["rayClusterSpec"]) for where, spec in rayjob_specs() if "rayClusterSpec" in spec]
    pods = []
    for where, cluster in clusters:
        pods.append((f"{where}:head", cluster["headGroupSpec"]["template"]))
        pods += [(f"{where}:{g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    pods += [(f"{where}:submitter", spec["submitterPodTemplate"]) for where, spec in rayjob_specs()
             if "submitterPodTemplate" in spec]
    return pods


MANIFESTS = manifests()


@pytest.mark.parametrize("where,doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_matches_its_schema(where, doc):
    validate(doc)


def test_every_kind_is_checked_against_a_real_schema():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds, kinds
    assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(pod_template_schema()["properties"]["spec"])[:200]


def inject(doc: dict, path: tuple, field: str = "notAField") -> dict:
    """A copy of ``doc`` with an unknown ``field`` added to the object at ``path`` (keys and list indexes)."""
    bad = copy.deepcopy(doc)
    node = bad
    for key in path:
        node = node[key]
    node[field] = 1
    return bad


UNKNOWN_FIELD_CASES = [  # (manifest, path to the object that gets an unknown field)
    ("raycluster.yaml#1:RayCluster", ("spec",)),
    ("raycluster.yaml#1:RayCluster", ("spec", "workerGroupSpecs", 0)),
    ("raycluster.yaml#1:RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec")),
    ("raycluster.yaml#1:RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "resources")),
    ("raycluster.yaml#1:RayCluster", ("metadata",)),
    ("rayjob-train.yaml#0:RayJob", ("spec",)),
    ("rayjob-train.yaml#0:RayJob", ("spec", "rayClusterSpec", "headGroupSpec")),
    ("rayjob-index.yaml#0:RayJob", ("spec", "deletionStrategy", "deletionRules", 0, "condition")),
    ("rayjob-index.yaml#0:RayJob", ("spec", "submitterPodTemplate", "spec", "containers", 0)),
    ("nightly-raycronjob.yaml#0:RayCronJob", ("spec",)),
    ("nightly-raycronjob.yaml#0:RayCronJob", ("spec", "jobTemplate")),
    ("nightly-cronjob.yaml:rayjob.yaml:RayJob", ("spec",)),
    ("nightly-cronjob.yaml#4:CronJob", ("spec",)),
    ("nightly-cronjob.yaml#4:CronJob", ("spec", "jobTemplate", "spec")),
    ("nightly-cronjob.yaml#4:CronJob", ("spec", "jobTemplate", "spec", "template", "spec", "containers", 0)),
    ("nightly-cronjob.yaml#1:Role", ("rules", 0)),
]


@pytest.mark.parametrize("where,path", UNKNOWN_FIELD_CASES)
def test_an_unknown_field_fails_validation(where, path):
    (doc,) = [doc for w, doc in MANIFESTS if w == where]
    validate(doc)
    with pytest.raises(jsonschema.ValidationError, match="notAField"):
        validate(inject(doc, path))


def test_a_misspelt_or_mistyped_field_fails_validation():
    (doc,) = [doc for w, doc in MANIFESTS if w == "nightly-raycronjob.yaml#0:RayCronJob"]
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["jobTemplate"]["preRunningDeadline"] = misspelt["spec"]["jobTemplate"].pop(
        "preRunningDeadlineSeconds")
    with pytest.raises(jsonschema.ValidationError):
        validate(misspelt)
    mistyped = copy.deepcopy(doc)
    mistyped["spec"]["jobTemplate"]["deletionStrategy"]["deletionRules"][0]["policy"] = "Delete"
    with pytest.raises(jsonschema.ValidationError):
        validate(mistyped)


# ------------------------------------------------------------------------------------------------ operator behaviour
def operator_rules(spec: dict) -> list[str]:
    """What KubeRay v1.7's ValidateRayJobSpec / validateDeletionConfiguration (ray-operator/controllers/ray/utils/
    validation.go) and the CRD's CEL rules reject, for the fields these files use."""
    errors = []
    selector = bool(spec.get("clusterSelector"))
    if bool(spec.get("rayClusterSpec")) == selector:
        errors.append("exactly one of rayClusterSpec and clusterSelector")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if selector and (spec.get("backoffLimit", 0) > 0 or spec.get("suspend")):
        errors.append("clusterSelector mode: no backoffLimit > 0, no suspend")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"{key} must be positive")
    strategy = spec.get("deletionStrategy")
    if strategy:
        rules = strategy.get("deletionRules", [])
        if rules and spec.get("shutdownAfterJobFinishes"):
            errors.append("deletionRules and shutdownAfterJobFinishes are mutually exclusive")
        if rules and ("onSuccess" in strategy or "onFailure" in strategy):
            errors.append("deletionRules and onSuccess/onFailure are mutually exclusive")
        seen = set()
        for rule in rules:
            condition = rule["condition"]
            if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
                errors.append("a deletion condition needs exactly one of jobStatus and jobDeploymentStatus")
            if selector and rule["policy"] in ("DeleteCluster", "DeleteWorkers"):
                errors.append(f"{rule['policy']} is not supported with clusterSelector")
            key = (condition.get("jobStatus"), condition.get("jobDeploymentStatus"), rule["policy"])
            if key in seen:
                errors.append(f"duplicate deletion rule {key}")
            seen.add(key)
    return errors


RAYJOBS = rayjob_specs()


@pytest.mark.parametrize("where,spec", RAYJOBS, ids=[w for w, _ in RAYJOBS])
def test_rayjobs_pass_the_operators_own_checks_and_have_deadlines(where, spec):
    assert operator_rules(spec) == [], where
    assert spec["preRunningDeadlineSeconds"] > 0 and spec["activeDeadlineSeconds"] > 0, where
    if spec.get("clusterSelector"):  # no cluster TTL to clean up after them: the RayJob must delete itself
        policies = {(r["policy"], r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"])
                    for r in spec["deletionStrategy"]["deletionRules"]}
        assert {("DeleteSelf", "SUCCEEDED"), ("DeleteSelf", "FAILED"), ("DeleteSelf", "Failed")} <= policies, where
    else:
        assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0, where


def test_operator_rules_catch_what_the_operator_rejects():
    (_, nightly), = [(w, s) for w, s in RAYJOBS if w.startswith("nightly-raycronjob")]
    for change in ({"ttlSecondsAfterFinished": 60}, {"backoffLimit": 2}, {"shutdownAfterJobFinishes": True},
                   {"preRunningDeadlineSeconds": 0}, {"rayClusterSpec": {"headGroupSpec": {}}}):
        assert operator_rules({**nightly, **change}), change
    bad = copy.deepcopy(nightly)
    bad["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteCluster"
    assert operator_rules(bad)


def test_nightly_runs_cannot_pile_up():
    """A run ends before the next night starts; a missed schedule is skipped, not replayed in a burst."""
    for where, spec in RAYJOBS:
        if "nightly" in where:
            assert spec["activeDeadlineSeconds"] < 24 * 3600, where
    ((_, cron),) = of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert 0 < cron["spec"]["startingDeadlineSeconds"] < 24 * 3600
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["ttlSecondsAfterFinished"] > 0
    ((_, raycron),) = of_kind("RayCronJob")
    assert raycron["spec"]["timeZone"] == cron["spec"]["timeZone"]
    assert raycron["spec"]["schedule"] == cron["spec"]["schedule"]


def test_kubectl_image_is_maintained_and_pinned():
    ((_, cron),) = of_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "bitnami" not in container["image"], "bitnami's versioned kubectl tags are gone (2025)"
    assert re.fullmatch(r"registry\.k8s\.io/kubectl:v1\.\d+\.\d+", container["image"]), container["image"]
    assert container["command"][0] == "/bin/kubectl", "the image is distroless: no shell, kubectl at /bin/kubectl"


RAY_PODS = ray_pod_templates()


@pytest.mark.parametrize("where,pod", RAY_PODS, ids=[w for w, _ in RAY_PODS])
def test_every_ray_pod_can_pull_the_private_image(where, pod):
    assert pod["spec"].get("imagePullSecrets"), f"{where}: no imagePullSecrets"
    secrets = {s["name"] for _, p in RAY_PODS for s in p["spec"]["imagePullSecrets"]}
    assert len(secrets) == 1, f"one registry Secret everywhere, got {secrets}"


def quantity(value) -> float:
    """A Kubernetes quantity (``500m``, ``44``, ``168Gi``) as a number (cores, or GiB for memory)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


@pytest.mark.parametrize("where,pod", [(w, p) for w, p in RAY_PODS if not w.endswith("submitter")],
                         ids=[w for w, _ in RAY_PODS if not w.endswith("submitter")])
def test_requests_fit_the_node_type_they_name(where, pod):
    """Allocatable < capacity (kubelet and system reservations, eviction threshold, DaemonSets): leave >= 1 vCPU and
    10 % of memory, else the pod stays Pending on the very node type it was sized for."""
    node_type = pod["spec"].get("nodeSelector", {}).get(INSTANCE_TYPE)
    assert node_type in NODE_CAPACITY, f"{where}: nodeSelector {INSTANCE_TYPE} should name one of {set(NODE_CAPACITY)}"
    cpus, gib = NODE_CAPACITY[node_type]
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert quantity(requests["cpu"]) <= cpus - 1, f"{where}: {requests['cpu']} CPUs on a {cpus}-vCPU {node_type}"
    assert quantity(requests["memory"]) <= 0.9 * gib, f"{where}: {requests['memory']} on a {gib} GiB {node_type}"


def test_quantity_and_fit_rule_reject_a_full_node():
    assert quantity("64Gi") > 0.9 * NODE_CAPACITY["m6i.4xlarge"][1]
    assert quantity("500m") == 0.5 and quantity("200Mi") == pytest.approx(200 / 1024)


# --------------------------------------------------------------------------------------------------------------- docs
def docs() -> str:
    return (REPO / "docs" / "CLUSTER.md").read_text()


def test_docs_clean_up_nightly_rayjobs_by_the_operators_label_and_turn_the_gate_on():
    ((_, raycron),) = of_kind("RayCronJob")
    name = raycron["metadata"]["name"]
    text = docs()
    assert f"ray.io/cronjob-name={name}" in text
    lines = [line for line in text.splitlines() if "rayjob" in line and f"-l app={name}" in line]
    assert all("nightly-cronjob" in line or "CronJob" in line for line in lines), lines
    assert "featureGates[0].name=RayCronJob" in text and "RayCronJob=true" in text
    assert "1.7.0" in text, "docs should name the KubeRay version the manifests are validated against"


def policy_blocks(text: str) -> dict[str, dict]:
    """The IAM policy documents in docs/CLUSTER.md: ```json blocks whose first key is "Version"."""
    found = {}
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        doc = json.loads(block)
        if "Statement" in doc:
            found[doc.get("Id", str(len(found)))] = doc
    return found


def actions(policy: dict) -> set[str]:
    out = set()
    for statement in policy["Statement"]:
        listed = statement["Action"]
        out |= {listed} if isinstance(listed, str) else set(listed)
    return out


def test_docs_give_a_head_policy_that_can_launch_workers():
    policies = policy_blocks(docs())
    assert {"whale-dist-head", "whale-dist-worker"} <= set(policies), set(policies)
    head, worker = policies["whale-dist-head"], policies["whale-dist-worker"]
    needed = {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
              "iam:PassRole", "ssm:GetParameters", "s3:GetObject", "s3:PutObject", "s3:ListBucket"}
    assert needed <= actions(head), needed - actions(head)
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "ssm:GetParameter"} <= actions(worker)
    assert not {a for a in actions(worker) if a.startswith(("ec2:Run", "iam:"))}, "workers launch nothing"
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    worker_profile = aws["available_node_types"]["gpu_workers"]["node_config"]["IamInstanceProfile"]["Arn"]
    passed = [s["Resource"] for s in head["Statement"] if "iam:PassRole" in s["Action"]]
    role = worker_profile.replace(":instance-profile/", ":role/")
    assert [role] in passed or role in passed, f"iam:PassRole should name the worker role {role}: {passed}"


# ------------------------------------------------------------------------------------------------------- AWS launcher
def aws_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_launcher_config_passes_rays_schema_and_preparation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws_config())
    validate_config(prepared)
    bad = aws_config()
    bad["available_node_types"]["head"]["notAField"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_aws_bootstrap_against_mocked_aws(tmp_path, monkeypatch):
    """Ray's AWS bootstrap (IAM, key pair, subnets, security groups, AMI) on moto: no cloud contacted."""
    from moto import mock_aws
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes the cluster's SSH key under ~/.ssh
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-west-2", "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        from ray.autoscaler._private.aws.config import bootstrap_aws

        config = bootstrap_aws(prepare_config(aws_config()))
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["ImageId"] == aws_config()["available_node_types"][name]["node_config"]["ImageId"], (
            "Ray replaced the AMI: an empty ImageId or `latest_dlami` boots a CUDA 11 era driver")
        assert node_config["SecurityGroupIds"] and node_config["SubnetIds"], name


def test_aws_node_configs_are_valid_run_instances_requests():
    """Ray passes node_config to EC2 RunInstances: check it against botocore's model of that request."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in aws_config()["available_node_types"].items():
        report = ParamValidator().validate(dict(node_type["node_config"], MinCount=1, MaxCount=1), shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = dict(aws_config()["available_node_types"]["head"]["node_config"], MinCount=1, MaxCount=1, InstanceTyp="x")
    assert ParamValidator().validate(bad, shape).has_errors()


def test_aws_nodes_boot_a_driver_that_runs_cuda_13():
    """torch here is a CUDA 13 build (driver >= 580): the AMI is AWS's current Base OSS NVIDIA driver DLAMI."""
    from importlib.metadata import requires

    cuda = [r for r in requires("torch") or [] if r.startswith("cuda-toolkit")]  # no `import torch`: 5 s
    assert not cuda or "==13." in cuda[0], f"torch's CUDA changed ({cuda}): revisit the AMI and the faiss build"
    for name, node_type in aws_config()["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert image.startswith(DLAMI_PARAMETER), f"{name}: {image}"
        assert image.endswith("/latest/ami-id") and re.search(r"ubuntu-(22|24)\.04/", image), image


def test_aws_nodes_log_in_to_the_images_registry_without_a_literal_secret():
    config = aws_config()
    registry = config["docker"]["image"].split("/")[0]
    commands = " ; ".join(config["initialization_commands"])
    assert f"docker login {registry}" in commands and "--password-stdin" in commands, commands
    login = shlex.split(commands)
    assert "--password" not in login and "-p" not in login, "the token comes from SSM, never from this file"
    assert f"--region {config['provider']['region']}" in commands
    head = config["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in config["available_node_types"].items()
               if n != config["head_node_type"]}
    assert head not in workers, "the head needs more rights than the workers: give it its own profile"


# ---------------------------------------------------------------------------------------------------- runtime env
def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    fields = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(fields) <= RuntimeEnv.known_fields, set(fields) - RuntimeEnv.known_fields
    env = RuntimeEnv(**fields)
    assert env.working_dir() == "." and env.env_vars()
    with pytest.raises(TypeError):
        RuntimeEnv(**{**fields, "env_vars": {"N": 1}})


# ------------------------------------------------------------------------------------------------ image and packages
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_test_only_packages_stay_out_of_the_runtime_dependencies():
    project = pyproject()["project"]
    runtime = names(project["dependencies"])
    assert not runtime & {"moto", "pytest", "hypothesis", "jsonschema", "ruff"}, runtime
    assert "moto" in names(project["optional-dependencies"]["dev"])
    assert "moto" in names(project["optional-dependencies"]["demo"])
    assert "jsonschema" in names(project["optional-dependencies"]["dev"])
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^jsonschema==", constraints, re.M) and re.search(r"^moto==", constraints, re.M)


def test_runtime_modules_import_moto_lazily():
    import ast

    for path in (REPO / "whale_dist").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: inside functions is fine
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (module or "").startswith("moto"), f"{path.relative_to(REPO)} imports moto at import time"


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_image_installs_under_the_constraints_and_gpu_faiss_of_the_gpu_extra():
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", dockerfile().replace("\\\n", " "), re.M)
    installs = [part for run in runs for part in run.split("&&") if "pip install" in part]
    assert installs and all("-c constraints.txt" in part for part in installs), installs
    assert re.search(r"^COPY .*constraints\.txt", dockerfile(), re.M), "constraints.txt must be in the image"
    (gpu,) = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert gpu.startswith("faiss-cuda==") and f'"{gpu}"' in dockerfile(), (gpu, installs)
    assert "pip uninstall -y faiss-cpu" in dockerfile(), "faiss-cpu and faiss-cuda both own the `faiss` package"


def test_dockerignore_keeps_the_environment_and_data_out_of_the_build():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "demo-output", "data", "bench/out", ".pytest_cache", "**/__pycache__"} <= ignored
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile(), re.M)
    sources = {src for line in copied for src in line.split()}
    assert not sources & ignored, sources & ignored
