"""Build the upstream programs the local environment runs, from pinned versions, with Go.

There is no Docker engine and no binary downloads here, so etcd, the Kubernetes control
plane, kwok, MinIO, Helm, actionlint and glua are compiled through the Go module proxy that
``go env GOPROXY`` names, and cached by version under ``$XDG_CACHE_HOME/kubelora/bin``. A warm
cache makes every build a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"
KWOK_VERSION = "v0.8.0"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
HELM_VERSION = "v3.22.0"
ACTIONLINT_VERSION = "v1.7.12"
# gopher-lua, the Lua interpreter Argo CD embeds for resource health checks; v1.1.1 is the release
# Argo CD's own go.mod requires.
GLUA_VERSION = "v1.1.1"
# Kueue, the job queue of docs/gpu-cluster.md (tests/queueing). Its CRDs come from the same module's source.
KUEUE_VERSION = "v0.17.0"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubelora"


def bin_root() -> Path:
    return cache_root() / "bin"


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def directory(self) -> Path:
        return bin_root() / f"{self.name}-{self.version}"

    def path(self, binary: str | None = None) -> Path:
        return self.directory / (binary or self.binaries[0])

    def is_built(self) -> bool:
        return all((self.directory / b).is_file() for b in self.binaries)


KUBERNETES = Tool(
    "kubernetes",
    KUBERNETES_VERSION,
    ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
)
ETCD = Tool("etcd", ETCD_VERSION, ("etcd",))
KWOK = Tool("kwok", KWOK_VERSION, ("kwok", "kwokctl"))
MINIO = Tool("minio", MINIO_VERSION, ("minio",))
HELM = Tool("helm", HELM_VERSION, ("helm",))
# Lints .github/workflows (tests/images/test_release_workflow.py).
ACTIONLINT = Tool("actionlint", ACTIONLINT_VERSION, ("actionlint",))
# Runs the Argo CD health checks of docs/gitops.md (tests/helm/test_gitops_lua.py).
GLUA = Tool("glua", GLUA_VERSION, ("glua",))
# Admits suspended Jobs against ClusterQueue quotas (tests/queueing, kubelora.devenv.kueue).
KUEUE = Tool("kueue", KUEUE_VERSION, ("kueue",))
ALL_TOOLS = (ETCD, KUBERNETES, KWOK, MINIO, HELM, ACTIONLINT, GLUA, KUEUE)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOTOOLCHAIN"] = "local"
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-mod=mod")
    return env


def _run(cmd: list[str], cwd: Path | None, log: Path, heartbeat_seconds: float = 60.0) -> None:
    """Run a build step into its log, saying every minute that it is still going."""
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                proc.wait(timeout=heartbeat_seconds)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                print(f"Still building step={cmd[1]} elapsed={elapsed:.0f}s log={log}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"Command failed: {' '.join(cmd)} (log={log})\n{tail}")


def go_proxy() -> str:
    """The first HTTP(S) module proxy in ``go env GOPROXY``: the one Go itself is configured with.

    The Kubernetes build reads ``k8s.io/kubernetes``'s go.mod from it directly, so a GOPROXY of
    ``off`` or only ``direct`` cannot work and fails here with what to set instead.
    """
    try:
        result = subprocess.run(["go", "env", "GOPROXY"], capture_output=True, text=True, env=_go_env(), check=False)
    except FileNotFoundError as exc:
        raise RuntimeError("Go is not installed: building the tools needs Go 1.26 or newer on PATH") from exc
    if result.returncode != 0:
        raise RuntimeError(f"`go env GOPROXY` failed: {result.stderr.strip()}")
    proxy = result.stdout.strip()
    for entry in proxy.replace("|", ",").split(","):
        entry = entry.strip()
        if entry.startswith(("http://", "https://")):
            return entry.rstrip("/")
    raise RuntimeError(
        f"GOPROXY={proxy!r} names no HTTP(S) Go module proxy, and the tool builds need one (the Kubernetes "
        "build reads k8s.io/kubernetes's go.mod from it). Point Go at the module proxy or mirror you use, "
        "e.g. `go env -w GOPROXY=https://go-mirror.example.internal,direct`, or export GOPROXY."
    )


def _kubernetes_staging_modules(version: str) -> list[str]:
    """The staging modules k8s.io/kubernetes replaces with ./staging paths in its go.mod."""
    url = f"{go_proxy()}/k8s.io/kubernetes/@v/{version}.mod"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (the Go module proxy)
        text = response.read().decode()
    modules = []
    for line in text.splitlines():
        line = line.strip().removeprefix("replace").strip()
        if "=> ./staging/" in line:
            modules.append(line.split()[0])
    if not modules:
        raise RuntimeError(f"No staging modules found in {url}")
    return modules


def _wrapper_module(workdir: Path, module: str, require: dict[str, str], replace: dict[str, str]) -> None:
    lines = [f"module {module}", "", "go 1.26.0", "", "require ("]
    lines += [f"\t{m} {v}" for m, v in require.items()]
    lines += [")", ""]
    if replace:
        lines.append("replace (")
        lines += [f"\t{m} => {target}" for m, target in replace.items()]
        lines.append(")")
    (workdir / "go.mod").write_text("\n".join(lines) + "\n")
    (workdir / "tools.go").write_text("package tools\n")


def _build_kubernetes(tool: Tool, workdir: Path, log: Path) -> None:
    minor = tool.version.lstrip("v").split(".")[1]
    staging_version = "v0." + ".".join(tool.version.lstrip("v").split(".")[1:])
    replace = {m: f"{m} {staging_version}" for m in _kubernetes_staging_modules(tool.version)}
    _wrapper_module(workdir, "kubelora.dev/build/kubernetes", {"k8s.io/kubernetes": tool.version}, replace)
    _run(["go", "mod", "download", "k8s.io/kubernetes"], workdir, log)
    stamp = {
        "gitVersion": tool.version,
        "gitMajor": "1",
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    ldflags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += [f"-X {pkg}.{k}={v}" for k, v in stamp.items()]
    packages = [f"k8s.io/kubernetes/cmd/{b}" for b in tool.binaries]
    _run(
        ["go", "build", "-trimpath", "-ldflags", " ".join(ldflags), "-o", str(workdir / "out") + "/", *packages],
        workdir,
        log,
    )


def _build_etcd(tool: Tool, workdir: Path, log: Path) -> None:
    _wrapper_module(workdir, "kubelora.dev/build/etcd", {"go.etcd.io/etcd/server/v3": tool.version}, {})
    _run(["go", "mod", "download", "go.etcd.io/etcd/server/v3"], workdir, log)
    _run(
        [
            "go",
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(workdir / "out" / "etcd"),
            "go.etcd.io/etcd/server/v3",
        ],
        workdir,
        log,
    )


def _go_install(packages: list[str]) -> object:
    def build(tool: Tool, workdir: Path, log: Path) -> None:
        out = workdir / "out"
        out.mkdir(exist_ok=True)
        env_cmd = ["env", f"GOBIN={out}", "GOFLAGS="]
        for pkg in packages:
            _run([*env_cmd, "go", "install", "-trimpath", "-ldflags", "-s -w", f"{pkg}@{tool.version}"], workdir, log)

    return build


BUILDERS = {
    "kubernetes": _build_kubernetes,
    "etcd": _build_etcd,
    "kwok": _go_install(["sigs.k8s.io/kwok/cmd/kwok", "sigs.k8s.io/kwok/cmd/kwokctl"]),
    "minio": _go_install(["github.com/minio/minio"]),
    "helm": _go_install(["helm.sh/helm/v3/cmd/helm"]),
    "actionlint": _go_install(["github.com/rhysd/actionlint/cmd/actionlint"]),
    "glua": _go_install(["github.com/yuin/gopher-lua/cmd/glua"]),
    "kueue": _go_install(["sigs.k8s.io/kueue/cmd/kueue"]),
}


def build(tool: Tool) -> Path:
    """Build one tool into its versioned cache folder, atomically; a no-op when cached."""
    if tool.is_built():
        return tool.directory
    bin_root().mkdir(parents=True, exist_ok=True)
    log = cache_root() / "logs" / f"{tool.name}-{tool.version}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    with tempfile.TemporaryDirectory(dir=bin_root(), prefix=f".build-{tool.name}-") as tmp:
        workdir = Path(tmp)
        BUILDERS[tool.name](tool, workdir, log)  # type: ignore[operator]
        out = workdir / "out"
        missing = [b for b in tool.binaries if not (out / b).is_file()]
        if missing:
            raise RuntimeError(f"Build of {tool.name} produced no {missing} (log={log})")
        staged = bin_root() / f".staged-{tool.name}-{tool.version}"
        shutil.rmtree(staged, ignore_errors=True)
        out.rename(staged)
        shutil.rmtree(tool.directory, ignore_errors=True)
        staged.rename(tool.directory)
    return tool.directory


def _progress(tools: list[Tool]) -> Iterator[Tool]:
    total = len(tools)
    for index, tool in enumerate(tools, 1):
        cached = tool.is_built()
        state = "cached" if cached else "building (cold builds take minutes on 2 cores)"
        print(f"[{index}/{total}] {tool.name} {tool.version}: {state}", file=sys.stderr, flush=True)
        yield tool


def build_all(tools: tuple[Tool, ...] = ALL_TOOLS) -> dict[str, Path]:
    """Build every tool, showing which one is under way and how long each took."""
    try:
        import rich.progress as rich_progress
    except ImportError:  # the bootstrap may run before the virtualenv exists
        rich_progress = None  # type: ignore[assignment]
    todo = [t for t in tools if not t.is_built()]
    result = {t.name: t.directory for t in tools if t.is_built()}
    if not todo:
        return result
    if rich_progress is None or not sys.stderr.isatty():
        for tool in _progress(todo):
            started = time.monotonic()
            result[tool.name] = build(tool)
            print(
                f"Built tool={tool.name} version={tool.version} seconds={time.monotonic() - started:.0f}",
                file=sys.stderr,
                flush=True,
            )
        return result
    columns = (
        rich_progress.SpinnerColumn(),
        rich_progress.TextColumn("{task.description}"),
        rich_progress.BarColumn(),
        rich_progress.TimeElapsedColumn(),
    )
    with rich_progress.Progress(*columns) as progress:
        overall = progress.add_task("Building tools", total=len(todo))
        for tool in todo:
            progress.update(overall, description=f"Building {tool.name} {tool.version}")
            result[tool.name] = build(tool)
            progress.advance(overall)
    return result


if __name__ == "__main__":
    names = set(sys.argv[1:])
    selected = tuple(t for t in ALL_TOOLS if not names or t.name in names)
    for name, path in build_all(selected).items():
        print(f"{name}\t{path}")
