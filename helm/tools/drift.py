#!/usr/bin/env python3
"""Catches drift between the chart and the cowsnap binary, with no cluster:
for each value set rendered by check.py, every cowsnap container of every
workload is run as a local process with exactly its rendered command, args
and environment, with these remappings only:

- each volume mount is a directory under a temporary root (hostPath volumes
  at ROOT/host/PATH, so a host path and the container path that mounts it
  agree; /dev stays /dev); Secret volumes hold the rendered Secret's data,
  or, for Secrets named in values and made outside the chart, test
  certificates and a token made here with openssl;
- fieldRef environment: spec.nodeName "drift-node", status.hostIP and
  status.podIP 127.0.0.1; `$(VAR)` expanded as kubelet does;
- a rendered Service's cluster DNS name and port (NAME.NAMESPACE.svc:PORT)
  become localhost and the local port of the container port it targets
  (the control certificate is checked to name the Service's DNS name, as a
  cluster's clients would reach it);
- TCP ports are replaced by free ones (the same map for the whole set, so a
  worker address in the control's environment follows its worker), 0.0.0.0
  by 127.0.0.1.

Then it checks that each process starts and stays up; that every unix
socket a sidecar of the same pod is given (--csi-address through its own
mounts, node-driver-registrar's --kubelet-registration-path on the host)
is served and answers CSI Probe and GetPluginInfo naming the chart's
CSIDriver; that every declared container port answers gRPC health (TLS
and client certificate as the chart gives them) or, for metrics,
/metrics; that probes and Service target ports name served ports; and
that the DaemonSet's worker registered itself with the control service
through its API Service (token and TLS as rendered) and that the control
service reports it, and the workers of control.workers, HEALTHY (mTLS with
the chart's certificates end to end, the worker certificate naming no
address).

Usage: drift.py RENDER_DIR   (from check.py); env COWSNAP (binary).
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COWSNAP = os.environ.get("COWSNAP", os.path.join(ROOT, "target", "debug", "cowsnap"))
CSI_PROTO_DIR = os.path.join(ROOT, "proto", "csi", "v1")
IMAGE_REPO = "cowsnap/cowsnap"
FIELDS = {
    "spec.nodeName": "drift-node",
    "status.hostIP": "127.0.0.1",
    "status.podIP": "127.0.0.1",
    "metadata.namespace": "cowsnap",
}

failures = []
passes = []


def ok(msg):
    passes.append(msg)
    print(f"    ok {msg}")


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpcurl(args, timeout=20):
    r = subprocess.run(["grpcurl"] + args, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def openssl_material(d, control_hosts):
    """A CA, control and worker certificates and a token, as an admin makes
    them for tls.existingSecret / auth.existingSecret."""
    os.makedirs(d, exist_ok=True)

    def run(*a):
        subprocess.run(["openssl"] + list(a), cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=drift-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    control_san = ",".join(["DNS:localhost", "IP:127.0.0.1"] + [f"DNS:{h}" for h in control_hosts])
    # The worker certificate names no address: the control service checks
    # it against the DaemonSet's name (--worker-tls-server-name).
    for who, san in (("control", control_san), ("worker", "DNS:cowsnap-worker")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=drift-{who}",
            "-keyout", f"{who}.key", "-out", f"{who}.csr")
        with open(os.path.join(d, f"{who}.ext"), "w") as f:
            f.write(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "2",
            "-out", f"{who}.crt", "-extfile", f"{who}.ext")
    data = {}
    for k in ("ca.crt", "control.crt", "control.key", "worker.crt", "worker.key"):
        with open(os.path.join(d, k), "rb") as f:
            data[k] = f.read()
    return data


class PodRun:
    """One workload's pod, its cowsnap containers run as processes."""

    def __init__(self, obj, secrets, root, ports, services):
        self.obj = obj
        self.name = f"{obj['kind']}/{obj['metadata']['name']}"
        self.spec = obj["spec"]["template"]["spec"]
        self.secrets = secrets
        self.root = root
        self.ports = ports
        # "NAME.NAMESPACE.svc:PORT" -> the container port it targets.
        self.services = services
        self.volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for t in obj["spec"].get("volumeClaimTemplates", []):
            self.volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "pvc": True}
        self.procs = []

    def volume_dir(self, vol):
        v = self.volumes[vol]
        if "hostPath" in v:
            p = v["hostPath"]["path"]
            return p if p == "/dev" else os.path.join(self.root, "host", p.lstrip("/"))
        return os.path.join(self.root, "vol", vol)

    def host_path(self, p):
        return os.path.join(self.root, "host", p.lstrip("/"))

    def prepare_volumes(self):
        for name, v in self.volumes.items():
            d = self.volume_dir(name)
            if d == "/dev":
                continue
            os.makedirs(d, exist_ok=True)
            if "secret" in v:
                sname = v["secret"]["secretName"]
                data = self.secrets.get(sname)
                if data is None:
                    fail(f"{self.name}: volume {name} names Secret {sname}, which neither the chart nor the test makes")
                    continue
                items = v["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    if it["key"] not in data:
                        fail(f"{self.name}: Secret {sname} has no key {it['key']}")
                        continue
                    path = os.path.join(d, it["path"])
                    with open(path, "wb") as f:
                        f.write(data[it["key"]])
                    os.chmod(path, v["secret"].get("defaultMode", 0o644))

    def mount_map(self, container):
        """Container mount path -> local directory, longest first."""
        m = {vm["mountPath"]: self.volume_dir(vm["name"]) for vm in container.get("volumeMounts", [])}
        return sorted(m.items(), key=lambda kv: -len(kv[0]))

    def local_path(self, container, path):
        for mp, d in self.mount_map(container):
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                return d + path[len(mp):]
        return None

    def rewrite(self, container, s):
        mounts = [(mp, d) for mp, d in self.mount_map(container) if mp != d]
        if mounts:
            alt = "|".join(re.escape(mp) for mp, _ in mounts)
            local = dict(mounts)
            s = re.sub(rf"(?<![A-Za-z0-9_.-])({alt})(?=/|$|,)", lambda m: local[m.group(1)], s)
        s = s.replace("0.0.0.0:", "127.0.0.1:")

        def service(m):
            cp = self.services.get(f"{m.group(1)}:{m.group(2)}")
            if cp is None:
                return m.group(0)
            self.ports.setdefault(cp, free_port())
            return f"localhost:{self.ports[cp]}"


        def port(m):
            p = int(m.group(2))
            self.ports.setdefault(p, free_port())
            return f"{m.group(1)}:{self.ports[p]}"

        s = re.sub(r"(127\.0\.0\.1|\$\(NODE_IP\)|\$\(POD_IP\)|localhost):([0-9]{2,5})\b", port, s)
        # After the ports: the local port it gives is not mapped again.
        return re.sub(r"\b([a-z0-9-]+\.[a-z0-9-]+\.svc(?:\.cluster\.local)?):([0-9]{1,5})\b", service, s)

    def env_of(self, container):
        env = {}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = self.expand(self.rewrite(container, e["value"]), env)
            elif "fieldRef" in e.get("valueFrom", {}):
                fp = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = FIELDS.get(fp, f"drift-{fp}")
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]].decode()
        return env

    def expand(self, s, env):
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)

    def start(self):
        self.prepare_volumes()
        for c in self.spec["containers"]:
            if c["image"].rsplit(":", 1)[0] != IMAGE_REPO:
                continue
            env = self.env_of(c)
            cmd = [self.expand(self.rewrite(c, a), env) for a in c.get("command", []) + c.get("args", [])]
            if not cmd or cmd[0] != "cowsnap":
                fail(f"{self.name}/{c['name']}: command {cmd[:2]} does not run cowsnap")
                continue
            cmd[0] = COWSNAP
            log = open(os.path.join(self.root, f"{c['name']}.log"), "w")
            full_env = dict(os.environ)
            full_env.pop("COWSNAP_IO", None)
            full_env.update(env)
            print(f"    run {self.name}/{c['name']}: {' '.join(cmd[1:])}")
            p = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
            self.procs.append((c, p, log.name))

    def stop(self):
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def alive(self, c, p, log):
        if p.poll() is not None:
            with open(log) as f:
                fail(f"{self.name}/{c['name']} exited ({p.returncode}):\n{f.read()[-3000:]}")
            return False
        return True


