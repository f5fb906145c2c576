"""infra/ against the code: the Dockerfile, the Compose file, the Kubernetes manifests and the S3
policies, parsed and cross-checked with the settings and the CLI.

No container engine runs on these machines, so nothing here builds or starts an image. What is
checked instead: every `EXCHANGE_*` variable the files set is a setting (or a CLI variable), and
the values they give pass `Settings.from_mapping`; every command they run is a real `exchange`
command with options it knows; probes ask `/readyz` and `/healthz` on the port the settings
give; the final image is non-root and compiler-free; the S3 policies allow exactly the actions
`exchange/storage.py` needs on one bucket. Settings and commands are read at run time, so a new
setting or command needs no change here.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from exchange.cli import main
from exchange.dev.seaweed import ADMIN_ACTIONS, SERVICE_ACTIONS
from exchange.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "container" / "Dockerfile"
COMPOSE_DIR = INFRA / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S = INFRA / "k8s"
S3 = INFRA / "s3"

#: The name of the image the Dockerfile builds, as Compose and Kubernetes refer to it.
IMAGE = "exchange"
#: Values standing in for secrets the manifests only refer to (a Secret, an env file).
SECRET_DUMMIES = {"EXCHANGE_DATABASE_URL": "postgresql://exchange@db.invalid:5432/exchange"}
#: Variables that hold secrets: never inline in Compose or a ConfigMap.
SECRET_VARIABLES = {
    "EXCHANGE_DATABASE_URL",
    "EXCHANGE_S3_SECRET_ACCESS_KEY",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
}


# -- the settings and the CLI, read at run time ----------------------------------------------------


def _commands(cmd: click.Command = main, path: tuple[str, ...] = ("exchange",)) -> Iterator[click.Command]:
    yield cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def known_variables() -> set[str]:
    """Every `EXCHANGE_*` name something reads: the settings, the config file, the CLI's own."""
    names = {f"EXCHANGE_{f.name.upper()}" for f in fields(Settings)} | {"EXCHANGE_CONFIG"}
    for cmd in _commands():
        for param in cmd.params:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            names.update(envvars)
    return names


def unknown_variables(names: Iterable[str]) -> list[str]:
    known = known_variables()
    return sorted(n for n in names if n.startswith("EXCHANGE_") and n not in known)


def settings_of(env: Mapping[str, str]) -> Settings:
    """The settings a container with this environment gets (raises on a bad value)."""
    return Settings.from_mapping({k: v for k, v in env.items() if k.startswith("EXCHANGE_")})


def cli_problem(argv: Sequence[str]) -> str | None:
    """None when `argv` is a real `exchange` command whose options and arguments it knows; else
    what is wrong. Option values are not converted: paths name the container's files."""
    if not argv or argv[0] != "exchange":
        return f"{list(argv)[:1]} is not the exchange command"
    cmd: click.Command = main
    path, args, positional = "exchange", list(argv[1:]), 0
    while args:
        token = args.pop(0)
        ctx = click.Context(cmd, info_name=path)
        if token.startswith("-") and token != "-":
            name, eq, _ = token.partition("=")
            option = next(
                (
                    p
                    for p in cmd.get_params(ctx)
                    if isinstance(p, click.Option) and name in (*p.opts, *p.secondary_opts)
                ),
                None,
            )
            if option is None:
                return f"{path}: no such option {name}"
            if not (option.is_flag or option.count or eq):
                if not args:
                    return f"{path}: {name} needs a value"
                args.pop(0)
        elif isinstance(cmd, click.Group):
            sub = cmd.get_command(ctx, token)
            if sub is None:
                return f"{path}: no such command {token!r}"
            cmd, path, positional = sub, f"{path} {token}", 0
        else:
            positional += 1
            arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
            if not any(a.nargs == -1 for a in arguments) and positional > sum(a.nargs for a in arguments):
                return f"{path}: unexpected argument {token!r}"
    if isinstance(cmd, click.Group) and not cmd.invoke_without_command:
        return f"{path}: a command is needed"
    required = sum(
        a.nargs for a in cmd.params if isinstance(a, click.Argument) and a.required and a.nargs > 0
    )
    if positional < required:
        return f"{path}: {required} argument(s) needed, {positional} given"
    return None


