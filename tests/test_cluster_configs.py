"""The files in ``cluster/`` and the submit lines in docs/CLUSTER.md are configuration that no unit test runs: check
that they parse, name scripts and configs that exist (and that those configs load, overrides included), agree with
each other on image and Ray version, keep secrets out, and ask for resources that fit the configs they run.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from whale_dist.cli import COMMANDS
from whale_dist.config import Config, config_from_argv, load_config, split_argv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/whale_dist"  # where cluster/Dockerfile puts the repository
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION", re.IGNORECASE)
RAYJOB_FIELDS = {  # RayJobSpec, ray-operator/apis/ray/v1/rayjob_types.go
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "preRunningDeadlineSeconds"}  # v1.7; the full check: test_cluster_schemas.py
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend", "timeZone"}  # KubeRay 1.7 RayCronJobSpec


def yaml_paths() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[tuple[Path, dict]]:
    """Every YAML document in cluster/, plus RayJobs embedded in ConfigMaps (the CronJob fallback)."""
    found = [(path, doc) for path in yaml_paths() for doc in documents(path)]
    for path, doc in list(found):
        if doc.get("kind") == "ConfigMap":
            found += [(path, inner) for text in doc.get("data", {}).values() for inner in yaml.safe_load_all(text)
                      if isinstance(inner, dict)]
    return found


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in all_documents() if doc.get("kind") == kind]


def job_specs() -> list[tuple[Path, dict]]:
    """The RayJob specs: standalone RayJobs and the templates of RayCronJobs."""
    specs = [(path, doc["spec"]) for path, doc in of_kind("RayJob")]
    return specs + [(path, doc["spec"]["jobTemplate"]) for path, doc in of_kind("RayCronJob")]


def docs_submit_lines() -> list[str]:
    """``ray job submit ... -- python jobs/X.py ...`` lines of docs/CLUSTER.md (continuations joined)."""
    text = (REPO / "docs" / "CLUSTER.md").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("ray job submit")]


def entrypoints() -> list[tuple[str, str]]:
    """(where, entrypoint command) for every job the cluster files and the docs run."""
    found = [(f"{path.name}:{spec.get('entrypoint', '')[:40]}", spec["entrypoint"]) for path, spec in job_specs()]
    return found + [("docs/CLUSTER.md", line.split(" -- ", 1)[1]) for line in docs_submit_lines()]


def parse_entrypoint(command: str) -> tuple[Path, list[str]]:
    """``python jobs/X.py [command] ARGS`` -> (script in the repo, ARGS with image paths mapped to the repo).

    Paths inside the image (``/home/ray/whale_dist/...``, see cluster/Dockerfile) are the repository's files.
    """
    argv = [arg.replace(IMAGE_ROOT + "/", f"{REPO}/") for arg in shlex.split(command)]
    assert argv[0] == "python" and argv[1].endswith(".py"), f"not a python job: {command}"
    args = argv[2:]
    if args and not args[0].startswith("-") and "=" not in args[0]:  # a sub-command: `identify.py calibrate ...`
        args = args[1:]
    return REPO / argv[1], args


def config_of(args: list[str]) -> Path:
    config = split_argv(args)[0]
    assert config, f"no --config in {args}"
    return Path(config)


def job_flags(script: Path) -> dict:
    """The flags the job's module accepts (``FLAGS``), so a documented ``--images`` is checked too."""
    return getattr(importlib.import_module(COMMANDS[script.stem][0]), "FLAGS", {})


def cluster_config() -> Config:
    """The one config every cluster file runs (checked by ``test_cluster_files_run_one_config``)."""
    (config,) = {config_of(parse_entrypoint(spec["entrypoint"])[1]) for _, spec in job_specs()}
    return load_config(str(config))