def wait_for(pred, what, pods, secs=60):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        for pod in pods:
            for c, p, log in pod.procs:
                if not pod.alive(c, p, log):
                    return False
        time.sleep(0.2)
    fail(f"timed out waiting for {what}")
    return False


def tls_args(pod, c):
    """grpcurl flags to reach a cowsnap container's TCP API as the chart
    lets its peers: the CA and the control certificate as client."""
    args = c.get("args", [])
    if not any(a.startswith("--tls-cert=") for a in args):
        return ["-plaintext"]
    ca = next(a.split("=", 1)[1] for a in args if a.startswith("--tls-ca="))
    ca_local = pod.local_path(c, ca)
    tls_dir = os.path.dirname(ca_local)
    cert, key = os.path.join(tls_dir, "control.crt"), os.path.join(tls_dir, "control.key")
    if not os.path.exists(cert):
        # The worker pod holds only its own certificate: use the control's,
        # materialized by the control pod of the same set.
        cert, key = PodRun.control_client
    args = ["-cacert", ca_local, "-cert", cert, "-key", key]
    if pod.obj["kind"] == "DaemonSet":
        # Which node addresses a worker certificate names depends on
        # control.workers; the chart always names the DaemonSet
        # (check_workers covers the addresses, through the control service).
        args += ["-servername", pod.obj["metadata"]["name"]]
    return args