def test_cli_problem_tells_real_commands_from_others() -> None:
    assert cli_problem(["exchange", "serve"]) is None
    assert cli_problem(["exchange", "--identity", "/x", "init", "--name", "a", "--org=b"]) is None
    assert cli_problem(["exchange", "audit", "verify", "--bundle", "b"]) is None
    assert cli_problem(["exchange", "serv"]) is not None
    assert cli_problem(["exchange", "serve", "--port", "1"]) is not None
    assert cli_problem(["exchange", "init", "--name"]) is not None
    assert cli_problem(["exchange", "audit"]) is not None
    assert cli_problem(["exchange", "serve", "extra"]) is not None
    assert cli_problem(["python", "-m", "exchange"]) is not None


def test_variable_and_value_checks_can_fail() -> None:
    assert unknown_variables(["EXCHANGE_PORT", "EXCHANGE_SERVER", "PATH"]) == []
    assert unknown_variables(["EXCHANGE_S3_BUCKETS"]) == ["EXCHANGE_S3_BUCKETS"]
    with pytest.raises(Exception, match="database_url"):
        settings_of({"EXCHANGE_DATABASE_URL": "mysql://x"})


# -- the Dockerfile -------------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, rest) per stage, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for pair in shlex.split(rest):
                name, eq, value = pair.partition("=")
                assert eq, f"ENV {pair!r}: use the NAME=value form"
                env[name] = value
    return env


def _exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    rests = [rest for w, rest in stage if w == word]
    assert rests, f"the final stage has no {word}"
    value = json.loads(rests[-1])  # exec form: no shell between the runtime and the CLI
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


#: Packages that compile: none may be installed in the final image.
_COMPILERS = re.compile(
    r"\b(gcc|g\+\+|clang|cc|make|cmake|build-essential|libc6?-dev|python3?(\.\d+)?-dev|rustc|cargo)\b"
)


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        return ["not multi-stage"]
    final = stages[-1]
    problems = []
    if not any(w == "COPY" and "--from=" in rest for w, rest in final):
        problems.append("the final stage copies nothing from a build stage")
    users = [rest for w, rest in final if w == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"the final stage runs as {uid!r}: a fixed non-root UID is needed")
    for w, rest in final:
        if w == "RUN" and re.search(r"\b(install|add)\b", rest) and _COMPILERS.search(rest):
            problems.append(f"the final stage installs a compiler: {rest}")
        if w == "RUN" and re.search(r"\bpip\b.*\binstall\b", rest):
            problems.append("the final stage runs pip: it should only copy the builder's venv")
    entrypoint, cmd = _exec_form(final, "ENTRYPOINT"), _exec_form(final, "CMD")
    if entrypoint != ["exchange"]:
        problems.append(f"ENTRYPOINT {entrypoint}: expected ['exchange']")
    if problem := cli_problem(entrypoint + cmd):
        problems.append(problem)
    env = dockerfile_env(final)
    problems += [f"unknown variable {n}" for n in unknown_variables(env)]
    port = settings_of(env).port
    exposed = [int(p.split("/")[0]) for w, rest in final if w == "EXPOSE" for p in rest.split()]
    if exposed != [port]:
        problems.append(f"EXPOSE {exposed}, but the settings give port {port}")
    if not any(w == "HEALTHCHECK" and "/healthz" in rest for w, rest in final):
        problems.append("no HEALTHCHECK on /healthz")
    return problems


def image_env() -> dict[str, str]:
    return dockerfile_env(dockerfile_stages(DOCKERFILE.read_text())[-1])


