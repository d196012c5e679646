"""The image-mode kubelet's rules that need no cluster: expansion, command, user, env, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubelora.devenv import kubelet, podrunner


def test_expand_follows_kubernetes_rules():
    env = {"A": "x", "B": "y"}.get
    assert kubelet.expand("$(A)-$(B)", env) == "x-y"
    assert kubelet.expand("$(C)", env) == "$(C)"  # undefined stays
    assert kubelet.expand("$$(A)", env) == "$(A)"  # escaped
    assert kubelet.expand("$$", env) == "$"
    assert kubelet.expand("a$b", env) == "a$b"
    assert kubelet.expand("$(A", env) == "$(A"
    assert kubelet.expand("end$", env) == "end$"


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (None, None, ["/entry", "--flag", "cmd-default"]),
        (["/bin/run"], None, ["/bin/run"]),
        (None, ["--mine"], ["/entry", "--flag", "--mine"]),
        (["/bin/run"], ["a", "$(X)"], ["/bin/run", "a", "x-value"]),
    ],
)
def test_command_replaces_entrypoint_and_args_replace_cmd(command, args, expected):
    image = {"Entrypoint": ["/entry", "--flag"], "Cmd": ["cmd-default"]}
    container = {"name": "c", "command": command, "args": args}
    assert kubelet.container_command(container, image, {"X": "x-value"}) == expected


def _pod(security=None):
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"a": "1"}, "annotations": {"n": "v"}},
        "spec": {"securityContext": security or {}, "nodeName": "node-1", "serviceAccountName": "sa"},
        "status": {"podIP": "127.1.0.9", "hostIP": "10.0.0.1"},
    }


def test_user_from_security_context_else_image():
    image = {"User": "65532:65532"}
    assert kubelet.container_user(_pod(), {"name": "c"}, image) == "65532:65532"
    assert kubelet.container_user(_pod({"runAsUser": 1000}), {"name": "c"}, image) == "1000"
    pod = _pod({"runAsUser": 1000, "runAsGroup": 2000})
    assert kubelet.container_user(pod, {"name": "c", "securityContext": {"runAsUser": 7}}, image) == "7:2000"
    assert kubelet.container_user(_pod(), {"name": "c"}, {}) == "0"


def test_run_as_non_root_refuses_root_like_the_kubelet():
    with pytest.raises(kubelet.StartError) as info:
        kubelet.container_user(_pod({"runAsNonRoot": True}), {"name": "c"}, {})
    assert info.value.reason == "CreateContainerConfigError"
    assert "container has runAsNonRoot and image will run as root" in info.value.message
    with pytest.raises(kubelet.StartError, match="non-numeric user"):
        kubelet.container_user(_pod({"runAsNonRoot": True}), {"name": "c"}, {"User": "app"})


class FakeLookup:
    def __init__(self, secrets, configmaps):
        self.secrets, self.configmaps = secrets, configmaps

    def secret(self, name):
        return self.secrets.get(name)

    def configmap(self, name):
        return self.configmaps.get(name)

    def allocatable(self):
        return {"cpu": "96", "memory": "1100Gi"}


def test_env_sources_and_the_kubelets_error_messages():
    lookup = FakeLookup({"s": {"k": "secret-value"}}, {"cm": {"mode": "fast", "other": "o"}})
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-$(CM_mode)-$(KUBERNETES_SERVICE_HOST)"},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nope", "optional": True}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['n']"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
    }
    env = kubelet.container_env(_pod(), container, lookup, kubelet.service_env("127.0.0.1", 6443))  # type: ignore[arg-type]
    assert env["B"] == "a-fast-127.0.0.1"
    assert env["S"] == "secret-value"
    assert "OPT" not in env
    assert env["IP"] == "127.1.0.9"
    assert env["NOTE"] == "v"
    assert env["CPU"] == "96"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"
    missing_key = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]}
    with pytest.raises(kubelet.StartError, match=r"^couldn't find key token in Secret ns/s$"):
        kubelet.container_env(_pod(), missing_key, lookup, {})  # type: ignore[arg-type]
    missing = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]}
    with pytest.raises(kubelet.StartError, match=r'^secret "gone" not found$'):
        kubelet.container_env(_pod(), missing, lookup, {})  # type: ignore[arg-type]
    cm = {"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "zz"}}}]}
    with pytest.raises(kubelet.StartError, match=r"^couldn't find key zz in ConfigMap ns/cm$"):
        kubelet.container_env(_pod(), cm, lookup, {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("returncode", "output", "code", "rest"),
    [
        (0, b"ok\n", 0, b"ok\n"),
        (
            3,
            b"out\nsubprocess exited with status 3\nsubprocess exited with status 3\nError: exit status 3\n",
            3,
            b"out\n",
        ),
        (1, b"x\nsubprocess exited on killed\nsubprocess exited with status 1\nError: exit status 1\n", 137, b"x\n"),
        (
            1,
            b"nonl" + b"subprocess exited on terminated\nsubprocess exited with status 1\nError: exit status 1\n",
            143,
            b"nonl",
        ),
        (-9, b"partial", 137, b"partial"),
    ],
)
def test_exit_codes_from_buildah_and_its_trailer_removed(tmp_path: Path, returncode, output, code, rest):
    log = tmp_path / "0.log"
    log.write_bytes(output)
    assert kubelet.parse_exit(returncode, log) == (code, None)
    assert log.read_bytes() == rest


def test_a_command_that_cannot_start_is_a_start_error(tmp_path: Path):
    log = tmp_path / "0.log"
    log.write_bytes(
        b"process failed to start with error: fork/exec /nope: no such file or directory"
        b"process exited with error: exec: not startedsubprocess exited with status 1\nError: exit status 1\n"
    )
    code, message = kubelet.parse_exit(1, log)
    assert code == 128
    assert message == "fork/exec /nope: no such file or directory"


def test_termination_message_falls_back_to_the_last_log_lines(tmp_path: Path):
    log = tmp_path / "0.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    container = kubelet.Container({"name": "c", "terminationMessagePolicy": "FallbackToLogsOnError"}, False)
    container.log_path = log
    message = kubelet.termination_message(container, 1)
    assert message.endswith("line 199\n")
    assert len(message.encode()) <= kubelet.FALLBACK_BYTES
    assert "line 119\n" not in message  # only the last 80 lines
    assert kubelet.termination_message(container, 0) == ""  # success: no fallback
    file = tmp_path / "term"
    file.write_text("from the file")
    container.termination_file = file
    assert kubelet.termination_message(container, 1) == "from the file"


def test_image_names_match_exactly_or_in_local_forms():
    assert kubelet.image_candidates("ghcr.io/kubelora/trainer:0.1.0") == ["ghcr.io/kubelora/trainer:0.1.0"]
    forms = kubelet.image_candidates("kubelora-base:bookworm")
    assert forms[0] == "kubelora-base:bookworm"
    assert "localhost/kubelora-base:bookworm" in forms
    assert "localhost/busybox:latest" in kubelet.image_candidates("busybox")


def test_label_selectors():
    match = podrunner._matches
    assert match({"a": "1"}, podrunner.parse_selector("a=1"))
    assert match({"a": "1"}, podrunner.parse_selector(""))
    assert not match({"a": "1"}, podrunner.parse_selector("!a"))
    assert match({"b": "1"}, podrunner.parse_selector(podrunner.NOT_SERVING))
    assert not match({podrunner.POD_LABEL: "vllm"}, podrunner.parse_selector(podrunner.NOT_SERVING))
    assert match({"a": "2"}, podrunner.parse_selector("a!=1,a"))


def test_mount_destinations_resolve_symlinks_inside_the_root(tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("/run")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "current").symlink_to("../srv/v1")
    resolve = kubelet.resolve_in_root
    assert (
        resolve(tmp_path, "/var/run/secrets/kubernetes.io/serviceaccount")
        == "/run/secrets/kubernetes.io/serviceaccount"
    )
    assert resolve(tmp_path, "/opt/current/data") == "/srv/v1/data"
    assert resolve(tmp_path, "/../../etc/x") == "/etc/x"  # never leaves the root
    assert resolve(tmp_path, "/plain/dir") == "/plain/dir"


def test_executables_are_looked_up_inside_the_root(tmp_path: Path):
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    tool = tmp_path / "usr" / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (tmp_path / "usr" / "bin" / "sh").symlink_to("/usr/bin/tool")  # absolute: resolved inside the root
    assert kubelet.find_executable(tmp_path, "tool", "/usr/local/bin:/usr/bin")
    assert kubelet.find_executable(tmp_path, "/bin/sh", "")
    assert not kubelet.find_executable(tmp_path, "tool", "/usr/local/bin")
    assert not kubelet.find_executable(tmp_path, "/bin/missing", "")


def _net_pod(name, ip, labels=None, hostname=None, subdomain=None, ready=False, phase="Running"):
    spec = {"containers": [{"name": "c"}]}
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    meta = {"name": name, "namespace": "ns", "uid": name, "labels": labels or {}}
    return {"metadata": meta, "spec": spec, "status": status}


def test_hosts_file_is_the_kubelets_plus_the_headless_services_dns_names():
    from kubelora.devenv.kubelet import hosts

    plain = hosts.content(_net_pod("web-abc", "127.2.0.4"), [])
    assert plain.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert plain.splitlines()[-1] == "127.2.0.4\tweb-abc"
    pod = _net_pod("job-1-xyz", "127.2.1.3", hostname="job-1", subdomain="svc")
    pod["spec"]["hostAliases"] = [{"ip": "10.1.2.3", "hostnames": ["a.example", "b.example"]}]
    records = [("job-0", "127.2.0.2"), ("job-1", "127.2.1.3")]
    text = hosts.content(pod, records)
    lines = text.splitlines()
    # Its own line first (the FQDN is the canonical name), with the short forms the search path would give.
    own = "127.2.1.3\tjob-1.svc.ns.svc.cluster.local\tjob-1.svc.ns.svc\tjob-1.svc.ns\tjob-1.svc\tjob-1"
    assert lines.index(own) < lines.index("10.1.2.3\ta.example\tb.example")
    assert "127.2.0.2\tjob-0.svc.ns.svc.cluster.local\tjob-0.svc.ns.svc\tjob-0.svc.ns\tjob-0.svc" in lines
    # The Service's own names resolve to every endpoint, as a headless Service's A records.
    assert [line.split("\t")[0] for line in lines if line.endswith("\tsvc")] == ["127.2.0.2", "127.2.1.3"]
    # No subdomain: peers are not listed (their names come from DNS only under a Service).
    assert "job-0" not in hosts.content(_net_pod("other", "127.2.0.9"), records)


def test_service_endpoints_follow_the_endpointslice_controllers_rules():
    from kubelora.devenv.kubelet import hosts

    service = {"metadata": {"name": "svc", "namespace": "ns"}, "spec": {"clusterIP": "None", "selector": {"a": "b"}}}
    pods = [
        _net_pod("p0", "127.2.0.2", hostname="job-0", subdomain="svc"),  # not ready
        _net_pod("p1", "127.2.0.3", hostname="job-1", subdomain="svc", ready=True),
        _net_pod("p2", "127.2.0.4", hostname="job-2", subdomain="other", ready=True),  # another subdomain: no name
        _net_pod("p3", "", hostname="job-3", subdomain="svc", ready=True),  # no IP yet
        _net_pod("p4", "127.2.0.6", hostname="job-4", subdomain="svc", ready=True, phase="Succeeded"),
    ]
    assert hosts.service_records(service, pods) == [("", "127.2.0.4"), ("job-1", "127.2.0.3")]
    service["spec"]["publishNotReadyAddresses"] = True
    assert hosts.service_records(service, pods) == [("", "127.2.0.4"), ("job-0", "127.2.0.2"), ("job-1", "127.2.0.3")]


def test_hosts_file_is_rewritten_in_place_for_its_bind_mount(tmp_path: Path):
    from kubelora.devenv.kubelet import hosts

    path = tmp_path / "etc-hosts"
    assert hosts.write_in_place(path, "a\n")
    inode = path.stat().st_ino
    assert hosts.write_in_place(path, "a\nb\n") and path.read_text() == "a\nb\n"
    assert not hosts.write_in_place(path, "a\nb\n")
    assert hosts.write_in_place(path, "c\n") and path.read_text() == "c\n"
    assert path.stat().st_ino == inode and oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_mounted_hosts_file_is_not_replaced_by_buildahs(tmp_path: Path):
    from kubelora.devenv.kubelet import run_command

    (tmp_path / "etc").mkdir()
    args = ("buildah", "c", tmp_path, ["true"], {}, "0", "/", "h")
    command, _ = run_command(*args, [(tmp_path / "hosts", "/etc/hosts", True)], tmp_path / "log")
    assert "--no-hosts" in command and f"{tmp_path / 'hosts'}:/etc/hosts:ro" in command
    command, _ = run_command(*args, [], tmp_path / "log")
    assert "--no-hosts" not in command