def check_pod(pod, objs, driver):
    for c, p, log in pod.procs:
        if not pod.alive(c, p, log):
            return
    # Unix sockets the other containers of the pod are pointed at.
    for side in pod.spec["containers"]:
        if side["image"].rsplit(":", 1)[0] == IMAGE_REPO:
            continue
        for a in side.get("args", []):
            sock = None
            if a.startswith("--csi-address="):
                sock = pod.local_path(side, a.split("=", 1)[1])
                what = f"{side['name']} --csi-address"
            elif a.startswith("--kubelet-registration-path="):
                sock = pod.host_path(a.split("=", 1)[1])
                what = f"{side['name']} --kubelet-registration-path (host)"
            if sock is None:
                continue
            if not wait_for(lambda: os.path.exists(sock), f"{pod.name}: {what} {sock}", [pod]):
                continue
            calls = [("Probe", '"ready": true'), ("GetPluginInfo", f'"name": "{driver}"')]
            if "csi-snapshot-metadata" in side["image"]:
                # The sidecar exits unless the driver advertises the service.
                calls.append(("GetPluginCapabilities", "SNAPSHOT_METADATA_SERVICE"))
            for method, want in calls:
                rc, out = grpcurl(["-plaintext", "-unix", "-authority", "localhost", "-import-path", CSI_PROTO_DIR, "-proto", "csi.proto",
                                   "-d", "{}", sock, f"csi.v1.Identity/{method}"])
                if rc != 0 or want not in out:
                    fail(f"{pod.name}: {what}: CSI {method} did not answer {want}: {out.strip()}")
                else:
                    ok(f"{pod.name}: {what} answers CSI {method}")
    # Declared ports.
    declared = {}
    for c in pod.spec["containers"]:
        for port in c.get("ports", []):
            declared[port.get("name")] = (c, port["containerPort"])
    for c, p, log in pod.procs:
        for port in c.get("ports", []):
            local = pod.ports.get(port["containerPort"])
            if local is None:
                fail(f"{pod.name}/{c['name']}: port {port['name']} {port['containerPort']} is in no argument")
                continue
            if port["name"] == "metrics":
                url = f"http://127.0.0.1:{local}/metrics"

                def up():
                    try:
                        with urllib.request.urlopen(url, timeout=2) as r:
                            return r.status == 200 and b"# TYPE" in r.read()
                    except OSError:
                        return False

                if wait_for(up, f"{pod.name}: metrics at {url}", [pod]):
                    ok(f"{pod.name}: port metrics serves /metrics")
                continue
            target = f"127.0.0.1:{local}"

            def serving():
                rc, out = grpcurl(tls_args(pod, c) + [target, "grpc.health.v1.Health/Check"])
                return rc == 0 and "SERVING" in out

            if wait_for(serving, f"{pod.name}: gRPC health on port {port['name']} ({target})", [pod]):
                ok(f"{pod.name}: port {port['name']} answers gRPC health")
    # Exec probes of the cowsnap containers run as rendered.
    for c, p, log in pod.procs:
        env = dict(os.environ)
        env.update(pod.env_of(c))
        for kind in ("readinessProbe", "livenessProbe"):
            cmd = ((c.get(kind) or {}).get("exec") or {}).get("command")
            if not cmd:
                continue
            cmd = [pod.expand(pod.rewrite(c, a), env) for a in cmd]
            if cmd[0] == "cowsnap":
                cmd[0] = COWSNAP

            def probe_passes():
                return subprocess.run(cmd, env=env, capture_output=True, text=True).returncode == 0

            if wait_for(probe_passes, f"{pod.name}/{c['name']}: {kind} {' '.join(cmd[1:])}", [pod]):
                ok(f"{pod.name}/{c['name']}: {kind} (exec) passes")
    # Probes name declared ports.
    for c in pod.spec["containers"]:
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe or "exec" in probe:
                continue
            port = (probe.get("httpGet") or probe.get("grpc") or {}).get("port")
            names = {n for n in declared} | {cp for _, cp in declared.values()}
            if port not in names:
                fail(f"{pod.name}/{c['name']}: {kind} port {port} is no container port of the pod")
    # Services select this pod with served target ports.
    labels = pod.obj["spec"]["template"]["metadata"]["labels"]
    for s in objs:
        if s["kind"] != "Service":
            continue
        sel = s["spec"].get("selector", {})
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            for sp in s["spec"]["ports"]:
                if sp["targetPort"] not in declared:
                    fail(f"Service/{s['metadata']['name']}: targetPort {sp['targetPort']} is no port of {pod.name}")