def image_uid() -> int:
    users = [rest for w, rest in dockerfile_stages(DOCKERFILE.read_text())[-1] if w == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("USER 10001:10001", "USER root", "non-root"),
        ("USER 10001:10001", "", "non-root"),
        ('CMD ["serve"]', 'CMD ["serv"]', "no such command"),
        ('ENTRYPOINT ["exchange"]', 'ENTRYPOINT ["python"]', "ENTRYPOINT"),
        ("EXCHANGE_PORT=8080", "EXCHANGE_PROT=8080", "unknown variable"),
        ("EXCHANGE_PORT=8080", "EXCHANGE_PORT=9090", "EXPOSE"),
        ("USER 10001", "RUN apt-get update && apt-get install -y gcc\nUSER 10001", "compiler"),
        ("COPY --from=builder", "COPY", "copies nothing"),
    ],
)
def test_dockerfile_check_catches(old: str, new: str, problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(problem in p for p in dockerfile_problems(text.replace(old, new)))


# -- environment files ----------------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    """A `NAME=value` file; `X.env` is read from its committed `X.env.example`."""
    if not path.exists():
        path = path.with_name(path.name + ".example")
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, eq, value = line.partition("=")
            assert eq, f"{path.name}: {line!r} is not NAME=value"
            env[name.strip()] = value
    return env


def test_env_examples() -> None:
    examples = sorted(INFRA.rglob("*.env.example"))
    assert examples
    for path in examples:
        assert unknown_variables(env_file(path)) == [], path.name


# -- Compose --------------------------------------------------------------------------------------


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _env_files(service: Mapping[str, Any], base: Path) -> dict[str, str]:
    files = service.get("env_file") or []
    env: dict[str, str] = {}
    for item in [files] if isinstance(files, str) else files:
        env.update(env_file(base / (item if isinstance(item, str) else item["path"])))
    return env


def compose_problems(doc: Mapping[str, Any], base: Path = COMPOSE_DIR) -> list[str]:
    services: Mapping[str, Any] = doc["services"]
    problems = []
    image = doc["x-exchange"]["image"]
    ours = {name: s for name, s in services.items() if s.get("image") == image}
    for name, service in services.items():
        env = _environment(service)
        problems += [f"{name}: unknown variable {n}" for n in unknown_variables(env)]
        problems += [f"{name}: unknown variable {n}" for n in unknown_variables(_env_files(service, base))]
        problems += [f"{name}: secret {n} inline" for n in SECRET_VARIABLES & set(env)]
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith(".") and "." in Path(source).name and not (base / source).exists():
                problems.append(f"{name}: mounts {source}, which is not there")
    if "exchange" not in ours or ours["exchange"].get("deploy", {}).get("replicas", 1) < 2:
        problems.append("the exchange service is not replicated")
    runs = []
    for name, service in ours.items():
        if service.get("entrypoint") is not None:
            problems.append(f"{name}: overrides the image's entrypoint")
        argv = ["exchange", *(service.get("command") or ["serve"])]
        runs.append(argv)
        if problem := cli_problem(argv):
            problems.append(f"{name}: {problem}")
        env = image_env() | _env_files(service, base) | _environment(service)
        try:
            port = settings_of(
                env | {k: SECRET_DUMMIES.get(k, "x") for k in SECRET_VARIABLES - set(env)}
            ).port
        except Exception as exc:
            problems.append(f"{name}: bad settings: {exc}")
            continue
        if argv[1:] == ["serve"] and f"exchange {port}" not in (base / "Caddyfile").read_text():
            problems.append(f"{name}: the proxy does not forward to port {port}")
    if not any("init" in argv for argv in runs):
        problems.append("no service runs `exchange init` (the migration and first admin)")
    images = " ".join(str(s.get("image", "")) for s in services.values())
    for needed in ("postgres", "minio/minio", "caddy"):
        if needed not in images:
            problems.append(f"no {needed} service")
    return problems


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose() -> None:
    assert compose_problems(compose()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("EXCHANGE_S3_BUCKET: exchange", "EXCHANGE_S3_BUCKT: exchange", "unknown variable"),
        ('EXCHANGE_PORT: "8080"', "EXCHANGE_PORT: eighty", "bad settings"),
        ("EXCHANGE_S3_ENDPOINT: http://minio:9000", "EXCHANGE_S3_ENDPOINT: minio:9000", "bad settings"),
        ('EXCHANGE_PORT: "8080"', 'EXCHANGE_PORT: "8081"', "proxy"),
        ("command: [serve]", "command: [server]", "no such command"),
        ("init, --name, admin", "init, --admin, admin", "no such option"),
        ("replicas: 3", "replicas: 1", "not replicated"),
        (
            "    EXCHANGE_HOST: 0.0.0.0\n",
            "    EXCHANGE_HOST: 0.0.0.0\n    EXCHANGE_DATABASE_URL: x\n",
            "inline",
        ),
        ("./Caddyfile:", "./Caddyfile.missing:", "not there"),
    ],
)
def test_compose_check_catches(old: str, new: str, problem: str) -> None:
    text = COMPOSE.read_text()
    assert old in text
    problems = compose_problems(yaml.safe_load(text.replace(old, new)))
    assert any(problem in p for p in problems), problems


