#!/usr/bin/env python3
"""Offline checks of the cowsnap chart, all through helm/tools/helm.py:

- `helm lint --strict` with the default values and every set in
  helm/values/*.yaml;
- `helm template` of each, every object validated: Kubernetes kinds with
  kubernetes-validate (strict, Kubernetes 1.37.0), the snapshot custom
  resources against helm/schemas/, ServiceMonitor with the npm validator
  (helm/tools/validate-crd.mjs, when NODE_MODULES_DIR is set); each
  validator first shown to refuse a broken object;
- every file of helm/values/bad/ refused by values.schema.json, with the
  path its first comment line names;
- deploy/manifests/cowsnap.yaml equal to the default render (objects
  compared parsed; the generated Secrets are left out of it).

Usage: check.py OUTDIR  (rendered files go there, named after the set).
Prints the objects rendered per value set; exit 1 on any failure.
"""

import copy
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "helm", "cowsnap")
HELM = [sys.executable, os.path.join(ROOT, "helm", "tools", "helm.py")]
K8S_VERSION = "1.37.0"
RELEASE, NAMESPACE = "cowsnap", "cowsnap"
CRD_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): "volumesnapshotclass-snapshot.storage.k8s.io-v1.json",
    ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService"): "snapshotmetadataservice-cbt.storage.k8s.io-v1beta1.json",
}
GENERATED = "cowsnap.io/generated"

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def value_sets():
    d = os.path.join(ROOT, "helm", "values")
    sets = [("default", [])]
    for f in sorted(os.listdir(d)):
        if f.endswith(".yaml"):
            sets.append((f[: -len(".yaml")], [os.path.join(d, f)]))
    return sets


def helm(*args):
    return subprocess.run(HELM + list(args), capture_output=True, text=True)


def render(files):
    args = ["template", RELEASE, CHART, "-n", NAMESPACE]
    for f in files:
        args += ["-f", f]
    return helm(*args)


def objects(text):
    return [d for d in yaml.safe_load_all(text) if d]


def name_of(o):
    return f"{o['kind']}/{o['metadata']['name']}"


def k8s_valid(o):
    try:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return str(e)[:400]
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {o['apiVersion']} {o['kind']} in Kubernetes {K8S_VERSION}"


def crd_valid(o):
    path = os.path.join(ROOT, "helm", "schemas", CRD_SCHEMAS[(o["apiVersion"], o["kind"])])
    with open(path) as f:
        schema = json.load(f)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=str)
    return "; ".join(f"{list(e.path)}: {e.message}" for e in errors) or None


def servicemonitors_valid(objs):
    """(ok, output) of the npm validator over the ServiceMonitor objects."""
    mods = os.environ.get("NODE_MODULES_DIR")
    if not mods:
        return None, "NODE_MODULES_DIR unset"
    script = os.path.join(ROOT, "helm", "tools", "validate-crd.mjs")
    # Node resolves packages from the script's directory upward: run a copy
    # placed next to node_modules.
    local = os.path.join(os.path.dirname(mods), "validate-crd.mjs")
    with open(script) as src, open(local, "w") as dst:
        dst.write(src.read())
    r = subprocess.run(["node", local], input=json.dumps(objs), capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def validate(o):
    key = (o["apiVersion"], o["kind"])
    if key in CRD_SCHEMAS:
        return crd_valid(o)
    return k8s_valid(o)


def validators_refuse_broken_objects(sample):
    """Each validator must reject a broken object, or its passes mean nothing."""
    by_kind = {o["kind"]: o for o in sample}
    sts = copy.deepcopy(by_kind["StatefulSet"])
    sts["spec"]["replica"] = 2  # a typo of replicas
    if k8s_valid(sts) is None:
        fail("kubernetes-validate accepted a StatefulSet with spec.replica")
    vsc = copy.deepcopy(by_kind["VolumeSnapshotClass"])
    vsc["deletionPolicy"] = "Keep"
    if crd_valid(vsc) is None:
        fail("the VolumeSnapshotClass schema accepted deletionPolicy Keep")
    sms = {
        "apiVersion": "cbt.storage.k8s.io/v1beta1",
        "kind": "SnapshotMetadataService",
        "metadata": {"name": "x"},
        "spec": {"address": "a:1", "audience": "x"},
    }
    if crd_valid(sms) is None:
        fail("the SnapshotMetadataService schema accepted a spec without caCert")
    if os.environ.get("NODE_MODULES_DIR"):
        bad = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "x"},
            "spec": {"selector": {}, "endpoints": [{"port": 9090}]},
        }
        ok, _ = servicemonitors_valid([bad])
        if ok:
            fail("the ServiceMonitor validator accepted endpoints[0].port 9090 (a number)")