@pytest.mark.parametrize("path", yaml_paths(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_cluster_yaml_parses_and_says_what_to_edit(path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    assert "EDIT" in path.read_text(), f"{path.name} must say in a comment what to edit"


def test_there_is_a_job_for_training_reindexing_and_a_nightly_schedule():
    scripts = {parse_entrypoint(command)[0].name for _, command in entrypoints()}
    assert {"train.py", "index.py", "nightly.py"} <= scripts
    assert of_kind("RayCluster") and of_kind("RayCronJob") and of_kind("CronJob")
    assert {"train.py", "embed.py", "index.py", "identify.py", "nightly.py"} <= {
        parse_entrypoint(line.split(" -- ", 1)[1])[0].name for line in docs_submit_lines()}


@pytest.mark.parametrize("where,command", entrypoints())
def test_entrypoints_name_scripts_and_configs_that_exist_and_load(where, command):
    script, args = parse_entrypoint(command)
    assert script.is_file(), f"{where}: {script} does not exist"
    assert "def main(argv" in script.read_text(), f"{where}: {script.name} has no main(argv)"
    assert config_of(args).is_file(), f"{where}: config {config_of(args)} does not exist"
    config_from_argv(args, job_flags(script))  # unknown flags, keys or wrong types raise ConfigError


def test_cluster_files_run_one_config():
    """The resource checks below size the clusters for that config: a file running another would be unchecked."""
    configs = {config_of(parse_entrypoint(spec["entrypoint"])[1]) for _, spec in job_specs()}
    assert len(configs) == 1, configs


def test_kuberay_fields_are_known_to_kuberay():
    for path, spec in job_specs():
        assert set(spec) <= RAYJOB_FIELDS, f"{path.name}: unknown RayJob fields {set(spec) - RAYJOB_FIELDS}"
    for path, doc in of_kind("RayCronJob"):
        assert set(doc["spec"]) <= RAYCRONJOB_FIELDS, f"{path.name}: {set(doc['spec']) - RAYCRONJOB_FIELDS}"
        assert len(doc["spec"]["schedule"].split()) == 5
    for path, spec in job_specs():
        assert bool(spec.get("rayClusterSpec")) != bool(spec.get("clusterSelector")), path.name


def test_cluster_selectors_name_the_raycluster():
    names = {doc["metadata"]["name"] for _, doc in of_kind("RayCluster")}
    for path, spec in job_specs():
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in names, path.name


def pod_specs() -> list[tuple[str, dict]]:
    """(group name, pod spec) of every Ray head and worker group in the KubeRay files."""
    clusters = [doc["spec"] for _, doc in of_kind("RayCluster")]
    clusters += [spec["rayClusterSpec"] for _, spec in job_specs() if spec.get("rayClusterSpec")]
    pods = []
    for cluster in clusters:
        pods.append(("head", cluster["headGroupSpec"]))
        pods += [(group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])]
    return pods


def ray_images() -> set[str]:
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    images = {aws["docker"]["image"]}
    for _, group in pod_specs():
        images |= {container["image"] for container in group["template"]["spec"]["containers"]}
    for _, spec in job_specs():  # the submitter pods (ray job submit) run the same image
        images |= {c["image"] for c in spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])}
    return images


def test_one_image_and_the_ray_version_of_pyproject_everywhere():
    import ray

    (image,) = ray_images()
    assert f"ray{ray.__version__}" in image, f"image tag {image} should name Ray {ray.__version__}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert image in dockerfile, "the build command in cluster/Dockerfile should tag the image the clusters pull"
    versions = {doc["spec"]["rayVersion"] for _, doc in of_kind("RayCluster")}
    versions |= {spec["rayClusterSpec"]["rayVersion"] for _, spec in job_specs() if spec.get("rayClusterSpec")}
    assert versions == {ray.__version__}
    assert f"ray[default,train,data]>={ray.__version__.rsplit('.', 1)[0]}" in (REPO / "pyproject.toml").read_text()