# -- Kubernetes -----------------------------------------------------------------------------------


def k8s_objects(texts: Iterable[str]) -> list[dict[str, Any]]:
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def _k8s_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(K8S.glob("*.yaml"))}


def _pod_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _ours(container: Mapping[str, Any]) -> bool:
    return str(container["image"]).rsplit("/", 1)[-1].split(":")[0] == IMAGE


def k8s_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Job", "Secret"):
        if kind not in by_kind:
            problems.append(f"no {kind}")
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    secrets = {
        s["metadata"]["name"]: s.get("stringData", s.get("data", {})) for s in by_kind.get("Secret", [])
    }
    for name, data in config_maps.items():
        problems += [f"ConfigMap {name}: unknown variable {n}" for n in unknown_variables(data)]
        problems += [f"ConfigMap {name}: secret {n}" for n in SECRET_VARIABLES & set(data)]
    runs: list[list[str]] = []
    for workload in by_kind.get("Deployment", []) + by_kind.get("Job", []):
        kind, name = workload["kind"], workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True or security.get("runAsUser") != image_uid():
            problems.append(f"{kind} {name}: not runAsNonRoot as the image's UID {image_uid()}")
        secret_volumes = {
            v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v
        }
        for volume_secret in secret_volumes.values():
            if volume_secret not in secrets:
                problems.append(f"{kind} {name}: mounts Secret {volume_secret}, which no example defines")
        for c in _pod_containers(pod):
            where = f"{kind} {name} container {c['name']}"
            sc = c.get("securityContext", {})
            if (
                sc.get("readOnlyRootFilesystem") is not True
                or sc.get("allowPrivilegeEscalation") is not False
            ):
                problems.append(f"{where}: needs readOnlyRootFilesystem and no privilege escalation")
            if not _ours(c):
                continue
            argv = c.get("command") or ["exchange"]
            argv = [*argv, *c.get("args", [])]
            runs.append(argv)
            if problem := cli_problem(argv):
                problems.append(f"{where}: {problem}")
            if "resources" not in c:
                problems.append(f"{where}: no resources")
            env = dict(image_env())
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref not in config_maps:
                    problems.append(f"{where}: envFrom names no ConfigMap here ({ref})")
                env.update(config_maps.get(ref, {}))
            for item in c.get("env", []):
                problems += [f"{where}: unknown variable {n}" for n in unknown_variables([item["name"]])]
                if "value" in item:
                    env[item["name"]] = str(item["value"])
                    if item["name"] in SECRET_VARIABLES:
                        problems.append(f"{where}: secret {item['name']} inline")
                    continue
                ref = item.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("key") not in secrets.get(ref.get("name"), {}):
                    problems.append(f"{where}: {item['name']} refers to no Secret key here ({ref})")
                env[item["name"]] = SECRET_DUMMIES.get(item["name"], "dummy")
            try:
                settings = settings_of(env)
            except Exception as exc:
                problems.append(f"{where}: bad settings: {exc}")
                continue
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if argv[1:] == ["serve"]:
                key_dir = str(Path(settings.effective_log_signing_key_file).parent)
                if mounts.get(key_dir) not in secret_volumes:
                    problems.append(f"{where}: the log signing key {key_dir} is not mounted from a Secret")
                problems += _probe_problems(where, c, settings.port)
                problems += _metrics_problems(where, workload, c, settings.metrics_port)
                grace = pod.get("terminationGracePeriodSeconds", 30)
                if grace <= getattr(settings, "shutdown_grace_s", 0):
                    problems.append(f"{where}: terminationGracePeriodSeconds is not above shutdown_grace_s")
    for deployment in by_kind.get("Deployment", []):
        name = deployment["metadata"]["name"]
        if deployment["spec"].get("replicas", 1) < 2:
            problems.append(f"Deployment {name}: not replicated")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for other in by_kind.get("Service", []) + by_kind.get("PodDisruptionBudget", []):
            selector = other["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            if not selector.items() <= labels.items():
                problems.append(f"{other['kind']} {other['metadata']['name']} does not select {name}")
        ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for service in by_kind.get("Service", []):
            for port in service["spec"]["ports"]:
                if port["targetPort"] not in ports:
                    problems.append(f"Service {service['metadata']['name']}: no container port {port}")
    if ["exchange", "serve"] not in runs:
        problems.append("nothing runs `exchange serve`")
    problems += _network_policy_problems(objects)
    if not any("init" in argv for argv in runs):
        problems.append("no Job runs `exchange init` (the migration and first admin)")
    return problems


def _probe_problems(where: str, container: Mapping[str, Any], port: int) -> list[str]:
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    problems = []
    if port not in named.values():
        problems.append(f"{where}: containerPort is not the settings' port {port}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or named.get(get.get("port"), get.get("port")) != port:
            problems.append(f"{where}: {probe} is not GET {path} on port {port}")
    return problems


def _metrics_problems(
    where: str, workload: Mapping[str, Any], container: Mapping[str, Any], metrics_port: int
) -> list[str]:
    """The metrics listener is declared where Prometheus looks, and nowhere else."""
    if not metrics_port:
        return []
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    problems = []
    if named.get("metrics") != metrics_port:
        problems.append(f"{where}: no containerPort named metrics at EXCHANGE_METRICS_PORT {metrics_port}")
    if annotations.get("prometheus.io/port") not in (None, str(metrics_port)):
        problems.append(f"{where}: the prometheus.io/port annotation is not {metrics_port}")
    return problems


def _network_policy_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The metrics port is reachable from the monitoring namespace only; the API port from anyone."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if not policies:
        return ["no NetworkPolicy guards the metrics port"]
    problems = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            sources = rule.get("from", [])
            anywhere = not sources or any(
                f.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0") for f in sources
            )
            if "metrics" in ports and anywhere:
                problems.append(f"NetworkPolicy {policy['metadata']['name']}: metrics open to everyone")
            if "http" in ports and "metrics" in ports:
                problems.append(f"NetworkPolicy {policy['metadata']['name']}: one rule for API and metrics")
    return problems


def test_kubernetes() -> None:
    assert k8s_problems(k8s_objects(_k8s_texts().values())) == []


def test_kustomization_lists_files_that_exist() -> None:
    (kustomization,) = k8s_objects([(K8S / "kustomization.yaml").read_text()])
    assert all((K8S / r).exists() for r in kustomization["resources"])


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        ("configmap.yaml", "EXCHANGE_S3_REGION:", "EXCHANGE_S3_REGOIN:", "unknown variable"),
        ("configmap.yaml", 'EXCHANGE_PORT: "8080"', 'EXCHANGE_PORT: "-1"', "bad settings"),
        ("configmap.yaml", 'EXCHANGE_PORT: "8080"', 'EXCHANGE_PORT: "8081"', "containerPort"),
        ("configmap.yaml", "EXCHANGE_PUBLIC_URL: https://", "EXCHANGE_PUBLIC_URL: ftp://", "bad settings"),
        ("deployment.yaml", "args: [serve]", "args: [serve, --reload]", "no such option"),
        ("job-init.yaml", "init, --name", "bootstrap, --name", "no such command"),
        ("job-migrate.yaml", "[admin, migrate]", "[admin, migrat]", "no such command"),
        ("deployment.yaml", "path: /readyz", "path: /ready", "readinessProbe"),
        (
            "deployment.yaml",
            "livenessProbe:\n            httpGet: {path: /healthz",
            "livenessProbe:\n            httpGet: {path: /readyz",
            "livenessProbe",
        ),
        ("deployment.yaml", "key: s3-access-key-id", "key: s3-access-key", "no Secret key"),
        ("deployment.yaml", "runAsUser: 10001", "runAsUser: 0", "runAsNonRoot"),
        ("deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnly"),
        ("deployment.yaml", "replicas: 3", "replicas: 1", "not replicated"),
        ("configmap.yaml", 'EXCHANGE_METRICS_PORT: "9090"', 'EXCHANGE_METRICS_PORT: "9091"', "named metrics"),
        ("deployment.yaml", 'prometheus.io/port: "9090"', 'prometheus.io/port: "9100"', "annotation"),
        (
            "networkpolicy.yaml",
            "- namespaceSelector:\n            matchLabels: {kubernetes.io/metadata.name: monitoring}",
            "- ipBlock: {cidr: 0.0.0.0/0}",
            "metrics open",
        ),
        (
            "networkpolicy.yaml",
            "    - from:\n        - namespaceSelector:\n"
            "            matchLabels: {kubernetes.io/metadata.name: monitoring}\n      ports:",
            "    - ports:",
            "metrics open",
        ),
        (
            "configmap.yaml",
            'EXCHANGE_SHUTDOWN_GRACE_S: "25"',
            'EXCHANGE_SHUTDOWN_GRACE_S: "40"',
            "terminationGrace",
        ),
        ("deployment.yaml", "mountPath: /run/secrets/exchange,", "mountPath: /run/keys,", "signing key"),
        ("pdb.yaml", "kind: PodDisruptionBudget", "kind: Pod", "no PodDisruptionBudget"),
        ("service.yaml", "targetPort: http", "targetPort: api", "no container port"),
    ],
)
def test_kubernetes_check_catches(file: str, old: str, new: str, problem: str) -> None:
    texts = _k8s_texts()
    assert old in texts[file]
    texts[file] = texts[file].replace(old, new)
    problems = k8s_problems(k8s_objects(texts.values()))
    assert any(problem in p for p in problems), problems


