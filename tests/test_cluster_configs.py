"""The deployment configurations (cluster/aws, cluster/kuberay) and docs/scaling.md, checked offline.

- AWS: the cluster launcher YAML against the JSON Schema that ships with Ray's autoscaler, then
  through Ray's own config preparation (defaults, node types, validation) and the parts of Ray's AWS
  bootstrap that run without AWS (instance profiles, AMI, the security group's inbound rules).
- KubeRay: the RayCluster and RayJob manifests against KubeRay v1.7.0's documented fields and the
  Kubernetes 1.37 pod schema (tests/data/kuberay/README.md says where they come from).
- Both: what the issue asks of a deployment (token auth, GPUs, preStop drain, grace period, fixed
  metrics port, Prometheus wiring, no credentials, nothing bound to the internet).
- docs/scaling.md holds exactly the tables docs/scaling.py prints.

Every check is a function returning the problems it finds; each is also run on a mutated copy of
the configuration that it must reject, so that a check that can no longer fail fails the tests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support.clocks import FakeClock

ROOT = Path(__file__).resolve().parent.parent
AWS_DIR = ROOT / "cluster" / "aws"
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
AWS_CONFIG = AWS_DIR / "alexray-cluster.yaml"
SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "kuberay"
PROMETHEUS_YML = ROOT / "cluster" / "prometheus" / "prometheus.yml"
METRICS_PORT = 8080
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def alexray_sd_glob() -> str:
    """The alexray file_sd glob of cluster/prometheus/prometheus.yml."""
    config = load_yaml(PROMETHEUS_YML)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "alexray")
    return job["file_sd_configs"][0]["files"][0]


def sd_files() -> list[str]:
    config = load_yaml(PROMETHEUS_YML)
    return [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]


# ================================================================================ AWS ==========

@pytest.fixture(scope="module")
def aws() -> dict:
    return load_yaml(AWS_CONFIG)


def _commands(config: dict, key: str) -> list[str]:
    return [" ".join(c.split()) for c in config.get(key, [])]


def _flag(commands: list[str], name: str) -> list[str]:
    """Values of ``--name=value`` / ``--name value`` in the ``ray start`` commands."""
    found = []
    for command in commands:
        if "ray start" not in command:
            continue
        words = shlex.split(command.split("ray start", 1)[1])
        for i, word in enumerate(words):
            if word.startswith(f"--{name}="):
                found.append(word.split("=", 1)[1])
            elif word == f"--{name}" and i + 1 < len(words):
                found.append(words[i + 1])
    return found


def aws_problems(config: dict) -> list[str]:
    """What the issue asks of the AWS deployment, as a list of what is missing or wrong."""
    problems = []
    head_type = config["head_node_type"]
    types = config["available_node_types"]
    head_start = _commands(config, "head_start_ray_commands")
    worker_start = _commands(config, "worker_start_ray_commands")
    setup = _commands(config, "setup_commands")
    text = yaml.safe_dump(config)

    # Token auth on every node, with the token from a synced file, never written in the config.
    for name, cmds in (("head", head_start), ("worker", worker_start)):
        starts = [c for c in cmds if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{name}: ray start without RAY_AUTH_MODE=token")
    if config.get("file_mounts", {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("the token file ~/.ray/auth_token is not synced to the nodes")
    if re.search(r"RAY_AUTH_TOKEN\s*[=:]", text):
        problems.append("RAY_AUTH_TOKEN is set in the config: the token would be in clear")

    # The dashboard / Jobs API on the head's loopback only.
    hosts = _flag(head_start, "dashboard-host")
    if hosts != ["127.0.0.1"] and hosts != ["localhost"]:
        problems.append(f"head dashboard-host is {hosts or 'unset'}, not 127.0.0.1")
    if any("0.0.0.0" in c for c in head_start + worker_start):
        problems.append("a start command binds 0.0.0.0")

    # The metrics port fixed, the same on every node.
    ports = _flag(head_start, "metrics-export-port") + _flag(worker_start, "metrics-export-port")
    if len(ports) != 2 or set(ports) != {str(METRICS_PORT)}:
        problems.append(f"metrics-export-port is {ports}, not {METRICS_PORT} on head and workers")

    # A CPU head and a GPU worker type that may run on spot capacity.
    head = types[head_type]
    if head.get("resources", {}).get("GPU", 0):
        problems.append("the head offers GPUs")
    gpu_types = [n for n, t in types.items() if n != head_type and t.get("resources", {}).get("GPU", 0) > 0]
    if not gpu_types:
        problems.append("no worker type offers GPUs")
    for name in gpu_types:
        market = types[name]["node_config"].get("InstanceMarketOptions", {})
        if market.get("MarketType") != "spot":
            problems.append(f"{name}: not allowed on spot (InstanceMarketOptions.MarketType)")
        if types[name].get("max_workers", 0) < 1:
            problems.append(f"{name}: max_workers < 1")

    # Instance profiles, no keys.
    for name, node_type in types.items():
        if "Name" not in node_type["node_config"].get("IamInstanceProfile", {}) and \
                "Arn" not in node_type["node_config"].get("IamInstanceProfile", {}):
            problems.append(f"{name}: no IamInstanceProfile (S3 would need keys)")
    if "aws_credentials" in config.get("provider", {}):
        problems.append("provider.aws_credentials: keys in the config")

    # Security group: nothing but SSH open to the internet; every port open between nodes.
    problems += security_group_problems(config)

    # The project installed on every node from this checkout.
    if config.get("file_mounts", {}).get("~/alexray") != ".":
        problems.append("the checkout is not synced to ~/alexray")
    if not any(re.search(r"pip install .*-e ~/alexray\b", c) for c in setup):
        problems.append("setup_commands do not pip install the project")

    # Prometheus on the head.
    if not any("cluster/aws/prometheus.sh" in c and ("start" in c) for c in head_start):
        problems.append("the head does not start Prometheus")
    return problems


def security_group_problems(config: dict) -> list[str]:
    """Ray's own inbound rules for the cluster's group, with the config's extra rules, checked."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-alexray"}, extra)
    problems = []
    for rule in rules:
        world = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if any(cidr in ("0.0.0.0/0", "::/0") for cidr in world):
            if (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) != ("tcp", 22, 22):
                problems.append(f"inbound rule open to the internet: {rule}")
    intra = [r for r in rules if r.get("IpProtocol") == "-1" and r.get("UserIdGroupPairs")]
    if not intra:
        problems.append("nodes cannot reach each other on every port (metrics ports are picked by the OS)")
    return problems