def check_set(name, files, outdir):
    lint_args = ["lint", "--strict", CHART, "-n", NAMESPACE]
    for f in files:
        lint_args += ["-f", f]
    r = helm(*lint_args)
    if r.returncode != 0:
        fail(f"{name}: helm lint --strict: {r.stdout}{r.stderr}")
    r = render(files)
    if r.returncode != 0:
        fail(f"{name}: helm template: {r.stderr}")
        return []
    with open(os.path.join(outdir, f"{name}.yaml"), "w") as f:
        f.write(r.stdout)
    objs = objects(r.stdout)
    monitors = []
    for o in objs:
        if o["kind"] == "ServiceMonitor":
            monitors.append(o)
            continue
        err = validate(o)
        if err:
            fail(f"{name}: {name_of(o)}: {err}")
    if monitors:
        ok, out = servicemonitors_valid(monitors)
        if ok is None:
            fail(f"{name}: ServiceMonitor not validated ({out}): set NODE_MODULES_DIR")
        elif not ok:
            fail(f"{name}: {out}")
        else:
            print(f"    {out} (npm @kubernetes-models/prometheus-operator)")
    print(f"--- {name}: {len(objs)} objects, lint and validation done")
    for o in objs:
        print(f"    {name_of(o)}")
    return objs


def check_bad_values():
    d = os.path.join(ROOT, "helm", "values", "bad")
    for f in sorted(os.listdir(d)):
        path = os.path.join(d, f)
        with open(path) as fh:
            first = fh.readline()
        m = re.search(r"refused: (/\S+)", first)
        want = m.group(1) if m else None
        r = render([path])
        if r.returncode == 0:
            fail(f"bad values {f} were accepted")
        elif want and f"'{want}'" not in r.stderr:
            fail(f"bad values {f}: refused, but not at {want}: {r.stderr.strip()}")
        else:
            print(f"refused as expected: {f}: {r.stderr.strip().splitlines()[-1]}")


def comparable(objs):
    return {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["metadata"].get("labels", {}).get(GENERATED) != "true"
    }


def check_manifests(default_objs):
    path = os.path.join(ROOT, "deploy", "manifests", "cowsnap.yaml")
    with open(path) as f:
        committed = comparable(objects(f.read()))
    rendered = comparable(default_objs)
    if committed != rendered:
        missing = sorted(set(rendered) - set(committed))
        extra = sorted(set(committed) - set(rendered))
        changed = sorted(k for k in set(rendered) & set(committed) if rendered[k] != committed[k])
        fail(
            "deploy/manifests/cowsnap.yaml differs from the default render "
            f"(missing {missing}, extra {extra}, changed {changed}): run deploy/render-manifests.sh"
        )
    else:
        print(f"deploy/manifests/cowsnap.yaml matches the default render ({len(rendered)} objects)")


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    rendered = {}
    for name, files in value_sets():
        rendered[name] = check_set(name, files, outdir)
    sample = rendered["default"] + [
        o for o in rendered.get("metrics-snapshot-metadata", []) if o["kind"] == "SnapshotMetadataService"
    ]
    validators_refuse_broken_objects(sample)
    check_bad_values()
    check_manifests(rendered["default"])
    if failures:
        print(f"{len(failures)} chart check(s) failed")
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