# -- the S3 identity ------------------------------------------------------------------------------

BUCKET = "arn:aws:s3:::BUCKET_NAME"
#: What each S3 operation of exchange/storage.py needs. A new operation there fails the test
#: below until it is placed here, and its action granted (or deliberately not).
OPERATION_ACTIONS = {
    "head_bucket": ("s3:ListBucket", BUCKET),
    "get_object": ("s3:GetObject", f"{BUCKET}/*"),
    "presigned_get_object": ("s3:GetObject", f"{BUCKET}/*"),
    "head_object": ("s3:GetObject", f"{BUCKET}/*"),
    "put_object": ("s3:PutObject", f"{BUCKET}/*"),
    "create_multipart_upload": ("s3:PutObject", f"{BUCKET}/*"),
    "upload_part": ("s3:PutObject", f"{BUCKET}/*"),
    "complete_multipart_upload": ("s3:PutObject", f"{BUCKET}/*"),
    "abort_multipart_upload": ("s3:AbortMultipartUpload", f"{BUCKET}/*"),
    "list_parts": ("s3:ListMultipartUploadParts", f"{BUCKET}/*"),
    "delete_object": ("s3:DeleteObject", f"{BUCKET}/*"),
}
#: The same operations as SeaweedFS identity actions (weed's coarser classes, scoped to the bucket).
WEED_ACTIONS = {
    "head_bucket": "Read",
    "get_object": "Read",
    "presigned_get_object": "Read",
    "head_object": "Read",
    "list_parts": "Read",
    "put_object": "Write",
    "create_multipart_upload": "Write",
    "upload_part": "Write",
    "complete_multipart_upload": "Write",
    "abort_multipart_upload": "Write",
    "delete_object": "Write",
}
#: Operations storage.py has that the service's identity is deliberately not allowed.
NOT_GRANTED = {
    "create_bucket": "Storage.ensure_bucket serves tests and dev stacks; operators make the bucket"
}