def arg_value(c, flag):
    return next((a.split("=", 1)[1] for a in c.get("args", []) if a.startswith(f"{flag}=")), None)


def check_workers(control, workers_pod, objs):
    """The DaemonSet's worker registered itself (its log, and ListWorkers
    on the control service shows it HEALTHY at its advertised address);
    the workers of control.workers are HEALTHY too."""
    c, _, _ = control.procs[0]
    wc, _, wlog = workers_pod.procs[0]
    static = next((e["value"] for e in c.get("env", []) if e["name"] == "COWSNAP_WORKERS"), "")
    register_with = arg_value(wc, "--register-with")
    if not register_with:
        fail(f"{workers_pod.name}: the worker is not given --register-with")
        return
    env = workers_pod.env_of(wc)
    advertise = workers_pod.expand(workers_pod.rewrite(wc, arg_value(wc, "--advertise") or ""), env)
    node = workers_pod.expand(arg_value(wc, "--node") or "", env)
    api = control.ports[next(p["containerPort"] for p in c["ports"] if p["name"] == "api")]
    args = tls_args(control, c)
    token_arg = arg_value(c, "--auth-token-file")
    if token_arg:
        with open(control.local_path(c, token_arg)) as f:
            args += ["-H", f"authorization: Bearer {f.read().strip()}"]
    # Every static address is the same worker here (one node).
    want = {f"workers/{node}": advertise}
    seen = {}

    def healthy():
        rc, out = grpcurl(args + [f"127.0.0.1:{api}", "cowsnap.v1.WorkerService/ListWorkers"])
        if rc != 0:
            return False
        seen.clear()
        for w in json.loads(out or "{}").get("workers", []):
            seen[w["name"]] = (w.get("address"), w.get("health"))
        return all(seen.get(n) == (a, "HEALTHY") for n, a in want.items())

    how = "and the static control.workers list" if static else "without a static worker list"
    if wait_for(healthy, f"{control.name}: {want} HEALTHY in ListWorkers (seen {seen})", [control, workers_pod], secs=60):
        ok(f"{control.name}: ListWorkers shows the worker {list(want)[0]} at {advertise} HEALTHY ({how})")
    with open(wlog) as f:
        text = f.read()
    if "registered with the control service" in text:
        ok(f"{workers_pod.name}: the worker registered itself with {register_with}")
    else:
        fail(f"{workers_pod.name}: the worker did not register itself with {register_with}:\n{text[-3000:]}")


def service_hosts(objs, pods):
    """"NAME.NAMESPACE.svc:PORT" (and .cluster.local) of every Service ->
    the container port it targets in the pod it selects."""
    out = {}
    for s in objs:
        if s["kind"] != "Service":
            continue
        sel = s["spec"].get("selector", {})
        for pod in pods:
            labels = pod.obj["spec"]["template"]["metadata"]["labels"]
            if not sel or not all(labels.get(k) == v for k, v in sel.items()):
                continue
            named = {p.get("name"): p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])}
            for sp in s["spec"]["ports"]:
                t = sp["targetPort"]
                cp = named.get(t) if isinstance(t, str) else t
                if cp is None:
                    continue
                base = f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc"
                for h in (base, base + ".cluster.local"):
                    out[f"{h}:{sp['port']}"] = cp
    return out