def test_aws_config_matches_rays_schema(aws):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)
    # Ray's own path for 'ray up': defaults merged, node types filled, validated again.
    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert any("uv pip install" in c for c in prepared["worker_setup_commands"])
    assert any("prometheus" in c for c in prepared["head_setup_commands"])


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["available_node_types"]["gpu"].update(max_worker=2), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="cpu-head"), ValueError),
    (lambda c: c["available_node_types"]["gpu"].update(min_workers=9), ValueError),
])
def test_rays_validation_rejects_broken_configs(aws, mutate, error):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(aws)
    mutate(config)
    with pytest.raises(error):
        validate_config(prepare_config(config))


def test_aws_bootstrap_steps_that_run_offline(aws, monkeypatch):
    """Ray's AWS bootstrap keeps our instance profile and AMI and never has to call AWS for them."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    def no_aws(*args, **kwargs):
        raise AssertionError("contacted AWS")

    monkeypatch.setattr(aws_config, "_client", no_aws)
    monkeypatch.setattr(aws_config, "_resource", no_aws)
    prepared = prepare_config(copy.deepcopy(aws))
    before = copy.deepcopy(prepared["available_node_types"])
    aws_config._configure_iam_role(prepared)   # returns early: the head names its profile
    aws_config._check_ami(prepared)            # keeps our ImageId (no Ray default AMI)
    assert prepared["available_node_types"] == before

    # Without a head profile Ray would create one with EC2 and S3 full access: it asks AWS.
    del prepared["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]
    prepared["head_node"] = {}
    with pytest.raises(AssertionError, match="contacted AWS"):
        aws_config._configure_iam_role(prepared)


def test_aws_deployment_has_what_the_issue_asks(aws):
    assert aws_problems(aws) == []


def _set_start(config, key, old, new):
    config[key] = [c.replace(old, new) for c in config[key]]


AWS_MUTATIONS = {
    "no token mode on workers": lambda c: _set_start(c, "worker_start_ray_commands", "RAY_AUTH_MODE=token", ""),
    "token not synced": lambda c: c["file_mounts"].pop("~/.ray/auth_token"),
    "token in clear": lambda c: c["setup_commands"].append("export RAY_AUTH_TOKEN=abc"),
    "dashboard on every interface": lambda c: _set_start(c, "head_start_ray_commands", "--dashboard-host=127.0.0.1",
                                                         "--dashboard-host=0.0.0.0"),
    "dashboard host left to the default": lambda c: _set_start(c, "head_start_ray_commands",
                                                               "--dashboard-host=127.0.0.1", ""),
    "metrics port on the head only": lambda c: _set_start(c, "worker_start_ray_commands",
                                                          "--metrics-export-port=8080", ""),
    "on-demand only": lambda c: c["available_node_types"]["gpu"]["node_config"].pop("InstanceMarketOptions"),
    "GPU head": lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
    "no worker profile": lambda c: c["available_node_types"]["gpu"]["node_config"].pop("IamInstanceProfile"),
    "keys in the provider": lambda c: c["provider"].update(aws_credentials={"aws_access_key_id": "x"}),
    "dashboard port opened": lambda c: c["provider"]["security_group"].update(IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]),
    "project not installed": lambda c: c.update(setup_commands=[s for s in c["setup_commands"] if "pip" not in s]),
    "no prometheus": lambda c: c.update(head_start_ray_commands=c["head_start_ray_commands"][:2]),
}


@pytest.mark.parametrize("name", sorted(AWS_MUTATIONS))
def test_aws_checks_catch(aws, name):
    config = copy.deepcopy(aws)
    AWS_MUTATIONS[name](config)
    assert aws_problems(config), f"{name} went unnoticed"


def test_head_prometheus_listens_on_loopback_with_alexrays_config():
    script = (AWS_DIR / "prometheus.sh").read_text()
    assert "--web.listen-address=127.0.0.1:9090" in script
    assert "0.0.0.0" not in script
    assert "$HOME/alexray/cluster/prometheus/prometheus.yml" in script
    # The head's `ray start` sets the targets dir for every driver on it (the default is per user)
    # to the one the config reads, and Ray's discovery file is read too.
    head_start = " ".join(_commands(load_yaml(AWS_CONFIG), "head_start_ray_commands"))
    assert f"ALEXRAY_PROMETHEUS_TARGETS_DIR={alexray_sd_glob().rsplit('/', 1)[0]}" in head_start
    assert RAY_SD_FILE in sd_files()


def test_iam_policies_are_valid_json_scoped_to_the_bucket():
    s3 = json.loads((AWS_DIR / "policies" / "s3.json").read_text())
    resources = [r for st in s3["Statement"] for r in ([st["Resource"]] if isinstance(st["Resource"], str)
                                                        else st["Resource"])]
    assert resources and all(r.startswith("arn:aws:s3:::BUCKET") for r in resources)
    autoscaler = json.loads((AWS_DIR / "policies" / "autoscaler.json").read_text())
    passrole = [st for st in autoscaler["Statement"] if "iam:PassRole" in st["Action"]]
    assert passrole and all("*" not in json.dumps(st["Resource"]) for st in passrole)
    iam = (AWS_DIR / "iam.sh").read_text()
    for profile in ("alexray-head", "alexray-worker"):
        assert profile in iam
    config = load_yaml(AWS_CONFIG)
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()} == \
        {"alexray-head", "alexray-worker"}


# ============================================================================ KubeRay ==========

K8S_ANCHORS = {
    "podtemplatespec-v1-core": {"$ref": "#/$defs/V1PodTemplateSpec"},
    "objectmeta-v1-meta": {"$ref": "#/$defs/V1ObjectMeta"},
    "resourcerequirements-v1-core": {"$ref": "#/$defs/V1ResourceRequirements"},
    "envvar-v1-core": {"$ref": "#/$defs/V1EnvVar"},
    "envfromsource-v1-core": {"$ref": "#/$defs/V1EnvFromSource"},
    "envvarsource-v1-core": {"$ref": "#/$defs/V1EnvVarSource"},
    "volumemount-v1-core": {"$ref": "#/$defs/V1VolumeMount"},
    "securitycontext-v1-core": {"$ref": "#/$defs/V1SecurityContext"},
    "service-v1-core": {"$ref": "#/$defs/V1Service"},
    "pullpolicy-v1-core": {"type": "string"},
    "servicetype-v1-core": {"type": "string"},
    "persistentvolumeaccessmode-v1-core": {"type": "string"},
    "quantity-resource-api": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    # Unused by alexray and not in the generated core file: any object.
    "ingresstls-v1-networking": {"type": "object"},
    "networkpolicyingressrule-v1-networking": {"type": "object"},
    "networkpolicyegressrule-v1-networking": {"type": "object"},
}
_SCALARS = {"boolean": {"type": "boolean"}, "integer": {"type": "integer"}, "float": {"type": "number"},
            "string": {"type": "string"},
            "object (keys:string, values:string)": {"type": "object", "additionalProperties": {"type": "string"}}}


def _field_type(text: str) -> dict:
    if text.endswith(" array"):
        return {"type": "array", "items": _field_type(text[: -len(" array")])}
    if text in _SCALARS:
        return dict(_SCALARS[text])
    link = re.fullmatch(r"\[(\w+)\]\(([^)]*)\)", text)
    if not link:
        raise ValueError(f"unknown field type {text!r} in the KubeRay API reference")
    name, target = link.groups()
    if target.startswith("#"):
        return {"$ref": f"#/$defs/{name}"}
    anchor = target.rsplit("#", 1)[1]
    if anchor not in K8S_ANCHORS:
        raise ValueError(f"no schema for the Kubernetes type {name} ({anchor})")
    return dict(K8S_ANCHORS[anchor])


def kuberay_defs(markdown: str) -> dict:
    """JSON Schemas of the KubeRay types from the API reference: fields, types, enums, minimums."""
    defs = {}
    for section in re.split(r"^## ", markdown, flags=re.M)[1:]:
        name, body = section.split("\n", 1)
        name = name.strip()
        if "_Underlying type:_ _string_" in body:
            values = re.findall(r"^\| `([^`]+)` \|", body, flags=re.M)
            enum = re.search(r"^- Enum: \[([^\]]*)\]", body, flags=re.M)
            values = values or (enum.group(1).split() if enum else [])
            defs[name] = {"type": "string", **({"enum": values} if values else {})}
            continue
        props, required = {}, []
        for row in re.findall(r"^\| `.*\|$", body, flags=re.M):
            cells = [c.strip() for c in row.strip("|").split("|")]
            field, description, _default, validation = cells
            match = re.fullmatch(r"`(\w+)` _(.+)_", field)
            if not match:
                raise ValueError(f"{name}: cannot read the row {row!r}")
            prop, type_text = match.groups()
            schema = _field_type(type_text)
            const = re.fullmatch(r"`([^`]+)`", description)
            if prop in ("apiVersion", "kind") and const:
                schema = {"const": const.group(1)}
            enum = re.search(r"Enum: \[([^\]]*)\]", validation)
            if enum:
                schema = {"allOf": [schema, {"enum": enum.group(1).split()}]}
            for key, keyword in (("Minimum", "minimum"), ("MinItems", "minItems"), ("MinLength", "minLength")):
                bound = re.search(rf"{key}: (\d+)", validation)
                if bound:
                    schema = {"allOf": [schema, {keyword: int(bound.group(1))}]}
            if "Required:" in validation:
                required.append(prop)
            props[prop] = schema
        defs[name] = {"type": "object", "properties": props, "additionalProperties": False,
                      **({"required": required} if required else {})}
    return defs


@pytest.fixture(scope="module")
def schema_defs() -> dict:
    core = json.loads((SCHEMA_DIR / "k8s-core-v1.37.json").read_text())["$defs"]
    kuberay = kuberay_defs((SCHEMA_DIR / "kuberay-api-v1.7.0.md").read_text())
    assert not set(core) & set(kuberay)
    return {**core, **kuberay}


def validator(defs: dict, kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{kind}"})


def schema_errors(defs: dict, doc: dict) -> list[str]:
    kind = {"RayCluster": "RayCluster", "RayJob": "RayJob", "ServiceAccount": "V1ServiceAccount"}[doc["kind"]]
    out = []
    for error in validator(defs, kind).iter_errors(doc):
        # Optional fields are "X or null": name the error inside X, not the anyOf around it.
        while error.context:
            error = max(error.context, key=lambda e: (e.validator_value != "null", len(e.absolute_path)))
        out.append(f"{'/'.join(map(str, error.absolute_path))}: {error.message}")
    return out


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_yaml(KUBERAY_DIR / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(KUBERAY_DIR / "rayjob.yaml")


def test_the_schema_reads_the_whole_reference(schema_defs):
    """Guards the converter: the types the manifests use are there with their documented fields."""
    assert set(schema_defs["WorkerGroupSpec"]["properties"]) >= {"groupName", "minReplicas", "maxReplicas",
                                                                 "rayStartParams", "template"}
    assert schema_defs["AuthMode"]["enum"] == ["disabled", "token"]
    assert schema_defs["UpscalingMode"]["enum"] == ["Default", "Aggressive", "Conservative"]
    assert "lifecycle" in schema_defs["V1Container"]["properties"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "serviceaccount.yaml"])
def test_kuberay_manifests_match_the_documented_fields(schema_defs, name):
    assert schema_errors(schema_defs, load_yaml(KUBERAY_DIR / name)) == []


def _worker(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


def _worker_container(doc):
    return _worker(doc)["template"]["spec"]["containers"][0]


SCHEMA_MUTATIONS = {  # name: (mutation, where the schema must point)
    "misspelt worker group field": (lambda d: _worker(d).update(maxReplica=4), "'maxReplica' was unexpected"),
    "replicas as a string": (lambda d: _worker(d).update(minReplicas="0"), "minReplicas: '0' is not of type"),
    "auth mode outside the enum": (lambda d: d["spec"]["authOptions"].update(mode="tokens"),
                                   "authOptions/mode: 'tokens' is not one of"),
    "unknown preStop field": (lambda d: _worker_container(d)["lifecycle"]["preStop"]["exec"].update(cmd=["x"]),
                              "preStop/exec: Additional properties are not allowed ('cmd'"),
    "toleration with an unknown key": (lambda d: _worker(d)["template"]["spec"]["tolerations"][0].update(taint="x"),
                                       "tolerations/0: Additional properties are not allowed ('taint'"),
    "container without a name": (lambda d: _worker_container(d).pop("name"),
                                 "containers/0: 'name' is a required property"),
    "GPU quantity as a list": (lambda d: _worker_container(d)["resources"]["limits"].update({"nvidia.com/gpu": [4]}),
                               "limits/nvidia.com/gpu"),
    "status in a manifest": (lambda d: d.update(status={}), "('status' was unexpected)"),
    "wrong apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion: 'ray.io/v1' was expected"),
}


@pytest.mark.parametrize("name", sorted(SCHEMA_MUTATIONS))
def test_kuberay_schema_rejects(schema_defs, raycluster, name):
    mutate, expected = SCHEMA_MUTATIONS[name]
    doc = copy.deepcopy(raycluster)
    mutate(doc)
    errors = schema_errors(schema_defs, doc)
    assert any(expected in e for e in errors), f"{name}: {errors}"


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _port(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def _drain_deadline(container: dict) -> int | None:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if not any(str(c).endswith("cluster/kuberay/drain.py") for c in command) or "--deadline" not in command:
        return None
    return int(command[command.index("--deadline") + 1])


def cluster_problems(spec: dict) -> list[str]:
    """What the issue asks of a KubeRay cluster spec (RayCluster.spec or RayJob.spec.rayClusterSpec)."""
    problems = []
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("token auth off, or its token not from a named Secret")
    head = spec["headGroupSpec"]
    groups = [head] + spec.get("workerGroupSpecs", [])
    gpu_groups = []
    for group in spec.get("workerGroupSpecs", []):
        name = group.get("groupName")
        limits = [c.get("resources", {}).get("limits", {}) for c in _containers(group)]
        if any(int(lim.get("nvidia.com/gpu", 0)) > 0 for lim in limits):
            gpu_groups.append(group)
        else:
            continue
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not 0 <= lo <= group.get("replicas", lo) <= hi or hi < 1 or hi == 2**31 - 1:
            problems.append(f"{name}: replicas not within minReplicas <= replicas <= maxReplicas (bounded)")
        pod = group["template"]["spec"]
        if not any(t.get("key") == "nvidia.com/gpu" and t.get("operator") in ("Exists", "Equal")
                   for t in pod.get("tolerations", [])):
            problems.append(f"{name}: no toleration for nvidia.com/gpu taints")
        for c in _containers(group):
            requests = c.get("resources", {}).get("requests", {})
            if requests.get("nvidia.com/gpu") not in (None, c["resources"]["limits"].get("nvidia.com/gpu")):
                problems.append(f"{name}: GPU requests differ from limits")
        deadline = _drain_deadline(_containers(group)[0])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if deadline is None:
            problems.append(f"{name}: no preStop running cluster/kuberay/drain.py --deadline N")
        elif grace < deadline + 15:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} leaves under 15 s past the "
                            f"drain deadline {deadline}")
    if not gpu_groups:
        problems.append("no worker group asks for nvidia.com/gpu")

    # One metrics port: ray start's, the container's 'metrics' port and the scrape annotation.
    for group in groups:
        port = group.get("rayStartParams", {}).get("metrics-export-port")
        ray_container = _containers(group)[0]
        annotations = group["template"].get("metadata", {}).get("annotations", {})
        if port != str(METRICS_PORT) or _port(ray_container, "metrics") != METRICS_PORT or \
                annotations.get("prometheus.io/port") != str(METRICS_PORT) or \
                annotations.get("prometheus.io/scrape") != "true":
            problems.append(f"{group.get('groupName', 'head')}: metrics port not {METRICS_PORT} everywhere")
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head offers CPUs to training tasks")

    # The prometheus sidecar sees the driver's targets dir and Ray's discovery file.
    problems += sidecar_problems(head)
    return problems


def sidecar_problems(head: dict) -> list[str]:
    problems = []
    pod = head["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    ray_head, sidecar = pod["containers"][0], containers.get("prometheus")
    if sidecar is None:
        return ["no prometheus sidecar on the head"]
    env = {e["name"]: e.get("value") for e in ray_head.get("env", [])}
    targets_dir = env.get("ALEXRAY_PROMETHEUS_TARGETS_DIR")
    if f"{targets_dir}/*.json" != alexray_sd_glob():
        problems.append(f"ALEXRAY_PROMETHEUS_TARGETS_DIR {targets_dir} is not the dir prometheus.yml reads")

    def volume_at(container, path):
        return next((m["name"] for m in container.get("volumeMounts", [])
                     if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")), None)

    for path in sd_files():
        directory = path.rsplit("/", 1)[0]
        written, read = volume_at(ray_head, directory), volume_at(sidecar, directory)
        if written is None or written != read:
            problems.append(f"{directory}: not one volume shared by ray-head and the prometheus sidecar")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_volume = volumes.get(volume_at(sidecar, "/etc/prometheus/prometheus.yml"), {})
    if config_volume.get("configMap", {}).get("name") != "alexray-prometheus":
        problems.append("the sidecar does not read the alexray-prometheus ConfigMap")
    args = " ".join(sidecar.get("args", []))
    if "--config.file=/etc/prometheus/prometheus.yml" not in args or _port(sidecar, "prometheus") != 9090:
        problems.append("the sidecar's config file or port is not the one documented")
    return problems


def test_kuberay_cluster_has_what_the_issue_asks(raycluster, rayjob):
    assert cluster_problems(raycluster["spec"]) == []
    assert cluster_problems(rayjob["spec"]["rayClusterSpec"]) == []


def test_rayjob_runs_the_same_cluster_as_the_raycluster(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert entrypoint[:5] == ["python", "-u", "-m", "orchestrator.cli", "train"]
    spec_path = entrypoint[5]
    assert spec_path.startswith("/home/ray/alexray/")
    assert (ROOT / spec_path.removeprefix("/home/ray/alexray/")).is_file()  # the Dockerfile copies the checkout
    assert any(a.startswith("run.name=") for a in entrypoint), "a retry must resume, not start a new run"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def _group(doc, name):
    return next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


CLUSTER_MUTATIONS = {
    "auth off": lambda d: d["spec"]["authOptions"].update(mode="disabled"),
    "no GPUs": lambda d: [c["resources"][k].pop("nvidia.com/gpu") for c in _containers(_group(d, "gpu"))
                          for k in ("limits", "requests")],
    "unbounded workers": lambda d: _group(d, "gpu").pop("maxReplicas"),
    "min above max": lambda d: _group(d, "gpu").update(minReplicas=9),
    "no GPU toleration": lambda d: _group(d, "gpu")["template"]["spec"].pop("tolerations"),
    "grace shorter than the drain": lambda d: _group(d, "gpu")["template"]["spec"].update(
        terminationGracePeriodSeconds=90),
    "grace left at the default": lambda d: _group(d, "gpu")["template"]["spec"].pop("terminationGracePeriodSeconds"),
    "no preStop": lambda d: _containers(_group(d, "gpu"))[0].pop("lifecycle"),
    "metrics port mismatch": lambda d: _group(d, "gpu")["rayStartParams"].update({"metrics-export-port": "9100"}),
    "no scrape annotation": lambda d: _group(d, "gpu")["template"]["metadata"].pop("annotations"),
    "targets dir not shared": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1][
        "volumeMounts"].pop(2),
    "targets dir env differs": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"][0].update(value="/var/tmp/targets"),
    "training on the head": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
}


@pytest.mark.parametrize("name", sorted(CLUSTER_MUTATIONS))
def test_kuberay_checks_catch(raycluster, name):
    doc = copy.deepcopy(raycluster)
    CLUSTER_MUTATIONS[name](doc)
    assert cluster_problems(doc["spec"]), f"{name} went unnoticed"


def podmonitor_problems(podmonitor: dict, cluster: dict) -> list[str]:
    problems = []
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        labels = group["template"].get("metadata", {}).get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{group.get('groupName', 'head')}: its pods are not selected")
    ports = {e["port"]: e for e in podmonitor["spec"]["podMetricsEndpoints"]}
    if "metrics" not in ports:
        problems.append("Ray's metrics port is not scraped")
    federate = ports.get("prometheus", {})
    head_ports = [_port(c, "prometheus") for c in _containers(spec["headGroupSpec"])]
    if federate.get("path") != "/federate" or not federate.get("honorLabels") or not any(head_ports) or \
            federate.get("params", {}).get("match[]") != ['{job="alexray"}']:
        problems.append("alexray's series are not federated from the head's sidecar")
    return problems


def test_podmonitor_selects_the_ray_pods_and_federates_alexray(raycluster):
    podmonitor = load_yaml(KUBERAY_DIR / "podmonitor.yaml")
    assert podmonitor["apiVersion"] == "monitoring.coreos.com/v1" and podmonitor["kind"] == "PodMonitor"
    assert podmonitor_problems(podmonitor, raycluster) == []
    broken = copy.deepcopy(podmonitor)
    broken["spec"]["selector"]["matchLabels"] = {"app": "other"}
    broken["spec"]["podMetricsEndpoints"][1]["honorLabels"] = False
    assert len(podmonitor_problems(broken, raycluster)) == 3


def test_dockerfile_installs_the_pinned_ray_and_the_checkout():
    dockerfile = (KUBERAY_DIR / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[default,train\]==([\d.]+)"', pyproject).group(1)
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py311", dockerfile, flags=re.M)
    assert base and base.group(1) == ray_pin
    assert load_yaml(KUBERAY_DIR / "raycluster.yaml")["spec"]["rayVersion"] == ray_pin
    assert "COPY --chown=ray:users . /home/ray/alexray" in dockerfile
    ignored = (KUBERAY_DIR / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ======================================================================= preStop hook ==========

@pytest.fixture(scope="module")
def drain():
    return _load_module(KUBERAY_DIR / "drain.py", "alexray_kuberay_drain")


def test_drain_then_wait_for_the_workers_then_stop(drain):
    calls, clock, alive = [], FakeClock(), iter([3, 2, 0])
    code = drain.run(90, node_id_fn=lambda: "ab" * 28,
                     drain_fn=lambda node, deadline, msg: calls.append(("drain", node, deadline)),
                     alive_fn=lambda node: next(alive), stop_fn=lambda: calls.append(("stop",)),
                     clock=clock, sleep=clock.sleep, hostname="pod-1")
    assert code == 0
    assert calls == [("drain", "ab" * 28, 90), ("stop",)]
    assert clock.now == pytest.approx(2 * drain.POLL_S)


def test_drain_stops_ray_at_the_deadline_and_after_failures(drain):
    clock, stopped = FakeClock(), []
    drain.run(30, node_id_fn=lambda: "n", drain_fn=lambda *a: None, alive_fn=lambda node: 1,
              stop_fn=lambda: stopped.append(clock.now), clock=clock, sleep=clock.sleep)
    assert stopped == [pytest.approx(30)]

    def unreachable():
        raise ConnectionError("no raylet")

    clock, stopped = FakeClock(), []
    drain.run(30, node_id_fn=unreachable, drain_fn=lambda *a: pytest.fail("drained without a node"),
              alive_fn=lambda node: pytest.fail("polled without a node"),
              stop_fn=lambda: stopped.append(clock.now), clock=clock, sleep=clock.sleep)
    assert stopped == [0.0]


# ====================================================================== credentials ==========

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[=:]\s*\S", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9+/_-]{8,}"),
    "literal env value for a token": re.compile(r"name:\s*RAY_AUTH_TOKEN\s*\n\s*value:", re.M),
    "password": re.compile(r"password\s*[=:]\s*\S", re.I),
}


def secrets_in(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def deployment_files() -> list[Path]:
    return sorted(p for d in (AWS_DIR, KUBERAY_DIR) for p in d.rglob("*") if p.is_file())


def test_no_credentials_in_any_deployment_file():
    files = deployment_files()
    assert len(files) >= 10
    found = {str(p.relative_to(ROOT)): secrets_in(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("text", [
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "export RAY_AUTH_TOKEN=0123456789abcdef",
    "env:\n  - name: RAY_AUTH_TOKEN\n    value: abc",
])
def test_credential_scan_finds(text):
    assert secrets_in(text)


# ======================================================================= scaling doc ===========

@pytest.fixture(scope="module")
def scaling():
    return _load_module(ROOT / "docs" / "scaling.py", "alexray_docs_scaling")


def doc_tables(text: str) -> dict[str, str]:
    """The table after each ``<!-- table:NAME -->`` marker of the doc, up to the first blank line."""
    out = {}
    for match in re.finditer(r"<!-- table:([\w-]+) -->\n((?:\|.*\n?)+)", text):
        out[match.group(1)] = match.group(2).rstrip("\n")
    return out


def test_scaling_doc_holds_the_scripts_tables(scaling):
    doc = doc_tables((ROOT / "docs" / "scaling.md").read_text())
    assert doc == scaling.tables()


def test_scaling_doc_check_catches_an_edited_cell(scaling):
    text = (ROOT / "docs" / "scaling.md").read_text().replace("| 16 | 32% | 58% | 94% | 99% |",
                                                                "| 16 | 35% | 58% | 94% | 99% |")
    assert doc_tables(text) != scaling.tables()


def test_scaling_model_counts_the_real_models_parameters(scaling):
    from workers.models.architectures import build_model

    model = build_model("alexnet", 1000, 1.0)
    assert scaling.PARAMS == sum(p.numel() for p in model.parameters()) == 60_965_224
    fc = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    assert scaling.FC_PARAMS == fc


def test_scaling_arithmetic(scaling):
    gpu = scaling.GPUS["A100"]
    # 2(N-1)/N x 243.86 MB at 42.5 GB/s for 16 GPUs: 10.76 ms.
    assert scaling.allreduce_s(16, scaling.PARAMS * 4, 42.5) == pytest.approx(1.875 * 0.24386 / 42.5, rel=1e-3)
    one = scaling.step(gpu, 1, 400, 4)
    assert one["efficiency"] == 1 and one["images_per_s"] == gpu.rate
    # bf16 never worse than fp32; more bandwidth never worse.
    for n in scaling.GPU_COUNTS:
        for net in scaling.NETWORKS_GBIT:
            assert scaling.step(gpu, n, net, 2)["efficiency"] >= scaling.step(gpu, n, net, 4)["efficiency"]
        assert scaling.step(gpu, n, 400, 4)["efficiency"] >= scaling.step(gpu, n, 100, 4)["efficiency"]
    assert scaling.main(["--rate", "A100=9400"]) == 0