def storage_operations() -> set[str]:
    source = (ROOT / "exchange" / "storage.py").read_text()
    return (
        set(re.findall(r"\._client\.(\w+)", source))
        | set(re.findall(r'generate_presigned_url\(\s*"(\w+)"', source))
        | set(re.findall(r"\.(presigned_\w+_object)\(", source))
    )


def policy_problems(policy: Mapping[str, Any]) -> list[str]:
    problems = []
    if policy.get("Version") != "2012-10-17":
        problems.append("Version is not 2012-10-17")
    granted: set[tuple[str, str]] = set()
    for statement in policy["Statement"]:
        actions, resources = statement["Action"], statement["Resource"]
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        for action in actions:
            if "*" in action or "?" in action:
                problems.append(f"wildcard action {action}")
        for resource in resources:
            if resource not in (BUCKET, f"{BUCKET}/*"):
                problems.append(f"resource {resource} is not the bucket placeholder")
        if statement["Effect"] == "Allow":
            granted |= {(a, r) for a in actions for r in resources}
    needed = {OPERATION_ACTIONS[op] for op in storage_operations() if op in OPERATION_ACTIONS}
    problems += [f"not allowed: {a} on {r}" for a, r in sorted(needed - granted)]
    problems += [f"allowed but unused: {a} on {r}" for a, r in sorted(granted - needed)]
    return problems


