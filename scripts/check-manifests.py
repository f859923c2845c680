#!/usr/bin/env python3
"""Checks every manifest we ship; run by ./scripts/test with the tools venv (scripts/lib.sh).

  python scripts/check-manifests.py ENVOY_BINARY

1. yamllint (.yamllint.yaml) over envoy/, docker-compose.yml and the schemas.
2. Every document under envoy/kubernetes, envoy/istio and envoy/envoy-gateway against a schema:
   Kubernetes' own kinds with kubernetes-validate (strict: unknown fields fail), our custom
   resources with tests/schemas/crds.yaml (jsonschema). A kind with no schema fails.
3. Every Envoy fragment inside an Istio EnvoyFilter, inside a bootstrap, with
   `envoy --mode validate` (the real Envoy 1.40): the HTTP filter before the router, per-route
   configs on a route, the clusters it names.
4. docker-compose.yml runs what ./scripts/demo runs: the same config files, ports, commands and
   environment (Postgres instead of the SQLite file being the one intended difference), and the
   Dockerfile stages it builds exist.
5. The checker checks itself: a manifest with a misspelt field and an EnvoyFilter with a broken
   filter must fail.
"""

import copy
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST_DIRS = ["envoy/kubernetes", "envoy/istio", "envoy/envoy-gateway"]
KUBERNETES_VERSION = "1.30"


def load_schemas():
    doc = yaml.safe_load((ROOT / "tests/schemas/crds.yaml").read_text())
    defs = doc["$defs"]
    return {key: {"$defs": defs, **schema} for key, schema in doc["kinds"].items()}


def documents(path):
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if doc is not None:
            yield i, doc


def check_document(doc, schemas):
    """Errors of one manifest document (empty when it is valid)."""
    key = f"{doc.get('apiVersion')}/{doc.get('kind')}"
    if key in schemas:
        validator = jsonschema.Draft202012Validator(schemas[key])
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key}: add it to tests/schemas/crds.yaml"]
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"]
    return []


def envoy_bootstrap(envoy_filter):
    """A bootstrap holding an EnvoyFilter's HTTP filters and per-route configs."""
    filters, route_configs, clusters = [], {}, set()
    for patch in envoy_filter["spec"]["configPatches"]:
        value = patch["patch"]["value"]
        if patch["applyTo"] == "HTTP_FILTER":
            filters.append(value)
            grpc = value.get("typed_config", {}).get("grpc_service", {})
            name = grpc.get("envoy_grpc", {}).get("cluster_name")
            if name:
                clusters.add(name)
        elif patch["applyTo"] == "HTTP_ROUTE":
            route_configs.update(value.get("typed_per_filter_config", {}))
        else:
            raise ValueError(f"unexpected applyTo {patch['applyTo']}")
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    if route_configs:
        route["typed_per_filter_config"] = route_configs
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "check",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": filters
        + [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }

    def cluster(name, http2):
        c = {
            "name": name,
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": 9}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "check",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster("upstream", False)]
            + [cluster(name, True) for name in sorted(clusters)],
        }
    }


