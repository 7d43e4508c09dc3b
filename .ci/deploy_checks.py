#!/usr/bin/env python3
"""Consistency checks for deploy/ and docs/ that no off-the-shelf tool makes.

Run by .ci/check-deploy with the tool venv's python (needs PyYAML and jsonschema):

    deploy_checks.py ROOT RENDERED_K8S_YAML OUT_DIR

- every metric and label used by the dashboard, the alert rules, their tests, the runbook and the
  code's metric macros is in docs/metrics.md (so names cannot drift silently);
- every alert has severity, summary, description and a runbook_url whose anchor exists in
  docs/operations.md, and a test in alerts_test.yml where it fires;
- both example configs parse as TOML and use only keys and value types that src/config/mod.rs
  accepts (the config rejects unknown keys, so a typo would stop the service);
- the Kubernetes objects agree with each other and with the config (ports, selectors, grace period
  above the drain timeout, every ${VAR} provided), and the PodMonitor matches a schema of the
  fields we use (no Prometheus Operator CRD schema is available offline);
- the systemd unit's stop timeout is above the drain timeout and its env example covers ${VAR}s.

It also writes OUT_DIR/dashboard_rules.yml: every dashboard query as a recording rule, so that
`promtool check rules` parses the dashboard's PromQL.

Prints one line per problem and exits 1 if there is any.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(sys.argv[1])
RENDERED = Path(sys.argv[2])
OUT = Path(sys.argv[3])
problems: list[str] = []


def problem(where: str, msg: str) -> None:
    problems.append(f"{where}: {msg}")


# --------------------------------------------------------------------------------------------
# The catalogue: docs/metrics.md
# --------------------------------------------------------------------------------------------
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

catalogue: dict[str, dict] = {}
metrics_md = (ROOT / "docs/metrics.md").read_text()
for m in re.finditer(r"^### `(meterflow_\w+)`\n- type: (\w+) · (.*)$", metrics_md, re.M):
    name, mtype, rest = m.groups()
    labels: dict[str, set[str] | None] = {}
    # "labels: `sink`, `endpoint` (`usage`, ...), `status_class` (`2xx`, `3xx`, ...)"
    # A value list may wrap onto the next lines of the bullet: take the whole bullet.
    bullet_end = metrics_md.find("\n- ", m.end())
    text = rest + metrics_md[m.end():bullet_end]
    if "labels:" in text:
        spec = text.split("labels:", 1)[1]
        for lm in re.finditer(r"`(\w+)`(?:\s*\(([^)]*)\))?", spec):
            label, values = lm.groups()
            vals = set(re.findall(r"`([^`]+)`", values)) if values else None
            # "(`usage`, `batch`, ...)": an open list, names only
            if values and "..." in values:
                vals = None
            labels[label] = vals or None
    catalogue[name] = {"type": mtype, "labels": labels}

if len(catalogue) < 10:
    problem("docs/metrics.md", f"found only {len(catalogue)} catalogue entries; is the format intact?")
for name, entry in catalogue.items():
    if entry["type"] not in {"counter", "gauge", "histogram"}:
        problem("docs/metrics.md", f"{name}: unknown type {entry['type']}")
    if entry["type"] == "counter" and not name.endswith("_total"):
        problem("docs/metrics.md", f"{name}: a counter's name must end in _total")
table_names = set(re.findall(r"^\| `(meterflow_\w+)` \|", metrics_md, re.M))
if table_names != set(catalogue):
    problem("docs/metrics.md", f"quick-reference table and sections differ: {sorted(table_names ^ set(catalogue))}")


def base_metric(name: str) -> str | None:
    """The catalogue entry a series name belongs to, or None."""
    if name in catalogue:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and catalogue.get(name[: -len(suffix)], {}).get("type") == "histogram":
            return name[: -len(suffix)]
    return None


LITERAL_ALTERNATION = re.compile(r"^[\w.-]+(\|[\w.-]+)*$")


def check_promql(where: str, text: str) -> None:
    """Metric names, selector labels and (for enumerated labels) values against the catalogue."""
    for m in re.finditer(r"\b(meterflow_\w+)\b(\{([^}]*)\})?", text):
        name, _, matchers = m.groups()
        base = base_metric(name)
        if base is None:
            problem(where, f"metric {name} is not in docs/metrics.md")
            continue
        allowed = catalogue[base]["labels"]
        for mm in re.finditer(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", matchers or ""):
            label, op, value = mm.groups()
            if label in SCRAPE_LABELS or (label == "le" and name.endswith("_bucket")):
                continue
            if label not in allowed:
                problem(where, f"{name} has no label {label!r} (catalogue: {sorted(allowed) or 'none'})")
                continue
            values = allowed[label]
            if values and op in ("=", "=~") and LITERAL_ALTERNATION.match(value):
                unknown = set(value.split("|")) - values
                if unknown:
                    problem(where, f"{name}{{{label}}} has no value {sorted(unknown)} (catalogue: {sorted(values)})")


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------
dash_path = ROOT / "deploy/grafana/meterflow-dashboard.json"
dashboard = json.loads(dash_path.read_text())


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


dashboard_exprs = []
for p in walk_panels(dashboard.get("panels", [])):
    for t in p.get("targets", []):
        if t.get("expr"):
            dashboard_exprs.append((p.get("title", "?"), t["expr"]))
            check_promql(f"{dash_path.relative_to(ROOT)} panel {p.get('title')!r}", t["expr"])
        if p.get("type") != "row" and t.get("datasource", p.get("datasource", {})).get("uid") != "${datasource}":
            problem(str(dash_path.relative_to(ROOT)), f"panel {p.get('title')!r} does not use the $datasource variable")
# Layout: panels inside the 24-column grid, none on top of another, unique ids.
cells: dict[tuple[int, int], str] = {}
ids = [p.get("id") for p in walk_panels(dashboard.get("panels", []))]
if len(ids) != len(set(ids)):
    problem(str(dash_path.relative_to(ROOT)), "panel ids are not unique")
for p in walk_panels(dashboard.get("panels", [])):
    g = p.get("gridPos", {})
    if g.get("x", 0) + g.get("w", 0) > 24:
        problem(str(dash_path.relative_to(ROOT)), f"panel {p.get('title')!r} is wider than the grid")
    for cx in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
        for cy in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
            if (cx, cy) in cells:
                problem(str(dash_path.relative_to(ROOT)), f"panel {p.get('title')!r} overlaps {cells[(cx, cy)]!r}")
                break
            cells[(cx, cy)] = p.get("title")
        else:
            continue
        break
variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource":
    problem(str(dash_path.relative_to(ROOT)), "no datasource variable named 'datasource'")
for v in variables.values():
    if v.get("type") == "query":
        check_promql(f"{dash_path.relative_to(ROOT)} variable {v['name']}", v.get("definition", ""))
if len(dashboard_exprs) < 10:
    problem(str(dash_path.relative_to(ROOT)), f"only {len(dashboard_exprs)} queries found")
used_by_dashboard = {base_metric(n) for _, e in dashboard_exprs for n in re.findall(r"\b(meterflow_\w+)", e)}
for name in sorted(set(catalogue) - used_by_dashboard):
    print(f"note: {name} is catalogued but not on the dashboard")

# Grafana's variables are not PromQL: substitute them, then let promtool parse every query.
rules = []
for i, (title, expr) in enumerate(dashboard_exprs):
    e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    e = re.sub(r"\$\{?(\w+)\}?", ".*", e)
    rules.append({"record": f"dashboard:query_{i}", "expr": e})
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

# --------------------------------------------------------------------------------------------
# Alert rules, their tests, the runbook
# --------------------------------------------------------------------------------------------
def github_anchor(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


ops_md = (ROOT / "docs/operations.md").read_text()
anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", ops_md, re.M)}
check_promql("docs/operations.md", ops_md)
check_promql("docs/metrics.md (prose)", metrics_md.split("## Events", 1)[-1])

alerts_path = ROOT / "deploy/prometheus/alerts.yml"
alerts = yaml.safe_load(alerts_path.read_text())
alert_names = []
for group in alerts["groups"]:
    for rule in group["rules"]:
        name = rule.get("alert") or rule.get("record")
        where = f"{alerts_path.relative_to(ROOT)} {name}"
        check_promql(where, rule["expr"])
        if "alert" not in rule:
            continue
        alert_names.append(name)
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problem(where, f"annotation {key} missing")
        if rule.get("labels", {}).get("severity") not in {"warning", "critical"}:
            problem(where, "severity label must be warning or critical")
        url = ann.get("runbook_url", "")
        if not url.startswith("docs/operations.md#"):
            problem(where, f"runbook_url {url!r} must point into docs/operations.md")
        elif url.split("#", 1)[1] not in anchors:
            problem(where, f"runbook_url anchor #{url.split('#', 1)[1]} is not a heading of docs/operations.md")
        if f"`{name}`" not in ops_md and name not in ops_md:
            problem(where, "not described in docs/operations.md")

tests_path = ROOT / "deploy/prometheus/alerts_test.yml"
tests = yaml.safe_load(tests_path.read_text())
fires, quiet = set(), set()
for group in tests["tests"]:
    for s in group.get("input_series", []):
        check_promql(f"{tests_path.relative_to(ROOT)} input", s["series"])
    for t in group.get("alert_rule_test", []):
        (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
for name in alert_names:
    if name not in fires:
        problem(str(tests_path.relative_to(ROOT)), f"no test where {name} fires")
    if name not in quiet:
        problem(str(tests_path.relative_to(ROOT)), f"no test where {name} stays quiet")

# --------------------------------------------------------------------------------------------
# Code: every metric the code registers is catalogued
# --------------------------------------------------------------------------------------------
for path in sorted((ROOT / "src").rglob("*.rs")):
    text = path.read_text()
    for m in re.finditer(r"\b(?:describe_)?(?:counter|gauge|histogram)!\(\s*\"(meterflow_\w+)\"", text):
        if base_metric(m.group(1)) is None:
            problem(str(path.relative_to(ROOT)), f"registers {m.group(1)}, which docs/metrics.md does not list")

# --------------------------------------------------------------------------------------------
# Config files against the shape in src/config/mod.rs
# --------------------------------------------------------------------------------------------
config_rs = "\n".join(p.read_text() for p in sorted((ROOT / "src/config").glob("*.rs")))
structs: dict[str, dict[str, str]] = {}
for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", config_rs, re.S):
    fields = {}
    for f in re.finditer(r"^\s*pub (\w+):\s*(.+?),\s*$", m.group(2), re.M):
        fields[f.group(1)] = f.group(2).strip()
    structs[m.group(1)] = fields
# A section read through another shape (`#[serde(try_from = "SinkFile")]`) is written as that one.
for m in re.finditer(r"#\[serde\(try_from = \"(\w+)\"\)\]\s*pub struct (\w+)", config_rs):
    if m.group(1) in structs:
        structs[m.group(2)] = structs[m.group(1)]
enums: dict[str, set[str]] = {}
for m in re.finditer(r"pub enum (\w+)\s*\{(.*?)\}", config_rs, re.S):
    enums[m.group(1)] = {v.lower() for v in re.findall(r"^\s*(\w+),", m.group(2), re.M)}
duration_fields = set()
for m in re.finditer(r"with = \"humantime_serde\"\)\]\s*pub (\w+):", config_rs):
    duration_fields.add(m.group(1))

HUMANTIME = re.compile(r"^\s*(\d+\s*(nsec|ns|usec|us|µs|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)\s*)+$")


def unwrap(ty: str, prefix: str) -> str | None:
    if ty.startswith(prefix + "<") and ty.endswith(">"):
        return ty[len(prefix) + 1 : -1].strip()
    return None


def check_value(where: str, field: str, ty: str, value) -> None:
    inner = unwrap(ty, "Option")
    if inner:
        return check_value(where, field, inner, value)
    inner = unwrap(ty, "Vec")
    if inner:
        if not isinstance(value, list):
            return problem(where, f"expected a list, got {value!r}")
        for i, v in enumerate(value):
            check_value(f"{where}[{i}]", field, inner, v)
        return
    inner = unwrap(ty, "BTreeMap")
    if inner:
        if not isinstance(value, dict):
            return problem(where, f"expected a table, got {value!r}")
        vty = inner.split(",", 1)[1].strip()
        for k, v in value.items():
            check_value(f"{where}.{k}", field, vty, v)
        return
    if ty in structs:
        if not isinstance(value, dict):
            return problem(where, f"expected a table, got {value!r}")
        for k, v in value.items():
            if k not in structs[ty]:
                problem(where, f"unknown key {k!r} (accepted: {', '.join(structs[ty])})")
            else:
                check_value(f"{where}.{k}" if where else k, k, structs[ty][k], v)
        return
    if ty in enums:
        if value not in enums[ty]:
            problem(where, f"{value!r} is not one of {sorted(enums[ty])}")
        return
    if ty == "Duration" or field in duration_fields:
        if not (isinstance(value, str) and HUMANTIME.match(value)):
            problem(where, f"{value!r} is not a duration like \"10s\"")
        return
    expected = {
        "String": str, "Secret": str, "bool": bool, "usize": int, "u32": int, "u64": int,
        "u16": int, "f64": (float, int), "Decimal": (str, int, float),
    }.get(ty)
    if expected is None:
        print(f"note: {where}: type {ty} not checked")
    elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        problem(where, f"{value!r} is not a {ty}")


def duration_seconds(text) -> float:
    """Seconds in a humantime string; a malformed value (reported elsewhere) counts as 0."""
    text = str(text)
    units = {"ms": 0.001, "msec": 0.001, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60,
             "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    total = 0.0
    for n, u in re.findall(r"(\d+)\s*([a-zµ]+)", text):
        total += int(n) * units.get(u, 0)
    return total


def load_config(rel: str) -> dict:
    path = ROOT / rel
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        problem(rel, f"not valid TOML: {e}")
        return {}
    if "Config" not in structs:
        problem("src/config/mod.rs", "no `pub struct Config` found")
        return cfg
    before = len(problems)
    check_value("", "", "Config", cfg)
    problems[before:] = [f"{rel}: {p}" for p in problems[before:]]
    return cfg


def env_refs(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", text))


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------
k8s_toml_rel = "deploy/kubernetes/meterflow.toml"
k8s_cfg = load_config(k8s_toml_rel)
docs = [d for d in yaml.safe_load_all(RENDERED.read_text()) if d]
by_kind: dict[str, list] = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
for kind in ("Deployment", "ConfigMap", "Service", "PodMonitor", "PodDisruptionBudget", "ServiceAccount"):
    if len(by_kind.get(kind, [])) != 1:
        problem("deploy/kubernetes", f"expected exactly one {kind} in the kustomization, found {len(by_kind.get(kind, []))}")
if by_kind.get("Secret"):
    problem("deploy/kubernetes", "the kustomization must not contain the Secret (it would overwrite real credentials)")

PODMONITOR_SCHEMA = {
    # The subset of monitoring.coreos.com/v1 PodMonitor that we use, written from the Prometheus
    # Operator API reference; unknown fields are refused so typos fail.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {"type": "object"},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


if all(len(by_kind.get(k, [])) == 1 for k in ("Deployment", "ConfigMap", "Service", "PodMonitor", "PodDisruptionBudget")):
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    pm = by_kind["PodMonitor"][0]
    try:
        jsonschema.validate(pm, PODMONITOR_SCHEMA)
    except jsonschema.ValidationError as e:
        problem("deploy/kubernetes/podmonitor.yaml", f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
    if not matches(dep["spec"]["selector"], pod_labels):
        problem("Deployment", "selector does not match the pod template's labels")
    for obj, sel in (("Service", by_kind["Service"][0]["spec"]["selector"]),
                     ("PodMonitor", pm["spec"]["selector"].get("matchLabels", {})),
                     ("PodDisruptionBudget", by_kind["PodDisruptionBudget"][0]["spec"]["selector"].get("matchLabels", {}))):
        if not sel or not matches({"matchLabels": sel}, pod_labels):
            problem(obj, f"selector {sel} does not select the Deployment's pods {pod_labels}")
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if ep.get("port") not in ports:
            problem("PodMonitor", f"port {ep.get('port')!r} is not a named container port {sorted(ports)}")
    for sp in by_kind["Service"][0]["spec"]["ports"]:
        if sp.get("targetPort") not in ports and sp.get("targetPort") not in ports.values():
            problem("Service", f"targetPort {sp.get('targetPort')!r} is not a container port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        p = container.get(probe, {}).get("httpGet", {})
        if p.get("path") != path:
            problem("Deployment", f"{probe} must GET {path}, has {p.get('path')!r}")
        if p.get("port") not in ports and p.get("port") not in ports.values():
            problem("Deployment", f"{probe} port {p.get('port')!r} is not a container port")
    if dep["spec"].get("replicas", 1) < 2:
        problem("Deployment", "runs fewer than 2 replicas")
    # Config ↔ Deployment
    if k8s_cfg:
        listen = k8s_cfg.get("admin", {}).get("listen", "127.0.0.1:9090")
        host, _, port = listen.rpartition(":")
        if host not in ("0.0.0.0", "[::]"):
            problem(k8s_toml_rel, f"admin.listen {listen!r} is unreachable for probes; use 0.0.0.0:{port}")
        if int(port) not in ports.values():
            problem("Deployment", f"admin.listen port {port} is not a container port {ports}")
        kafka = k8s_cfg.get("kafka", {})
        drain = duration_seconds(kafka.get("drain_timeout", "10s"))
        session = duration_seconds(kafka.get("session_timeout", "30s"))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if not drain < session:
            problem(k8s_toml_rel, f"kafka.drain_timeout ({drain}s) must be below session_timeout ({session}s)")
        if grace < drain + 15:
            problem("Deployment", f"terminationGracePeriodSeconds {grace} must exceed kafka.drain_timeout ({drain}s) by 15s or more")
        ledger = k8s_cfg.get("ledger", {}).get("url", "")
        if "sqlite" in ledger:
            problem(k8s_toml_rel, "several replicas need the PostgreSQL ledger, not SQLite")
    # Every ${VAR} of the config reaches the container.
    secret_example = yaml.safe_load((ROOT / "deploy/kubernetes/secret.example.yaml").read_text())
    secret_keys = set(secret_example.get("stringData", {})) | set(secret_example.get("data", {}))
    env_names = {e["name"] for e in container.get("env", [])}
    from_secret = any(ef.get("secretRef", {}).get("name") == secret_example["metadata"]["name"]
                      for ef in container.get("envFrom", []))
    for var in sorted(env_refs((ROOT / k8s_toml_rel).read_text())):
        if var not in env_names and not (from_secret and var in secret_keys):
            problem(k8s_toml_rel, f"${{{var}}} is set neither by the Deployment's env nor by the Secret "
                                  f"{secret_example['metadata']['name']} (interpolation is textual: comments count too)")
    sc = container.get("securityContext", {})
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and "ALL" in sc.get("capabilities", {}).get("drop", [])
            and spec.get("securityContext", {}).get("runAsNonRoot")):
        problem("Deployment", "must run non-root, read-only root filesystem, no privilege escalation, all capabilities dropped")

# --------------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------------
sd_toml_rel = "deploy/systemd/meterflow.toml"
sd_cfg = load_config(sd_toml_rel)
unit = (ROOT / "deploy/systemd/meterflow.service").read_text()
stop = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
if sd_cfg:
    drain = duration_seconds(sd_cfg.get("kafka", {}).get("drain_timeout", "10s"))
    stop_s = duration_seconds(stop.group(1)) if stop else 90
    if stop_s < drain + 15:
        problem("deploy/systemd/meterflow.service", f"TimeoutStopSec ({stop_s}s) must exceed kafka.drain_timeout ({drain}s) by 15s or more")
    ledger = sd_cfg.get("ledger", {}).get("url", "")
    if ledger.startswith("sqlite://") and "/var/lib/meterflow/" not in ledger:
        problem(sd_toml_rel, "the SQLite ledger must live in the StateDirectory /var/lib/meterflow")
env_example = (ROOT / "deploy/systemd/meterflow.env.example").read_text()
env_keys = set(re.findall(r"^#?\s*(\w+)=", env_example, re.M))
for var in sorted(env_refs((ROOT / sd_toml_rel).read_text())):
    if var not in env_keys:
        problem(sd_toml_rel, f"${{{var}}} is not in deploy/systemd/meterflow.env.example")

# --------------------------------------------------------------------------------------------
for p in problems:
    print(f"FAIL {p}")
print(f"deploy_checks: {len(catalogue)} catalogued metrics, {len(dashboard_exprs)} dashboard queries, "
      f"{len(alert_names)} alerts, {len(problems)} problems")
sys.exit(1 if problems else 0)