def check_control_names(control, register_with):
    """The control certificate names the host the workers register with."""
    m = re.match(r"https://([^:/]+):", register_with or "")
    if not m:
        return
    c, _, _ = control.procs[0]
    cert = control.local_path(c, arg_value(c, "--tls-cert"))
    r = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", cert], capture_output=True, text=True)
    if f"DNS:{m.group(1)}" in r.stdout:
        ok(f"{control.name}: its certificate names {m.group(1)}, which workers register with")
    else:
        fail(f"{control.name}: its certificate does not name {m.group(1)} (workers register with {register_with}): {r.stdout}{r.stderr}")


def run_set(name, path, base):
    print(f"--- drift, {name}")
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    driver = next(o["metadata"]["name"] for o in objs if o["kind"] == "CSIDriver")
    for o in objs:
        if o["kind"] == "StorageClass" and o["provisioner"] != driver:
            fail(f"StorageClass/{o['metadata']['name']}: provisioner {o['provisioner']} is not {driver}")
        if o["kind"] == "VolumeSnapshotClass" and o["driver"] != driver:
            fail(f"VolumeSnapshotClass/{o['metadata']['name']}: driver {o['driver']} is not {driver}")
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v) for k, v in o.get("data", {}).items()}
        for o in objs
        if o["kind"] == "Secret"
    }
    root = tempfile.mkdtemp(prefix=f"{name[:4]}.", dir=base)
    # Secrets the pods use that the chart does not render: made here.
    wanted = set()
    for o in objs:
        if o["kind"] in ("StatefulSet", "DaemonSet"):
            for v in o["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in v:
                    wanted.add(v["secret"]["secretName"])
    material = None
    control_hosts = [f"{o['metadata']['name']}.{o['metadata']['namespace']}.svc" for o in objs if o["kind"] == "Service"]
    for s in sorted(wanted - set(secrets)):
        material = material or openssl_material(os.path.join(root, "openssl"), control_hosts)
        secrets[s] = dict(material) if "tls" in s else {"token": b"drift-token-0123456789"}
        print(f"    Secret {s} is made outside the chart: test material from openssl")
    ports = {}
    services = {}
    pods = [PodRun(o, secrets, os.path.join(root, o["kind"][0].lower()), ports, services)
            for o in objs if o["kind"] in ("DaemonSet", "StatefulSet")]
    services.update(service_hosts(objs, pods))
    # Workers first: they register themselves once the control service is
    # up, and it registers control.workers at start.
    pods.sort(key=lambda p: p.obj["kind"] != "DaemonSet")
    control = next(p for p in pods if p.obj["kind"] == "StatefulSet")
    workers_pod = next(p for p in pods if p.obj["kind"] == "DaemonSet")
    try:
        for p in pods:
            p.start()
            if p is control:
                cdir = None
                for c, _, _ in p.procs:
                    ca = next((a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--tls-ca=")), None)
                    if ca:
                        cdir = os.path.dirname(p.local_path(c, ca))
                PodRun.control_client = (os.path.join(cdir, "control.crt"), os.path.join(cdir, "control.key")) if cdir else None
        # The control pod's files exist now for the worker's client certificate.
        for p in pods:
            check_pod(p, objs, driver)
        if control.procs and workers_pod.procs:
            check_control_names(control, arg_value(workers_pod.procs[0][0], "--register-with"))
            check_workers(control, workers_pod, objs)
    finally:
        for p in pods:
            p.stop()
        if not failures:
            shutil.rmtree(root, ignore_errors=True)


def main():
    render_dir = sys.argv[1]
    if not os.access(COWSNAP, os.X_OK):
        print(f"drift: no cowsnap binary at {COWSNAP} (set COWSNAP)")
        sys.exit(1)
    base = tempfile.mkdtemp(prefix="cowsnap-drift.")
    for f in sorted(os.listdir(render_dir)):
        if f.endswith(".yaml"):
            run_set(f[: -len(".yaml")], os.path.join(render_dir, f), base)
    if failures:
        print(f"drift: {len(passes)} passed, {len(failures)} failed (logs under {base})")
        sys.exit(1)
    shutil.rmtree(base, ignore_errors=True)
    print(f"drift: {len(passes)} passed, 0 failed: the chart's commands run on this cowsnap")


if __name__ == "__main__":
    main()