def literal_env(node, found: list) -> list:
    """Every (name, literal value) set as an environment variable anywhere in a YAML tree."""
    if isinstance(node, dict):
        if isinstance(node.get("env_vars"), dict):
            found += [(k, v) for k, v in node["env_vars"].items()]
        for item in node.get("env", []) if isinstance(node.get("env"), list) else []:
            if isinstance(item, dict) and "value" in item:
                found.append((item["name"], item["value"]))
        for value in node.values():
            literal_env(value, found)
    elif isinstance(node, list):
        for value in node:
            literal_env(value, found)
    elif isinstance(node, str) and "env_vars:" in node:  # runtimeEnvYAML strings
        literal_env(yaml.safe_load(node), found)
    return found


def test_no_credentials_in_cluster_files():
    """Credentials come from instance profiles, IRSA or Kubernetes Secrets: never a literal in a file in git."""
    found: list = []
    for _, doc in all_documents():
        literal_env(doc, found)
    assert found, "expected some env settings to check"
    assert not [name for name, _ in found if SECRET_NAME.search(name)], found


def test_runtime_env_uploads_the_code_and_not_the_environment():
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert {".git", ".venv", "demo-output"} <= set(runtime_env["excludes"])
    kept = ("whale_dist", "jobs", "configs", "cluster")
    assert not [pattern for pattern in runtime_env["excludes"] if pattern.strip("/*") in kept]
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules", "image_uri"}


def test_working_dir_upload_is_the_code_and_small(tmp_path):
    """Zip this checkout exactly as ``ray job submit --working-dir .`` does (Ray's own packager, same excludes).

    The job server refuses request bodies over 100 MiB; a virtualenv or benchmark output left in the checkout would
    otherwise break every submission.
    """
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=excludes)
    top = {name.split("/")[0] for name in ZipFile(package).namelist()}
    assert {"whale_dist", "jobs", "configs", "cluster"} <= top
    assert not top & {".git", ".venv", "tests", "demo-output"}, top
    assert package.stat().st_size < 20 * 1024**2, f"{package.stat().st_size / 2**20:.0f} MiB: {sorted(top)}"


def fits(cfg: Config, groups: list[tuple[float, float, int]]) -> None:
    """``groups``: (GPUs per node, CPUs per node, max nodes). Training and embedding must fit on the GPU nodes."""
    per_node = [(min(gpus, cpus // cfg.train.cpus_per_worker), nodes) for gpus, cpus, nodes in groups if gpus > 0]
    assert per_node, "no GPU group"
    if cfg.train.use_gpu:
        assert sum(workers * nodes for workers, nodes in per_node) >= cfg.train.num_workers, (groups, cfg.train)
    total_gpus = sum(gpus * nodes for gpus, _, nodes in groups)
    assert cfg.embed.num_actors * cfg.embed.actor_num_gpus <= total_gpus, (groups, cfg.embed)
    assert any(gpus == 0 and cpus > 0 for gpus, cpus, _ in groups) or len(groups) == 1, "no CPU group for decode"


def test_aws_launcher_groups_fit_the_config():
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = {name: t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]}
    groups = [(t["resources"].get("GPU", 0), t["resources"]["CPU"], t["max_workers"]) for t in types.values()]
    fits(cluster_config(), groups)
    assert sum(nodes for _, _, nodes in groups) <= aws["max_workers"]
    assert aws["head_node_type"] in aws["available_node_types"]


def kuberay_groups(cluster_spec: dict) -> list[tuple[float, float, int]]:
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(group["rayStartParams"].get("num-gpus", gpus)) == gpus, f"{group['groupName']}: Ray vs pod GPUs"
        groups.append((gpus, float(limits["cpu"]), group["maxReplicas"]))
    return groups


@pytest.mark.parametrize("name", ["raycluster", "rayjob-train"])
def test_kuberay_groups_fit_the_config(name):
    (doc,) = [doc for path, doc in all_documents() if path.stem == name and doc["kind"].startswith("Ray")]
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]
    cfg = cluster_config()
    if name == "rayjob-train":  # a dedicated training cluster: its GPU group alone must hold the workers
        cfg.embed.num_actors = 0
        assert [g["replicas"] for g in spec["workerGroupSpecs"]] == [g["maxReplicas"] for g in spec["workerGroupSpecs"]]
    fits(cfg, kuberay_groups(spec))