def test_every_storage_operation_is_placed() -> None:
    assert storage_operations() - OPERATION_ACTIONS.keys() - NOT_GRANTED.keys() == set()
    assert storage_operations() - WEED_ACTIONS.keys() - NOT_GRANTED.keys() == set()


def test_seaweed_service_identity_grants_exactly_what_storage_uses() -> None:
    """The dev stores' service identity (exchange/dev/seaweed.py) and its template in infra/local/."""
    needed = {WEED_ACTIONS[op] for op in storage_operations() if op in WEED_ACTIONS}
    assert set(SERVICE_ACTIONS) == needed
    template = json.loads((INFRA / "local" / "s3-identities.example.json").read_text())
    actions = {i["name"]: i["actions"] for i in template["identities"]}
    assert actions == {
        "admin": list(ADMIN_ACTIONS),
        "exchange": [f"{action}:BUCKET_NAME" for action in SERVICE_ACTIONS],
    }


def test_local_security_template_locks_what_the_cluster_locks() -> None:
    example = tomllib.loads((INFRA / "local" / "security.toml.example").read_text())
    assert all(example["jwt"][part]["key"] == "CHANGE_ME" for part in ("signing", "filer_signing"))
    assert all(example["jwt"][part]["read"]["key"] == "CHANGE_ME" for part in ("signing", "filer_signing"))
    assert example["access"] == {"ui": False}
    assert {"master", "volume", "filer", "s3", "client"} <= example["grpc"].keys()


@pytest.mark.parametrize("name", ["policy-aws.json", "policy-minio.json"])
def test_s3_policy(name: str) -> None:
    assert policy_problems(json.loads((S3 / name).read_text())) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('"s3:DeleteObject",', '"s3:*",', "wildcard"),
        ('"s3:DeleteObject",', '"s3:DeleteObject", "s3:PutObjectAcl",', "unused"),
        ('"s3:DeleteObject",', "", "not allowed"),
        ('"arn:aws:s3:::BUCKET_NAME/*"', '"arn:aws:s3:::*"', "placeholder"),
    ],
)
def test_s3_policy_check_catches(old: str, new: str, problem: str) -> None:
    text = (S3 / "policy-minio.json").read_text()
    assert old in text
    problems = policy_problems(json.loads(text.replace(old, new, 1)))
    assert any(problem in p for p in problems), problems