def envoy_validate(envoy, bootstrap):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(bootstrap, f)
        f.flush()
        out = subprocess.run(
            [envoy, "--mode", "validate", "--disable-hot-restart", "-c", f.name],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        return [line for line in out.stderr.splitlines() if "error" in line.lower()][-3:] or [
            out.stderr[-500:]
        ]
    return []


def check_file(path, schemas, envoy):
    errors, checked = [], 0
    for i, doc in documents(path):
        where = f"{path.relative_to(ROOT)} document {i + 1} ({doc.get('kind')})"
        errors += [f"{where}: {e}" for e in check_document(doc, schemas)]
        if doc.get("kind") == "EnvoyFilter":
            errors += [f"{where}: envoy: {e}" for e in envoy_validate(envoy, envoy_bootstrap(doc))]
        checked += 1
    return errors, checked


def self_check(schemas, envoy):
    """The checks above catch what they are for."""
    problems = []
    deployment = next(
        d
        for _, d in documents(ROOT / "envoy/kubernetes/tokenbudget.yaml")
        if d["kind"] == "Deployment"
    )
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSecs"] = 5
    if not check_document(bad, schemas):
        problems.append("a Deployment with a misspelt field passed")
    for path in (ROOT / "envoy").glob("*/*.yaml"):
        for _, doc in documents(path):
            key = f"{doc.get('apiVersion')}/{doc.get('kind')}"
            if key in schemas:
                bad = copy.deepcopy(doc)
                bad["spec"]["misspeltField"] = True
                if not check_document(bad, schemas):
                    problems.append(f"a {key} with an unknown field passed")
            if doc.get("kind") == "EnvoyFilter":
                bad = copy.deepcopy(doc)
                bad["spec"]["configPatches"][0]["patch"]["value"]["typed_config"][
                    "processing_mode"
                ]["response_body_mode"] = "SOMETIMES"
                if not envoy_validate(envoy, envoy_bootstrap(bad)):
                    problems.append(f"{path.name}: a broken ext_proc filter passed Envoy")
    return problems


def demo_facts():
    """What ./scripts/demo runs, read from the script and the config files it names."""
    demo = (ROOT / "scripts/demo").read_text()
    env = dict(re.findall(r'^export (TOKENBUDGET_[A-Z_]+)="([^"]*)"', demo, re.M))
    envoy_cfg = re.search(r'^ENVOY_CFG="\$PWD/([^"]+)"', demo, re.M).group(1)
    fake_addr = re.search(r"examples/fake_model (\S+)", demo).group(1)
    budget = shlex.split(re.search(r'"\$BIN" (budgets create [^>]+)>', demo).group(1))
    envoy_flags = shlex.split(
        re.search(r'"\$TOKENBUDGET_ENVOY" -c "\$ENVOY_CFG" ([^>]+)>', demo).group(1)
    )
    config = env["TOKENBUDGET_CONFIG"].removeprefix("$PWD/")
    toml_text = (ROOT / config).read_text()
    listen = dict(re.findall(r'^(grpc_listen|admin_listen) = "([^"]+)"', toml_text, re.M))
    envoy_text = (ROOT / envoy_cfg).read_text()
    ports = [int(p) for p in re.findall(r"port_value: (\d+)", envoy_text)]
    return {
        "env": env,
        "config": config,
        "envoy_cfg": envoy_cfg,
        "fake_addr": fake_addr,
        "budget": budget,
        "envoy_flags": envoy_flags,
        "listen": listen,
        "envoy_ports": ports,
    }


def check_compose():
    errors = []
    demo = demo_facts()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    def expect(cond, msg):
        if not cond:
            errors.append(f"docker-compose.yml vs scripts/demo: {msg}")

    for name, svc in services.items():
        expect(svc.get("network_mode") == "host", f"{name}: not on the host network")
    mounts = {
        name: {v.split(":")[0].removeprefix("./"): v.split(":")[1] for v in svc.get("volumes", [])}
        for name, svc in services.items()
    }
    tb = services["tokenbudget"]
    in_container = mounts["tokenbudget"].get(demo["config"])
    expect(in_container is not None, f"tokenbudget does not mount {demo['config']}")
    expect(
        tb["environment"].get("TOKENBUDGET_CONFIG") == in_container,
        "tokenbudget's TOKENBUDGET_CONFIG is not the mounted demo config",
    )
    # The demo's environment, but Postgres for the SQLite file.
    for key in demo["env"]:
        if key == "TOKENBUDGET_SQLITE_PATH":
            expect("TOKENBUDGET_DATABASE_URL" in tb["environment"], "no Postgres URL")
        else:
            expect(key in tb["environment"], f"tokenbudget lacks {key}, which the demo sets")
    extra = set(tb["environment"]) - set(demo["env"]) - {"TOKENBUDGET_DATABASE_URL"}
    expect(not extra, f"tokenbudget sets {sorted(extra)}, which the demo does not")
    expect(tb["command"] == ["serve"], "tokenbudget does not run `serve`")
    url = tb["environment"].get("TOKENBUDGET_DATABASE_URL", "")
    pg_port = services["postgres"]["command"][services["postgres"]["command"].index("-p") + 1]
    expect(f"127.0.0.1:{pg_port}/" in url, "the database URL does not name the Postgres service's port")

    admin_port = demo["listen"]["admin_listen"].rsplit(":", 1)[1]
    expect(
        any(f"127.0.0.1:{admin_port}/readyz" in part for part in tb["healthcheck"]["test"]),
        f"tokenbudget's health check does not ask the demo's admin port {admin_port}",
    )
    grpc_port = int(demo["listen"]["grpc_listen"].rsplit(":", 1)[1])
    expect(grpc_port in demo["envoy_ports"], f"{demo['envoy_cfg']} does not reach tokenbudget's port")

    fake = services["fake-model"]
    expect(fake["command"] == [demo["fake_addr"]], "the fake model listens elsewhere than in the demo")
    fake_port = int(demo["fake_addr"].rsplit(":", 1)[1])
    expect(fake_port in demo["envoy_ports"], f"{demo['envoy_cfg']} does not reach the fake model")

    budget = services["demo-budget"]
    expect(budget["command"] == demo["budget"], "the sample budget differs from the demo's")
    expect(
        budget["environment"].get("TOKENBUDGET_DATABASE_URL") == url,
        "the sample budget goes to another store",
    )

    envoy = services["envoy"]
    envoy_in = mounts["envoy"].get(demo["envoy_cfg"])
    expect(envoy_in is not None, f"envoy does not mount {demo['envoy_cfg']}")
    cmd = envoy["command"]
    expect(cmd[:3] == ["envoy", "-c", envoy_in], "envoy does not run the mounted demo config")
    expect(cmd[3:] == demo["envoy_flags"], f"envoy flags {cmd[3:]} != the demo's {demo['envoy_flags']}")
    version = re.search(r"^ENVOY_VERSION=(\S+)", (ROOT / "scripts/lib.sh").read_text(), re.M).group(1)
    expect(envoy["image"] == f"envoyproxy/envoy:v{version}", f"envoy image is not Envoy {version}")
    envoy_admin = demo["envoy_ports"][0]
    expect(
        any(f"/dev/tcp/127.0.0.1/{envoy_admin}" in part for part in envoy["healthcheck"]["test"]),
        "envoy's health check does not ask its admin port",
    )

    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
    for name, svc in services.items():
        target = (svc.get("build") or {}).get("target")
        if target:
            expect(target in stages, f"{name} builds Dockerfile stage {target!r}, which does not exist")
    expect("--bin tokenbudget" in dockerfile and "--example fake_model" in dockerfile,
           "the Dockerfile does not build tokenbudget and the fake model")
    rust = re.search(r"^FROM rust:(\d+)\.(\d+)", dockerfile, re.M)
    need = re.search(r'^rust-version = "(\d+)\.(\d+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    expect(
        rust and need and (int(rust[1]), int(rust[2])) >= (int(need[1]), int(need[2])),
        "the Dockerfile's Rust is older than Cargo.toml's rust-version",
    )
    return errors


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    envoy = sys.argv[1]
    lint = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-c",
            str(ROOT / ".yamllint.yaml"),
            "envoy",
            "docker-compose.yml",
            "tests/schemas",
            ".yamllint.yaml",
        ],
        cwd=ROOT,
    )
    errors = [] if lint.returncode == 0 else ["yamllint failed (above)"]
    schemas = load_schemas()
    files = sorted(p for d in MANIFEST_DIRS for p in (ROOT / d).glob("*.yaml"))
    total = 0
    for path in files:
        e, n = check_file(path, schemas, envoy)
        errors += e
        total += n
    errors += check_compose()
    errors += [f"self-check: {p}" for p in self_check(schemas, envoy)]
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(
        f"manifests: {total} documents in {len(files)} files valid; docker-compose.yml matches "
        "scripts/demo; checker self-check passed"
    )


if __name__ == "__main__":
    main()
