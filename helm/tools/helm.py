#!/usr/bin/env python3
"""`helm lint` and `helm template` for the cowsnap chart: a real `helm` from
PATH when there is one, else Helm's own Go code through the pinned PyPI
package helm-python-sdk (module helm_python), so the checks run where no
helm binary can be installed.

    helm.py lint --strict CHART [-f VALUES]...
    helm.py template NAME CHART [-n NAMESPACE] [-f VALUES]...

`template` prints the rendered manifests as `helm template` does: one YAML
document per template file, each after a `# Source: CHART/templates/FILE`
line, in file order (NOTES.txt left out). Exit 1 on a lint error (or, with
--strict, a warning) or a render error, with Helm's message.
"""

import argparse
import os
import shutil
import subprocess
import sys

import yaml


def real_helm():
    """The helm binary on PATH, unless COWSNAP_HELM_SDK=1 asks for the SDK."""
    if os.environ.get("COWSNAP_HELM_SDK") == "1":
        return None
    return shutil.which("helm")


def merged_values(files):
    """Values files merged left to right, as helm's -f does (maps deep)."""

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
        return out

    values = {}
    for f in files or []:
        with open(f) as fh:
            values = merge(values, yaml.safe_load(fh) or {})
    return values


def lint(args):
    helm = real_helm()
    if helm:
        cmd = [helm, "lint", args.chart] + (["--strict"] if args.strict else [])
        for f in args.values or []:
            cmd += ["-f", f]
        return subprocess.call(cmd)
    import helm_python

    report = helm_python.lint(
        args.chart, merged_values(args.values), strict=args.strict, namespace=args.namespace
    )
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    worst = 0
    for m in report.get("messages") or []:
        sev = m.get("severity", 0)
        worst = max(worst, sev)
        print(f"[{names.get(sev, sev)}] {m.get('path', '')}: {m.get('error', '')}")
    for e in report.get("errors") or []:
        print(f"[ERROR] {e}")
        worst = 3
    failed = worst >= 3 or (args.strict and worst >= 2)
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {'failed' if failed else 'no failures'}")
    return 1 if failed else 0


def template(args):
    helm = real_helm()
    if helm:
        cmd = [helm, "template", args.name, args.chart, "--namespace", args.namespace]
        for f in args.values or []:
            cmd += ["-f", f]
        return subprocess.call(cmd)
    import helm_python

    values = merged_values(args.values)
    try:
        with helm_python.Chart.load(args.chart) as chart:
            # helm validates the merged values against values.schema.json
            # before rendering; do the same.
            chart.validate_schema(chart.merge_values(values))
            rendered = chart.render(
                values, name=args.name, namespace=args.namespace, is_install=True
            )
    except helm_python.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    out = []
    for path in sorted(rendered):
        body = rendered[path]
        if path.endswith("NOTES.txt") or not body.strip():
            continue
        for doc in body.split("\n---\n"):
            if doc.strip() and any(
                l.strip() and not l.lstrip().startswith("#") for l in doc.splitlines()
            ):
                out.append(f"---\n# Source: {path}\n{doc.strip(chr(10))}\n")
    sys.stdout.write("".join(out))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("lint")
    pl.add_argument("chart")
    pl.add_argument("--strict", action="store_true")
    pl.add_argument("-f", "--values", action="append")
    pl.add_argument("-n", "--namespace", default="default")
    pt = sub.add_parser("template")
    pt.add_argument("name")
    pt.add_argument("chart")
    pt.add_argument("-f", "--values", action="append")
    pt.add_argument("-n", "--namespace", default="default")
    args = p.parse_args()
    sys.exit(lint(args) if args.cmd == "lint" else template(args))


if __name__ == "__main__":
    main()
